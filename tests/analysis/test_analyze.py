"""`analysis.analyze` on a planted store (no models): the parts it can run, reuse, and its errors."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.activations.store import StoreError, write_arrays
from neurodiff_jax.analysis import analyze
from neurodiff_jax.crosscoder import synthetic
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.errors import CheckpointError
from tests.crosscoder.conftest import train_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("an")
  truth = synthetic.plant_features(32, {"shared": 32, "chat_only": 8, "base_only": 8}, seed=0)
  store = synthetic.write_planted_store(tmp / "store", truth, 16_384)
  train_lib.train(train_config(store, tmp / "run", sparsity="l1", l1_lambda=1.0, dict_size=128, steps=400,
                               checkpoint_every=400, log_every=200))
  return tmp, truth


def _config(workdir, **over):
  from configs.analyze import get_config

  c = get_config()
  c.unlock()
  c.workdir = str(workdir)
  c.causal.enabled = c.steering.enabled = c.logit_lens.enabled = False
  c.progress = False
  c.batch_size = 2048
  for k, v in over.items():
    c[k] = v
  return c


def test_analysis_without_models_writes_the_tables_and_reuses_them(trained, tmp_path):
  tmp, _ = trained
  logs = []
  summary = analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "a")), log=logs.append)
  table = pd.read_parquet(tmp_path / "a" / "latents.parquet")
  assert len(table) == 128 and summary["tokens"] == 16_384
  assert summary["classes"]["chat_only"] == (table["tag"] == "chat_only").sum()
  # Planted chat-only features are found as chat-only latents with small ν^ε (nothing of them in the base).
  chat = table[table["tag"] == "chat_only"]
  assert len(chat) >= 4 and chat["nu_error"].abs().median() < 0.1
  assert (tmp_path / "a" / "report.html").is_file()
  # Each latent's activation histogram over every analysed token: its bins hold each of its firings once.
  with np.load(tmp_path / "a" / "latent_histograms.npz") as z:
    counts, edges = z["counts"], z["edges"]
  assert counts.shape == (128, len(edges) - 1) and (counts >= 0).all()
  np.testing.assert_array_equal(counts.sum(1), table.sort_values("latent")["count"].to_numpy())
  logs.clear()
  analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "a")), log=logs.append)
  assert any("pass: reusing" in line for line in logs) and any("table: reusing" in line for line in logs)
  logs.clear()
  analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "a"), force_parts=("table",)), log=logs.append)
  assert any("pass: reusing" in line for line in logs) and not any("table: reusing" in line for line in logs)


def test_errors_name_the_fix(trained, tmp_path):
  tmp, _ = trained
  with pytest.raises(ConfigError, match="latent index 500 is out of range.*128 latents"):
    analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "x"), latents=(3, 500)))
  with pytest.raises(StoreError, match="has no layer 4 .*it has \\[0\\]"):
    analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "x"), layer=4))
  with pytest.raises(CheckpointError, match="no training run at"):
    analyze.analyze(_config(tmp_path / "nothing"))
  # The store the checkpoint was trained on is gone.
  moved = tmp / "store_moved"
  shutil.move(tmp / "store", moved)
  try:
    with pytest.raises(StoreError, match="trained on the store .*store, which is missing"):
      analyze.analyze(_config(tmp / "run", out_dir=str(tmp_path / "x")))
  finally:
    shutil.move(moved, tmp / "store")


def test_models_must_be_the_ones_the_store_was_harvested_from(tmp_path):
  from neurodiff_jax.models import checkpoint_info
  from neurodiff_jax.organisms.random_model import build_random_checkpoint

  store = write_arrays(tmp_path / "s", {0: np.zeros((8, 2, 64), np.float32)})
  with pytest.raises(analyze.AnalysisError, match="does not record its models' checkpoints.*causal.enabled=False.*logit_lens.enabled=False"):
    analyze.check_models(store)
  path = str(build_random_checkpoint(tmp_path / "rand", family="gemma2", seed=0))
  real = checkpoint_info(path).fingerprint
  store.manifest["models"] = [{"role": "base", "path": path, "fingerprint": real},
                              {"role": "finetuned", "path": path, "fingerprint": "0" * len(real)}]
  with pytest.raises(analyze.AnalysisError, match="finetuned model at .* is not the one the store was harvested"):
    analyze.check_models(store)
  store.manifest["models"][1]["fingerprint"] = real
  assert len(analyze.check_models(store)) == 2
