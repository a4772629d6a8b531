"""Latent browser: filter a run's latent table, search it, and open a latent's page.

Query parameters: `run=NAME` (the run), `latent=N` (open latent N's page). `/?page=latents&run=l1&latent=5`
(or `/latent-browser?run=l1&latent=5`) opens latent 5 of run l1 directly. A run that is not an analysed run of the
root, or a latent that is not an index of its dictionary (`-1`, `abc`, `5000`), is refused with an error naming
the valid ones, and no other run or latent is shown in its place.

A latent page follows the convention of SAE dashboards (STYLE.md): top-activating contexts with the firing
token highlighted (and a few contexts per activation quantile), the activation histogram, decoder norms per
model, the tokens its chat decoder direction promotes and suppresses (logit lens), its statistics. Contexts are
HTML: each token escaped, its background coloured by the latent's activation on it, the firing token boxed
(`class="firing"`).

A latent that never fired on the analysed tokens (tag `dead`) carries the badge "dead: never fired" in the table
(`status`), in the latent picker and on its page, and is never the latent a page starts on (`default_latent`).
"""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import quote

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import (
  DEAD_BADGE,
  NEVER_FIRED,
  TAG_ORDER,
  dead_latents,
  default_latent,
  flag,
  fmt,
  latent_label,
  pick,
  query_param,
  remember,
  remembered,
  run_read,
  run_table,
  set_param,
  tokens_html,
)
from neurodiff_jax.dashboard.results import ResultsRoot, Run, analyze_command

TABLE_COLUMNS = ["latent", "status", "tag", "delta_norm", "freq", "max_act", "nu_error", "nu_recon", "template_share",
                 "genuine", "dec_cos"]
STAT_COLUMNS = ["tag", "delta_norm", "dec_norm_base", "dec_norm_chat", "dec_cos", "freq", "count", "max_act",
                "beta_recon_base", "beta_recon_chat", "beta_error_base", "beta_error_chat", "beta_act_base",
                "beta_act_chat", "nu_recon", "nu_error", "template_share", "template_mass_share", "genuine",
                "nu_rank", "nu_half"]
QUANTILES = ("q4", "q3", "q2", "q1")  # highest activation quantile first
# What the histogram's legend calls each group of stored examples (analysis/examples.parquet `group`).
GROUP_LABELS = {"top": "top activations", "q4": "quantile 4 (highest)", "q3": "quantile 3", "q2": "quantile 2",
                "q1": "quantile 1 (lowest)"}


def context_html(tokens: list[str], acts: list[float], index: int, scale: float) -> str:
  """One context as HTML: each token's background by its activation / `scale`, the firing token (`index`) boxed."""
  return tokens_html(tokens, acts, index, scale, rgb="255, 140, 0", border="#c00", div_class="context",
                     title=lambda v: f"activation {v:.3f}")


def _strip(token: str) -> str:
  return token.strip().casefold()


def search(latents: pd.DataFrame, examples: pd.DataFrame, query: str) -> pd.DataFrame:
  """Latents matching `query`: an index (`12`, `#12`), else latents whose top contexts contain the token."""
  query = query.strip()
  if not query:
    return latents
  m = re.fullmatch(r"#?(\d+)", query)
  if m:
    return latents[latents["latent"] == int(m.group(1))]
  top = examples[examples["group"].astype(str) == "top"]
  want = _strip(query)
  hit = top["context_tokens"].map(lambda toks: any(_strip(t) == want for t in toks))
  if not hit.any():  # no whole-token match: a piece of one (a word split into pieces)
    hit = top["context_tokens"].map(lambda toks: any(want in _strip(t) for t in toks))
  return latents[latents["latent"].isin(set(top.loc[hit, "latent"].tolist()))]


def _range(df: pd.DataFrame, col: str) -> tuple[float, float]:
  vals = df[col].astype(float)
  vals = vals[np.isfinite(vals)]
  return (float(vals.min()), float(vals.max())) if len(vals) else (0.0, 1.0)


def _within(df: pd.DataFrame, col: str, lo: float, hi: float) -> pd.Series:
  vals = df[col].astype(float)
  return (vals >= lo) & (vals <= hi)


def filters(latents: pd.DataFrame) -> pd.DataFrame:
  """The filter widgets (tag, ν, frequency, template share, genuine) and the rows they leave."""
  tags = [t for t in TAG_ORDER if t in set(latents["tag"].astype(str))]
  c1, c2, c3 = st.columns(3)
  chosen = c1.multiselect("tag", tags, default=tags, key="latents_tag")
  genuine_only = c1.checkbox("genuine only (chat-only latents that pass latent scaling)", key="latents_genuine")
  lo_f, hi_f = _range(latents, "freq")
  freq = c2.slider("firing frequency", lo_f, max(hi_f, lo_f + 1e-9), (lo_f, max(hi_f, lo_f + 1e-9)),
                   format="%.4f", key="latents_freq")
  share = c2.slider("template share", 0.0, 1.0, (0.0, 1.0), step=0.01, key="latents_template")
  use_nu = c3.checkbox("filter by ν (drops latents without ν)", key="latents_use_nu")
  nu_error = c3.slider("ν^ε range", -1.0, 2.0, (-1.0, 0.2), step=0.05, key="latents_nu_error", disabled=not use_nu)
  nu_recon = c3.slider("ν^r range", -1.0, 2.0, (-1.0, 0.5), step=0.05, key="latents_nu_recon", disabled=not use_nu)
  keep = latents["tag"].astype(str).isin(chosen)
  if genuine_only:
    keep &= flag(latents["genuine"])
  if (freq[0], freq[1]) != (lo_f, max(hi_f, lo_f + 1e-9)):  # untouched: keep the latents without a frequency too
    keep &= _within(latents, "freq", *freq)
  if (share[0], share[1]) != (0.0, 1.0):
    keep &= _within(latents, "template_share", *share)
  if use_nu:
    keep &= _within(latents, "nu_error", *nu_error) & _within(latents, "nu_recon", *nu_recon)
  return latents[keep]


def render_latent(run: Run, latents: pd.DataFrame, latent: int) -> None:
  """One latent's page: contexts, histogram, decoder norms, logit lens, statistics (STYLE.md order)."""
  rows = latents[latents["latent"] == latent]
  if rows.empty:
    st.error(f"Latent {latent} is not in run {run.name} (dictionary of {len(latents)} latents): pick 0..."
             f"{len(latents) - 1}.")
    return
  row = rows.iloc[0]
  is_dead = str(row["tag"]) == "dead"
  st.header(f"Latent {latent}")
  if is_dead:
    st.badge(DEAD_BADGE, icon=":material/block:", color="red")
    st.warning(f"Latent {latent} {NEVER_FIRED} on the {_tokens(run)} analysed tokens: it has no contexts, no "
               "activation distribution and no max activation, and its Δnorm is its initialisation's, not a class. "
               "Steering by it adds its decoder row in code units, which barely moves the models.")
  st.caption(f"run {run.name} · tag {row['tag']} · Δnorm {fmt(row['delta_norm'], 3)} · genuine "
             f"{fmt(row['genuine'])} · freq {fmt(row['freq'], 5)}")
  examples = run_read(run, "examples")
  mine = examples[examples["latent"] == latent]
  scale = float(row["max_act"]) if np.isfinite(row["max_act"]) and row["max_act"] > 0 else \
      float(mine["activation"].max() if len(mine) else 1.0)

  st.subheader("Top activating contexts")
  top = mine[mine["group"].astype(str) == "top"].sort_values("rank")
  if top.empty and is_dead:
    st.info(f"No contexts: latent {latent} {NEVER_FIRED} on the analysed tokens.")
  elif top.empty:
    st.info("No contexts stored for this latent (`examples.context_latents` decides which live latents get them; "
            "chat-only latents come first).")
  else:
    st.html("".join(
        f'<div class="example" style="margin-bottom: 0.4em;"><small>{fmt(e.activation, 3)} · token '
        f"{html.escape(str(row_token(e)))} · {contribution_html(float(e.activation), row)}</small>"
        f"{context_html(list(e.context_tokens), list(e.context_acts), int(e.context_index), scale)}</div>"
        for e in top.head(10).itertuples()))
    st.caption("Decoder contribution: the norm of what the latent adds to each model's reconstruction at the firing "
               "token, activation × ‖d_j‖ of that model's decoder row (original units).")
    quantiles = [q for q in QUANTILES if (mine["group"].astype(str) == q).any()]
    if quantiles:
      st.subheader("Contexts per activation quantile")
      for q in quantiles:
        part = mine[mine["group"].astype(str) == q].sort_values("rank").head(3)
        with st.expander(f"{q} (activations {fmt(part.activation.min(), 3)}–{fmt(part.activation.max(), 3)})"):
          st.html("".join(context_html(list(e.context_tokens), list(e.context_acts), int(e.context_index), scale)
                          for e in part.itertuples()))

  left, right = st.columns(2)
  with left:
    st.subheader("Activation histogram")
    activation_histogram(run, latent, mine, is_dead)
  with right:
    st.subheader("Decoder norm per model")
    norms = {f"{c.removeprefix('dec_norm_')} model": float(row[c]) for c in latents.columns
             if c.startswith("dec_norm_")}
    st.altair_chart(alt.Chart(pd.DataFrame({"model": list(norms), "norm": list(norms.values())})).mark_bar()
                    .encode(x=alt.X("model:N", sort=None, title=None), y=alt.Y("norm:Q", title="decoder norm ‖d_j‖"),
                            tooltip=["model:N", alt.Tooltip("norm:Q", format=".4f")]).properties(height=220),
                    width="stretch")

  st.subheader("Logit lens of the chat decoder direction")
  lens = run_read(run, "latent_logit_lens") if run.has("logit_lens.parquet") else pd.DataFrame()
  lens = lens[lens["latent"] == latent] if len(lens) else lens
  if lens.empty:
    st.info("No logit lens for this latent: launch.analyze reads it for every latent that fired "
            "(`logit_lens.num_latents=0`, the default), or for the first N when a limit was set; a latent that "
            "never fired has none. Rerun the analysis with `--config.logit_lens.num_latents=0 "
            f"--config.force_parts='(\"logit_lens\",)'` to cover every live latent (`{analyze_command(run.path)}`).")
  else:
    c1, c2 = st.columns(2)
    for col, direction in ((c1, "promoted"), (c2, "suppressed")):
      part = lens[lens["direction"].astype(str) == direction].sort_values("rank")
      col.markdown(f"**{direction}**")
      col.dataframe(part[["token", "logit"]].assign(token=part["token"].astype(str).map(repr)), hide_index=True,
                    key=f"lens_{direction}")

  steer = run_table(run, "steering.parquet") if run.has("steering.parquet") else pd.DataFrame()
  steer = steer[steer["latent"] == latent] if len(steer) else steer
  if len(steer):
    st.subheader("Steering with the decoder direction")
    st.caption("Greedy completions with α · max activation · d_j^chat added after the layer at every position "
               "(analysis `steering` part; α = 0 unsteered). The whole text as generated.")
    with st.container(key="latent_steering"):
      st.html(steering_html(steer))
  if not is_dead:
    alpha = live_alpha(steer)
    st.markdown(f"[Steer both models by latent {latent} on the Live page (α = {alpha:g} × max activation)]"
                f"({live_url(run.name, latent, alpha)})")

  st.subheader("Statistics")
  stats = {c: fmt(row[c], 5) for c in STAT_COLUMNS if c in latents.columns}
  st.table(pd.DataFrame({"value": list(stats.values())}, index=list(stats)))


def _tokens(run: Run) -> str:
  """The number of analysed tokens (analysis summary), as text."""
  try:
    n = run_read(run, "summary").get("tokens")
  except (OSError, ValueError):
    n = None
  return f"{int(n):,}" if n is not None else "?"


def contribution_html(activation: float, row: pd.Series) -> str:
  """activation × ‖d_j‖ per model (`dec_norm_<model>` columns): the norm of the latent's part of each reconstruction."""
  parts = [(c.removeprefix("dec_norm_"), activation * float(row[c])) for c in row.index if str(c).startswith("dec_norm_")]
  attrs = " ".join(f'data-{html.escape(m)}="{v:.6g}"' for m, v in parts)
  text = ", ".join(f"{html.escape(m)} {v:.3g}" for m, v in parts)
  return f'<span class="contrib" {attrs}>decoder contribution: {text}</span>'


def activation_histogram(run: Run, latent: int, mine: pd.DataFrame, is_dead: bool) -> None:
  """The latent's activation histogram over every analysed token (latent_histograms.npz), log-spaced bins."""
  if not run.has("latent_histograms.npz"):
    st.info("This analysis has no latent_histograms.npz (written before the pass counted every activation): "
            f"rerun `{analyze_command(run.path)}`. Below, only the stored examples (top activations and a sample "
            "of firings), which are not the distribution.")
    if len(mine):
      shown = mine[["activation"]].assign(examples=[GROUP_LABELS.get(g, g) for g in mine["group"].astype(str)])
      st.altair_chart(alt.Chart(shown).mark_bar().encode(
          x=alt.X("activation:Q", bin=alt.Bin(maxbins=30), title="activation"), y=alt.Y("count():Q", title="examples"),
          color=alt.Color("examples:N", title="examples", sort=[GROUP_LABELS[g] for g in ("top", *QUANTILES)]),
      ).properties(height=220), width="stretch")
    return
  hist = run_read(run, "latent_histograms")
  counts, edges = np.asarray(hist["counts"][latent], np.int64), np.asarray(hist["edges"], np.float64)
  fired = int(counts.sum())
  if not fired:
    st.info(f"Latent {latent} {NEVER_FIRED} on the {_tokens(run)} analysed tokens: no activation to count."
            if is_dead else f"Latent {latent} has no firing in its histogram.")
    return
  frame = histogram_frame(counts, edges)
  st.altair_chart(alt.Chart(frame, title=f"{fired:,} firings over {_tokens(run)} analysed tokens").mark_bar().encode(
      x=alt.X("low:Q", scale=alt.Scale(type="log"), title="activation (log scale)"), x2="high:Q",
      y=alt.Y("firings:Q", title="tokens"),
      tooltip=[alt.Tooltip("low:Q", format=".3g"), alt.Tooltip("high:Q", format=".3g"), alt.Tooltip("firings:Q")],
  ).properties(height=220), width="stretch")
  st.caption(f"Every activation of the latent over the analysed tokens (not only the stored examples), in "
             f"{len(counts)} log-spaced bins from {edges[0]:.0e} to {edges[-1]:.0e}; the first bin also holds smaller "
             "activations and the last larger ones.")


def histogram_frame(counts: np.ndarray, edges: np.ndarray) -> pd.DataFrame:
  """The non-empty bins of one latent's histogram: low, high (nominal edges) and firings."""
  keep = counts > 0
  return pd.DataFrame({"low": edges[:-1][keep], "high": edges[1:][keep], "firings": counts[keep]})


def steering_html(steer: pd.DataFrame) -> str:
  """Every steered completion in full (wrapped, escaped), grouped by prompt and model, by increasing strength."""
  out = []
  for (prompt, model), part in steer.groupby(["prompt", "model"], sort=False):
    rows = "".join(f'<tr><td style="white-space: nowrap;">× {float(r.multiple):g}</td>'
                   f'<td class="completion" style="white-space: pre-wrap;">{html.escape(str(r.completion))}</td></tr>'
                   for r in part.sort_values("multiple").itertuples())
    out.append(f'<div class="steer"><b>{html.escape(str(model))} model</b>, prompt '
               f"<i>{html.escape(str(prompt))}</i><table>{rows}</table></div>")
  return "".join(out)


def live_alpha(steer: pd.DataFrame) -> float:
  """The α to open Live with: the smallest multiple of max activation whose chat completion differs from the
  unsteered one on some prompt (analysis steering), else 2."""
  if not len(steer):
    return 2.0
  chat = steer[steer["model"].astype(str) == "chat"] if (steer["model"].astype(str) == "chat").any() else steer
  plain = chat[chat["multiple"] == 0].set_index("prompt")["completion"]
  moved = [float(r.multiple) for r in chat[chat["multiple"] > 0].itertuples()
           if r.prompt in plain.index and str(r.completion) != str(plain[r.prompt])]
  return min(moved) if moved else 2.0


def live_url(run: str, latent: int, alpha: float) -> str:
  """The Live page steering both models by `latent` of `run` at α (× its max activation), as a relative link."""
  return f"/live-models?run={quote(run)}&latent={int(latent)}&alpha={alpha:g}"


def latent_url(run: str, latent: int) -> str:
  """A latent's page, as a relative link."""
  return f"/latent-browser?run={quote(run)}&latent={int(latent)}"


def row_token(example: Any) -> str:
  """The firing token of an example row, as read."""
  tokens = list(example.context_tokens)
  index = int(example.context_index)
  return repr(tokens[index]) if 0 <= index < len(tokens) else "?"


def wanted_latent(run: Run, latents: pd.DataFrame) -> tuple[int | None, bool]:
  """(the latent the URL or an earlier page asks for, whether it was refused) for `run`.

  The URL's `latent=` must be an index of the run's dictionary (a whole number in its latent table); anything else
  is refused with an error naming the range. Without one, the latent opened before on this run (another page).
  """
  wanted = query_param("latent")
  if wanted is None:
    before = remembered("latent")
    return (before[1], False) if isinstance(before, tuple) and before[0] == run.name else (None, False)
  known = {int(x) for x in latents["latent"]}
  if re.fullmatch(r"\d+", wanted.strip()) and int(wanted) in known:
    remember("latent", (run.name, int(wanted)))
    return int(wanted), False
  st.error(f"latent '{wanted}' is not a latent of run {run.name}: its latents are 0...{len(latents) - 1} (whole "
           "numbers). Pick one below.")
  return None, True


def render(root: ResultsRoot) -> None:
  """The latent browser."""
  st.title("Latents")
  ready = [r for r in root.runs if r.analysis is not None and not r.error]
  for r in root.runs:
    if r.error:
      st.error(r.error)
  why = {r.name: "it has no readable analysis (run `python -m launch.analyze` on it)" for r in root.runs
         if r not in ready}
  if not ready:
    st.info("No analysed run: `python -m launch.analyze --config.workdir=RUN` writes the latent table.")
  name = pick("run", [r.name for r in ready], "run", key="latents_run", every=[r.name for r in root.runs], why=why)
  if name is None:  # no analysed run, or one the URL names that is not: refused above
    return
  run = root.run(name)
  latents = run_read(run, "latents")
  examples = run_read(run, "examples")

  shown = filters(latents)
  query = st.text_input("search: a latent index, or a token in its top contexts", key="latents_search")
  shown = search(shown, examples, query)
  st.caption(f"{len(shown)} of {len(latents)} latents")
  if query.strip() and shown.empty:
    asked = re.fullmatch(r"#?(\d+)", query.strip())
    st.warning(f"latent {asked.group(1)} is not among the latents the filters leave (run {run.name} has latents "
               f"0...{len(latents) - 1})" if asked else
               f"no latent left by the filters has '{query.strip()}' as a token of its top contexts")
  sort = st.selectbox("sort by", ["delta_norm", "freq", "nu_error", "nu_recon", "template_share", "latent",
                                  "max_act"], key="latents_sort")
  shown = shown.sort_values(sort, ascending=sort in ("nu_error", "nu_recon", "latent"), na_position="last")
  dead = dead_latents(latents)
  shown = shown.assign(status=np.where(shown["latent"].isin(dead), DEAD_BADGE, "live"))
  shown = shown.assign(page=[latent_url(run.name, j) for j in shown["latent"]])
  st.dataframe(shown[[c for c in TABLE_COLUMNS if c in shown.columns] + ["page"]], hide_index=True, key="latents_table",
               column_config={"page": st.column_config.LinkColumn("page", display_text="open")})

  options = [int(x) for x in shown["latent"].head(500)]
  current = st.session_state.get("latents_latent")
  wanted, refused = (current, False) if current in options else wanted_latent(run, latents)
  if wanted is not None and wanted not in options:  # asked for, but filtered out of the table: still openable
    options = [wanted, *options]
  if not options:
    return
  if wanted is None and not refused:  # nothing asked for: the best live latent, never one that never fired
    best = default_latent(shown)
    wanted = best if best in options else next((j for j in options if j not in dead), options[0])
  index = None if refused else options.index(wanted)
  latent = st.selectbox("open latent", options, index=index, key="latents_latent", placeholder="choose a latent",
                        format_func=lambda j: latent_label(j, dead),
                        on_change=lambda: remember("latent", (run.name, st.session_state["latents_latent"])))
  if latent is None:  # the URL's latent was refused above; the URL keeps it until one is picked
    return
  set_param("latent", str(latent))
  st.divider()
  render_latent(run, latents, int(latent))


__all__ = ["GROUP_LABELS", "QUANTILES", "activation_histogram", "context_html", "contribution_html", "filters",
           "histogram_frame", "latent_url", "live_alpha", "live_url", "render", "render_latent", "search",
           "steering_html", "wanted_latent"]
