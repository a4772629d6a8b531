"""The main job, `python -m launch.demo`: the smoke demo's results root, its story report, reruns, flag errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from neurodiff_jax.demo.pipeline import STAGES
from neurodiff_jax.utils.results import RESULTS_FORMAT

ROOT = Path(__file__).resolve().parents[2]


def _env(home):
  env = {**os.environ, "NEURODIFF_HOME": str(home), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


def _run(*args, home, timeout=300, prefix=""):
  if prefix:  # run the launcher through `python -c` so `prefix` executes first (e.g. hiding torch)
    cmd = [sys.executable, "-c", prefix + "import runpy, sys; sys.argv = ['launch.demo', *sys.argv[1:]]; "
           "runpy.run_module('launch.demo', run_name='__main__', alter_sys=True)", *args]
  else:
    cmd = [sys.executable, "-m", "launch.demo", *args]
  return subprocess.run(cmd, cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=timeout)


def _text(html: str) -> str:
  """The report's visible text (tags dropped, embedded images removed, entities of quotes undone)."""
  html = re.sub(r'src="data:[^"]+"', "", html)
  return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'").replace("&lt;", "<")


def test_smoke_demo_writes_every_stage_and_a_story_from_the_files(demo_run):
  root, _ = demo_run
  manifest = json.loads((root / "demo.json").read_text())
  assert manifest["format_version"] == RESULTS_FORMAT and set(manifest["stages"]) == set(STAGES)
  for record in manifest["stages"].values():  # each run's time kept, the latest last
    assert record["history"] and record["history"][-1] == record["seconds"]
  assert set(manifest["runs"]) == {"batchtopk", "l1"} and manifest["scale"] == "small"
  html = (root / "report.html").read_text()
  text = _text(html)
  for n in range(1, 7):
    assert f"{n}. " in text
  assert "<img" in html and "src=\"http" not in html  # plots embedded: one self-contained file
  # Section 2: each run's class counts, read from its analysis summary, are in the table.
  for name in ("batchtopk", "l1"):
    classes = json.loads((root / "runs" / name / "analysis" / "summary.json").read_text())["classes"]
    fve = json.loads((root / "runs" / name / "metrics.json").read_text())["fve/0"]
    assert f"{name} has {classes['chat_only']:,} chat-only latents" in text
    row = re.search(rf"{name} {name} \([^)]*\) (\S+) \S+ \S+ \S+ (\S+) (\S+)", text)
    assert row, name
    assert float(row.group(1)) == pytest.approx(fve, abs=1e-3)
    assert row.group(2).replace(",", "") == str(classes["shared"]) and row.group(3).replace(",", "") == str(
        classes["chat_only"])
  # Section 3: the genuine count equals the rule applied to latents.parquet.
  l1 = pd.read_parquet(root / "runs" / "l1" / "analysis" / "latents.parquet")
  chat = l1[(l1.tag == "chat_only") & l1.nu_error.notna()]
  genuine = int(((chat.nu_error < 0.2) & (chat.nu_recon < 0.5)).sum())
  assert re.search(rf"l1 {int((l1.tag == 'chat_only').sum())} {genuine} ", text)
  # Section 4: a genuine latent's top context, its firing token outlined.
  shown = re.findall(r'id="l1-latent-(\d+)"', html)
  if genuine:
    assert shown
    j = int(shown[0])
    ex = pd.read_parquet(root / "runs" / "l1" / "analysis" / "examples.parquet")
    top = ex[(ex.latent == j) & (ex.group == "top")].sort_values("rank").iloc[0]
    fire = str(top.context_tokens[int(top.context_index)]).replace("\n", "↵") or "∅"
    block = html[html.index(f'id="l1-latent-{j}"'):]
    assert re.search(r'class="tok fire"[^>]*>' + re.escape(re.sub(r"[&<>\"']", lambda m: {
        "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}[m.group()], fire)) + "<", block)
  else:
    assert "l1 : no genuine chat-only latent" in text or "no genuine chat-only latent" in text
  # Section 6: ADL's best relevance and the baseline, as in relevance.parquet.
  rel = pd.read_parquet(root / "diffs" / "narrow" / "diff" / "adl" / "relevance.parquet")
  best = rel[rel.source != "baseline"].share.max()
  base = rel[rel.source == "baseline"].share.iloc[0]
  assert re.search(rf"best {best:.3g} \(\w+, position \d+\) against {base:.3g}", text)


def test_rerun_without_torch_reuses_every_stage(demo_run):
  root, overrides = demo_run
  if not overrides:
    pytest.fail("NEURODIFF_TEST_DEMO_ROOT is set: this test needs the demo built by the session")
  report = (root / "report.html").stat().st_mtime
  l1_latents = (root / "runs" / "l1" / "analysis" / "latents.parquet").read_bytes()
  hide_torch = "import sys; sys.modules['torch'] = None; "  # torch is a test reference, never a runtime need
  args = ["--config=demo:small", *(f"--config.{k}={v}" for k, v in overrides.items())]
  proc = _run(*args, home=Path(overrides["root"]).parent, prefix=hide_torch, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "PyTorch was not found" not in out
  for i, stage in enumerate(STAGES, 1):
    assert f"[{i}/{len(STAGES)}] {stage}: done" in out
  assert "organisms: using the small-scale base model" in out and "harvest: no store" not in out
  assert "train: resuming" not in out or "nothing left" not in out
  assert out.count("reusing") >= 2  # the analysis parts and the diff methods were reused, not recomputed
  assert (root / "runs" / "l1" / "analysis" / "latents.parquet").read_bytes() == l1_latents
  assert (root / "report.html").stat().st_mtime >= report


def test_unknown_scale_and_unforceable_stage_are_clear_errors(tmp_path):
  proc = _run("--config=demo:huge", home=tmp_path)
  assert proc.returncode == 2 and "unknown demo scale 'huge'; known: default, small" in proc.stderr
  proc = _run("--config=demo:small", "--config.force_stages=('train',)", home=tmp_path)
  assert proc.returncode == 2
  assert "config.force_stages has 'train'; stages that can be forced: analyze, adl, report" in proc.stderr


def test_unknown_config_name_lists_known_configs(tmp_path):
  proc = _run("--config=no_such_config", home=tmp_path)
  assert proc.returncode == 2
  assert "unknown config 'no_such_config'" in proc.stderr and "demo" in proc.stderr


def test_misspelt_override_is_refused(tmp_path):
  proc = _run("--config.scal=small", home=tmp_path)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "no field 'scal' (did you mean scale?)" in proc.stderr
