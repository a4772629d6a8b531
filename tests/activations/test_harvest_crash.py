"""SIGKILL at any point then rerun, and two processes sharing a store: contents equal a clean run's."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neurodiff_jax.activations.store import METADATA, ActivationStore, layer_name

JOB = Path(__file__).with_name("harvest_job.py")
ROOT = Path(__file__).resolve().parents[2]


def _popen(config, path):
  path.write_text(json.dumps(config.to_dict()))
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, str(JOB), str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err.decode()[-3000:]
  return out.decode()


def _contents(root):
  store = ActivationStore.open(root)
  arrays = {n: store.array(n).read().result() for n in [layer_name(l) for l in store.layout.layers] + list(METADATA)}
  return store, arrays


def _assert_same(a, b):
  (sa, xa), (sb, xb) = _contents(a), _contents(b)
  for key in ("num_tokens", "stats", "layers", "config_key", "corpus_fingerprint"):
    assert sa.manifest[key] == sb.manifest[key], key
  for n in xa:
    assert xa[n].dtype == xb[n].dtype
    np.testing.assert_array_equal(xa[n].view(np.uint8), xb[n].view(np.uint8), err_msg=n)


def test_sigkill_then_rerun_equals_uninterrupted(harvest_config, tmp_path):
  from neurodiff_jax.organisms.corpus import generate_documents
  from tests.activations.conftest import write_jsonl

  c = harvest_config
  # Enough tokens (~100 units) that the harvest runs for seconds and the kills land mid-run.
  c.datasets = [write_jsonl(tmp_path / "more.jsonl", [{"text": t} for t in generate_documents(1000, 11)])]
  c.out_dir = str(tmp_path / "clean")
  _wait(_popen(c, tmp_path / "clean.json"))
  units = ActivationStore.open(c.out_dir).layout.num_units
  crash = tmp_path / "crash"
  c.out_dir = str(crash)
  # Kill twice: once right after the first unit is committed, once mid-unit of a later one.
  for kill_at in (1, units // 2):
    proc = _popen(c, tmp_path / "crash.json")
    deadline = time.time() + 300
    while len(list(crash.glob("progress/unit_*.json"))) < kill_at:
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline
      time.sleep(0.01)
    if kill_at > 1:
      time.sleep(0.05)  # land somewhere inside the next unit's compute or write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((crash / "manifest.json").read_text())
    assert not manifest["complete"] and "stats" not in manifest  # never claims unwritten tokens
    done = len(list((crash / "progress").glob("unit_*.json")))
    assert kill_at <= done < units
  out = _wait(_popen(c, tmp_path / "crash.json"))
  assert "already written" in out
  _assert_same(tmp_path / "clean", crash)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_share_one_store(harvest_config, tmp_path):
  c = harvest_config
  c.out_dir = str(tmp_path / "clean")
  _wait(_popen(c, tmp_path / "clean.json"))
  c.out_dir = str(tmp_path / "multi")
  c.distributed = True
  c.coordinator_address = f"127.0.0.1:{_free_port()}"
  c.process_count = 2
  procs = []
  for p in range(2):
    c.process_index = p
    procs.append(_popen(c, tmp_path / f"p{p}.json"))
  outs = [_wait(p) for p in procs]
  assert any("store complete" in o for o in outs)
  assert all("for process" in o for o in outs)
  _assert_same(tmp_path / "clean", tmp_path / "multi")
