"""`python -m launch.analyze` end to end on the small organisms: every part, reuse, a killed run, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.analysis.latent_table import COLUMNS
from tests.launch import ROOT, run_launcher
from tests.numerics import assert_close, rounding


@pytest.fixture(scope="module")
def run(organisms, tmp_path_factory):
  """A small L1 crosscoder trained on the small organisms' store (harvested by the train launcher)."""
  config, _ = organisms
  tmp = tmp_path_factory.mktemp("analyze")
  work = tmp / "run"
  proc = run_launcher("launch.train", "--config=tiny_l1:small", f"--config.store={tmp / 'store'}",
                      "--config.steps=150", "--config.checkpoint_every=150", f"--config.workdir={work}",
                      home=config.home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return config.home, work


ARGS = ("--config=analyze", "--config.causal.num_conversations=24", "--config.causal.n_boot=200",
        "--config.steering.num_latents=2", "--config.steering.max_new_tokens=8", "--config.batch_size=1024")


@pytest.mark.slow
def test_analyze_writes_every_result_and_reuses_them(run):
  home, work = run
  proc = run_launcher("launch.analyze", *ARGS, f"--config.workdir={work}", home=home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = work / "analysis"
  table = pd.read_parquet(out / "latents.parquet")
  assert set(COLUMNS) <= set(table.columns) and len(table) == 512
  assert (table["latent"] == np.arange(512)).all()
  live = table["tag"] != "dead"
  assert (table.loc[~live, "freq"] == 0).all() and table.loc[~live, "beta_error_chat"].isna().all()
  assert np.isfinite(table.loc[live, "beta_error_chat"]).all() and (table.loc[live, "freq"] > 0).all()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["classes"] == table["tag"].value_counts().reindex(summary["classes"]).fillna(0).astype(int).to_dict()
  ex = pd.read_parquet(out / "examples.parquet")
  assert set(ex["latent"]) <= set(table.loc[live, "latent"]) and len(ex) > 100
  first = ex.iloc[0]
  # The context's codes are recomputed in other batches than the pass's: encoder sums over 2·d inputs.
  assert_close(first["context_acts"][first["context_index"]], first["activation"], c=rounding(n=2 * 64),
               scale=np.abs(first["context_acts"]).max(), what="the firing token's context activation is the example's")
  assert all(isinstance(t, str) for t in first["context_tokens"])  # decoded with the chat tokenizer
  causal = pd.read_parquet(out / "causal.parquet")
  assert {"all_base", "all_latents", "template_chat"} <= set(causal["group"])
  assert set(causal["region"]) == {"reply", "first", "rest"}
  assert (causal["kl_mean"] >= 0).all() and (causal["ci_low"] <= causal["kl_mean"]).all()
  steer = pd.read_parquet(out / "steering.parquet")
  assert set(steer["model"]) == {"chat", "base"} and steer["latent"].nunique() == 2
  html = (out / "report.html").read_text()
  assert "data:image/png;base64," in html and "src=\"http" not in html
  for png in ("delta_norm.png", "latent_scaling.png", "causal.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "analysis pass" in proc.stderr  # progress bar
  # A second run reuses every finished part.
  again = run_launcher("launch.analyze", *ARGS, f"--config.workdir={work}", home=home)
  assert again.returncode == 0, again.stderr[-3000:]
  for part in ("pass", "table", "causal", "steering"):
    assert f"{part}: reusing" in again.stdout, again.stdout
  assert "analysis pass" not in again.stderr


@pytest.mark.slow
def test_a_killed_analysis_finishes_without_redoing_finished_parts(run, tmp_path):
  home, work = run
  out = tmp_path / "out"
  env = {**os.environ, "NEURODIFF_HOME": str(home), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "launch.analyze", *ARGS, f"--config.workdir={work}", f"--config.out_dir={out}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  seen = []
  deadline = time.time() + 300
  for line in proc.stdout:  # kill it once the pass is done and the next part has started
    seen.append(line)
    if "causal:" in line or "loading the store's models" in line or time.time() > deadline:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert (out / "pass.npz").is_file() and not (out / "report.html").exists(), "".join(seen)
  again = run_launcher("launch.analyze", *ARGS, f"--config.workdir={work}", f"--config.out_dir={out}", home=home)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "pass: reusing" in again.stdout and "table: reusing" in again.stdout
  assert (out / "report.html").is_file()


def test_bad_inputs_end_with_one_line_naming_the_fix(tmp_path):
  home = tmp_path / "home"
  proc = run_launcher("launch.analyze", "--config=analyze", f"--config.workdir={tmp_path / 'none'}", home=home,
                      timeout=120)
  assert proc.returncode == 2 and "no training run at" in proc.stderr and "launch.train" in proc.stderr
  (tmp_path / "empty").mkdir()
  proc = run_launcher("launch.analyze", "--config=analyze", f"--config.workdir={tmp_path / 'empty'}", home=home,
                      timeout=120)
  assert proc.returncode == 2 and "no complete checkpoint in" in proc.stderr, proc.stderr[-2000:]
  proc = run_launcher("launch.analyze", "--config=analyze", "--config.exclude=('bso',)", home=home, timeout=120)
  assert proc.returncode == 2 and "unknown token kind 'bso'" in proc.stderr
  proc = run_launcher("launch.analyze", "--config=analyze", "--config.force_parts=('cuasal',)", home=home,
                      timeout=120)
  assert proc.returncode == 2 and "parts are pass, table, causal" in proc.stderr
