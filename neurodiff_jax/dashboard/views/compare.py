"""Compare runs: Δnorm histograms and latent-scaling ν scatters of chosen runs side by side (e.g. L1 vs BatchTopK).

Query parameter `runs=A,B` picks the runs (default: every analysed run; `runs=` none); a name that is not an
analysed run of the root is refused with an error naming them, the others shown. Charts are interactive (zoom,
pan, tooltips with the latent index); the latents page opens one with `?page=latents&run=NAME&latent=N`.

Latents that never fired on the analysed tokens (tag `dead`) are in no class count and no histogram: their Δnorm is
their initialisation's. They are counted apart ("never fired: N (not in the histogram)"), as in the report, and the
training's "dead in the last training window" (metrics.json) is a separate row with that name.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import (
  DEAD_IN_WINDOW,
  LIVE_CLASSES,
  NEVER_FIRED,
  flag,
  fmt,
  not_found,
  remember,
  remembered,
  run_read,
  set_param,
)
from neurodiff_jax.dashboard.results import ResultsRoot, Run

TAG_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#aaaaaa"]  # the live classes (LIVE_CLASSES)
# What a legend calls each Δnorm class (the `tag` column keeps the code's names; docs/analysis.md).
TAG_LABELS = {"chat_only": "chat-only", "base_only": "base-only", "shared": "shared", "other": "other",
              "dead": "dead"}
NU_CLIP = (-0.5, 1.5)  # ν outside this range is drawn on its edge (a near-zero β^chat makes ν huge)


def never_fired(latents: pd.DataFrame) -> int:
  """How many latents never fired on the analysed tokens (tag `dead`)."""
  return int((latents["tag"].astype(str) == "dead").sum())


def delta_norm_histogram(latents: pd.DataFrame, title: str, bins: int = 40) -> alt.Chart:
  """Histogram of the live latents' Δnorm, stacked by class (latents that never fired left out: see never_fired)."""
  df = latents[["latent", "delta_norm", "tag"]].dropna(subset=["delta_norm"])
  df = df[df["tag"].astype(str) != "dead"].copy()
  df["class"] = df["tag"].astype(str).map(TAG_LABELS).fillna(df["tag"].astype(str))
  return alt.Chart(df[["latent", "delta_norm", "class"]], title=title).mark_bar().encode(
      x=alt.X("delta_norm:Q", bin=alt.Bin(maxbins=bins, extent=[0, 1]), title="Δnorm (0 base-only, 1 chat-only)"),
      y=alt.Y("count():Q", title="latents"),
      color=alt.Color("class:N", title="Δnorm class",
                      scale=alt.Scale(domain=[TAG_LABELS[t] for t in LIVE_CLASSES], range=TAG_COLOURS)),
      tooltip=[alt.Tooltip("class:N", title="Δnorm class"), alt.Tooltip("count():Q", title="latents")],
  ).properties(height=260).interactive()


def nu_points(latents: pd.DataFrame, chat_only: bool = True) -> pd.DataFrame:
  """Latents with both ν finite (chat-only ones by default), ν clipped to NU_CLIP for drawing; `colour` column."""
  df = latents if not chat_only else latents[latents["tag"].astype(str) == "chat_only"]
  df = df[np.isfinite(df["nu_recon"].astype(float)) & np.isfinite(df["nu_error"].astype(float))].copy()
  df["nu_recon_shown"] = df["nu_recon"].clip(*NU_CLIP)
  df["nu_error_shown"] = df["nu_error"].clip(*NU_CLIP)
  df["genuine"] = flag(df["genuine"]).map({True: "genuine", False: "not genuine"})
  df["tag"] = df["tag"].astype(str)
  df["class"] = df["tag"].map(TAG_LABELS).fillna(df["tag"])
  return df


def nu_scatter(points: pd.DataFrame, title: str, colour: str = "genuine") -> alt.Chart:
  """ν^ε against ν^r, one point per latent, coloured by `colour` (genuine or tag), with the latent in the tooltip."""
  scale = alt.Scale(domain=["genuine", "not genuine"], range=["#2ca02c", "#d62728"]) if colour == "genuine" else \
      alt.Scale(domain=[TAG_LABELS[t] for t in LIVE_CLASSES], range=TAG_COLOURS)
  field, legend = ("genuine", "latent scaling") if colour == "genuine" else ("class", "Δnorm class")
  return alt.Chart(points, title=title).mark_circle(size=40, opacity=0.7).encode(
      x=alt.X("nu_recon_shown:Q", title="ν^r = β^r,base / β^r,chat", scale=alt.Scale(domain=list(NU_CLIP))),
      y=alt.Y("nu_error_shown:Q", title="ν^ε = β^ε,base / β^ε,chat", scale=alt.Scale(domain=list(NU_CLIP))),
      color=alt.Color(f"{field}:N", title=legend, scale=scale),
      tooltip=[alt.Tooltip("latent:Q", title="latent"), alt.Tooltip("class:N", title="Δnorm class"), "genuine:N",
               alt.Tooltip("nu_recon:Q", format=".3f"), alt.Tooltip("nu_error:Q", format=".3f"),
               alt.Tooltip("delta_norm:Q", format=".3f"), alt.Tooltip("freq:Q", format=".4f")],
  ).properties(height=320).interactive()


NEVER_FIRED_ROW = f"{NEVER_FIRED} (not a class)"
DEAD_IN_WINDOW_ROW = f"{DEAD_IN_WINDOW} (share)"


def class_table(runs: list[Run]) -> pd.DataFrame:
  """Live latents per Δnorm class (rows) and run (columns); then, apart, the latents that never fired, the share
  dead in the last training window (metrics.json), FVE and L0."""
  cols = {}
  for run in runs:
    tags = run_read(run, "latents")["tag"].astype(str).value_counts()
    metrics = run_read(run, "final_metrics")
    col = {t: int(tags.get(t, 0)) for t in LIVE_CLASSES}
    col.update({"live latents": int(sum(col.values())), NEVER_FIRED_ROW: int(tags.get("dead", 0)),
                DEAD_IN_WINDOW_ROW: fmt(metrics.get("dead_fraction")), "FVE base": fmt(metrics.get("fve/0")),
                "FVE chat": fmt(metrics.get("fve/1")), "L0": fmt(metrics.get("l0"), 2)})
    cols[run.name] = {k: str(v) for k, v in col.items()}
  return pd.DataFrame(cols)


def chosen_runs(names: list[str], every: list[str]) -> list[str]:
  """The runs multiselect: starts at the URL's `runs=` (its analysed runs), else the runs chosen before, else all.

  A name in `runs=` that is not an analysed run is refused with an error naming them; the URL keeps it (a reload
  shows the same) until the user changes the choice, which is written to the URL and remembered.
  """
  raw = st.query_params.get("runs")
  asked = None if raw is None else [n for n in dict.fromkeys(str(raw).split(",")) if n]
  given = None if asked is None else [n for n in asked if n in names]
  before = remembered("runs")
  if given is not None:
    default = given
    remember("runs", given)
  elif isinstance(before, list) and set(before) <= set(names):
    default = before
  else:
    default = names
  chosen = st.multiselect("runs", names, default=default, key="compare_runs",
                          on_change=lambda: remember("runs", list(st.session_state["compare_runs"])))
  if given is None or chosen != given:
    set_param("runs", ",".join(chosen))
  elif asked:  # the URL still names what it asked for: refuse the names that are not analysed runs
    for name in asked:
      if name not in names:
        st.error(not_found("run", name, names, every))
  return chosen


def render(root: ResultsRoot) -> None:
  """The compare page."""
  st.title("Compare runs")
  ready = [r for r in root.runs if r.analysis is not None and not r.error]
  for r in root.runs:
    if r.error:
      st.error(r.error)
  names = [r.name for r in ready]
  if not ready:
    st.info("No analysed run to compare: run `python -m launch.analyze --config.workdir=RUN` on a training run.")
    for name in (st.query_params.get("runs") or "").split(","):
      if name:
        st.error(not_found("run", name, names, [r.name for r in root.runs]))
    return
  chosen = chosen_runs(names, [r.name for r in root.runs])
  colour = st.radio("colour ν points by", ["genuine", "tag"], horizontal=True, key="compare_colour",
                    format_func={"genuine": "genuine or not", "tag": "Δnorm class"}.get)
  all_latents = st.checkbox("ν of every live latent (not only chat-only)", value=False, key="compare_all")
  runs = [root.run(n) for n in chosen]
  if not runs:
    st.info("No run chosen: pick runs above.")
    return
  st.table(class_table(runs))
  cols = st.columns(len(runs))
  for col, run in zip(cols, runs):
    latents = run_read(run, "latents")
    with col:
      st.altair_chart(delta_norm_histogram(latents, f"{run.name}: Δnorm of the live latents"), width="stretch")
      st.caption(f"{NEVER_FIRED}: {never_fired(latents)} (not in the histogram)")
      points = nu_points(latents, chat_only=not all_latents)
      st.altair_chart(nu_scatter(points, f"{run.name}: latent scaling ({len(points)} latents)", colour),
                      width="stretch")
      if points.empty and not all_latents:
        st.caption(f"{run.name} has no live chat-only latent with ν: tick 'ν of every live latent' to see the rest.")
      outside = int(((points["nu_recon"] != points["nu_recon_shown"]) |
                     (points["nu_error"] != points["nu_error_shown"])).sum())
      if outside:
        st.caption(f"{outside} latent(s) with ν outside [{NU_CLIP[0]}, {NU_CLIP[1]}] drawn on the edge.")


__all__ = ["DEAD_IN_WINDOW_ROW", "NEVER_FIRED_ROW", "NU_CLIP", "TAG_COLOURS", "TAG_LABELS", "chosen_runs",
           "class_table", "delta_norm_histogram", "never_fired", "nu_points", "nu_scatter", "render"]
