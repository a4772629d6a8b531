"""The dashboard's pages driven headless with Streamlit's AppTest; every check is against the results files.

A page is opened as a browser would open `/?page=NAME&run=...&latent=N`: `at.query_params` before the first run.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest
from streamlit.util import calc_hash

from neurodiff_jax.dashboard.app import PAGES, URL_PATHS
from neurodiff_jax.dashboard.results import discover
from tests.causal_verdicts import check_verdict
from tests.numerics import U64, assert_close, rounding

APP = str(Path(__file__).resolve().parents[2] / "neurodiff_jax" / "dashboard" / "app.py")


def open_page(root: Path, page: str, monkeypatch, **params: str) -> AppTest:
  """The app on `root`, opened at `page` with query parameters `params`, after its first run."""
  monkeypatch.setenv("NEURODIFF_RESULTS", str(root))
  at = AppTest.from_file(APP, default_timeout=120)
  at.query_params["page"] = page
  for k, v in params.items():
    at.query_params[k] = str(v)
  at.run()
  assert not at.exception, [e.value for e in at.exception]
  return at


def _runs(root: Path) -> list[Path]:
  return sorted(p for p in (root / "runs").iterdir() if (p / "analysis" / "latents.parquet").is_file())


def _diff(root: Path) -> Path:
  return min(p for p in (root / "diffs").iterdir() if (p / "diff" / "adl" / "logit_lens.parquet").is_file())


def _table(at: AppTest, *columns: str, which: int = 0) -> pd.DataFrame:
  """The `which`-th st.dataframe shown that has all of `columns` (AppTest does not expose a dataframe's key)."""
  found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
  assert len(found) > which, f"no dataframe {which} with {columns}: {[list(d.value.columns) for d in at.dataframe]}"
  return found[which]


def test_overview_shows_each_runs_metrics(demo_root, monkeypatch):
  at = open_page(demo_root, "overview", monkeypatch)
  assert not at.error, [e.value for e in at.error]
  shown = {}
  for m in at.metric:
    shown.setdefault(m.label, []).append(m.value)
  runs = _runs(demo_root)
  metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
  # Tabs in discovery order (sorted directory names under runs/).
  assert shown["FVE base (fve/0)"] == [f"{m['fve/0']:.4f}" for m in metrics]
  assert shown["FVE chat (fve/1)"] == [f"{m['fve/1']:.4f}" for m in metrics]
  assert shown["L0"] == [f"{m['l0']:.2f}" for m in metrics]
  # Training's dead latents under their own name, never "dead fraction" (the analysis's are "never fired").
  assert shown["dead in the last training window"] == [f"{m['dead_fraction']:.4f}" for m in metrics]
  assert not any("dead fraction" in label for label in shown)
  tables = [t.value for t in at.table]
  captions = [c.value for c in at.caption]
  for run, config, classes in zip(runs, tables[0::2], tables[1::2]):
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert config.loc["sparsity", "value"] == summary["sparsity"]
    assert config.loc["dict size", "value"] == str(summary["dict_size"])
    tags = pd.read_parquet(run / "analysis" / "latents.parquet")["tag"].astype(str).value_counts()
    # The classes are of the live latents; the ones that never fired are counted apart, under that name.
    assert {k: int(v) for k, v in classes["latents"].items() if int(v)} == {k: int(v) for k, v in tags.items()
                                                                          if k != "dead"}
    assert "dead" not in classes.index
    assert any(c.startswith(f"never fired: {int(tags.get('dead', 0))} (not in the classes") for c in captions)
  # The analysis outputs no other page shows: every steering sample, the report to download.
  for i, run in enumerate(runs):
    steer = pd.read_parquet(run / "analysis" / "steering.parquet")
    shown = _table(at, "latent", "model", "prompt", "strength", "completion", which=i)
    pd.testing.assert_frame_equal(shown.reset_index(drop=True), steer, check_dtype=False)
  assert len(at.get("download_button")) == len(runs)
  # Training curves: four altair charts per run from metrics.jsonl.
  charts = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
  assert [c["title"] for c in charts] == ["loss", "FVE", "L0", "dead in the last training window"] * len(runs)


def test_compare_plots_each_runs_latents(demo_root, monkeypatch):
  runs = _runs(demo_root)
  at = open_page(demo_root, "compare", monkeypatch)
  (counts,) = [t.value for t in at.table]
  assert list(counts.columns) == [r.name for r in runs]
  titles = [json.loads(c.proto.spec)["title"] for c in at.get("vega_lite_chart")]
  frames = {spec["title"]: data for spec, data in _chart_frames(at)}
  captions = [c.value for c in at.caption]
  for run in runs:
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    tags = lat["tag"].astype(str).value_counts()
    for tag in ("chat_only", "shared", "other", "base_only"):
      assert int(counts.loc[tag, run.name]) == int(tags.get(tag, 0))
    # The latents that never fired are in no class count and no histogram, and are counted apart.
    assert "dead" not in counts.index
    assert int(counts.loc["never fired (not a class)", run.name]) == int(tags.get("dead", 0))
    assert int(counts.loc["live latents", run.name]) == int((lat["tag"].astype(str) != "dead").sum())
    metrics = json.loads((run / "metrics.json").read_text())
    assert counts.loc["dead in the last training window (share)", run.name] == f"{metrics['dead_fraction']:.4f}"
    hist = frames[f"{run.name}: Δnorm of the live latents"]
    assert sorted(hist["latent"]) == sorted(lat.loc[lat["tag"].astype(str) != "dead", "latent"])
    assert f"never fired: {int(tags.get('dead', 0))} (not in the histogram)" in captions
    chat = lat[(lat["tag"].astype(str) == "chat_only") & np.isfinite(lat["nu_error"]) & np.isfinite(lat["nu_recon"])]
    assert f"{run.name}: latent scaling ({len(chat)} latents)" in titles
  # Every live latent instead of the chat-only ones.
  at.checkbox(key="compare_all").check().run()
  titles = [json.loads(c.proto.spec)["title"] for c in at.get("vega_lite_chart")]
  for run in runs:
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    n = int((np.isfinite(lat["nu_error"]) & np.isfinite(lat["nu_recon"])).sum())
    assert f"{run.name}: latent scaling ({n} latents)" in titles


def test_latent_browser_filters_and_searches(demo_root, monkeypatch):
  run = _runs(demo_root)[-1]
  lat = pd.read_parquet(run / "analysis" / "latents.parquet")
  at = open_page(demo_root, "latents", monkeypatch, run=run.name)
  assert at.selectbox(key="latents_run").value == run.name
  assert len(_table(at, "latent", "tag", "delta_norm")) == len(lat)
  tag = lat["tag"].astype(str).value_counts().index[-1]  # the rarest tag
  at.multiselect(key="latents_tag").set_value([tag]).run()
  shown = _table(at, "latent", "tag", "delta_norm")
  assert set(shown["tag"].astype(str)) == {tag}
  assert sorted(shown["latent"]) == sorted(lat.loc[lat["tag"].astype(str) == tag, "latent"])
  at.multiselect(key="latents_tag").set_value(sorted(set(lat["tag"].astype(str)))).run()
  at.slider(key="latents_template").set_range(0.5, 1.0).run()
  shown = _table(at, "latent", "tag", "delta_norm")
  assert sorted(shown["latent"]) == sorted(lat.loc[lat["template_share"].between(0.5, 1.0), "latent"])
  at.slider(key="latents_template").set_range(0.0, 1.0).run()
  # Search by index, then by a token of a latent's top context.
  at.text_input(key="latents_search").input("12").run()
  assert _table(at, "latent", "tag", "delta_norm")["latent"].tolist() == [12]
  ex = pd.read_parquet(run / "analysis" / "examples.parquet")
  top = ex[ex["group"].astype(str) == "top"]
  word = next(t.strip() for toks in top["context_tokens"] for t in toks if t.strip().isalpha() and len(t.strip()) > 3)
  expected = {int(r.latent) for r in top.itertuples()
              if any(t.strip().casefold() == word.casefold() for t in r.context_tokens)}
  at.text_input(key="latents_search").input(word).run()
  assert set(_table(at, "latent", "tag", "delta_norm")["latent"]) == expected


def test_latent_page_from_the_url(demo_root, monkeypatch):
  run = _runs(demo_root)[-1]
  ex = pd.read_parquet(run / "analysis" / "examples.parquet")
  top = ex[ex["group"].astype(str) == "top"].sort_values(["latent", "rank"])
  lens = pd.read_parquet(run / "analysis" / "logit_lens.parquet")
  both = set(top["latent"]) & set(lens["latent"])  # a latent with contexts and a logit lens, when one has both
  latent = int(min(both or set(top["latent"])))
  first = top[top["latent"] == latent].iloc[0]
  at = open_page(demo_root, "latents", monkeypatch, run=run.name, latent=latent)
  assert not at.error, [e.value for e in at.error]
  assert [h.value for h in at.header] == [f"Latent {latent}"]
  assert at.query_params["latent"] == str(latent) and at.query_params["run"] == run.name
  contexts = at.get("html")[0].value
  firing = html.escape(first["context_tokens"][first["context_index"]]).replace("\n", "↵").replace("\t", "⇥")
  # The first context's boxed token is its firing token; every context has exactly one.
  head = contexts.split('class="example"')[1]
  assert f">{firing}</span>" in head.split('class="firing"')[1].split("</span>")[0] + "</span>"
  assert contexts.count('class="firing"') == min(10, int((top["latent"] == latent).sum()))
  mine = lens[(lens["latent"] == latent) & (lens["direction"].astype(str) == "promoted")].sort_values("rank")
  assert len(mine) or not both
  if len(mine):
    assert _table(at, "token", "logit")["token"].tolist() == [repr(t) for t in mine["token"]]
  row = pd.read_parquet(run / "analysis" / "latents.parquet").set_index("latent").loc[latent]
  (stats,) = [t.value for t in at.table]
  assert stats.loc["delta_norm", "value"] == f"{row['delta_norm']:.5f}"
  assert stats.loc["tag", "value"] == row["tag"]


def test_adl_page_shows_the_tables(demo_root, monkeypatch):
  diff = _diff(demo_root)
  at = open_page(demo_root, "adl", monkeypatch, diff=diff.name)
  assert not at.error, [e.value for e in at.error]
  lens = pd.read_parquet(diff / "diff" / "adl" / "logit_lens.parquet")
  shown = _table(at, "promoted (+δ)")
  groups = lens.groupby(["layer", "position"]).size()
  assert len(shown) == len(groups)
  first = lens[(lens["sign"] == "+") & (lens["rank"] == 0)].sort_values(["layer", "position"]).iloc[0]
  assert shown.iloc[0]["promoted (+δ)"].split(" · ")[0].removesuffix(" ✓") == first["token"]
  rel = pd.read_parquet(diff / "diff" / "adl" / "relevance.parquet")
  # The stored shares shown unchanged (a float64 display round trip).
  assert_close(_table(at, "source", "share")["share"].to_numpy(float), rel["share"].to_numpy(float),
               c=rounding(u=U64), what="ADL page shows relevance.parquet's shares")
  steer = pd.read_parquet(diff / "diff" / "adl" / "steering.parquet")
  assert len(_table(at, "unsteered", "steered")) == int((steer["steered"] & steer["chosen"]).sum())
  with np.load(diff / "diff" / "adl" / "means.npz") as f:
    norms = np.linalg.norm(f["delta"], axis=-1) / f["typical_norm_ft"][:, None]
  (chart,) = at.get("vega_lite_chart")
  assert json.loads(chart.proto.spec)["encoding"]["y"]["field"] == "relative"
  assert norms.size == len(lens.groupby(["layer", "position"]))


def test_old_results_and_no_results_are_messages(demo_root, tmp_path, monkeypatch):
  run = _runs(demo_root)[0]
  old = tmp_path / "old" / "runs" / "r"
  (old / "analysis").mkdir(parents=True)
  for f in (run / "analysis").iterdir():
    if f.name != "summary.json":
      (old / "analysis" / f.name).symlink_to(f.resolve())
  summary = json.loads((run / "analysis" / "summary.json").read_text())
  summary.pop("format_version")
  (old / "analysis" / "summary.json").write_text(json.dumps(summary))
  (old / "metrics.json").symlink_to((run / "metrics.json").resolve())
  rerun = f"python -m launch.analyze --config.workdir={old} --config.force=True"
  for page in ("overview", "latents"):
    at = open_page(tmp_path / "old", page, monkeypatch)
    assert any(rerun in e.value for e in at.error), [e.value for e in at.error]
  (tmp_path / "empty").mkdir()
  for root in (tmp_path / "empty", tmp_path / "missing"):
    at = open_page(root, "overview", monkeypatch)
    (err,) = at.error
    assert "python -m launch.demo" in err.value and str(root) in err.value


# ------------------------------------------------------------------------------------------ URLs and refusals


def _names(root: Path) -> tuple[list[str], list[str]]:
  """(run names, diff result names) as the dashboard lists them."""
  found = discover(root)
  return [r.name for r in found.runs], [d.name for d in found.diffs]


def _sidebar(at: AppTest, page: str) -> AppTest:
  """A click on `page` in the sidebar: its URL path, and the query string Streamlit's frontend sends on a page
  change (empty). AppTest.switch_page knows file pages only; a callable page's hash is that of its URL path."""
  at._page_hash = calc_hash(URL_PATHS[page])
  at.query_params = {}
  at.run()
  assert not at.exception, [e.value for e in at.exception]
  return at


def _errors(at: AppTest) -> list[str]:
  return [e.value for e in at.error]


@pytest.mark.parametrize("param", ["run", "page"])
def test_an_unknown_name_on_the_overview_is_refused_with_the_valid_ones(demo_root, monkeypatch, param):
  runs, _ = _names(demo_root)
  at = open_page(demo_root, "overview" if param == "run" else "nosuchpage", monkeypatch,
                 **({"run": "nosuchrun"} if param == "run" else {}))
  if param == "run":
    assert _errors(at) == [f"run 'nosuchrun' not found; runs in this root: {', '.join(runs)}."]
    assert at.query_params["run"] == "nosuchrun"  # the URL keeps what was asked: a reload shows the same refusal
  else:
    (err,) = _errors(at)
    assert err.startswith("page 'nosuchpage' not found; pages: overview, compare, latents, causal, adl, kl, methods, live"), err
    assert "/run-overview" in err
  # Nothing of any run is shown in its place.
  assert not at.metric and not at.get("vega_lite_chart") and not at.table and not at.dataframe
  assert not [s.value for s in at.subheader if s.value in runs]


def test_an_unknown_run_and_latent_on_the_latents_page_show_nothing_else(demo_root, monkeypatch):
  runs, _ = _names(demo_root)
  analysed = [r.name for r in _runs(demo_root)]
  at = open_page(demo_root, "latents", monkeypatch, run="nosuchrun", latent=3)
  assert _errors(at) == [f"run 'nosuchrun' not found; runs in this root: {', '.join(runs)}."]
  assert not at.dataframe and not at.header and not at.get("html")
  assert at.selectbox(key="latents_run").value is None and at.selectbox(key="latents_run").options == analysed
  # Picking a run from the refusal shows it and puts it in the URL; the error goes.
  at.selectbox(key="latents_run").select(analysed[-1]).run()
  assert not _errors(at) and at.query_params["run"] == analysed[-1]
  assert [h.value for h in at.header] == ["Latent 3"]


@pytest.mark.parametrize("latent", ["-1", "abc", "5000", "3.0"])
def test_a_latent_that_is_not_an_index_is_refused(demo_root, monkeypatch, latent):
  run = _runs(demo_root)[-1]
  n = len(pd.read_parquet(run / "analysis" / "latents.parquet"))
  at = open_page(demo_root, "latents", monkeypatch, run=run.name, latent=latent)
  want = f"latent '{latent}' is not a latent of run {run.name}: its latents are 0...{n - 1} (whole numbers)."
  assert _errors(at) == [f"{want} Pick one below."]
  # No other latent's page: no latent header, contexts or statistics; the URL keeps the value asked for.
  assert not at.header and not at.get("html") and not at.table
  assert at.selectbox(key="latents_latent").value is None and at.query_params["latent"] == latent


def test_an_unknown_diff_is_refused_with_the_roots_diffs(demo_root, monkeypatch):
  _, diffs = _names(demo_root)
  at = open_page(demo_root, "adl", monkeypatch, diff="nosuchdiff")
  assert _errors(at) == [f"diff result 'nosuchdiff' not found; diff results in this root: {', '.join(diffs)}."]
  assert not at.dataframe and not at.get("vega_lite_chart") and at.query_params["diff"] == "nosuchdiff"


def test_compare_refuses_unknown_runs_and_shows_only_those_asked(demo_root, monkeypatch):
  runs = [r.name for r in _runs(demo_root)]
  every, _ = _names(demo_root)
  at = open_page(demo_root, "compare", monkeypatch, runs=f"{runs[0]},nosuch")
  assert _errors(at) == [f"run 'nosuch' not found; runs in this root: {', '.join(every)}."]
  (counts,) = [t.value for t in at.table]
  assert list(counts.columns) == [runs[0]]  # the known one, as asked; never the others in place of 'nosuch'
  assert at.query_params["runs"] == f"{runs[0]},nosuch"
  at = open_page(demo_root, "compare", monkeypatch, runs="nosuch")
  assert _errors(at) == [f"run 'nosuch' not found; runs in this root: {', '.join(every)}."]
  assert not at.table and not at.get("vega_lite_chart")


def test_unknown_url_parameters_are_named(demo_root, monkeypatch):
  at = open_page(demo_root, "overview", monkeypatch, lattent=5)
  (warning,) = [w.value for w in at.warning]
  assert "lattent=5" in warning and "page, run, runs, diff, latent" in warning
  assert "lattent" not in at.query_params


def test_the_url_follows_the_pages_and_the_run_is_kept(demo_root, monkeypatch):
  run = _runs(demo_root)[-1].name
  at = open_page(demo_root, "latents", monkeypatch, run=run, latent=7)
  assert at.query_params == {"page": "latents", "run": run, "latent": "7"}
  at = _sidebar(at, "overview")
  assert at.query_params == {"page": "overview", "run": run}  # the run carried over, the latent dropped
  assert [s.value for s in at.subheader][:1] == [run] and at.selectbox(key="overview_run").value == run
  at = _sidebar(at, "compare")
  assert at.query_params["page"] == "compare" and at.query_params["runs"]
  at = _sidebar(at, "latents")
  assert at.query_params == {"page": "latents", "run": run, "latent": "7"}
  assert at.selectbox(key="latents_run").value == run and [h.value for h in at.header] == ["Latent 7"]
  at = _sidebar(at, "adl")
  _, diffs = _names(demo_root)
  assert at.query_params == {"page": "adl", "diff": diffs[0]}
  # A choice made on a page goes into the URL and to the next page.
  other = _runs(demo_root)[0].name
  at = _sidebar(at, "latents")
  at.selectbox(key="latents_run").select(other).run()
  assert at.query_params["run"] == other
  at = _sidebar(at, "overview")
  assert at.query_params == {"page": "overview", "run": other}
  at.selectbox(key="overview_run").select("all runs").run()
  assert at.query_params == {"page": "overview"}


def test_documented_paths_open_their_pages(demo_root, monkeypatch):
  """Every dashboard path docs/dashboard.md names opens its page (the default page is not served at its path)."""
  doc = (Path(__file__).resolve().parents[2] / "docs" / "dashboard.md").read_text()
  documented = dict(re.findall(r"^\| ([A-Z][\w -]+) \| `/([a-z-]+)`", doc, flags=re.MULTILINE))
  assert documented == {title: URL_PATHS[slug] for slug, title in PAGES}
  monkeypatch.setenv("NEURODIFF_RESULTS", str(demo_root))
  for slug, title in PAGES:
    if slug == "live":  # loads both models: tests/dashboard/test_live.py opens it
      continue
    at = AppTest.from_file(APP, default_timeout=120)
    at._page_hash = calc_hash(URL_PATHS[slug])  # what the browser's /<path> resolves to
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["page"] == slug
    assert at.title and at.title[0].value.startswith(title.split()[0]), (slug, [t.value for t in at.title])


def _chart_frames(at: AppTest) -> list[tuple[dict, pd.DataFrame]]:
  """(Vega-Lite spec, its data) of each chart shown."""
  out = []
  for chart in at.get("vega_lite_chart"):
    frames = [pa.ipc.open_stream(d.data.data).read_pandas() for d in chart.proto.datasets]
    out.append((json.loads(chart.proto.spec), pd.concat(frames) if frames else pd.DataFrame()))
  return out


def test_charts_have_human_labels(demo_root, monkeypatch):
  """Legends read "FVE base", "L0", "chat-only", never a metrics.jsonl key (`fve/0`) or a tag (`chat_only`)."""
  run = _runs(demo_root)[-1]
  ex = pd.read_parquet(run / "analysis" / "examples.parquet")
  latent = int(ex.loc[ex["group"].astype(str) == "top", "latent"].min())
  legends = {}
  for page, params in (("overview", {"run": run.name}), ("compare", {}), ("latents", {"run": run.name,
                                                                                      "latent": latent}),
                       ("adl", {}), ("causal", {"run": run.name})):
    for spec, data in _chart_frames(open_page(demo_root, page, monkeypatch, **params)):
      colour = spec.get("encoding", {}).get("color")
      if colour:
        legends[(page, spec.get("title", ""))] = set(data[colour["field"]].astype(str))
  curves = {title: values for (page, title), values in legends.items() if page == "overview"}
  assert curves["FVE"] == {"FVE base", "FVE chat"} and curves["L0"] == {"L0"}
  assert curves["loss"] <= {"total loss", "reconstruction loss"}
  assert curves["dead in the last training window"] == {"dead in the last training window"}
  for (page, title), values in legends.items():
    assert not any("/" in v or "_" in v for v in values), (page, title, values)


# ------------------------------------------------------------------------------------------------ dead latents


def _expected_default(lat: pd.DataFrame) -> int:
  """The latent a page starts on, by docs/dashboard.md: the best-ranked live chat-only latent (lowest nu_rank), else
  the live latent of highest Δnorm."""
  live = lat[lat["tag"].astype(str) != "dead"]
  chat = live[(live["tag"].astype(str) == "chat_only") & np.isfinite(live["nu_rank"].astype(float))]
  if len(chat):
    return int(chat.sort_values(["nu_rank", "latent"])["latent"].iloc[0])
  return int(live.sort_values(["delta_norm", "latent"], ascending=[False, True])["latent"].iloc[0])


def test_dead_latents_are_badged_and_never_the_default(demo_root, monkeypatch):
  """Every latent that never fired carries the badge in the table, the picker and on its page; the page starts on
  the best live latent; a dead latent's page says why it has no contexts (not `examples.context_latents`)."""
  runs = _runs(demo_root)
  with_dead = [r for r in runs if (pd.read_parquet(r / "analysis" / "latents.parquet")["tag"] == "dead").any()]
  assert with_dead, "the demo root has no run with a latent that never fired: nothing to check"
  for run in runs:
    lat = pd.read_parquet(run / "analysis" / "latents.parquet")
    dead = set(lat.loc[lat["tag"].astype(str) == "dead", "latent"].astype(int))
    at = open_page(demo_root, "latents", monkeypatch, run=run.name)
    table = _table(at, "latent", "status")
    assert set(table.loc[table["status"] == "dead: never fired", "latent"]) == dead
    assert set(table.loc[table["status"] == "live", "latent"]) == set(lat["latent"]) - dead
    opened = at.selectbox(key="latents_latent").value
    assert opened == _expected_default(lat) and opened not in dead
    assert at.query_params["latent"] == str(opened)
    assert [h.value for h in at.header] == [f"Latent {opened}"]
    assert not any("never fired" in w.value for w in at.warning)
  run = with_dead[0]
  lat = pd.read_parquet(run / "analysis" / "latents.parquet")
  j = int(lat.loc[lat["tag"] == "dead", "latent"].min())
  at = open_page(demo_root, "latents", monkeypatch, run=run.name, latent=j)
  assert at.selectbox(key="latents_latent").format_func(j) == f"{j} (dead: never fired)"
  assert any("dead: never fired" in m.value for m in at.markdown), [m.value for m in at.markdown]
  (warning,) = [w.value for w in at.warning]
  tokens = json.loads((run / "analysis" / "summary.json").read_text())["tokens"]
  assert warning.startswith(f"Latent {j} never fired on the {tokens:,} analysed tokens")
  infos = [i.value for i in at.info]
  assert f"No contexts: latent {j} never fired on the analysed tokens." in infos
  assert f"Latent {j} never fired on the {tokens:,} analysed tokens: no activation to count." in infos
  assert not any("context_latents" in i for i in infos)


# ------------------------------------------------------------------------------ causal test, per-token KL, methods


def test_causal_page_shows_the_table_the_intervals_and_a_verdict_from_them(demo_root, monkeypatch):
  """Every run's causal.parquet: its numbers in the table and the bars' data, and a verdict whose words follow from the
  95% intervals (significant = no overlap), for each region."""
  from neurodiff_jax.analysis.verdicts import causal_verdict

  runs = [r for r in _runs(demo_root) if (r / "analysis" / "causal.parquet").is_file()]
  assert runs, "no run of the demo root has a causal test"
  judged = 0
  for run in runs:
    frame = pd.read_parquet(run / "analysis" / "causal.parquet")
    at = open_page(demo_root, "causal", monkeypatch, run=run.name)
    assert not at.error, [e.value for e in at.error]
    shown = _table(at, "group", "region", "kl_mean", "ci_low", "ci_high")
    merged = frame.merge(shown, on=["group", "region"], suffixes=("", "_shown"))
    assert len(merged) == len(frame) == len(shown)
    for col in ("kl_mean", "ci_low", "ci_high", "n_tokens", "n_docs"):
      np.testing.assert_array_equal(merged[col].to_numpy(), merged[f"{col}_shown"].to_numpy())
    want = ["— (template tokens)" if n < 0 else str(n) for n in merged["n_latents"]]
    assert merged["latents"].tolist() == want
    for region in ("reply", "first", "rest"):
      if at.radio(key="causal_region").value != region:
        at.radio(key="causal_region").set_value(region).run()
      rows = {r.group: r for r in frame[frame["region"] == region].itertuples()}
      ((spec, data),) = _chart_frames(at)
      assert spec["title"].startswith(f"{run.name}: KL on ")
      assert sorted(data["group"]) == sorted(rows)
      for r in data.itertuples():
        assert (r.kl_mean, r.ci_low, r.ci_high) == (rows[r.group].kl_mean, rows[r.group].ci_low, rows[r.group].ci_high)
      (verdict,) = [m.value for m in at.markdown if m.value.startswith("**Verdict.**")]
      assert verdict == f"**Verdict.** {causal_verdict(frame, region).sentence}"
      judged += check_verdict(verdict, rows)
  assert judged, "no run has both chat-only halves: the verdict's comparison was never checked"


def test_kl_page_colours_the_text_by_kl_and_browses_the_top_contexts(demo_root, monkeypatch):
  diff = _diff(demo_root)
  kl = diff / "diff" / "kl"
  summary = pd.read_parquet(kl / "kl_summary.parquet")
  top = pd.read_parquet(kl / "kl_top_contexts.parquet").sort_values("kl", ascending=False, kind="stable")
  assert "context_kl" in top.columns, "kl_top_contexts.parquet has no context_kl: written by an older launch.diff"
  at = open_page(demo_root, "kl", monkeypatch, diff=diff.name)
  assert not at.error and not at.warning, ([e.value for e in at.error], [w.value for w in at.warning])
  shown = _table(at, "kind", "n_tokens", "mean", "p99")
  pd.testing.assert_frame_equal(shown.reset_index(drop=True), summary.reset_index(drop=True), check_dtype=False)
  metrics = {m.label: m.value for m in at.metric}
  assert metrics["mean KL"] == f"{summary.set_index('kind').loc['all', 'mean']:.4f}"
  contexts = _table(at, "rank", "kl", "doc", "position")
  np.testing.assert_array_equal(contexts["kl"].to_numpy(), top["kl"].to_numpy())
  assert contexts["token"].tolist() == [repr(t) for t in top["token"]]
  # The text coloured by KL: one span per token titled with its KL, the marked token boxed, in KL order.
  page = at.get("html")[0].value
  examples = page.split('class="kl-example"')[1:]
  assert len(examples) == min(20, len(top))
  scale = max(max(v) for v in top["context_kl"])
  for part, r in zip(examples, top.itertuples()):
    titles = [float(t.split('"')[0]) for t in part.split('title="KL ')[1:]]
    np.testing.assert_allclose(titles, r.context_kl, atol=5e-5)  # printed with 4 decimals
    assert part.count('class="firing"') == 1
    firing = html.escape(r.token).replace("\n", "↵").replace("\t", "⇥")
    assert f">{firing}</span>" in part.split('class="firing"')[1]
    alphas = [float(a) for a in re.findall(r"rgba\(200, 30, 30, ([0-9.]+)\)", part)]
    np.testing.assert_allclose(alphas, np.clip(np.asarray(r.context_kl) / scale, 0, 1), atol=5e-3)
  # The browser: the second context's tokens and their KL.
  at.selectbox(key="kl_context").set_value(1).run()
  one = _table(at, "token", "KL")
  second = top.iloc[1]
  assert one["token"].tolist() == [repr(t) for t in second["context_tokens"]]
  np.testing.assert_array_equal(one["KL"].to_numpy(), np.asarray(second["context_kl"], np.float64))
  labels = {m.label: m.value for m in at.metric}
  assert labels["fine-tuned model's top next"] == repr(second["top_ft"])
  assert labels["base model's top next"] == repr(second["top_base"])


def test_kl_contexts_written_before_context_kl_colour_the_marked_token_only():
  from neurodiff_jax.dashboard.views.kl import context_kls, kl_html

  row = {"context_tokens": ["a", " b", " c"], "marked": 1, "kl": 2.5}
  kls = context_kls(row)
  assert np.isnan(kls[0]) and kls[1] == 2.5 and np.isnan(kls[2])
  page = kl_html(row["context_tokens"], kls, 1, 5.0)
  assert page.count('title="KL not stored"') == 2 and 'title="KL 2.5000"' in page
  assert re.findall(r"rgba\(200, 30, 30, ([0-9.]+)\)", page) == ["0.00", "0.50", "0.00"]


def test_diff_methods_page_shows_every_file_of_every_method(demo_root, tmp_path, monkeypatch):
  """Each method's Parquet tables (values), plots and arrays, including a method no other page knows."""
  import shutil

  diff = _diff(demo_root)
  root = tmp_path / "root"
  shutil.copytree(diff, root / "diffs" / diff.name)
  extra = root / "diffs" / diff.name / "diff" / "norms"
  extra.mkdir()
  table = pd.DataFrame({"layer": [0, 1], "group": ["text", "text"], "quantity": ["cos", "cos"], "mean": [0.25, 0.5]})
  table.to_parquet(extra / "norms_summary.parquet", index=False)
  shutil.copy(next((diff / "diff").glob("*/*.png")), extra / "norms_hist.png")
  (extra / "done.json").write_text(json.dumps({"key": "k", "seconds": 1.0, "summary": {"layers": [0, 1]}}))
  at = open_page(root, "methods", monkeypatch, diff=diff.name)
  assert not at.error, [e.value for e in at.error]
  methods = sorted(p.name for p in (root / "diffs" / diff.name / "diff").iterdir() if (p / "done.json").is_file())
  assert [t.label for t in at.tabs] == methods and "norms" in methods
  frames = [d.value for d in at.dataframe]
  for method in methods:
    for f in sorted((root / "diffs" / diff.name / "diff" / method).glob("*.parquet")):
      want = pd.read_parquet(f)
      hits = [d for d in frames if list(d.columns) == list(want.columns) and len(d) == min(len(want), 2000)]
      assert hits, f"{method}/{f.name} not shown"
      assert any(d.head(5).astype(str).equals(want.head(5).astype(str)) for d in hits), f"{method}/{f.name} values"
  assert "**norms_summary.parquet** — 2 rows" in [m.value for m in at.markdown]
  pngs = sorted(p.name for p in (root / "diffs" / diff.name / "diff").glob("*/*.png"))
  assert sorted(i.proto.imgs[0].caption for i in at.get("image")) == pngs
  arrays = _table(at, "array", "shape", "dtype")
  with np.load(root / "diffs" / diff.name / "diff" / "adl" / "means.npz") as z:
    assert dict(zip(arrays["array"], arrays["shape"])) == {k: str(tuple(z[k].shape)) for k in z.files}


# ------------------------------------------------------------------------------------------------ latent pages


def test_latent_page_histogram_contributions_steering_and_links(demo_root, monkeypatch):
  """A steered latent's page: the activation histogram of every analysed token (latent_histograms.npz, summing to
  the latent's firing count), each top context's decoder contribution per model, every steered completion in full, a
  link to Live with the latent and a strength, and the table's link to each latent's page."""
  run = next(r for r in _runs(demo_root) if (r / "analysis" / "steering.parquet").is_file())
  lat = pd.read_parquet(run / "analysis" / "latents.parquet").set_index("latent")
  steer = pd.read_parquet(run / "analysis" / "steering.parquet")
  ex = pd.read_parquet(run / "analysis" / "examples.parquet")
  latent = int(next(j for j in steer["latent"] if ((ex["latent"] == j) & (ex["group"] == "top")).any()))
  with np.load(run / "analysis" / "latent_histograms.npz") as z:
    counts, edges = z["counts"][latent], z["edges"]
  assert counts.sum() == lat.loc[latent, "count"] > 0
  at = open_page(demo_root, "latents", monkeypatch, run=run.name, latent=latent)
  assert not at.error, [e.value for e in at.error]
  # The table links each row to its latent page.
  table = _table(at, "latent", "status", "page")
  assert table["page"].tolist() == [f"/latent-browser?run={run.name}&latent={j}" for j in table["latent"]]
  # The histogram: the stored bins of this latent, every analysed token, not the examples.
  frames = {spec.get("title", ""): data for spec, data in _chart_frames(at)}
  tokens = json.loads((run / "analysis" / "summary.json").read_text())["tokens"]
  data = frames[f"{int(counts.sum()):,} firings over {tokens:,} analysed tokens"]
  keep = counts > 0
  np.testing.assert_array_equal(data["firings"].to_numpy(), counts[keep])
  np.testing.assert_array_equal(data["low"].to_numpy(), edges[:-1][keep])
  # The decoder contribution on each top context: activation × ‖d‖ of each model's decoder row.
  contexts = at.get("html")[0].value
  top = ex[(ex["latent"] == latent) & (ex["group"] == "top")].sort_values("rank").head(10)
  base = [float(v) for v in re.findall(r'data-base="([^"]+)"', contexts)]
  chat = [float(v) for v in re.findall(r'data-chat="([^"]+)"', contexts)]
  np.testing.assert_allclose(base, top["activation"] * lat.loc[latent, "dec_norm_base"], rtol=1e-5)
  np.testing.assert_allclose(chat, top["activation"] * lat.loc[latent, "dec_norm_chat"], rtol=1e-5)
  # Every steered completion of the latent, whole.
  shown = next(h.value for h in at.get("html") if 'class="steer"' in h.value)
  mine = steer[steer["latent"] == latent]
  assert shown.count('class="completion"') == len(mine)
  for text in mine["completion"]:
    assert f">{html.escape(text)}</td>" in shown
  # The link to Live: this latent, and the smallest multiple that changed the chat model's completion (else 2).
  chat_rows = mine[mine["model"] == "chat"]
  plain = chat_rows[chat_rows["multiple"] == 0].set_index("prompt")["completion"]
  moved = [m for p, m, c in zip(chat_rows["prompt"], chat_rows["multiple"], chat_rows["completion"])
           if m > 0 and c != plain[p]]
  alpha = min(moved) if moved else 2.0
  assert any(f"(/live-models?run={run.name}&latent={latent}&alpha={alpha:g})" in m.value for m in at.markdown)
