"""The dashboard's Streamlit entry: `streamlit run neurodiff_jax/dashboard/app.py -- --results DIR`.

The results root is `--results DIR` after `--`, else `$NEURODIFF_RESULTS`; `--model-mesh DATA,MODEL` loads the
Live page's model pair onto a model mesh (`launch.dashboard --config.model_mesh`, docs/scaling.md). Pages (st.navigation, one module
each in `views/` with `render(root)`): Overview, Compare runs, Latents, Causal test, ADL, Per-token KL, Diff
methods, Live, Agents.

URLs: each page has its own path, and its URL always names what it shows (docs/dashboard.md, "URLs"):
  /run-overview?page=overview&run=NAME        the runs' metrics (no run: every run)
  /compare-runs?page=compare&runs=A,B         the runs side by side
  /latent-browser?page=latents&run=NAME&latent=N
  /causal-test?page=causal&run=NAME           the causal test: verdict, bars with intervals, table
  /adl-lens?page=adl&diff=NAME
  /kl-divergence?page=kl&diff=NAME            per-token KL: text coloured by KL, the contexts of highest KL
  /diff-methods?page=methods&diff=NAME        every file of every diff method
  /live-models?page=live&run=NAME&diff=NAME&latent=N
  /agent-results?page=agents&organism=NAME&agent=TYPE&seed=S   the agents' grades, comparison and a transcript
`/?page=NAME&...` (NAME a page or its path) opens that page with the other parameters; `/` alone opens the
overview. A name or index that does not exist is refused with an error naming the valid ones, never replaced by
another; sidebar navigation carries the chosen run, diff, latent (and organism, agent, seed) to the next page and
into its URL. In
`AppTest`, set `at.query_params["page"] = "latents"` (and run, latent) before the first `at.run()` to open a page.

A missing or empty results root and results written by an older version are shown as an error naming the
command to run, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import streamlit as st

from neurodiff_jax.dashboard.views import own_url, query_param
from neurodiff_jax.dashboard.results import NoResults, OldResults, ResultsRoot, discover

PAGES = (("overview", "Overview"), ("compare", "Compare runs"), ("latents", "Latents"), ("causal", "Causal test"),
         ("adl", "ADL"), ("kl", "Per-token KL"), ("methods", "Diff methods"), ("live", "Live"), ("agents", "Agents"))
# The URL path of each page. The page modules live in `views/`, not `pages/`: Streamlit treats a `pages/` folder
# beside the main script as v1 multipage scripts, and on a session's first load its page list was those files, so
# a deep link (`/run-overview`) opened with a "Page not found" dialog before the navigation took over.
URL_PATHS = {"overview": "run-overview", "compare": "compare-runs", "latents": "latent-browser", "causal": "causal-test",
             "adl": "adl-lens", "kl": "kl-divergence", "methods": "diff-methods", "live": "live-models",
             "agents": "agent-results"}
# What `?page=` accepts: a page's name or its URL path, any case.
PAGE_NAMES = {**{path: slug for slug, path in URL_PATHS.items()}, **{slug: slug for slug in URL_PATHS}}


def model_mesh_arg(argv: list[str] | None = None) -> tuple[int, ...]:
  """The Live page's model mesh: `--model-mesh DATA,MODEL` among the script's arguments (() = one device)."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--model-mesh", default="")
  args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  return tuple(int(v) for v in args.model_mesh.split(",") if v.strip())


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
    own_url(slug)
    try:
      if slug == "live":  # written separately and heavy (models): imported only when opened
        try:
          from neurodiff_jax.dashboard.views import live
        except ImportError as e:
          st.error(f"The live page could not be loaded ({e}); the other pages work without it.")
          return
        live.render(root, model_mesh_arg())
        return
      import importlib
      importlib.import_module(f"neurodiff_jax.dashboard.views.{slug}").render(root)
    except (NoResults, OldResults, FileNotFoundError) as e:
      st.error(str(e))

  show.__name__ = f"page_{slug}"
  return show


def _start(pages: dict[str, st.Page]) -> Callable[[], None]:
  """The page at `/`: opens the page `?page=` names (the overview without one) with the other parameters."""

  def start() -> None:
    wanted = query_param("page") or "overview"
    slug = PAGE_NAMES.get(wanted.strip().lower())
    if slug is None:
      st.title("neurodiff-jax")
      st.error(f"page '{wanted}' not found; pages: {', '.join(URL_PATHS)} (or their paths: "
               f"{', '.join('/' + p for p in URL_PATHS.values())}). Pick one in the sidebar.")
      return
    params = {k: st.query_params.get_all(k) for k in st.query_params}
    # The page's own path from here on, so that the sidebar, a reload and a copied link agree.
    st.switch_page(pages[slug], query_params={**params, "page": slug})

  start.__name__ = "start"
  return start


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
  # Every page keeps its own path: a default page would be served at `/` only, and its documented path
  # (`/run-overview`) would be "page not found". `/` is a hidden page that forwards to the one asked for.
  pages = {slug: st.Page(_page(slug, root), title=title, url_path=URL_PATHS[slug]) for slug, title in PAGES}
  start = st.Page(_start(pages), title="neurodiff-jax", url_path="start", default=True, visibility="hidden")
  nav = st.navigation([start, *pages.values()])
  with st.sidebar:
    st.caption(f"Results: `{root.path}`")
    st.caption(f"{len(root.runs)} crosscoder run(s), {len(root.diffs)} diff result(s)")
    old = [r.name for r in root.runs if r.error] + [d.name for d in root.diffs if d.error]
    if old:
      st.warning(f"Written by an older version: {', '.join(old)} (see the overview for what to rerun).")
  nav.run()


__all__ = ["PAGES", "PAGE_NAMES", "URL_PATHS", "load_root", "main", "results_dir"]

if __name__ == "__main__":  # streamlit runs the script as __main__; importing it shows nothing
  main()
