"""Checkpoints: a killed run resumes to the parameters of an uninterrupted one; `load` needs no training code."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.crosscoder import load
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.checkpoint import CheckpointError
from neurodiff_jax.crosscoder.model import encode_train
from tests.crosscoder.conftest import train_config
from tests.numerics import assert_close, rounding

JOB = Path(__file__).parent / "train_job.py"


def _run(store, work):
  return subprocess.run([sys.executable, str(JOB), str(store.root), str(work)], capture_output=True, text=True,
                        timeout=600)


def _steps(work):
  d = work / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.slow  # two 150-step runs in subprocesses, ~50 s on 2 cores
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(planted, tmp_path):
  _, store = planted
  clean = tmp_path / "clean"
  assert _run(store, clean).returncode == 0
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(JOB), str(store.root), str(killed)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and not any(s >= 40 for s in _steps(killed)):
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  stopped_at = max(_steps(killed))
  assert 40 <= stopped_at < 150, stopped_at  # killed mid-run, with checkpoints kept
  rerun = _run(store, killed)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"resuming from step {stopped_at}" in rerun.stdout
  a, b = load(clean), load(killed)
  for name in ("w_enc", "b_enc", "w_dec", "b_dec"):
    np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
  assert a.theta == b.theta and _steps(clean)[-1] == _steps(killed)[-1] == 150
  assert len(_steps(clean)) == 2  # keep_checkpoints=2


def test_load_gives_a_working_crosscoder_and_resume_checks_the_config(planted, tmp_path):
  truth, store = planted
  work = tmp_path / "run"
  metrics = train_lib.train(train_config(store, work, steps=30))
  cc = load(work)
  assert cc.cfg.dict_size == 256 and cc.cfg.k == 8 and cc.norm_scale.shape == (2,)
  x = store.read(0, 0, 512)
  codes = np.asarray(cc.encode(x))
  # Inference codes written out in numpy: relu(a) where the score relu(a)·Σ_i‖W_dec[j, i]‖ exceeds θ.
  p = {k: np.asarray(v, np.float64) for k, v in cc.params.items()}
  a_np = np.einsum("bMd,Mdm->bm", x * cc.norm_scale[None, :, None], p["w_enc"]) + p["b_enc"]
  score = np.maximum(a_np, 0) * np.linalg.norm(p["w_dec"], axis=-1).sum(-1)
  on = score > cc.theta
  # float32 scores round like the encoder's sum of M·d terms and then the norms' product; their terms'
  # magnitude is the largest score's. A score within that rounding of θ may go either way.
  n_terms = cc.cfg.num_models * cc.cfg.d_model
  decided = np.abs(score - cc.theta) > rounding(n=n_terms, depth=2) * score.max()
  np.testing.assert_array_equal((codes > 0)[decided], on[decided])
  assert_close(codes[on & decided], np.maximum(a_np, 0)[on & decided], c=rounding(n=n_terms),
               what="loaded crosscoder's codes are relu(a) of the numpy pre-activations")
  recon = np.asarray(cc(x))
  fve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
  assert fve > 0.3 and 4 <= codes.astype(bool).sum(1).mean() <= 32  # θ (still settling at step 30) gives ~k a token
  # With θ just below this batch's own k·B-th score, inference selects exactly what training's BatchTopK does.
  xn = jnp.asarray(x * cc.norm_scale[None, :, None])
  f_train, a, cut = encode_train(cc.params, xn, cc.cfg)
  exact = dataclasses.replace(cc, theta=float(np.nextafter(np.float32(cut), np.float32(0))))
  np.testing.assert_array_equal(np.asarray(exact.encode(x)) > 0, np.asarray(f_train) > 0)
  assert (work / "metrics.json").is_file() and metrics["step"] == 30
  assert list((work / "tensorboard").glob("events.out.tfevents.*"))
  # Running the finished config again is a no-op; another config in the same workdir is an error.
  again = train_lib.train(train_config(store, work, steps=30))
  assert again["step"] == 30 and again["loss/total"] == metrics["loss/total"]
  with pytest.raises(CheckpointError, match="another run config.*dict_size"):
    train_lib.train(train_config(store, work, steps=30, dict_size=128))
  with pytest.raises(CheckpointError, match="no checkpoint directory"):
    load(tmp_path / "nothing")

