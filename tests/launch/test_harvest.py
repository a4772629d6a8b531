"""`python -m launch.harvest --config=harvest_tiny` end to end on the small-scale organisms (base vs chat)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from neurodiff_jax.activations.store import ActivationStore

ROOT = Path(__file__).resolve().parents[2]


def test_harvest_launcher_on_the_organisms(organisms, tmp_path):
  config, paths = organisms
  env = {**os.environ, "NEURODIFF_HOME": config.home, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "store"
  proc = subprocess.run([sys.executable, "-m", "launch.harvest", "--config=harvest_tiny:small",
                         "--config.num_documents=80", f"--config.out_dir={out}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "store complete" in proc.stdout and "tok/s" in proc.stderr  # progress bar with a rate
  store = ActivationStore.open(out)
  m = store.manifest
  assert [x["path"] for x in m["models"]] == [str(paths["base"]), str(paths["chat"])]  # reused, not rebuilt
  assert [d["documents"] for d in m["datasets"]] == [80, 80] and m["layers"] == [1]
  x = store.read(1, 0, store.layout.num_tokens).astype(np.float32)
  kind = store.metadata("token_kind")
  # The chat model's residual differs from the base's most on chat-template tokens (what chat tuning changed).
  diff = np.linalg.norm(x[:, 1] - x[:, 0], axis=-1) / np.linalg.norm(x[:, 0], axis=-1)
  assert diff[kind == 2].mean() > diff[kind == 0].mean() > 0
  # A second run reuses everything.
  again = subprocess.run([sys.executable, "-m", "launch.harvest", "--config=harvest_tiny:small",
                          "--config.num_documents=80", f"--config.out_dir={out}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and re.search(r"(\d+) for process 0/1, \1 already written", again.stdout), again.stdout


def test_unknown_harvest_config_lists_the_known_ones():
  proc = subprocess.run([sys.executable, "-m", "launch.harvest", "--config=harvest_giant"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "unknown config 'harvest_giant'" in proc.stderr and "harvest_tiny" in proc.stderr
