"""Diff methods: every file `launch.diff` wrote for a diff result, method by method, so no result goes unseen.

Query parameter `diff=NAME` picks the diff result. ADL and per-token KL have pages of their own (linked); this page
shows, for every method directory under `diff/` (weights, adl, kl, logit_diff, norms, pca, sae, patching: whichever
ran), its `done.json` summary, each Parquet table, each PNG plot and the shapes of its arrays (`.npy`, `.npz`), and
the pair's `pair.json`. Tables are shown as written (first MAX_ROWS rows), so a new method's outputs appear here
without a page of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import diff_table, pick_diff
from neurodiff_jax.dashboard.results import DiffResult, ResultsRoot

MAX_ROWS = 2000  # rows of a table shown (the count of all rows is printed)
OWN_PAGES = {"adl": ("ADL", "/adl-lens"), "kl": ("Per-token KL", "/kl-divergence")}


def method_files(diff: DiffResult, method: str) -> dict[str, list[Path]]:
  """The files of `diff/<method>/` by kind: parquet, png, array (.npy/.npz), other (done.json and section.html left out)."""
  out: dict[str, list[Path]] = {"parquet": [], "png": [], "array": [], "other": []}
  for f in sorted((diff.diff_dir / method).iterdir()):
    if not f.is_file() or f.name in ("done.json", "section.html"):
      continue
    kind = {".parquet": "parquet", ".png": "png", ".npy": "array", ".npz": "array"}.get(f.suffix, "other")
    out[kind].append(f)
  return out


def array_shapes(path: Path) -> pd.DataFrame:
  """name, shape and dtype of each array in a .npy or .npz file (memory-mapped: nothing large is read)."""
  if path.suffix == ".npy":
    a = np.load(path, mmap_mode="r")
    return pd.DataFrame([{"array": path.stem, "shape": str(tuple(a.shape)), "dtype": str(a.dtype)}])
  with np.load(path) as z:
    return pd.DataFrame([{"array": k, "shape": str(tuple(z[k].shape)), "dtype": str(z[k].dtype)} for k in z.files])


def render_method(diff: DiffResult, method: str) -> None:
  """One method's summary, tables, plots and arrays."""
  if method in OWN_PAGES:
    title, path = OWN_PAGES[method]
    st.markdown(f"Read it on its own page: [{title}]({path}?diff={diff.name}). Its files as written:")
  summary = diff.done(method)
  if summary:
    with st.expander("summary (done.json)"):
      st.json(summary, expanded=1)
  files = method_files(diff, method)
  for f in files["parquet"]:
    table = diff_table(diff, method, f.name)
    st.markdown(f"**{f.name}** — {len(table):,} rows")
    st.dataframe(table.head(MAX_ROWS), hide_index=True, key=f"methods_{method}_{f.stem}")
  for f in files["png"]:
    st.image(str(f), caption=f.name)
  for f in files["array"]:
    st.markdown(f"**{f.name}**")
    st.dataframe(array_shapes(f), hide_index=True, key=f"methods_{method}_{f.stem}_arrays")
  for f in files["other"]:
    st.caption(f"{f.name}: {f.stat().st_size:,} bytes")


def render(root: ResultsRoot) -> None:
  """The diff-methods page."""
  st.title("Diff methods")
  diff = pick_diff(root, "methods_diff", "one directory per method under <results>/diff/")
  if diff is None:
    return
  pair = diff.pair()
  st.caption(f"`{diff.diff_dir}`: base `{pair.get('base')}` → fine-tuned `{pair.get('finetuned')}`")
  with st.expander("pair.json"):
    st.json(json.loads((diff.diff_dir / "pair.json").read_text()), expanded=1)
  if not diff.methods:
    st.info("No method has finished in this diff result.")
    return
  for tab, method in zip(st.tabs(diff.methods), diff.methods):
    with tab:
      render_method(diff, method)


__all__ = ["MAX_ROWS", "array_shapes", "method_files", "render", "render_method"]
