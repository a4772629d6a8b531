"""Norm difference: per token ‖h_ft − h_base‖, ‖h_ft‖, ‖h_base‖ and their cosine at chosen layers, streamed.

For every token of the data (a store of the pair, or both models run on the datasets, see
`differences.pair_chunks`) and every layer asked for (fractions of depth), the norms and the cosine
are computed on the device; the host keeps only running sums per (layer, token group), a bounded
uniform sample of the per-token values (for quantiles and the histogram: exact while the data fit
in it) and the top `top_contexts` tokens by ‖δ‖ = ‖h_ft − h_base‖, whose contexts are decoded at the
end. Special tokens (BOS, turn markers) carry outlier residuals in every model, so the
max-difference contexts are taken among the other tokens; their statistics have their own rows.

Outputs: `norms_summary.parquet` (one row per layer × token group × quantity), `norms_hist.png`,
`norms_top_contexts.parquet`, `section.html`.
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
from jaxtyping import Array, Float

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, KIND_TEXT
from neurodiff_jax.diffing import differences as dx
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.utils.plots import figure, png_html, save_png

QUANTITIES = ("diff_norm", "base_norm", "ft_norm", "cosine", "relative_diff")
GROUPS = {"all": None, "non_special": (KIND_TEXT, KIND_TEMPLATE), "text": (KIND_TEXT,), "special": (KIND_SPECIAL,),
          "chat_template": (KIND_TEMPLATE,)}
SAMPLE = 200_000  # per-token values kept per layer (uniformly) for quantiles and the histogram
_TINY = 1e-30


@jax.jit
def token_norms(x: Float[Array, "n 2 d"]) -> Float[Array, "5 n"]:
  """Per token: ‖h_ft − h_base‖, ‖h_base‖, ‖h_ft‖, cos(h_base, h_ft), ‖h_ft − h_base‖ / ‖h_base‖ (QUANTITIES)."""
  b, f = x[:, 0], x[:, 1]  # [n, d]
  dn = jnp.sqrt(jnp.sum(jnp.square(f - b), -1))  # [n]
  bn = jnp.sqrt(jnp.sum(jnp.square(b), -1))
  fn = jnp.sqrt(jnp.sum(jnp.square(f), -1))
  cos = jnp.sum(b * f, -1) / jnp.maximum(bn * fn, _TINY)
  return jnp.stack([dn, bn, fn, cos, dn / jnp.maximum(bn, _TINY)])


class _Running:
  """Count, sum, sum of squares, min and max of each quantity (float64)."""

  def __init__(self):
    q = len(QUANTITIES)
    self.count = 0
    self.sum, self.sumsq = np.zeros(q), np.zeros(q)
    self.min, self.max = np.full(q, np.inf), np.full(q, -np.inf)

  def add(self, v: np.ndarray) -> None:
    """Adds values [Q, n]."""
    if v.shape[1] == 0:
      return
    v = v.astype(np.float64)
    self.count += v.shape[1]
    self.sum += v.sum(1)
    self.sumsq += np.square(v).sum(1)
    self.min = np.minimum(self.min, v.min(1))
    self.max = np.maximum(self.max, v.max(1))


class _LayerStats:
  """One layer's running sums per token group, uniform sample and top-k by ‖δ‖."""

  def __init__(self, k: int, sample: int, seed: int):
    self.groups = {g: _Running() for g in GROUPS}
    self.sample = sample
    self.rng = np.random.default_rng(seed)
    self.keys = np.zeros(0)
    self.vals = np.zeros((len(QUANTITIES), 0))
    self.kinds = np.zeros(0, np.uint8)
    self.k = k
    self.top_vals = np.zeros((len(QUANTITIES), 0))
    self.top_refs = np.zeros(0, np.int64)

  def add(self, v: np.ndarray, kind: np.ndarray, ref: np.ndarray) -> None:
    """Adds the valid tokens' values [Q, n], their kinds and refs [n]."""
    for g, kinds in GROUPS.items():
      self.groups[g].add(v if kinds is None else v[:, np.isin(kind, kinds)])
    # Bottom-`sample` of i.i.d. uniform keys: a uniform sample of all tokens seen, whatever their order.
    keys = np.concatenate([self.keys, self.rng.random(v.shape[1])])
    vals = np.concatenate([self.vals, v], 1)
    kinds = np.concatenate([self.kinds, kind])
    if len(keys) > self.sample:
      keep = np.argpartition(keys, self.sample)[:self.sample]
      keys, vals, kinds = keys[keep], vals[:, keep], kinds[keep]
    self.keys, self.vals, self.kinds = keys, vals, kinds
    cand = dx.not_special(kind)
    tv = np.concatenate([self.top_vals, v[:, cand]], 1)
    tr = np.concatenate([self.top_refs, ref[cand]])
    order = np.argsort(-tv[0], kind="stable")[:self.k]
    self.top_vals, self.top_refs = tv[:, order], tr[order]


def summary_rows(layer: int, fraction: float, st: _LayerStats) -> list[dict[str, Any]]:
  """The summary table's rows of one layer: one per token group with tokens × quantity."""
  rows = []
  exact = st.groups["all"].count <= st.sample
  for g, kinds in GROUPS.items():
    r = st.groups[g]
    if r.count == 0:
      continue
    sel = np.ones(len(st.kinds), bool) if kinds is None else np.isin(st.kinds, kinds)
    for qi, q in enumerate(QUANTITIES):
      mean = r.sum[qi] / r.count
      var = max(r.sumsq[qi] / r.count - mean * mean, 0.0)
      qs = np.quantile(st.vals[qi, sel], [0.5, 0.9, 0.99]) if sel.any() else [np.nan] * 3
      rows.append({"layer": layer, "fraction": fraction, "group": g, "quantity": q, "tokens": r.count, "mean": mean,
                   "std": float(np.sqrt(var)), "min": r.min[qi], "p50": float(qs[0]), "p90": float(qs[1]),
                   "p99": float(qs[2]), "max": r.max[qi], "quantiles_exact": exact})
  return rows


def _histogram(stats: dict[int, _LayerStats], path: Path) -> None:
  fig = figure((10, 3.6))
  ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for l, st in stats.items():
    sel = dx.not_special(st.kinds)
    if sel.any():
      ax1.hist(st.vals[4, sel], bins=60, histtype="step", label=f"layer {l}")
      ax2.hist(st.vals[3, sel], bins=60, histtype="step", label=f"layer {l}")
  ax1.set_xlabel("‖h_ft − h_base‖ / ‖h_base‖")
  ax2.set_xlabel("cos(h_base, h_ft)")
  for ax in (ax1, ax2):
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
  fig.suptitle("Per-token difference (non-special tokens)")
  save_png(fig, path)


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict:
  """Streams the per-token norms at `cfg.layers`; writes the summary, histogram, top contexts and section.html."""
  out = Path(out)
  layers = dx.resolve_layers(ctx, cfg.layers, "norms.layers")
  k = int(cfg.top_contexts)
  stats = {l: _LayerStats(k, SAMPLE, ctx.seed + l) for l in layers}
  for chunk in dx.pair_chunks(ctx, layers, int(cfg.batch_size)):
    v = chunk.valid
    for l in layers:
      vals = np.asarray(token_norms(chunk.acts[l]), np.float64)[:, v]  # [Q, n_valid]
      stats[l].add(vals, chunk.kind[v], chunk.ref[v])
  n_layers = ctx.pair.num_layers
  summary = pd.DataFrame([r for l in layers for r in summary_rows(l, dx.layer_fraction(l, n_layers), stats[l])])
  summary.to_parquet(out / "norms_summary.parquet", index=False)
  top = []
  for l in layers:
    st = stats[l]
    cols = dx.context_columns(ctx, st.top_refs.tolist())
    for i, ref in enumerate(st.top_refs):
      row = {"layer": l, "rank": i, **{q: float(st.top_vals[qi, i]) for qi, q in enumerate(QUANTITIES)}}
      top.append(row | {"ref": int(ref)} | {c: cols[c][i] for c in cols})
  top_df = pd.DataFrame(top, columns=["layer", "rank", *QUANTITIES, "ref", "before", "token", "after", "context"])
  top_df.to_parquet(out / "norms_top_contexts.parquet", index=False)
  _histogram(stats, out / "norms_hist.png")

  head = summary[summary.group == ("non_special" if (summary.group == "non_special").any() else "all")]
  result: dict[str, Any] = {"source": "store" if ctx.store is not None else "models", "layers": {}}
  headline = []
  for l in layers:
    h = head[head.layer == l].set_index("quantity")
    if h.empty:
      continue
    result["layers"][str(l)] = {"tokens": int(h.loc["diff_norm", "tokens"]),
                                **{f"mean_{q}": float(h.loc[q, "mean"]) for q in QUANTITIES}}
    headline.append({"layer": l, "fraction": dx.layer_fraction(l, n_layers),
                     "tokens": int(h.loc["diff_norm", "tokens"]),
                     **{f"mean {q}": float(h.loc[q, "mean"]) for q in QUANTITIES}})
  result["tokens"] = int(stats[layers[0]].groups["all"].count)
  parts = [
      (f"<p>Per token, at each layer: ‖δ‖ = ‖h_ft − h_base‖, ‖h_base‖, ‖h_ft‖, cos(h_base, h_ft) and ‖δ‖/‖h_base‖, "
       f"over {result['tokens']} tokens from {html.escape(dx.source_name(ctx))} (means over non-special tokens below; "
       "norms_summary.parquet has every token group, quantile and extreme).</p>"),
      dx.table_html(headline, ["layer", "fraction", "tokens", *[f"mean {q}" for q in QUANTITIES]]),
      png_html(out / "norms_hist.png", "histograms of the relative difference and cosine per layer"),
      "<h3>Tokens with the largest ‖h_ft − h_base‖</h3><p>Special tokens left out; the token is outlined.</p>",
  ]
  for l in layers:
    rows = top_df[top_df.layer == l].head(10).to_dict("records")
    parts.append(f"<h4>Layer {l}</h4>" + dx.contexts_table_html(rows, ["rank", "diff_norm", "relative_diff", "cosine"]))
  dx.write_section(out, "Norm difference", parts)
  return result


__all__ = ["GROUPS", "QUANTITIES", "run", "summary_rows", "token_norms"]
