"""The training objective (docs/methods.md §2): reconstruction, L1 penalty, AuxK, and the per-batch metrics."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array, Bool, Float, Int

from neurodiff_jax.crosscoder import pairs as pairs_lib
from neurodiff_jax.crosscoder import sparsity
from neurodiff_jax.crosscoder.model import (CrosscoderConfig, Params, decode, encode_train, latent_norms,
                                            pre_activations)


RECONSTRUCTION = ("squared", "l2")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss settings: reconstruction kind, L1 λ and its warm-up, AuxK."""

  reconstruction: str = "squared"  # Σ_i ‖x_i − x̂_i‖² per token; "l2": Σ_i ‖x_i − x̂_i‖ (Minder et al.'s code)
  l1_lambda: float = 0.0
  l1_warmup_steps: int = 0
  k_aux: int = 0  # 0: d / 2
  aux_coef: float = 1 / 32
  dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing

  def __post_init__(self):
    if self.reconstruction not in RECONSTRUCTION:
      raise ValueError(f"unknown reconstruction loss {self.reconstruction!r}; choose 'squared' or 'l2'.")


def reconstruction_error(x: Float[Array, "B M d"], x_hat: Float[Array, "B M d"], kind: str) -> Float[Array, "B M"]:
  """Per token and model, ‖x_i − x̂_i‖² (squared) or ‖x_i − x̂_i‖ (l2)."""
  sq = jnp.sum(jnp.square(x - x_hat), axis=-1)
  return sq if kind == "squared" else jnp.sqrt(sq + 1e-12)


def aux_loss(params: Params, x: Float[Array, "B M d"], a: Float[Array, "B m"] | None, residual: Float[Array, "B M d"],
             dead: Bool[Array, "m"], k_aux: int, precision: Any, method: str = "bisect") -> Float[Array, ""]:
  """AuxK: the top `k_aux` dead latents of each token reconstruct the (detached) residual; ‖e − ê‖² / ‖e − ē‖².

  Zero, and not computed (a `lax.cond`), while no latent is dead. `a`: the step's differentiable
  pre-activations, or None to compute them here (the pairs step has only stopped ones). `method`:
  how each token's k_aux-th largest is found (`sparsity.topk_mask`).
  """
  k = min(k_aux, dead.shape[-1])

  def compute(params):
    pre = pre_activations(params, x, precision) if a is None else a
    relu = jnp.where(dead[None, :], jax.nn.relu(pre), 0.0)
    f = jnp.where(sparsity.topk_mask(jax.lax.stop_gradient(relu), k, method), relu, 0.0)
    e_hat = decode(params, f, precision).astype(jnp.float32) - params["b_dec"]
    num = jnp.sum(jnp.square(residual - e_hat))
    den = jnp.sum(jnp.square(residual - residual.mean(0, keepdims=True)))
    return num / jnp.maximum(den, 1e-12)

  return jax.lax.cond(jnp.any(dead), compute, lambda _: jnp.zeros((), jnp.float32), params)


def compute_params(params: Params, compute_dtype: Any) -> Params:
  """The parameters as the step computes with them (float32 masters cast to bf16 under bf16 compute)."""
  return jax.tree.map(lambda w: w.astype(compute_dtype), params) if compute_dtype != jnp.float32 else params


def loss_fn(params: Params, x: Float[Array, "B M d"], step: Int[ArrayLike, ""], dead: Bool[Array, "m"],
            cfg: CrosscoderConfig, lcfg: LossConfig, precision: Any = None, compute_dtype: Any = jnp.float32,
            pairs: pairs_lib.Pairs | None = None, spec: pairs_lib.PairSpec | None = None) -> tuple[Array, dict]:
  """Total loss and metrics of one batch (normalised inputs); with `pairs` (from `pairs.select`), the pairs step."""
  p = compute_params(params, compute_dtype)
  xc = x.astype(compute_dtype)
  if pairs is None:
    f, a, cut = encode_train(p, xc, cfg, precision)
    x_hat = decode(p, f, precision).astype(jnp.float32)
    f = f.astype(jnp.float32)
    fired, l0 = jnp.any(f > 0, axis=0), jnp.mean(jnp.sum(f > 0, axis=-1))
  else:
    x_hat, fired = pairs_lib.reconstruct(p, xc, pairs, spec)
    a, cut, l0 = None, pairs.cut, pairs.count / x.shape[0]
  err = reconstruction_error(x, x_hat, lcfg.reconstruction)  # [B, M]
  recon = err.sum(-1).mean()
  total = recon
  metrics = {"loss/reconstruction": recon}
  if cfg.sparsity == "l1":
    warm = jnp.minimum(1.0, (step + 1) / max(lcfg.l1_warmup_steps, 1))
    penalty = jnp.mean(jnp.sum(f * latent_norms(params), axis=-1))
    lam = lcfg.l1_lambda * warm
    total = total + lam * penalty
    metrics |= {"loss/l1": penalty, "l1_lambda": lam}
  elif lcfg.aux_coef > 0:
    k_aux = lcfg.k_aux or max(cfg.d_model // 2, 1)
    # The pairs step runs only without a latent split, where lax.top_k needs no gather.
    aux = aux_loss(p, xc, a, jax.lax.stop_gradient(x - x_hat), dead, k_aux, precision,
                   "bisect" if pairs is None else "top_k")
    total = total + lcfg.aux_coef * aux
    metrics |= {"loss/aux": aux}
  sq = jnp.sum(jnp.square(x - x_hat), axis=-1)  # [B, M]
  var = jnp.sum(jnp.square(x - x.mean(0, keepdims=True)), axis=-1)  # [B, M]
  fve = 1.0 - sq.sum(0) / jnp.maximum(var.sum(0), 1e-12)
  metrics |= {"loss/total": total, "l0": l0, "cut": cut, "fired": fired}
  metrics |= {f"fve/{i}": fve[i] for i in range(x.shape[1])}
  return total, metrics


__all__ = ["LossConfig", "RECONSTRUCTION", "aux_loss", "compute_params", "loss_fn", "reconstruction_error"]
