"""Latent scaling (Minder et al. 2025; docs/methods.md §4): β and ν of every latent in one pass.

For latent j with direction d = d_j^chat (the chat decoder row, used for both models), codes f_j
and a target y_i of model i, β_j = argmin_β Σ_x ‖β f_j(x) d − y_i(x)‖² = dᵀ Σ_x f_j y_i / (‖d‖² C_j)
with C_j = Σ_x f_j². Targets: reconstruction y^r = x̂_i, error y^ε = x_i − x̂_i + f_j d_j^i (latent
j's own part added back), activation y = x_i. Ratios ν^r = β^{r,base}/β^{r,chat} (high: Latent
Decoupling) and ν^ε = β^{ε,base}/β^{ε,chat} (high: Complete Shrinkage).

Every numerator is a projection of a few sums over the data, so the pass keeps per batch only
  rec_i,j = Σ_x f_j ⟨d_j, x̂_i⟩   and   err_i,j = Σ_x f_j ⟨d_j, e_i⟩   (e_i = x_i − x̂_i),
from which Σ f_j ⟨d_j, y^ε_i⟩ = err + C_j ⟨d_j, d_j^i⟩ and Σ f_j ⟨d_j, x_i⟩ = rec + err: four
[B, d] × [d, m] products per batch, no [m, N, d] tensor. The two ν targets are summed directly
(deriving x̂'s sum as x's minus e's lost digits when β^r is small); β of the raw activation is
their sum. All in the crosscoder's normalised space (`x · norm_scale`), as the reference code
does, so a global scale difference between the models does not bias ν. A latent that never fires
on the analysed tokens (C_j = 0) gets β = ν = NaN.

With M > 2 models, model 0 is the base and each model k ≥ 1 plays "chat" in the pair (0, k), with
its own decoder rows as directions: the result arrays carry a leading pair axis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.analysis.stream import (
  HIGHEST,
  Accumulator,
  Context,
  latent_selection,
  run_pass,
)
from neurodiff_jax.crosscoder.model import Crosscoder

TARGETS = ("recon", "error", "act")


class LatentScaling(Accumulator):
  """The sums of latent scaling for the chosen latents (all by default), for every (base, model k) pair."""

  name = "latent_scaling"
  summed = ("c2", "count", "rec", "err")

  def __init__(self, cc: Crosscoder, latents: Sequence[int] | np.ndarray | None = None, latent_shards: int = 1):
    self.sel = latent_selection(latents, cc.cfg.dict_size)
    self.all = len(self.sel) == cc.cfg.dict_size
    self.pairs = [(0, k) for k in range(1, cc.cfg.num_models)]
    if not self.pairs:
      raise ValueError("latent scaling compares models: the crosscoder reads only one model.")
    self.w_dec = np.asarray(cc.params["w_dec"], np.float64)[self.sel]  # [s, M, d] normalised units
    self.shard = len(self.sel) % latent_shards == 0

  def __repr__(self) -> str:
    return f"LatentScaling(latents={len(self.sel)}:{hashlib.sha256(self.sel.tobytes()).hexdigest()[:12]})"

  def init(self) -> dict[str, np.ndarray]:
    s, p = len(self.sel), len(self.pairs)
    return {"c2": np.zeros(s, np.float32), "count": np.zeros(s, np.int32),
            "rec": np.zeros((p, 2, s), np.float32), "err": np.zeros((p, 2, s), np.float32)}

  def specs(self) -> dict[str, P]:
    if not self.shard:
      return {}
    return {"c2": P("latent"), "count": P("latent"), "rec": P(None, None, "latent"), "err": P(None, None, "latent")}

  def update(self, state: dict[str, Array], ctx: Context) -> dict[str, Array]:
    f = ctx.f if self.all else ctx.f[:, self.sel]  # [B, s]
    e = ctx.x - ctx.x_hat  # [B, M, d]
    w = ctx.params["w_dec"] if self.all else ctx.params["w_dec"][self.sel]  # [s, M, d]
    rec, err = [], []
    for base, k in self.pairs:
      d = w[:, k]  # [s, d]: d_j^k, the direction for both models of the pair
      y = jnp.stack([ctx.x_hat[:, base], ctx.x_hat[:, k], e[:, base], e[:, k]])  # [4, B, d]
      if y.shape[1] >= y.shape[2]:  # contract the larger axis first: Fᵀ Y [4, s, d], then with d_j
        fty = jnp.einsum("Bs,YBd->Ysd", f, y, precision=HIGHEST)
        num = jnp.einsum("Ysd,sd->Ys", fty, d, precision=HIGHEST)  # [4, s]
      else:  # Y Dᵀ [4, B, s], then weighted by f and summed over the batch
        proj = jnp.einsum("YBd,sd->YBs", y, d, precision=HIGHEST)
        num = jnp.einsum("Bs,YBs->Ys", f, proj, precision=HIGHEST)
      rec.append(num[:2])
      err.append(num[2:])
    return {"c2": state["c2"] + jnp.sum(f * f, axis=0), "count": state["count"] + jnp.sum(f > 0, axis=0),
            "rec": state["rec"] + jnp.stack(rec), "err": state["err"] + jnp.stack(err)}

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """β per target and model, ν per pair, from the float64 sums (NaN for latents that never fired)."""
    c = host["c2"]  # [s]
    live = (host["count"] > 0) & (c > 0)
    out: dict[str, np.ndarray] = {"latent": self.sel, "count": host["count"], "c2": c}
    betas = {t: np.full((len(self.pairs), 2, len(self.sel)), np.nan) for t in TARGETS}
    with np.errstate(divide="ignore", invalid="ignore"):
      for p, (base, k) in enumerate(self.pairs):
        d = self.w_dec[:, k]  # [s, d]
        norm2 = np.einsum("sd,sd->s", d, d)
        denom = np.where(live, c * norm2, np.nan)
        for r, model in enumerate((base, k)):
          rec, err = host["rec"][p, r], host["err"][p, r]
          own = np.einsum("sd,sd->s", d, self.w_dec[:, model])  # ⟨d_j^k, d_j^i⟩
          betas["act"][p, r] = (rec + err) / denom
          betas["recon"][p, r] = rec / denom
          betas["error"][p, r] = (err + c * own) / denom
      for t in TARGETS:
        out[f"beta_{t}"] = betas[t]  # [pairs, (base, chat), s]
      for t in ("recon", "error"):
        chat = betas[t][:, 1]
        out[f"nu_{t}"] = np.where(chat != 0, betas[t][:, 0] / chat, np.nan)  # [pairs, s]
    return out


def latent_scaling(cc: Crosscoder, store: ActivationStore, layer: int, latents: Sequence[int] | None = None,
                   **pass_options) -> dict[str, np.ndarray]:
  """β^r, β^ε, β (both models) and ν^r, ν^ε of the chosen latents (all by default) in one pass over `store`."""
  mesh = pass_options.get("mesh")
  shards = mesh.shape["latent"] if mesh is not None else 1
  acc = LatentScaling(cc, latents, latent_shards=shards)
  return run_pass(cc, store, layer, [acc], **pass_options)[acc.name]


__all__ = ["TARGETS", "LatentScaling", "latent_scaling"]
