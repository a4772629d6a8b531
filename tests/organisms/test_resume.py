"""SIGKILL during LM training, rerun: the result equals an uninterrupted run's, the loss log has no duplicates."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.numerics import assert_close, rounding

JOB = Path(__file__).with_name("resume_job.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(workdir, out, kill_after_checkpoint=None):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, str(JOB), str(workdir), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if kill_after_checkpoint is None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return
  deadline = time.time() + 300
  while not (Path(workdir) / "checkpoints" / str(kill_after_checkpoint) / "_CHECKPOINT_METADATA").exists():
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def test_killed_training_resumes_to_the_same_parameters(tmp_path):
  _run(tmp_path / "clean", tmp_path / "clean.npz")
  _run(tmp_path / "crash", tmp_path / "crash.npz", kill_after_checkpoint=30)
  assert not (tmp_path / "crash.npz").exists()
  _run(tmp_path / "crash", tmp_path / "crash.npz")
  clean, resumed = np.load(tmp_path / "clean.npz"), np.load(tmp_path / "crash.npz")
  assert sorted(clean) == sorted(resumed) and len(clean) > 5
  for k in clean:
    # The resumed run replays the same compiled steps on the same batches: equal up to one rounding.
    assert_close(resumed[k], clean[k], c=rounding(), what=f"{k} after a kill and resume equals an unbroken run")
  log = [json.loads(l) for l in (tmp_path / "crash" / "loss_log.jsonl").read_text().splitlines()]
  assert [e["step"] for e in log] == list(range(5, 61, 5))  # nothing lost, nothing duplicated
  resumed_from = {e["resumed_from"] for e in log if e["step"] > 30}
  assert len(resumed_from) == 1 and resumed_from.pop() >= 30  # the rerun continued, it did not restart
  assert {e["resumed_from"] for e in log if e["step"] <= 30} == {0}


def test_a_finished_training_rerun_trains_nothing(tmp_path):
  """The last step is checkpointed: a build killed after training (during its evaluation) does not train again."""
  _run(tmp_path / "w", tmp_path / "first.npz")
  assert (tmp_path / "w" / "checkpoints" / "60" / "_CHECKPOINT_METADATA").exists()
  log_before = (tmp_path / "w" / "loss_log.jsonl").read_text()
  _run(tmp_path / "w", tmp_path / "again.npz")
  assert (tmp_path / "w" / "loss_log.jsonl").read_text() == log_before  # no step ran
  first, again = np.load(tmp_path / "first.npz"), np.load(tmp_path / "again.npz")
  assert sorted(first) == sorted(again)
  for k in first:
    np.testing.assert_array_equal(again[k], first[k])  # restored, not retrained: bit for bit
