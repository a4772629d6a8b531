"""Which latents are on: BatchTopK (over the batch), TopK (per token), and BatchTopK's inference threshold θ.

`kth_largest` finds the k-th largest of non-negative scores exactly, by bisection on their float
bits: for s ≥ 0 the uint32 bit patterns order like the floats, so 31 rounds of "how many scores
are ≥ t" pin the value. Each round is an elementwise compare and a sum, which XLA partitions like
any reduction: in the dense train step, with `s [B, m]` sharded over ('data', 'latent'), every
device counts its own block and only a scalar (TopK: one count per token) is all-reduced, so the
score matrix is never gathered (docs/crosscoder.md, "Sharding") and every mesh selects exactly the same
latents. Inside `shard_map` (the pairs step, `pairs.py`), `axis_name` sums the counts over a mesh
axis instead. Ties at the cut-off are all kept (as `s >= cut` would).

`lax.top_k` serves where the latent axis is whole on each device: `topk_mask(method="top_k")`
(AuxK in the pairs step) and the pairs step's per-token candidates, whose k·B-th largest is again
found by `kth_largest`. L1 codes need no mask (a ReLU; the penalty is in `objective.py`).

During training θ tracks the BatchTopK cut-off (`update_threshold`); at inference a latent is on
when its score exceeds θ (`threshold_mask`), so a token's codes do not depend on its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float

_BITS = 31  # non-negative float32s use the low 31 bits


def kth_largest(s: Float[ArrayLike, "... n"], k: int | Array, axis: tuple[int, ...] | int | None = None,
                axis_name: str | None = None) -> Float[Array, "..."]:
  """The k-th largest value of non-negative `s` over `axis` (None: all), exactly, by bisection on its bits.

  Inside `shard_map`, `axis_name` names the mesh axis whose shards hold the rest of `s`: the
  counts are summed over it, so every shard gets the k-th largest of the whole array.
  """
  u = jax.lax.bitcast_convert_type(jnp.maximum(s, 0.0).astype(jnp.float32), jnp.uint32)
  keep = axis is not None
  shape = jnp.sum(u, axis=axis, keepdims=keep).shape if keep else ()
  lo = jnp.zeros(shape, jnp.uint32)  # count(u >= lo) >= k always
  hi = jnp.full(shape, 1 << _BITS, jnp.uint32)  # count(u >= hi) < k always (NaN-free inputs)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    count = jnp.sum(u >= mid, axis=axis, keepdims=keep, dtype=jnp.int32)
    if axis_name is not None:
      count = jax.lax.psum(count, axis_name)
    enough = count >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, _BITS, body, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def batch_topk_mask(s: Float[ArrayLike, "B m"], k: int) -> tuple[Bool[Array, "B m"], Float[Array, ""]]:
  """BatchTopK: keep the k·B largest scores of the whole batch; returns the mask and the cut-off score."""
  cut = kth_largest(s, k * s.shape[0])
  return (s >= cut) & (s > 0), cut


def topk_mask(s: Float[ArrayLike, "B m"], k: int, method: str = "bisect") -> Bool[Array, "B m"]:
  """TopK: keep the k largest scores of each token (ties at the k-th all kept).

  `method="top_k"` finds each token's k-th largest as the min of `lax.top_k` (the same value,
  ~2.5x faster on CPU), for arrays whose latent axis is not split over devices, where top_k would
  gather it.
  """
  if method == "top_k":
    cut = jnp.min(jax.lax.top_k(jnp.maximum(s, 0.0), k)[0], axis=-1, keepdims=True)
  elif method == "bisect":
    cut = kth_largest(s, k, axis=-1)
  else:
    raise ValueError(f"unknown TopK method {method!r}; choose 'bisect' or 'top_k'.")
  return (s >= cut) & (s > 0)


def threshold_mask(s: Float[ArrayLike, "B m"], theta: Float[ArrayLike, ""]) -> Bool[Array, "B m"]:
  """Inference-time BatchTopK: a latent is on when its score exceeds the tracked threshold θ."""
  return s > theta


def update_threshold(theta: Float[Array, ""], cut: Float[Array, ""], momentum: float) -> Float[Array, ""]:
  """θ ← momentum·θ + (1 − momentum)·cut: the running average of BatchTopK's cut-off score.

  A batch whose cut is ≤ 0 (fewer than k·B positive scores) says nothing about θ and leaves it as
  it is; θ starts (from 0) at the first positive cut rather than averaging up from 0.
  """
  avg = momentum * theta + (1 - momentum) * cut
  return jnp.where(cut <= 0, theta, jnp.where(theta <= 0, cut, avg))


__all__ = ["batch_topk_mask", "kth_largest", "threshold_mask", "topk_mask", "update_threshold"]
