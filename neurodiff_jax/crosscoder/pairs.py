"""Sparse codes as (token, latent) pairs: the training step's exact BatchTopK/TopK without dense decoding.

With k of m latents active per token (k/m = 0.4% at issue 5's benchmark size), four of the dense
step's five [B, D] × [D, m] matmuls multiply zeros: the decode, its two gradients and the
encoder's weight gradient. The pairs step keeps one dense matmul, the pre-activations `a`, which
the selection needs for every latent, and does everything after it on the selected pairs only:

  * selection: each token's `per_token` best scores by `lax.top_k`; the BatchTopK cut-off is the
    k·B-th largest of these candidates (`kth_largest`, its counts summed over the data shards).
    That is the cut-off of the whole [B, m] score matrix whenever every token's last candidate is
    below it, because then every score at or above it is a candidate. The selected candidates are
    packed token by token into `capacity` pairs (token, latent, a);
  * decode: x̂[t] = Σ_p f_p W_dec[j_p] + b_dec, a gather and a sorted segment-sum;
  * backward (custom VJPs): ∂f_p = W_dec[j_p]·∂x̂[t_p], ∂W_dec[j] = Σ_p f_p ∂x̂[t_p],
    ∂W_enc[:, j] = Σ_p ∂a_p x[t_p], ∂b_enc[j] = Σ_p ∂a_p, segment-sums over each latent's pairs.

When the pairs cannot hold the exact selection (a token with more than `per_token` latents at or
above the cut-off, more selected pairs than `capacity` on a shard, a TopK tie at the k-th score),
`overflow` is set and the caller takes the dense step for that batch instead, so the codes, the
loss and the gradients are those of the dense step either way (up to float summation order).

The selection and the reconstruction run under `shard_map` over the mesh's `data` axis, each
shard on its own tokens with the dictionary replicated; a dictionary split over `latent` takes the
dense step (`use_pairs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from neurodiff_jax.crosscoder import sparsity
from neurodiff_jax.crosscoder.model import CrosscoderConfig, Params, pre_activations, scores

STEPS = ("auto", "dense", "pairs")


class Pairs(NamedTuple):
  """The selected (token, latent) pairs of a batch, packed token by token."""

  tokens: Int[Array, "P"]  # the pair's token (row of its shard's batch), ascending; unused pairs: the last row
  latents: Int[Array, "P"]  # unused pairs: 0
  pre: Float[Array, "P"]  # the pre-activation a[token, latent]; unused pairs −1, so that f = relu(pre) = 0
  count: Int[Array, ""]  # pairs in use (over all shards)
  overflow: Bool[Array, ""]  # the pairs cannot hold the exact selection: take the dense step
  cut: Float[Array, ""]  # the BatchTopK cut-off score (0 for TopK)


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """How the pairs step runs: the mesh, candidates per token, and pair capacity per data shard."""

  mesh: jax.sharding.Mesh
  candidates: int = 0  # BatchTopK candidates of every token; 0 = 3·k
  heavy_fraction: float = 0.125  # the fraction of a shard's tokens that get `heavy_candidates`
  heavy_candidates: int = 0  # 0 = 16·k
  capacity_factor: float = 1.25  # pairs per shard = factor · k · (tokens per shard) when data > 1

  def tiers(self, cfg: CrosscoderConfig, tokens: int) -> tuple[int, int, int]:
    """(candidates per token, heavy tokens, candidates per heavy token) for a shard of `tokens` tokens."""
    m = cfg.dict_size
    per_token = min(self.candidates or 3 * cfg.k, m)
    heavy = min(math.ceil(self.heavy_fraction * tokens), tokens)
    return per_token, heavy, max(min(self.heavy_candidates or 16 * cfg.k, m), per_token)

  def capacity(self, cfg: CrosscoderConfig, tokens_per_shard: int) -> int:
    """Pairs per data shard: exactly k·B on one shard; with several, room for an uneven split of the k·B."""
    exact = cfg.k * tokens_per_shard
    if cfg.sparsity == "topk" or self.mesh.shape["data"] == 1:
      return exact
    return math.ceil(self.capacity_factor * exact)


def use_pairs(step: str, cfg: CrosscoderConfig, mesh: jax.sharding.Mesh) -> bool:
  """Whether the training step runs on pairs: `step` is auto | dense | pairs (config.train_step).

  "auto" takes pairs only where they were measured faster (`pairs_pay_off`).
  """
  if step not in STEPS:
    raise ValueError(f"unknown train_step {step!r}; choose one of {', '.join(STEPS)}.")
  possible = cfg.sparsity in ("batchtopk", "topk") and mesh.shape["latent"] == 1
  if step == "pairs" and not possible:
    raise ValueError(f"train_step='pairs' needs sparsity batchtopk or topk and a mesh without a latent split (got "
                     f"{cfg.sparsity!r}, mesh {dict(mesh.shape)}); use train_step='auto' or 'dense'.")
  if step == "auto":
    return possible and pairs_pay_off({d.platform for d in mesh.devices.flat})
  return possible and step != "dense"


def pairs_pay_off(platforms: set[str]) -> bool:
  """Whether the pairs step beats the dense one on these device platforms (what train_step="auto" takes).

  Measured (docs/benchmarks.md, train step): on 2 CPU cores at d = 256, m = 8192, k = 32 the pairs
  step takes 725 ms against the dense step's 1,763; on an H200 at Gemma 2 2B size the dense step's
  matmuls run at 94 % of the float32 peak (144 ms) while the pairs step's gathers and segment-sums
  take 463 ms. Other accelerators are assumed to be like the GPU until measured.
  """
  return platforms == {"cpu"}


def _pack(a: Float[Array, "T m"], counts: Int[Array, "T"], latent_at: Any, capacity: int) -> tuple[Array, ...]:
  """Packs each token's first `counts[t]` candidates, token by token, into `capacity` pairs.

  `latent_at(tokens, pos)` gives the latent of a token's pos-th candidate. Returns tokens, latents,
  pre-activations and the number of pairs in use.
  """
  T = counts.shape[0]
  ends = jnp.cumsum(counts)
  count = ends[-1]
  p = jnp.arange(capacity, dtype=jnp.int32)
  tokens = jnp.minimum(jnp.searchsorted(ends, p, side="right"), T - 1).astype(jnp.int32)
  pos = jnp.maximum(p - (ends[tokens] - counts[tokens]), 0)
  used = p < count
  latents = jnp.where(used, latent_at(tokens, pos), 0).astype(jnp.int32)
  pre = jnp.where(used, a[tokens, latents], -1.0).astype(a.dtype)
  return tokens, latents, pre, count


def _batchtopk_candidates(s: Float[Array, "T m"], k_total: int, per_token: int, heavy_tokens: int,
                          heavy_candidates: int, axis_name: str) -> tuple[Array, Array, Any, Array]:
  """(cut-off, selected per token, latent_at, short) of BatchTopK from two tiers of per-token candidates.

  Tier 1: every token's `per_token` best scores. Tier 2: the `heavy_tokens` tokens whose last tier-1
  candidate is highest (the only ones that can hold more above the cut-off) get their
  `heavy_candidates` best instead. `short`: some token may still have uncounted scores at or above
  the cut-off, so the pairs are not the exact selection.
  """
  # The last candidate of a token is taken as a min, never a slice: XLA:CPU (jaxlib 0.10.2) turns a
  # top_k whose outputs are sliced into a full sort, 3 s instead of 0.07 s at 2048 × 8192.
  T, m = s.shape
  cand, idx = jax.lax.top_k(s, per_token)
  last = jnp.min(cand, axis=1)
  if per_token >= m or heavy_tokens == 0:
    cut = sparsity.kth_largest(cand, k_total, axis_name=axis_name)
    short = jnp.any((last >= cut) & (last > 0)) if per_token < m else jnp.zeros((), bool)
    counts = jnp.sum((cand >= cut) & (cand > 0), axis=1, dtype=jnp.int32)
    return cut, counts, lambda t, pos: idx[t, jnp.minimum(pos, per_token - 1)], short
  _, heavy = jax.lax.top_k(last, heavy_tokens)  # [R] token ids
  cand2, idx2 = jax.lax.top_k(s[heavy], heavy_candidates)  # [R, K2]
  is_heavy = jnp.zeros((T,), bool).at[heavy].set(True)
  slot = jnp.zeros((T,), jnp.int32).at[heavy].set(jnp.arange(heavy_tokens, dtype=jnp.int32))
  cand = jnp.where(is_heavy[:, None], 0.0, cand)  # a heavy token's candidates are its tier-2 ones
  cut = sparsity.kth_largest(jnp.concatenate([cand.ravel(), cand2.ravel()]), k_total, axis_name=axis_name)
  short = jnp.any(~is_heavy & (last >= cut) & (last > 0))
  if heavy_candidates < m:
    last2 = jnp.min(cand2, axis=1)
    short = short | jnp.any((last2 >= cut) & (last2 > 0))
  counts = jnp.sum((cand >= cut) & (cand > 0), axis=1, dtype=jnp.int32)
  counts = counts.at[heavy].set(jnp.sum((cand2 >= cut) & (cand2 > 0), axis=1, dtype=jnp.int32))

  def latent_at(t, pos):
    light = idx[t, jnp.minimum(pos, per_token - 1)]
    return jnp.where(is_heavy[t], idx2[slot[t], jnp.minimum(pos, heavy_candidates - 1)], light)

  return cut, counts, latent_at, short


def _select_local(a: Float[Array, "T m"], s: Float[Array, "T m"], cfg: CrosscoderConfig, spec: PairSpec,
                  capacity: int, total_tokens: int, axis_name: str) -> Pairs:
  """One data shard's pairs (inside `shard_map`) from its pre-activations and scores: BatchTopK or TopK."""
  T, m = s.shape
  if cfg.sparsity == "batchtopk":
    per_token, heavy, heavy_candidates = spec.tiers(cfg, T)
    cut, counts, latent_at, short = _batchtopk_candidates(s, cfg.k * total_tokens, per_token, heavy, heavy_candidates,
                                                          axis_name)
  else:
    K = min(cfg.k + 1, m)
    cand, idx = jax.lax.top_k(s, K)  # sorted; read by reductions, not slices (see _batchtopk_candidates)
    cut = jnp.zeros((), jnp.float32)
    last = jnp.min(cand, axis=1)
    # A tie at the k-th score (the k-th and (k+1)-th equal): the dense TopK keeps every tied latent.
    tie = (jnp.sum(cand == last[:, None], axis=1) >= 2) & (last > 0)
    short = jnp.any(tie) if K > cfg.k else jnp.zeros((), bool)
    counts = jnp.minimum(jnp.sum(cand > 0, axis=1, dtype=jnp.int32), cfg.k)
    latent_at = lambda t, pos: idx[t, jnp.minimum(pos, cfg.k - 1)]  # noqa: E731
  tokens, latents, pre, count = _pack(a, counts, latent_at, capacity)
  overflow = jax.lax.pmax((short | (count > capacity)).astype(jnp.int32), axis_name) > 0
  return Pairs(tokens, latents, pre, jax.lax.psum(count, axis_name), overflow, cut)


def select(params: Params, x: Float[Array, "B M d"], cfg: CrosscoderConfig, spec: PairSpec,
           precision: Any = None) -> Pairs:
  """The batch's selected pairs (no gradient), each data shard's packed in its own `capacity` block."""
  params = jax.lax.stop_gradient(params)
  a = pre_activations(params, x, precision)
  shards = spec.mesh.shape["data"]
  fn = functools.partial(_select_local, cfg=cfg, spec=spec, capacity=spec.capacity(cfg, x.shape[0] // shards),
                         total_tokens=x.shape[0], axis_name="data")
  out_specs = Pairs(P("data"), P("data"), P("data"), P(), P(), P())
  return jax.shard_map(fn, mesh=spec.mesh, in_specs=(P("data"), P("data")), out_specs=out_specs)(a, scores(params, a))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode_pairs(w_dec: Float[Array, "m D"], f: Float[Array, "P"], tokens: Int[Array, "P"], latents: Int[Array, "P"],
                 num_tokens: int) -> Float[Array, "T D"]:
  """x̂[t] = Σ_{p: t_p = t} f_p W_dec[j_p] (float32; `tokens` ascending), differentiable in `w_dec` and `f`."""
  rows = w_dec[latents].astype(jnp.float32) * f.astype(jnp.float32)[:, None]
  return jax.ops.segment_sum(rows, tokens, num_tokens, indices_are_sorted=True)


def _decode_fwd(w_dec, f, tokens, latents, num_tokens):
  return decode_pairs(w_dec, f, tokens, latents, num_tokens), (w_dec, f, tokens, latents)


def _decode_bwd(num_tokens, res, g):
  w_dec, f, tokens, latents = res
  g_rows = g[tokens]  # [P, D]: each pair's token's cotangent
  g_f = jnp.sum(w_dec[latents].astype(jnp.float32) * g_rows, axis=-1)
  g_w = jax.ops.segment_sum(f.astype(jnp.float32)[:, None] * g_rows, latents, w_dec.shape[0])
  return g_w.astype(w_dec.dtype), g_f.astype(f.dtype), None, None


decode_pairs.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def encode_pairs(w_enc: Float[Array, "D m"], b_enc: Float[Array, "m"], x: Float[Array, "T D"], tokens: Int[Array, "P"],
                 latents: Int[Array, "P"], pre: Float[Array, "P"]) -> Float[Array, "P"]:
  """The pairs' pre-activations `pre` (= x[t_p] W_enc[:, j_p] + b_enc[j_p], computed by `select`).

  Differentiable in `w_enc` and `b_enc` only: `x` is data and `pre` the stopped value.
  """
  del w_enc, b_enc, x, tokens, latents
  return pre


def _encode_fwd(w_enc, b_enc, x, tokens, latents, pre):
  return pre, (w_enc, b_enc, x, tokens, latents)


def _encode_bwd(res, g):
  w_enc, b_enc, x, tokens, latents = res
  m = w_enc.shape[-1]
  g = g.astype(jnp.float32)
  g_w = jax.ops.segment_sum(g[:, None] * x[tokens].astype(jnp.float32), latents, m).T
  g_b = jax.ops.segment_sum(g, latents, m)
  return g_w.astype(w_enc.dtype), g_b.astype(b_enc.dtype), None, None, None, None


encode_pairs.defvjp(_encode_fwd, _encode_bwd)


def _varying(x: Any, axis_name: str) -> Any:
  """`x` (replicated inside shard_map) typed as varying over `axis_name`."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.lax.pvary(x, axis_name)


def reconstruct(params: Params, x: Float[Array, "B M d"], pairs: Pairs, spec: PairSpec) -> tuple[Array, Array]:
  """(x̂ [B, M, d] float32, which latents fired [m]) from the pairs; gradients reach `params` only."""
  w_enc, w_dec = params["w_enc"], params["w_dec"]
  m = w_dec.shape[0]

  def local(w_enc, b_enc, w_dec, x, tokens, latents, pre):
    T = x.shape[0]
    # Each shard's gradient of the replicated weights is its own part: marking them varying makes
    # shard_map's transpose sum those parts over `data`.
    w_enc, b_enc, w_dec = _varying((w_enc, b_enc, w_dec), "data")
    x2 = jax.lax.stop_gradient(x.reshape(T, -1))
    f = jax.nn.relu(encode_pairs(w_enc.reshape(-1, m), b_enc, x2, tokens, latents, pre))
    x_hat = decode_pairs(w_dec.reshape(m, -1), f, tokens, latents, T)
    fired = jax.ops.segment_sum((f > 0).astype(jnp.int32), latents, m)
    return x_hat.reshape(x.shape), jax.lax.psum(fired, "data") > 0

  fn = jax.shard_map(local, mesh=spec.mesh, in_specs=(P(), P(), P(), P("data"), P("data"), P("data"), P("data")),
                     out_specs=(P("data"), P()))
  x_hat, fired = fn(w_enc, params["b_enc"], w_dec, x, pairs.tokens, pairs.latents, pairs.pre)
  return x_hat + params["b_dec"].astype(jnp.float32), fired


__all__ = ["PairSpec", "Pairs", "STEPS", "decode_pairs", "encode_pairs", "pairs_pay_off", "reconstruct", "select",
           "use_pairs"]
