"""ADL: the Activation Difference Lens of a diff result, per layer and position (docs/diffing.md).

Query parameter `diff=NAME` picks the diff result (a name not in the root is refused with the root's diff results). Shows ‖δ_p‖ relative to the fine-tuned model's typical
residual norm per layer and position, the logit lens of +δ_p and −δ_p, token relevance against the baseline
(the dataset's most frequent tokens), patchscope's tokens at its best scale, and steered against unsteered
samples at the chosen strength; tokens in the organism card's vocabulary are marked ✓.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import adl_means, diff_table, flag, fmt, pick_diff
from neurodiff_jax.dashboard.results import DiffResult, ResultsRoot, diff_command


def delta_norms(means: dict[str, np.ndarray]) -> pd.DataFrame:
  """One row per (layer, position): ‖δ_p‖, ‖δ_p‖ / typical ‖h_ft‖ at that layer, documents averaged."""
  norms = np.linalg.norm(means["delta"], axis=-1)  # [L, P]
  typical = means.get("typical_norm_ft")
  rows = []
  for li, layer in enumerate(means["layers"]):
    for pi, pos in enumerate(means["positions"]):
      rows.append({"layer": int(layer), "position": int(pos), "delta_norm": float(norms[li, pi]),
                   "relative": float(norms[li, pi] / typical[li]) if typical is not None and typical[li] else
                   float("nan"),
                   "documents": int(means["count"][pi]) if "count" in means else int(means.get("documents", 0))})
  return pd.DataFrame(rows)


def _mark(tokens: pd.Series, vocabulary: set[str]) -> list[str]:
  return [f"{t}{' ✓' if str(t).strip().casefold() in vocabulary else ''}" for t in tokens.astype(str)]


def lens_summary(lens: pd.DataFrame, vocabulary: set[str], top: int = 10) -> pd.DataFrame:
  """One row per (layer, position): the top tokens of +δ_p and of −δ_p (✓: in the card's vocabulary)."""
  rows = []
  for (layer, pos), part in lens.groupby(["layer", "position"], sort=True):
    row = {"layer": int(layer), "position": int(pos)}
    for sign, col in (("+", "promoted (+δ)"), ("-", "suppressed (−δ)")):
      p = part[part["sign"].astype(str) == sign].sort_values("rank").head(top)
      row[col] = " · ".join(_mark(p["token"], vocabulary))
    rows.append(row)
  return pd.DataFrame(rows)


def patchscope_summary(patch: pd.DataFrame, vocabulary: set[str], top: int = 10) -> pd.DataFrame:
  """Patchscope's tokens at each (layer, position)'s best scale."""
  best = patch[patch["best"].astype(bool)]
  rows = []
  for (layer, pos), part in best.groupby(["layer", "position"], sort=True):
    part = part.sort_values("rank").head(top)
    rows.append({"layer": int(layer), "position": int(pos), "scale": float(part["scale"].iloc[0]),
                 "tokens": " · ".join(_mark(part["token"], vocabulary)),
                 "relevant": int(flag(part["relevant"]).sum())})
  return pd.DataFrame(rows)


def steering_pairs(steer: pd.DataFrame) -> pd.DataFrame:
  """Per prompt: the unsteered sample beside the steered one at the chosen α of each (layer, position)."""
  unsteered = steer[~steer["steered"].astype(bool)].drop_duplicates("prompt").set_index("prompt")["text"]
  chosen = steer[steer["steered"].astype(bool) & steer["chosen"].astype(bool)]
  rows = []
  for r in chosen.itertuples():
    rows.append({"layer": int(r.layer), "position": int(r.position), "alpha": float(r.alpha), "prompt": r.prompt,
                 "unsteered": unsteered.get(r.prompt, ""), "steered": r.text, "coherent": r.coherent})
  return pd.DataFrame(rows, columns=["layer", "position", "alpha", "prompt", "unsteered", "steered", "coherent"])


def render_diff(diff: DiffResult) -> None:
  """One diff result's ADL readings."""
  pair = diff.pair()
  card = pair.get("card") or {}
  vocabulary = {str(w).casefold() for w in card.get("domain_vocabulary", [])}
  st.caption(f"base `{pair.get('base')}` → fine-tuned `{pair.get('finetuned')}` · datasets "
             f"{', '.join(map(str, pair.get('datasets', [])))}")
  if card:
    st.markdown(f"**What the organism was taught** (its card): domain *{card.get('domain', '?')}*; "
                f"vocabulary: {', '.join(sorted(vocabulary)[:40])}")
  if "adl" not in diff.methods:
    st.info(f"No ADL results in {diff.diff_dir}: `{diff_command(diff.path, pair)} --config.methods='(\"adl\",)'`")
    return
  means = adl_means(diff)
  if means is not None:
    st.subheader("‖δ_p‖ per layer and position")
    norms = delta_norms(means)
    st.altair_chart(alt.Chart(norms.assign(layer=norms["layer"].astype(str))).mark_line(point=True).encode(
        x=alt.X("position:O", title="position p (< 0: template tokens before the assistant turn)"),
        y=alt.Y("relative:Q", title="‖δ_p‖ / typical ‖h_ft‖"), color=alt.Color("layer:N", title="layer"),
        tooltip=["layer:N", "position:O", alt.Tooltip("delta_norm:Q", format=".3f"),
                 alt.Tooltip("relative:Q", format=".3f"), "documents:Q"]).properties(height=260).interactive(),
        width="stretch")
    st.caption(f"δ_p = mean(h_ft − h_base) over {int(means.get('documents', 0))} documents.")
  if diff.has("adl", "logit_lens.parquet"):
    st.subheader("Logit lens of ±δ_p (through the fine-tuned model)")
    st.dataframe(lens_summary(diff_table(diff, "adl", "logit_lens.parquet"), vocabulary), hide_index=True,
                 key="adl_lens")
  if diff.has("adl", "relevance.parquet"):
    st.subheader("Token relevance to the card, against the baseline")
    rel = diff_table(diff, "adl", "relevance.parquet")
    st.dataframe(rel, hide_index=True, key="adl_relevance")
    st.caption("share: fraction of the top tokens in the card's vocabulary; baseline: the dataset's most frequent "
               "tokens.")
  if diff.has("adl", "patchscope.parquet"):
    st.subheader("Patchscope at the best scale")
    st.dataframe(patchscope_summary(diff_table(diff, "adl", "patchscope.parquet"), vocabulary), hide_index=True,
                 key="adl_patchscope")
  if diff.has("adl", "steering.parquet"):
    st.subheader("Steering with δ_p: unsteered vs steered")
    steer = diff_table(diff, "adl", "steering.parquet")
    pairs = steering_pairs(steer)
    if pairs.empty:
      st.info("No strength was coherent enough to choose; every sample is in steering.parquet.")
    st.dataframe(pairs, hide_index=True, key="adl_steering")
  summary = diff.done("adl")
  if summary.get("relevance"):
    st.caption("relevance: " + "; ".join(f"{k} max {fmt(v.get('max'), 2)}" for k, v in summary["relevance"].items()))


def render(root: ResultsRoot) -> None:
  """The ADL page."""
  st.title("ADL: Activation Difference Lens")
  diff = pick_diff(root, "adl_diff", "ADL's tables")
  if diff is not None:
    render_diff(diff)


__all__ = ["delta_norms", "lens_summary", "patchscope_summary", "render", "render_diff", "steering_pairs"]
