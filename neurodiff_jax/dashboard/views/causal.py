"""Causal test: `launch.analyze`'s causal.parquet of a run — the verdict, the bars with their intervals, the table.

Query parameter `run=NAME` picks the run (a name that is not an analysed run with a causal test is refused with the
valid ones). The verdict is `analysis.verdicts.causal_verdict`, the sentence the report prints, computed from the
95% intervals of the region shown (docs/analysis.md, "Causal test").
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.analysis.verdicts import GROUP_NOTES, REGION_WORDS, causal_verdict, gap_closed
from neurodiff_jax.dashboard.views import pick, run_table
from neurodiff_jax.dashboard.results import ResultsRoot, analyze_command

# The groups in the order a reader compares them: the two baselines, the template patch, then the latent halves.
GROUP_ORDER = ("all_base", "all_latents", "template_chat", "nu_best_half", "nu_worst_half", "dnorm_top_half",
               "dnorm_bottom_half")
GROUP_KIND = {"all_base": "baseline", "all_latents": "baseline", "template_chat": "template tokens",
              "nu_best_half": "chat-only latents by ν", "nu_worst_half": "chat-only latents by ν",
              "dnorm_top_half": "chat-only latents by Δnorm (control)",
              "dnorm_bottom_half": "chat-only latents by Δnorm (control)"}


def _order(groups: list[str]) -> list[str]:
  return [g for g in GROUP_ORDER if g in groups] + [g for g in groups if g not in GROUP_ORDER]


def causal_rows(frame: pd.DataFrame) -> pd.DataFrame:
  """The causal table as the page shows it: one row per (group, region), what the group patches, its latent count in
  words (the template patch selects no latents), the interval and the share of the all-base → all-latents gap it
  closes in its region."""
  rows = []
  for region, part in frame.groupby(frame["region"].astype(str), sort=False):
    by = {str(r["group"]): r for r in part.to_dict(orient="records")}
    ceiling, floor = by.get("all_base"), by.get("all_latents")
    for g in _order(list(by)):
      r = by[g]
      n = r.get("n_latents")
      latents = "— (template tokens)" if n is not None and not pd.isna(n) and int(n) < 0 else str(int(n))
      closed = gap_closed(r, ceiling, floor) if ceiling is not None and floor is not None else np.nan
      rows.append({"group": g, "region": region, "patches": GROUP_NOTES.get(g, ""), "latents": latents,
                   "kl_mean": float(r["kl_mean"]), "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"]),
                   "gap closed": closed, "n_tokens": int(r["n_tokens"]), "n_docs": int(r["n_docs"])})
  return pd.DataFrame(rows)


def causal_chart(rows: pd.DataFrame, title: str) -> alt.LayerChart:
  """KL per group as bars with its 95% interval as an error bar (one region's rows of `causal_rows`)."""
  data = rows.assign(kind=[GROUP_KIND.get(g, "other") for g in rows["group"]])
  order = list(data["group"])
  base = alt.Chart(data).encode(x=alt.X("group:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)))
  bars = base.mark_bar().encode(
      y=alt.Y("kl_mean:Q", title="KL(P_chat ‖ P_patched), nats per token"),
      color=alt.Color("kind:N", title="group"),
      tooltip=[alt.Tooltip("group:N"), alt.Tooltip("patches:N"), alt.Tooltip("latents:N"),
               alt.Tooltip("kl_mean:Q", title="KL", format=".4f"), alt.Tooltip("ci_low:Q", format=".4f"),
               alt.Tooltip("ci_high:Q", format=".4f"), alt.Tooltip("gap closed:Q", format=".1%")])
  bars_ci = base.mark_errorbar(ticks=True, color="black").encode(y=alt.Y("ci_low:Q", title=""), y2="ci_high:Q")
  return alt.layer(bars, bars_ci).properties(title=title, height=300)


def render(root: ResultsRoot) -> None:
  """The causal-test page."""
  st.title("Causal test")
  ready = [r for r in root.runs if r.has("causal.parquet")]
  why = {r.name: ("it has no readable analysis" if r.analysis is None or r.error else
                  "its analysis has no causal test (causal.parquet)") for r in root.runs if r not in ready}
  if not ready:
    st.info("No run has a causal test: `python -m launch.analyze --config.workdir=RUN` writes causal.parquet (its "
            "`causal` part needs the store's models).")
  name = pick("run", [r.name for r in ready], "run", key="causal_run", every=[r.name for r in root.runs], why=why)
  if name is None:
    return
  run = root.run(name)
  frame = run_table(run, "causal.parquet")
  regions = [r for r in ("reply", "first", "rest") if r in set(frame["region"].astype(str))]
  region = st.radio("region", regions, horizontal=True, key="causal_region", format_func=REGION_WORDS.get)
  verdict = causal_verdict(frame, region)
  with st.container(border=True, key="causal_verdict"):
    st.markdown(f"**Verdict.** {verdict.sentence}")
  st.caption("Significant: the 95% bootstrap intervals (over conversations) do not overlap — a conservative reading of "
             "intervals that are paired across groups. The chat model's residual at the layer is replaced by x_base + "
             "Σ_{j∈S} f_j (d_j^chat − d_j^base); lower KL means S restores more of the chat model's behaviour.")
  rows = causal_rows(frame)
  st.altair_chart(causal_chart(rows[rows["region"] == region], f"{name}: KL on {REGION_WORDS.get(region, region)}"),
                  width="stretch")
  st.dataframe(rows, hide_index=True, key="causal_table",
               column_config={"gap closed": st.column_config.NumberColumn(format="percent")})
  st.caption(f"From `{run.path / 'analysis' / 'causal.parquet'}`; rerun with `{analyze_command(run.path)}`.")


__all__ = ["GROUP_ORDER", "causal_chart", "causal_rows", "render"]
