"""Shared pieces of the dashboard's pages: cached table reads and widgets that follow the URL's query parameters.

Every table read goes through `st.cache_resource`, keyed by the file's path and modification time, so a page
rerun (every widget change) reads nothing twice and a rerun of `launch.analyze` is picked up. Not
`st.cache_data`: it hands out a copy by unpickling the result on every hit, which for a run's
examples table (tens of thousands of rows of token lists) cost most of a latent page's rerun
(benchmarks/dashboard.py). The cached tables are shared, so pages treat them as read-only: every
change goes into a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.results import DiffResult, Run

TAG_ORDER = ("chat_only", "base_only", "shared", "other", "dead")  # the Δnorm classes, in the order pages show them


def _stamp(path: Path) -> float:
  try:
    return path.stat().st_mtime
  except OSError:
    return 0.0


@st.cache_resource(show_spinner=False, max_entries=64)
def _run_read(path: str, what: str, stamp: float, _run: Run) -> Any:
  return getattr(_run, what)()


def run_read(run: Run, what: str) -> Any:
  """`run.<what>()` cached (what: latents, examples, latent_logit_lens, metrics_history, final_metrics, config)."""
  files = {"latents": "analysis/latents.parquet", "examples": "analysis/examples.parquet",
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


def query_param(name: str, default: str | None = None) -> str | None:
  """The URL's `?name=` value (the first when repeated)."""
  value = st.query_params.get(name)
  return default if value in (None, "") else str(value)


def pick(label: str, options: Sequence[str], param: str, key: str) -> str | None:
  """A selectbox over `options` that starts at `?param=` when the URL names one, and writes the choice back."""
  if not options:
    return None
  options = list(options)
  wanted = query_param(param)
  index = options.index(wanted) if wanted in options else 0
  choice = st.selectbox(label, options, index=index, key=key)
  if choice is not None and query_param(param) != choice:
    st.query_params[param] = choice
  return choice


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


__all__ = ["TAG_ORDER", "adl_means", "diff_table", "flag", "fmt", "pick", "query_param", "run_read", "run_table"]
