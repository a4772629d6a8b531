"""dashboard/results: discovery of runs and diffs in any layout, tables read as written, old formats named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.dashboard.results import NoResults, OldResults, discover
from tests.numerics import U64, assert_close, rounding


def _run_dirs(root: Path) -> list[Path]:
  """Independent of discover: the run directories the demo layout puts under runs/."""
  return sorted(p for p in (root / "runs").iterdir() if (p / "analysis" / "summary.json").is_file())


def _diff_dirs(root: Path) -> list[Path]:
  return sorted(p for p in (root / "diffs").iterdir() if (p / "diff" / "pair.json").is_file())


def _link_tree(src: Path, dst: Path, replace: dict[str, dict] | None = None) -> None:
  """`dst` mirrors `src` with symlinked files, except the JSON files in `replace` (relative path -> content)."""
  replace = replace or {}
  for dirpath, dirnames, filenames in os.walk(src, followlinks=True):
    rel = Path(dirpath).relative_to(src)
    if rel.parts[:1] == ("checkpoints",):
      dirnames[:] = []
      (dst / "checkpoints").symlink_to((src / "checkpoints").resolve())
      continue
    (dst / rel).mkdir(parents=True, exist_ok=True)
    for f in filenames:
      key = (rel / f).as_posix()
      if key in replace:
        (dst / rel / f).write_text(json.dumps(replace[key]))
      else:
        (dst / rel / f).symlink_to((Path(dirpath) / f).resolve())


def test_discover_finds_runs_and_diffs_with_their_tables(demo_root):
  root = discover(demo_root)
  runs = _run_dirs(demo_root)
  assert sorted(r.path.resolve() for r in root.runs) == sorted(p.resolve() for p in runs)
  for run in root.runs:
    assert run.error is None, run.error
    src = run.path
    ref = pd.read_parquet(src / "analysis" / "latents.parquet")
    pd.testing.assert_frame_equal(run.latents(), ref)
    assert len(run.examples()) == len(pd.read_parquet(src / "analysis" / "examples.parquet"))
    metrics = json.loads((src / "metrics.json").read_text())
    assert run.final_metrics()["fve/0"] == metrics["fve/0"]
    lines = [json.loads(x) for x in (src / "tensorboard" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    hist = run.metrics_history()
    assert hist["step"].tolist() == [x["step"] for x in lines]
    assert_close(hist["fve/1"].to_numpy(), [x["fve/1"] for x in lines], c=rounding(u=U64),
                 what="metrics history equals metrics.jsonl's fve/1")  # the same float64 values read back
    summary = json.loads((src / "analysis" / "summary.json").read_text())
    roles = {m["role"]: m["path"] for m in summary["models"]}
    assert run.models() == (roles["base"], roles["finetuned"])
    cfg = run.config()
    assert cfg["sparsity"] == summary["sparsity"] and cfg["dict_size"] == summary["dict_size"]
    assert cfg["layer"] == summary["layer"]
  assert sorted(d.path.resolve() for d in root.diffs) == sorted(p.resolve() for p in _diff_dirs(demo_root))
  for diff in root.diffs:
    assert diff.error is None, diff.error
    assert diff.methods == sorted(p.name for p in (diff.path / "diff").iterdir() if (p / "done.json").is_file())
    pair = json.loads((diff.path / "diff" / "pair.json").read_text())
    assert diff.pair()["key"] == pair["key"] and diff.models() == (pair["base"], pair["finetuned"])
    if "adl" in diff.methods:
      with np.load(diff.path / "diff" / "adl" / "means.npz") as f:
        np.testing.assert_array_equal(diff.adl_means()["delta"], f["delta"])
      pd.testing.assert_frame_equal(diff.table("adl", "relevance"),
                                    pd.read_parquet(diff.path / "diff" / "adl" / "relevance.parquet"))
  pairs = root.model_pairs()
  assert len(pairs) == len(set(pairs)) and all(len(p) == 2 for p in pairs)


def test_discover_any_layout_names_from_demo_json(demo_root, tmp_path):
  """Runs and diffs nested at other depths are found; demo.json, when present, gives their names."""
  run, diff = _run_dirs(demo_root)[0], _diff_dirs(demo_root)[0]
  (tmp_path / "deep" / "er").mkdir(parents=True)
  (tmp_path / "deep" / "er" / "myrun").symlink_to(run.resolve())
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "elsewhere" / "d1").symlink_to(diff.resolve())
  (tmp_path / "stray.txt").write_text("not a run")
  root = discover(tmp_path)
  assert [r.name for r in root.runs] == ["myrun"] and [d.name for d in root.diffs] == ["d1"]
  (tmp_path / "demo.json").write_text(json.dumps({"runs": {"nice": "deep/er/myrun"}, "diffs": {"adl": "elsewhere/d1"}}))
  root = discover(tmp_path)
  assert [r.name for r in root.runs] == ["nice"] and [d.name for d in root.diffs] == ["adl"]
  assert root.run("nice").latents().shape == pd.read_parquet(run / "analysis" / "latents.parquet").shape


def test_old_results_keep_their_place_with_the_rerun_command(demo_root, tmp_path):
  run, diff = _run_dirs(demo_root)[0], _diff_dirs(demo_root)[0]
  summary = json.loads((run / "analysis" / "summary.json").read_text())
  summary.pop("format_version")
  _link_tree(run, tmp_path / "runs" / "old", {"analysis/summary.json": summary})
  (tmp_path / "runs" / "good").symlink_to(run.resolve())
  pair = json.loads((diff / "diff" / "pair.json").read_text())
  pair["format_version"] = 0
  _link_tree(diff, tmp_path / "diffs" / "olddiff", {"diff/pair.json": pair})
  root = discover(tmp_path)
  old, good = root.run("old"), root.run("good")
  assert good.error is None and len(good.latents()) > 0
  assert f"python -m launch.analyze --config.workdir={tmp_path / 'runs' / 'old'} --config.force=True" in old.error
  assert "summary.json" in old.error and "older neurodiff-jax" in old.error
  with pytest.raises(OldResults, match="launch.analyze"):
    old.latents()
  assert old.final_metrics()["fve/0"] == good.final_metrics()["fve/0"]  # training files are still readable
  bad = root.diff("olddiff")
  assert "python -m launch.diff" in bad.error and "--config.force=True" in bad.error and "format 0" in bad.error
  with pytest.raises(OldResults):
    bad.table("adl", "relevance")


def test_run_without_analysis_and_missing_or_empty_roots(demo_root, tmp_path):
  run = _run_dirs(demo_root)[0]
  work = tmp_path / "root" / "trained"
  (work / "tensorboard").mkdir(parents=True)
  shutil.copy(run / "tensorboard" / "metrics.jsonl", work / "tensorboard" / "metrics.jsonl")
  (work / "checkpoints").symlink_to((run / "checkpoints").resolve())
  root = discover(tmp_path / "root")
  (r,) = root.runs
  assert r.analysis is None and r.error is None and len(r.metrics_history()) > 0
  with pytest.raises(FileNotFoundError, match=f"launch.analyze --config.workdir={work}"):
    r.latents()
  (tmp_path / "empty").mkdir()
  with pytest.raises(NoResults, match="python -m launch.demo"):
    discover(tmp_path / "empty")
  with pytest.raises(NoResults, match="does not exist.*python -m launch.demo"):
    discover(tmp_path / "nowhere")
