"""Overview: each crosscoder run's config, final FVE / L0, latents dead in the last training window, Δnorm classes of
the live latents (the ones that never fired counted apart) and training curves.

Query parameter `run=NAME` shows only that run (default: all, one tab each; a name not in the root is refused
with the root's runs). Diff results are listed below.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import (
  DEAD_IN_WINDOW,
  LIVE_CLASSES,
  NEVER_FIRED,
  TAG_ORDER,
  fmt,
  pick,
  run_read,
  run_table,
)
from neurodiff_jax.dashboard.results import ResultsRoot, Run

# Training curves: (title, metrics.jsonl columns drawn together).
CURVES = (("loss", ("loss/total", "loss/reconstruction")), ("FVE", ("fve/0", "fve/1")), ("L0", ("l0",)),
          (DEAD_IN_WINDOW, ("dead_fraction",)))
# What a legend calls each metrics.jsonl column: model 0 of the crosscoder is the base model, model 1 the chat
# (fine-tuned) one.
METRIC_LABELS = {"loss/total": "total loss", "loss/reconstruction": "reconstruction loss", "fve/0": "FVE base",
                 "fve/1": "FVE chat", "l0": "L0",
                 "dead_fraction": DEAD_IN_WINDOW}
ALL_RUNS = "all runs"


def config_rows(run: Run) -> dict[str, Any]:
  """The config fields a reader compares runs by: sparsity, k or λ, dictionary size, layer, store, steps."""
  cfg = run_read(run, "config")
  sparsity = cfg.get("sparsity", cfg.get("crosscoder.sparsity"))
  out: dict[str, Any] = {"sparsity": sparsity}
  if sparsity == "l1":
    out["λ (l1_lambda)"] = cfg.get("l1_lambda")
  else:
    out["k"] = cfg.get("k", cfg.get("crosscoder.k"))
  out.update({"dict size": cfg.get("dict_size", cfg.get("crosscoder.dict_size")), "layer": cfg.get("layer"),
              "store": cfg.get("store"), "steps": cfg.get("steps", cfg.get("checkpoint_step")),
              "batch size": cfg.get("batch_size"), "lr": cfg.get("lr")})
  return {k: v for k, v in out.items() if v is not None}


def delta_norm_classes(run: Run) -> dict[str, int]:
  """Latent counts per `tag`: the analysis summary's (`dead`: never fired), else the final training metrics'
  (`dead`: idle for the last training window); `delta_norm_class_source` says which."""
  classes: dict[str, int] = {}
  if run.analysis is not None and not run.error:
    classes = dict(run_read(run, "summary").get("classes", {}))
  if not classes:
    classes = dict(run_read(run, "final_metrics").get("delta_norm_classes", {}))
  return {c: int(classes[c]) for c in TAG_ORDER if c in classes}


def delta_norm_class_source(run: Run) -> str:
  """What the dead count of `delta_norm_classes(run)` means: NEVER_FIRED (analysis) or DEAD_IN_WINDOW (training)."""
  analysed = run.analysis is not None and not run.error and bool(run_read(run, "summary").get("classes"))
  return NEVER_FIRED if analysed else DEAD_IN_WINDOW


def curves(history: pd.DataFrame) -> list[alt.Chart]:
  """One interactive line chart per training curve present in `history` (metrics.jsonl)."""
  charts = []
  for title, cols in CURVES:
    cols = [c for c in cols if c in history.columns]
    if "step" not in history.columns or not cols:
      continue
    long = history[["step", *cols]].rename(columns=METRIC_LABELS)
    long = long.melt("step", var_name="metric", value_name="value").dropna()
    charts.append(alt.Chart(long, title=title).mark_line(point=True).encode(
        x=alt.X("step:Q", title="training step"), y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
        color=alt.Color("metric:N", title=None, sort=[METRIC_LABELS[c] for c in cols]),
        tooltip=[alt.Tooltip("step:Q", title="step"), alt.Tooltip("metric:N", title="metric"),
                 alt.Tooltip("value:Q", format=".4f")],
    ).properties(height=220).interactive())
  return charts


def analysis_outputs(run: Run) -> None:
  """The analysis files no other page shows: the template statistics and plot, every steering sample, the report."""
  with st.expander("analysis outputs: template tokens, steering samples, report"):
    template = run_read(run, "summary").get("template") or {}
    if template:
      st.caption(f"template tokens: {fmt(template.get('template_token_fraction'))} of the analysed tokens; chat-only "
                 f"latents firing mostly on them: {template.get('chat_only_mostly_template')} of "
                 f"{template.get('chat_only_live')}; median template share {fmt(template.get('median_template_share_chat_only'))}"
                 f" (chat-only) vs {fmt(template.get('median_template_share_live'))} (live)")
    if run.has("template_share.png"):
      st.image(str(run.analysis / "template_share.png"), caption="template_share.png")
    if run.has("steering.parquet"):
      steer = run_table(run, "steering.parquet")
      st.markdown(f"**steering.parquet** — {len(steer)} samples of latents {', '.join(map(str, steer['latent'].unique()))}"
                  " (each latent's page shows its own)")
      st.dataframe(steer, hide_index=True, key=f"overview_steering_{run.name}")
    if run.has("causal.parquet"):
      st.markdown(f"The causal test: [Causal test](/causal-test?run={run.name}).")
    if run.has("report.html"):
      st.download_button("download the analysis report (report.html)", (run.analysis / "report.html").read_bytes(),
                         file_name=f"{run.name}-report.html", mime="text/html", key=f"overview_report_{run.name}")


def render_run(run: Run) -> None:
  """One run's section."""
  st.subheader(run.name)
  st.caption(f"`{run.path}`")
  if run.error:
    st.error(run.error)
  elif run.analysis is None:
    st.info(f"Not analysed yet: `python -m launch.analyze --config.workdir={run.path}` adds the latent table, "
            "ν and contexts.")
  metrics = run_read(run, "final_metrics")
  cols = st.columns(5)
  cols[0].metric("FVE base (fve/0)", fmt(metrics.get("fve/0")))
  cols[1].metric("FVE chat (fve/1)", fmt(metrics.get("fve/1")))
  cols[2].metric("L0", fmt(metrics.get("l0"), 2))
  cols[3].metric(DEAD_IN_WINDOW, fmt(metrics.get("dead_fraction")),
                 help="metrics.json dead_fraction: the share of latents that did not fire in the last dead_tokens "
                      "training tokens. Not the analysis's 'never fired' (latents.parquet tag dead).")
  cols[4].metric("step", fmt(metrics.get("step")))
  left, right = st.columns(2)
  with left:
    st.markdown("**Config**")
    st.table(pd.DataFrame({"value": [str(v) for v in config_rows(run).values()]}, index=list(config_rows(run))))
  with right:
    st.markdown("**Δnorm classes** (live latents)")
    classes = delta_norm_classes(run)
    if classes:
      live = {c: n for c, n in classes.items() if c in LIVE_CLASSES}
      st.table(pd.DataFrame({"latents": list(live.values())}, index=list(live)))
      source = delta_norm_class_source(run)
      st.caption(f"{source}: {classes.get('dead', 0)} (not in the classes: a dead latent's Δnorm is its "
                 f"initialisation's){'' if source == NEVER_FIRED else ' — from training; not analysed yet'}.")
    if run.analysis is not None and not run.error:
      genuine = run_read(run, "summary").get("genuine", {})
      if genuine:
        st.caption(f"genuine chat-only latents: {genuine.get('genuine')} of {genuine.get('chat_only_live')} "
                   f"({genuine.get('rule', '')})")
  if run.analysis is not None and not run.error:
    analysis_outputs(run)
  history = run_read(run, "metrics_history")
  if history.empty:
    st.info("No training curves (tensorboard/metrics.jsonl) in this run.")
    return
  charts = curves(history)
  for i in range(0, len(charts), 2):
    row = st.columns(2)
    for col, chart in zip(row, charts[i:i + 2]):
      col.altair_chart(chart, width="stretch")


def render(root: ResultsRoot) -> None:
  """The overview page."""
  st.title("Overview")
  st.caption(f"{root.path}")
  if root.runs:
    name = pick("run", [r.name for r in root.runs], "run", key="overview_run", everything=ALL_RUNS)
    if name is None:  # a run the root does not hold: refused above, nothing else shown as if it were asked for
      return
    runs = root.runs if name == ALL_RUNS else [root.run(name)]
    if len(runs) == 1:
      render_run(runs[0])
    else:
      for tab, run in zip(st.tabs([r.name for r in runs]), runs):
        with tab:
          render_run(run)
  else:
    st.info("No crosscoder runs here: train one with `python -m launch.train` (or run `python -m launch.demo`).")
  if root.diffs:
    st.header("Diff results")
    rows = []
    for d in root.diffs:
      models = d.models() or ("?", "?")
      rows.append({"name": d.name, "base": models[0], "fine-tuned": models[1], "methods": ", ".join(d.methods),
                   "status": d.error or "ok"})
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    for d in root.diffs:
      if d.error:
        st.error(d.error)


__all__ = ["ALL_RUNS", "CURVES", "METRIC_LABELS", "analysis_outputs", "config_rows", "curves",
           "delta_norm_class_source", "delta_norm_classes", "render", "render_run"]
