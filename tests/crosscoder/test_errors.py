"""Bad input to training: clear errors naming the problem and the fix, and no corrupted checkpoint."""

import numpy as np
import pytest

from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.crosscoder import load
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.model import CrosscoderConfig
from tests.crosscoder.conftest import train_config


def test_config_disagreeing_with_the_store_is_named(planted, tmp_path):
  _, store = planted
  with pytest.raises(ValueError, match=r"config.d_model=64 but the store .* has d_model=32"):
    train_lib.train(train_config(store, tmp_path / "a", d_model=64))
  with pytest.raises(ValueError, match=r"config.num_models=3 but the store .* has num_models=2"):
    train_lib.train(train_config(store, tmp_path / "b", num_models=3))
  with pytest.raises(ValueError, match=r"k=300 must be in \[1, dict_size=256\]"):
    train_lib.train(train_config(store, tmp_path / "c", k=300))
  with pytest.raises(ValueError, match="unknown sparsity 'relu'"):
    CrosscoderConfig(2, 32, 256, "relu")
  with pytest.raises(ValueError, match="batch_size=100 does not split over 8 data shards"):
    train_lib.train(train_config(store, tmp_path / "d", batch_size=100, mesh=(8, 1)))
  assert not (tmp_path / "a" / "checkpoints").exists() or not any((tmp_path / "a" / "checkpoints").iterdir())


def test_nan_batches_stop_naming_step_and_shard_or_are_skipped_and_counted(planted, tmp_path):
  truth, store = planted
  x = store.read(0, 0, 16384)
  bad = write_arrays(tmp_path / "nan_store", {0: x}, shard_tokens=8192)
  x[9000:9003, 1, 5] = np.nan  # three tokens in the second shard (8,192 tokens a shard), after the statistics
  bad.layer(0)[9000:9003].write(x[9000:9003]).result()
  work = tmp_path / "run"
  with pytest.raises(train_lib.NonFiniteBatchError, match=r"batch of step \d+ has NaN/Inf .* shard\(s\) \[1\]"):
    train_lib.train(train_config(bad, work, steps=200, checkpoint_every=10))
  saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  # The checkpoints written before the bad batch are whole and load; rerunning with skip resumes from them.
  assert saved and np.isfinite(load(work).params["w_dec"]).all()
  metrics = train_lib.train(train_config(bad, work, steps=200, checkpoint_every=10, nan_policy="skip"))
  assert metrics["step"] == 200 and metrics["skipped_batches"] >= 1
  assert np.isfinite(load(work).params["w_dec"]).all()
  nan_stats = write_arrays(tmp_path / "nan_stats", {0: x})
  with pytest.raises(ValueError, match="statistics of layer 0 .* are not finite"):
    train_lib.train(train_config(nan_stats, tmp_path / "run2"))
