"""Training in two processes joined by `jax.distributed` (one CPU device each, over 127.0.0.1).

A P-process run does not read the same global batches as a one-process run: each process draws
its batch_size / P rows from its own shuffle windows (`activations.reader`: windows dealt
round-robin to processes), while one process draws all batch_size rows of a batch from one
window. The reference run is therefore the ordinary one-process `train` fed the P-process run's
global batches (process 0's rows first, as the batch is laid out on the mesh), on a (2, 1) mesh of
two local devices, so the two runs must agree to float32 rounding.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurodiff_jax.activations import reader
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.crosscoder import load
from neurodiff_jax.crosscoder import train as train_lib
from tests.crosscoder.conftest import run_tolerances, train_config
from tests.numerics import assert_close

JOB = Path(__file__).parent / "train_job.py"
PARAMS = ("w_enc", "b_enc", "w_dec", "b_dec")
WINDOWED_BATCHES = reader.windowed_batches  # the real one, also while a test replaces it

pytestmark = pytest.mark.slow


def _two_processes(store, work, **overrides):
  """Runs train_job.py as processes 0 and 1 of one job; each one's (return code, last stdout line as JSON)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for p in range(2):
    over = dict(mesh=[2, 1], distributed=True, coordinator_address=f"127.0.0.1:{port}", process_count=2,
                process_index=p, keep_checkpoints=5) | overrides
    procs.append(subprocess.Popen([sys.executable, str(JOB), str(store.root), str(work), json.dumps(over)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outs):
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith("{"), err[-3000:]
    results.append((p.returncode, json.loads(lines[-1])))
  return results


class _GlobalBatches(reader.WindowedBatches):
  """The batches of a P-process run as one process's: batch e is every process's batch e, process 0's rows first."""

  def __init__(self, store, layer, batch_size, nproc, **kwargs):  # the parts are whole WindowedBatches
    self.parts = [WINDOWED_BATCHES(store, layer, batch_size // nproc, process_index=p, process_count=nproc, **kwargs)
                  for p in range(nproc)]
    self.batches_per_epoch = self.parts[0].batches_per_epoch

  def __call__(self, index):
    return np.concatenate([p(index) for p in self.parts])

  def tokens(self, index):
    return np.concatenate([p.tokens(index) for p in self.parts])

  def close(self):
    for p in self.parts:
      p.close()


def _one_process(monkeypatch, config):
  """`train(config)` in this process on a (2, 1) mesh, fed the batches two processes would read together."""
  def two_processes_worth(store, layer, batch_size, *, process_index, process_count, **kwargs):
    assert (process_index, process_count) == (0, 1)
    return _GlobalBatches(store, layer, batch_size, 2, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(reader, "windowed_batches", two_processes_worth)
    return train_lib.train(config)


def _tolerances(cc, config):
  """run_tolerances of a run: the two runs split their sums over the batch at different places."""
  return run_tolerances(config.batch_size, cc.cfg.num_models, cc.cfg.d_model, config.steps)


def _assert_same_crosscoder(a, b, config):
  _, c_params, c_theta = _tolerances(b, config)
  for name in PARAMS:
    assert_close(np.asarray(a.params[name]), np.asarray(b.params[name]), c=c_params,
                 what=f"{name} of the two-process run equals the one-process run's")
  assert_close(a.theta, b.theta, c=c_theta, what="θ of the two-process run equals the one-process run's")


def _saved_steps(work):
  return sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())


def test_two_processes_train_the_crosscoder_one_process_trains_on_the_same_batches(planted, tmp_path, monkeypatch):
  _, store = planted
  run = dict(steps=20, dict_size=256, checkpoint_every=10, log_every=5)
  results = _two_processes(store, tmp_path / "multi", **run)
  assert [code for code, _ in results] == [0, 0], results
  logged = [json.loads(line) for line in (tmp_path / "multi" / "tensorboard" / "metrics.jsonl").open()]  # process 0
  assert [m["step"] for m in logged] == [5, 10, 15, 20] and logged[-1]["loss/total"] < 0.9 * logged[0]["loss/total"]
  assert _saved_steps(tmp_path / "multi") == [10, 20]
  config = train_config(store, tmp_path / "one", mesh=(2, 1), **run)
  one = _one_process(monkeypatch, config)
  multi, single = load(tmp_path / "multi"), load(tmp_path / "one")
  assert_close(one["loss/total"], logged[-1]["loss/total"], c=_tolerances(single, config)[0],
               what="last loss of the two-process run equals the one-process run's")
  _assert_same_crosscoder(multi, single, config)


@pytest.fixture(scope="module")
def nan_on_one_process(planted, tmp_path_factory):
  """A copy of the planted store with NaN in one token of process 1's rows of the batch of step 3 (2 processes)."""
  _, store = planted
  x = store.read(0, 0, store.layout.num_tokens)
  bad = write_arrays(tmp_path_factory.mktemp("nan_on_one") / "store", {0: x}, shard_tokens=8192)
  c = train_config(bad, "/unused")
  rows = reader.windowed_batches(bad, 0, c.batch_size // 2, seed=c.seed, window_bytes=c.window_mib << 20,
                                 process_index=1, process_count=2)
  token = int(rows.tokens(3)[17])
  rows.close()
  x[token, 0, 4] = np.nan
  bad.layer(0)[token:token + 1].write(x[token:token + 1]).result()
  return bad, token


def test_nan_rows_on_one_process_stop_every_process_with_the_same_error(nan_on_one_process, tmp_path):
  bad, token = nan_on_one_process
  results = _two_processes(bad, tmp_path / "run", steps=8, checkpoint_every=2, log_every=4, nan_policy="stop")
  assert [code for code, _ in results] == [3, 3], results
  (_, a), (_, b) = results
  assert a == b and a["error"] == "NonFiniteBatchError", results
  shard = token // 8192
  assert (f"batch of step 3 has NaN/Inf activations in 1 of 256 tokens, on process(es) [1] (process 1: 1 tokens, "
          f"store tokens [{token}], shard(s) [{shard}] of layer 0 in {bad.root}); nothing from it on was applied or "
          f"saved (the last checkpoint, step 2, is good)") in a["message"]
  assert _saved_steps(tmp_path / "run") == [2]  # the stop is seen at step 4, before its checkpoint


def test_nan_rows_on_one_process_are_skipped_by_every_process(nan_on_one_process, tmp_path, monkeypatch):
  bad, _ = nan_on_one_process
  run = dict(steps=8, dict_size=256, checkpoint_every=4, log_every=4, nan_policy="skip")
  results = _two_processes(bad, tmp_path / "multi", **run)
  assert [code for code, _ in results] == [0, 0], results
  for _, out in results:  # the count is the global one, on every process
    assert out["metrics"]["skipped_batches"] == 1 and out["metrics"]["step"] == 8
  # The same step skipped, then the same batches on both processes: the run one process makes of them.
  config = train_config(bad, tmp_path / "one", mesh=(2, 1), **run)
  one = _one_process(monkeypatch, config)
  assert one["skipped_batches"] == 1
  _assert_same_crosscoder(load(tmp_path / "multi"), load(tmp_path / "one"), config)
