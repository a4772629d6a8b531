"""Shared pieces of the dashboard's pages: cached table reads and widgets that follow the URL's query parameters.

Every table read goes through `st.cache_resource`, keyed by the file's path and modification time, so a page
rerun (every widget change) reads nothing twice and a rerun of `launch.analyze` is picked up. Not
`st.cache_data`: it hands out a copy by unpickling the result on every hit, which for a run's
examples table (tens of thousands of rows of token lists) cost most of a latent page's rerun
(benchmarks/dashboard.py). The cached tables are shared, so pages treat them as read-only: every
change goes into a copy.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.results import DiffResult, ResultsRoot, Run

TAG_ORDER = ("chat_only", "base_only", "shared", "other", "dead")  # the `tag` values, in the order pages show them
LIVE_CLASSES = TAG_ORDER[:-1]  # the Δnorm classes proper: a dead latent's Δnorm is its initialisation's, not a class
# Two different "dead"s, never one name for both (docs/dashboard.md, "Dead latents"):
NEVER_FIRED = "never fired"  # analysis: latents.parquet tag 'dead', no firing on any analysed token
DEAD_IN_WINDOW = "dead in the last training window"  # training: metrics.json dead_fraction, idle for dead_tokens
DEAD_BADGE = "dead: never fired"  # the marker beside a latent that never fired, wherever one is listed or shown


def _stamp(path: Path) -> float:
  try:
    return path.stat().st_mtime
  except OSError:
    return 0.0


@st.cache_resource(show_spinner=False, max_entries=64)
def _run_read(path: str, what: str, stamp: float, _run: Run) -> Any:
  return getattr(_run, what)()


def run_read(run: Run, what: str) -> Any:
  """`run.<what>()` cached (what: latents, examples, latent_logit_lens, latent_histograms, metrics_history,
  final_metrics, config, summary)."""
  files = {"latents": "analysis/latents.parquet", "examples": "analysis/examples.parquet",
           "latent_histograms": "analysis/latent_histograms.npz",
           "latent_logit_lens": "analysis/logit_lens.parquet", "metrics_history": "tensorboard/metrics.jsonl",
           "final_metrics": "metrics.json", "config": "checkpoints", "summary": "analysis/summary.json"}
  return _run_read(str(run.path), what, _stamp(run.path / files[what]), run)


@st.cache_resource(show_spinner=False, max_entries=64)
def _run_table(path: str, file: str, stamp: float, _run: Run) -> pd.DataFrame:
  return _run.table(file)


def run_table(run: Run, file: str) -> pd.DataFrame:
  """Another analysis table of `run` (`steering.parquet`, `causal.parquet`), cached."""
  return _run_table(str(run.path), file, _stamp(run.path / "analysis" / file), run)


@st.cache_resource(show_spinner=False, max_entries=64)
def _diff_table(path: str, method: str, file: str, stamp: float, _diff: DiffResult) -> pd.DataFrame:
  return _diff.table(method, file)


def diff_table(diff: DiffResult, method: str, file: str) -> pd.DataFrame:
  """`diff.table(method, file)` cached (`file` with its extension)."""
  return _diff_table(str(diff.path), method, file, _stamp(diff.diff_dir / method / file), diff)


@st.cache_resource(show_spinner=False, max_entries=16)
def _adl_means(path: str, stamp: float, _diff: DiffResult) -> dict[str, np.ndarray] | None:
  return _diff.adl_means()


def adl_means(diff: DiffResult) -> dict[str, np.ndarray] | None:
  """`diff.adl_means()` cached."""
  return _adl_means(str(diff.path), _stamp(diff.diff_dir / "adl" / "means.npz"), diff)


# The URL parameters of the dashboard, and which of them each page reads (docs/dashboard.md, "URLs").
URL_PARAMS = ("page", "run", "runs", "diff", "latent", "alpha", "organism", "agent", "seed")
PAGE_PARAMS = {"overview": ("run",), "compare": ("runs",), "latents": ("run", "latent"), "causal": ("run",),
               "adl": ("diff",), "kl": ("diff",), "methods": ("diff",), "live": ("run", "diff", "latent", "alpha"),
               "agents": ("organism", "agent", "seed")}
# Session-state key of the selection carried across pages (run, runs, diff, latent; organism, agent, seed).
_MEMORY = "dashboard_selection"


def query_param(name: str, default: str | None = None) -> str | None:
  """The URL's `?name=` value (the last when repeated; `default` when absent or empty)."""
  value = st.query_params.get(name)
  return default if value in (None, "") else str(value)


def own_url(slug: str) -> None:
  """Makes the URL name the page shown: `page=slug`, the page's own parameters, nothing else.

  Another page's parameters are dropped quietly (the sidebar carries the selection, and a stale history entry
  holds them); a parameter the dashboard does not know is named in a warning, with the known ones, and dropped.
  """
  current = {k: st.query_params.get_all(k) for k in st.query_params}
  keep: dict[str, list[str]] = {"page": [slug]}
  unknown = []
  for name, values in current.items():
    if name in PAGE_PARAMS[slug]:
      keep[name] = values
    elif name not in URL_PARAMS:
      unknown.append(f"{name}={values[-1] if values else ''}")
  if unknown:
    st.warning(f"Ignored URL parameter(s) {', '.join(unknown)}: the dashboard reads {', '.join(URL_PARAMS)} "
               f"(this page: {', '.join(PAGE_PARAMS[slug])}).")
  if keep != current:
    st.query_params.from_dict(keep)


def set_param(name: str, value: str | None) -> None:
  """Writes `?name=value` to the URL (removes it for None), only when it changes."""
  if value is None:
    if name in st.query_params:
      del st.query_params[name]
  elif st.query_params.get(name) != value or len(st.query_params.get_all(name)) != 1:
    st.query_params[name] = value


def remembered(name: str) -> Any:
  """The selection `name` (run, runs, diff, latent, organism, agent, seed) the user made on this or another page, else
  None."""
  return st.session_state.get(_MEMORY, {}).get(name)


def remember(name: str, value: Any) -> None:
  """Carries the selection `name` to the other pages of this browser session."""
  st.session_state.setdefault(_MEMORY, {})[name] = value


def _remember_widget(name: str, key: str) -> None:
  remember(name, st.session_state.get(key))


def not_found(noun: str, wanted: str, options: Sequence[str], every: Sequence[str] | None = None,
              why: str | None = None) -> str:
  """The message refusing `wanted`, naming the valid choices (`every`: all of the root's when `options` are fewer)."""
  listed = ", ".join(options) or "none"
  if why is not None:
    return f"{noun} '{wanted}' cannot be shown here: {why}; {noun}s you can open here: {listed}."
  if every is not None and list(every) != list(options):
    return (f"{noun} '{wanted}' not found; {noun}s in this root: {', '.join(every) or 'none'} (this page opens "
            f"{listed}).")
  return f"{noun} '{wanted}' not found; {noun}s in this root: {listed}."


def pick(label: str, options: Sequence[str], param: str, key: str, *, noun: str | None = None,
         every: Sequence[str] | None = None, why: dict[str, str] | None = None,
         everything: str | None = None) -> str | None:
  """A selectbox over `options` for the URL parameter `param`, its choice written back to the URL and remembered.

  It starts at the user's last choice in it, else the URL's `?param=`, else the choice remembered from another
  page, else `everything` (an extra first option meaning no filter, shown as no parameter) or the first option.
  A URL value that is not an option is refused with an error naming the options (`every`: the root's names when
  this page offers fewer; `why`: name -> why it is not offered), and nothing is chosen (None) until the user
  picks one: no other object is shown as if it had been asked for.
  """
  options = list(options)
  noun = noun or param
  wanted = query_param(param)
  if not options:
    if wanted is not None:
      st.error(not_found(noun, wanted, options, every, (why or {}).get(wanted)))
    return None
  shown = [everything, *options] if everything is not None else options
  current = st.session_state.get(key)
  if current in shown:
    start = current
  elif wanted is not None:
    if wanted in options:
      start = wanted
      remember(param, wanted)
    else:
      st.error(not_found(noun, wanted, options, every, (why or {}).get(wanted)))
      start = None  # the bad value stays in the URL: a reload shows the same refusal
  elif remembered(param) in options:
    start = remembered(param)
  else:
    start = shown[0]
  choice = st.selectbox(label, shown, index=None if start is None else shown.index(start), key=key,
                        placeholder=f"choose a {noun}", on_change=_remember_widget, args=(param, key))
  if choice is not None:
    set_param(param, None if choice == everything else choice)
  return choice


def pick_diff(root: ResultsRoot, key: str, writes: str) -> DiffResult | None:
  """The diff result the user picks (URL `?diff=`), or None after saying why: none here, refused, or unreadable."""
  if not root.diffs:
    st.info(f"No diff results here: `python -m launch.diff --config=diff:narrow` (or `python -m launch.demo`) "
            f"writes {writes}.")
  name = pick("diff result", [d.name for d in root.diffs], "diff", key=key, noun="diff result")
  if name is None:  # no diff result, or one the URL names that the root does not hold: refused by pick
    return None
  diff = root.diff(name)
  if diff.error:
    st.error(diff.error)
    return None
  return diff


def shown_token(token: str) -> str:
  """A token as text a reader can see: newlines and tabs drawn, everything else escaped."""
  return html.escape(token).replace("\n", "↵").replace("\t", "⇥")


def tokens_html(tokens: Sequence[str], values: Sequence[float], marked: int, scale: float, *, rgb: str,
                title: Callable[[float], str], border: str, div_class: str) -> str:
  """Tokens as HTML, each background `rgb` at value / `scale` (0 where not finite), the `marked` token boxed."""
  scale = scale if scale > 0 else 1.0
  spans = []
  for i, (tok, v) in enumerate(zip(tokens, values)):
    alpha = float(np.clip(v / scale, 0.0, 1.0)) if np.isfinite(v) else 0.0
    style = f"background-color: rgba({rgb}, {alpha:.2f}); white-space: pre;"
    attr = f'title="{title(v)}"'
    if i == marked:
      spans.append(f'<span class="firing" {attr} style="{style} border: 2px solid {border}; font-weight: bold;">'
                   f"{shown_token(tok)}</span>")
    else:
      spans.append(f'<span class="tok" {attr} style="{style}">{shown_token(tok)}</span>')
  return f'<div class="{div_class}" style="font-family: monospace; line-height: 1.9;">' + "".join(spans) + "</div>"


def dead_latents(latents: pd.DataFrame) -> set[int]:
  """The latents of a latent table that never fired on the analysed tokens (tag 'dead')."""
  return {int(j) for j in latents.loc[latents["tag"].astype(str) == "dead", "latent"]}


def latent_label(latent: int, dead: set[int]) -> str:
  """A latent as a list shows it: its index, with the dead badge when it never fired."""
  return f"{int(latent)} ({DEAD_BADGE})" if int(latent) in dead else str(int(latent))


def default_latent(latents: pd.DataFrame) -> int | None:
  """The latent to start on: the best-ranked live chat-only one (lowest `nu_rank`), else the most chat-leaning
  live one (highest Δnorm); never a latent that never fired (None when every latent is dead)."""
  live = latents[latents["tag"].astype(str) != "dead"]
  if live.empty:
    return None
  chat = live[live["tag"].astype(str) == "chat_only"]
  if "nu_rank" in chat.columns:
    ranked = chat[np.isfinite(pd.to_numeric(chat["nu_rank"], errors="coerce").to_numpy(np.float64))]
    if len(ranked):
      return int(ranked.sort_values(["nu_rank", "latent"], kind="stable")["latent"].iloc[0])
  dn = pd.to_numeric(live["delta_norm"], errors="coerce").fillna(-1.0)
  return int(live.assign(_dn=dn).sort_values(["_dn", "latent"], ascending=[False, True], kind="stable")["latent"]
             .iloc[0])


def flag(column: pd.Series) -> pd.Series:
  """A nullable boolean column (e.g. `genuine`, missing where not judged) as plain bools, missing = False."""
  return column.astype("boolean").fillna(False).astype(bool)


def fmt(value: Any, digits: int = 4) -> str:
  """A number for display (— for missing)."""
  if value is None or value is pd.NA or (isinstance(value, float) and not np.isfinite(value)):
    return "—"
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.{digits}f}"
  return str(value)


__all__ = ["DEAD_BADGE", "DEAD_IN_WINDOW", "LIVE_CLASSES", "NEVER_FIRED", "PAGE_PARAMS", "TAG_ORDER", "URL_PARAMS",
           "adl_means", "dead_latents", "default_latent", "diff_table", "flag", "fmt", "latent_label", "not_found",
           "own_url", "pick", "pick_diff", "query_param", "remember", "remembered", "run_read", "run_table", "set_param", "shown_token", "tokens_html"]
