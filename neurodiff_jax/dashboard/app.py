"""The dashboard's Streamlit entry: `streamlit run neurodiff_jax/dashboard/app.py -- --results DIR`.

The results root is `--results DIR` after `--`, else `$NEURODIFF_RESULTS`. Pages (st.navigation, one module
each in `pages/` with `render(root)`): Overview, Compare runs, Latents, ADL, Live.

URLs (query parameters; a page's own path works too, e.g. `/latent-browser?run=l1&latent=5`):
  ?page=overview|compare|latents|adl|live   the page to open (the default page becomes that one); its URL
                                            path (run-overview, compare-runs, latent-browser, adl-lens,
                                            live-models) is accepted too
  &run=NAME                                 overview / latents: the run (names as in the sidebar)
  &latent=N                                 latents: open latent N's page
  &runs=A,B                                 compare: the runs side by side
  &diff=NAME                                adl: the diff result
So `/?page=latents&run=batchtopk&latent=12` opens latent 12 of the batchtopk run. In `AppTest`, set
`at.query_params["page"] = "latents"` (and run, latent) before the first `at.run()` to open a page.

A missing or empty results root and results written by an older version are shown as an error naming the
command to run, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import streamlit as st

from neurodiff_jax.dashboard.results import NoResults, OldResults, ResultsRoot, discover

PAGES = (("overview", "Overview"), ("compare", "Compare runs"), ("latents", "Latents"), ("adl", "ADL"),
         ("live", "Live"))
# The URL path of each page. Never a module name of `pages/`: Streamlit treats a `pages/` folder beside the main
# script as v1 multipage scripts and, on a session's first run (and on every AppTest run), would execute
# `pages/<url path>.py` itself, which only defines `render` and shows nothing.
URL_PATHS = {"overview": "run-overview", "compare": "compare-runs", "latents": "latent-browser", "adl": "adl-lens",
             "live": "live-models"}


def results_dir(argv: list[str] | None = None) -> str | None:
  """The results root: `--results DIR` among the script's arguments, else $NEURODIFF_RESULTS."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--results", default=None)
  args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  return args.results or os.environ.get("NEURODIFF_RESULTS") or None


@st.cache_data(ttl=30, show_spinner=False)
def load_root(path: str) -> ResultsRoot:
  """`discover(path)`, cached for 30 s (a new run shows up on the next rerun after that)."""
  return discover(path)


def _page(slug: str, root: ResultsRoot) -> Callable[[], None]:
  """The callable st.Page of `slug`; the page module is imported when the page is shown."""

  def show() -> None:
    try:
      if slug == "live":  # written separately and heavy (models): imported only when opened
        try:
          from neurodiff_jax.dashboard.pages import live
        except ImportError as e:
          st.error(f"The live page could not be loaded ({e}); the other pages work without it.")
          return
        live.render(root)
        return
      import importlib
      importlib.import_module(f"neurodiff_jax.dashboard.pages.{slug}").render(root)
    except (NoResults, OldResults, FileNotFoundError) as e:
      st.error(str(e))

  show.__name__ = f"page_{slug}"
  return show


def main() -> None:
  """Finds the results root, then shows the chosen page."""
  st.set_page_config(page_title="neurodiff-jax", layout="wide")
  path = results_dir()
  if path is None:
    st.error("No results directory given: start the dashboard with `python -m launch.dashboard "
             "--config.results=DIR` (or `streamlit run neurodiff_jax/dashboard/app.py -- --results DIR`, or set "
             "$NEURODIFF_RESULTS). Make results with `python -m launch.demo`.")
    st.stop()
  try:
    root = load_root(str(path))
  except NoResults as e:
    st.error(str(e))
    st.stop()
  wanted = st.query_params.get("page")
  wanted = {**{v: k for k, v in URL_PATHS.items()}, **{k: k for k in URL_PATHS}}.get(wanted, "overview")
  pages = [st.Page(_page(slug, root), title=title, url_path=URL_PATHS[slug], default=slug == wanted)
           for slug, title in PAGES]
  nav = st.navigation(pages)
  with st.sidebar:
    st.caption(f"Results: `{root.path}`")
    st.caption(f"{len(root.runs)} crosscoder run(s), {len(root.diffs)} diff result(s)")
    old = [r.name for r in root.runs if r.error] + [d.name for d in root.diffs if d.error]
    if old:
      st.warning(f"Written by an older version: {', '.join(old)} (see the overview for what to rerun).")
  nav.run()


__all__ = ["PAGES", "URL_PATHS", "load_root", "main", "results_dir"]

if __name__ == "__main__":  # streamlit runs the script as __main__; importing it shows nothing
  main()
