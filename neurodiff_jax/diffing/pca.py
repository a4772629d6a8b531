"""PCA of the activation differences δ = h_ft − h_base at one layer, streamed (no [N, d] matrix in memory).

Pass 1 sums, over every token, δ − c and (δ − c)(δ − c)ᵀ on the device (float32 at full matmul
precision, `c` the first chunk's mean, so the sums do not cancel when the mean difference is large),
folded into float64 host sums every `FOLD_EVERY` chunks; the covariance Σ = E[(δ−c)(δ−c)ᵀ] −
(μ−c)(μ−c)ᵀ is eigendecomposed on the host (float64). Components are unit vectors v_i, signed so that
their largest-magnitude entry is positive. Pass 2 projects every token, (δ − μ)·v_i, and keeps per
component and sign the `top_contexts` largest projections. Special tokens (BOS, turn markers) are
left out of both passes: their residual differences are outliers that would take the first
components.

Outputs: `pca_variance.parquet` (+ `pca_variance.png`), `pca_lens.parquet` (±v_i through the
fine-tuned model's final norm and unembedding), `pca_top_contexts.parquet`, `components.npy`
([k, d] float32, usable as steering vectors), `mean_difference.npy` ([d]), `section.html`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float

from neurodiff_jax.diffing import differences as dx
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models.lens import logit_lens, top_tokens
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, integer_ticks, png_html, save_png

FOLD_EVERY = 16  # chunks summed in float32 on the device before each float64 fold on the host
TOP_TOKENS = 20  # tokens read from each component's logit lens
HIGHEST = jax.lax.Precision.HIGHEST


@jax.jit
def moments(x: Float[Array, "n 2 d"], valid: Bool[Array, " n"], c: Float[Array, " d"]
            ) -> tuple[Float[Array, ""], Float[Array, " d"], Float[Array, "d d"]]:
  """(count, Σ(δ − c), Σ(δ − c)(δ − c)ᵀ) over the valid rows of a chunk, δ = h_ft − h_base."""
  w = valid.astype(jnp.float32)
  y = (x[:, 1] - x[:, 0] - c) * w[:, None]  # [n, d], 0 on invalid rows
  return w.sum(), y.sum(0), jnp.einsum("nd,ne->de", y, y, precision=HIGHEST)


@jax.jit
def projections(x: Float[Array, "n 2 d"], mean: Float[Array, " d"], comps: Float[Array, "k d"]) -> Float[Array, "n k"]:
  """(δ − μ)·v_i of every row and component."""
  return jnp.einsum("nd,kd->nk", x[:, 1] - x[:, 0] - mean, comps, precision=HIGHEST)


def streaming_covariance(chunks: Any, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
  """(tokens, mean δ [d], covariance of δ [d, d]) in float64 over the non-special valid rows of `chunks`."""
  n, c = 0, None
  host_s = host_S = None
  dev = None
  for i, chunk in enumerate(chunks):
    keep = chunk.valid & dx.not_special(chunk.kind)
    x = chunk.acts[layer]
    if c is None:
      if not keep.any():
        continue
      xs = np.asarray(x)[keep]
      c = (xs[:, 1] - xs[:, 0]).mean(0).astype(np.float32)
      d = len(c)
      host_s, host_S = np.zeros(d), np.zeros((d, d))
    part = moments(x, jnp.asarray(keep), jnp.asarray(c))
    dev = part if dev is None else jax.tree.map(jnp.add, dev, part)
    if (i + 1) % FOLD_EVERY == 0:
      n, host_s, host_S = _fold(dev, n, host_s, host_S)
      dev = None
  if dev is not None:
    n, host_s, host_S = _fold(dev, n, host_s, host_S)
  if c is None or n == 0:
    raise ConfigError("pca: the data hold no token besides special ones; give datasets with text.")
  shift = host_s / n  # μ − c
  cov = host_S / n - np.outer(shift, shift)
  return n, c.astype(np.float64) + shift, (cov + cov.T) / 2


def _fold(dev: Any, n: int, s: np.ndarray, S: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  cnt, ds, dS = jax.device_get(dev)
  return n + round(float(cnt)), s + np.asarray(ds, np.float64), S + np.asarray(dS, np.float64)


def principal_components(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(all eigenvalues descending [d], top-k unit eigenvectors [k, d] with their largest-|entry| positive)."""
  w, v = np.linalg.eigh(cov)
  order = np.argsort(w)[::-1]
  w, v = np.maximum(w[order], 0.0), v[:, order]
  comps = v[:, :k].T.copy()  # [k, d]
  big = np.abs(comps).argmax(1)
  comps *= np.sign(comps[np.arange(len(comps)), big])[:, None]
  return w, comps


def _variance_plot(ratio: np.ndarray, k: int, path: Path) -> None:
  shown = min(len(ratio), max(2 * k, 32))
  fig = figure((7, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  idx = np.arange(1, shown + 1)
  ax.bar(idx, ratio[:shown], color=["C0" if i <= k else "0.7" for i in idx], label="explained variance ratio")
  ax2 = ax.twinx()
  ax2.plot(idx, np.cumsum(ratio)[:shown], "C1.-", label="cumulative")
  ax2.set_ylim(0, 1.02)
  ax.set_xlabel("component")
  integer_ticks(ax.xaxis)
  ax.set_ylabel("share of variance")
  ax2.set_ylabel("cumulative share")
  ax.set_title(f"PCA of h_ft − h_base (first {k} kept, in blue)")
  save_png(fig, path)


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict:
  """PCA of δ at `cfg.layer`: variance, components' logit lens, top contexts, components.npy, section.html."""
  out = Path(out)
  (layer,) = dx.resolve_layers(ctx, (cfg.layer,), "pca.layer")
  d = ctx.pair.base.cfg.hidden_size
  k = int(cfg.components)
  if not 1 <= k <= d:
    raise ConfigError(f"pca.components={k} must be in [1, d_model={d}].")
  bs, top = int(cfg.batch_size), int(cfg.top_contexts)
  n, mean, cov = streaming_covariance(dx.pair_chunks(ctx, [layer], bs), layer)
  eig, comps = principal_components(cov, k)
  total = eig.sum()
  ratio = eig / total if total > 0 else np.zeros_like(eig)
  np.save(out / "components.npy", comps.astype(np.float32))
  np.save(out / "mean_difference.npy", mean.astype(np.float32))
  pd.DataFrame({"component": np.arange(len(eig)), "variance": eig, "std": np.sqrt(eig),
                "explained_variance_ratio": ratio, "cumulative": np.cumsum(ratio)}).to_parquet(
                    out / "pca_variance.parquet", index=False)
  _variance_plot(ratio, k, out / "pca_variance.png")

  # Pass 2: per component and sign, the largest projections (rows 0..k-1: +v_i, k..2k-1: −v_i).
  vals, refs = dx.empty_topk((2 * k,))
  comps_dev, mean_dev = jnp.asarray(comps, jnp.float32), jnp.asarray(mean, jnp.float32)
  for chunk in dx.pair_chunks(ctx, [layer], bs):
    keep = chunk.valid & dx.not_special(chunk.kind)
    if not keep.any():
      continue
    p = np.asarray(projections(chunk.acts[layer], mean_dev, comps_dev), np.float64)[keep].T  # [k, n]
    vals, refs = dx.merge_topk(vals, refs, np.concatenate([p, -p]), chunk.ref[keep][None, :], top)
  rows = []
  for j in range(2 * k):
    cols = dx.context_columns(ctx, refs[j].tolist())
    for r in range(refs.shape[1]):
      rows.append({"component": j % k, "sign": "+" if j < k else "-", "rank": r,
                   "projection": float(vals[j, r] if j < k else -vals[j, r]), "ref": int(refs[j, r]),
                   **{c: cols[c][r] for c in cols}})
  contexts = pd.DataFrame(rows, columns=["component", "sign", "rank", "projection", "ref", "before", "token", "after",
                                         "context"])
  contexts.to_parquet(out / "pca_top_contexts.parquet", index=False)

  lens = top_tokens(logit_lens(ctx.pair.ft, np.concatenate([comps, -comps])), ctx.pair.tokenizer, TOP_TOKENS)
  lens_rows = []
  for j, t in enumerate(lens):
    for r, (tok, tid, logit) in enumerate(zip(t["promoted"], t["promoted_ids"], t["promoted_logits"])):
      lens_rows.append({"component": j % k, "sign": "+" if j < k else "-", "rank": r, "token": tok,
                        "token_id": int(tid), "logit": float(logit)})
  lens_df = pd.DataFrame(lens_rows, columns=["component", "sign", "rank", "token", "token_id", "logit"])
  lens_df.to_parquet(out / "pca_lens.parquet", index=False)

  summary = {"source": "store" if ctx.store is not None else "models", "layer": layer, "tokens": n,
             "mean_difference_norm": float(np.linalg.norm(mean)), "total_variance": float(total),
             "explained_variance_ratio": [float(v) for v in ratio[:k]],
             "top_tokens": {str(i): {s: lens_df[(lens_df.component == i) & (lens_df.sign == s)].token.head(5).tolist()
                                     for s in "+-"} for i in range(k)}}
  _section(ctx, out, layer, n, k, ratio, mean, lens_df, contexts)
  return summary


def _section(ctx: DiffContext, out: Path, layer: int, n: int, k: int, ratio: np.ndarray, mean: np.ndarray,
             lens: pd.DataFrame, contexts: pd.DataFrame) -> None:
  parts = [
      (f"<p>PCA of δ = h_ft − h_base at layer {layer} over {n} tokens (special tokens left out) from "
       f"{html.escape(dx.source_name(ctx))}, streamed: the covariance is accumulated, never the tokens. ‖mean δ‖ = "
       f"{np.linalg.norm(mean):.4g}; the first {k} components explain {ratio[:k].sum():.1%} of the variance.</p>"),
      png_html(out / "pca_variance.png", "explained variance ratio per component"),
      (f"<p><b>Steering vectors.</b> <code>components.npy</code> holds the {k} components as unit rows [k, d] "
       f"(float32, in order, signed so that each one's largest entry is positive) in the residual space after "
       f"layer {layer}; <code>mean_difference.npy</code> holds mean δ. Add α·σ_i·v_i to the residual after layer "
       f"{layer} (σ_i = √variance_i, pca_variance.parquet) to steer along component i.</p>"),
  ]
  shown = min(k, 8)
  for i in range(shown):
    toks = {s: ", ".join(repr(t) for t in lens[(lens.component == i) & (lens.sign == s)].token.head(10))
            for s in "+-"}
    parts.append(f"<h3>Component {i} ({ratio[i]:.2%} of the variance)</h3>"
                 f"<p>Logit lens of +v: {html.escape(toks['+'])}<br>Logit lens of −v: {html.escape(toks['-'])}</p>")
    rows = contexts[(contexts.component == i) & (contexts["rank"] < 3)].to_dict("records")
    parts.append(dx.contexts_table_html(rows, ["sign", "rank", "projection"]))
  if k > shown:
    parts.append(f"<p>Components {shown}–{k - 1}: see pca_lens.parquet and pca_top_contexts.parquet.</p>")
  dx.write_section(out, "PCA of the activation differences", parts)


__all__ = ["FOLD_EVERY", "moments", "principal_components", "projections", "run", "streaming_covariance"]
