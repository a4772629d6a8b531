"""Bad input to training: clear errors naming the problem and the fix, and no corrupted checkpoint."""

import json

import jax
import numpy as np
import pytest

from neurodiff_jax.activations.reader import windowed_batches
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.crosscoder import load, sharding
from neurodiff_jax.crosscoder import step as step_lib
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.model import CrosscoderConfig
from neurodiff_jax.crosscoder.objective import LossConfig
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


def _leaves(state):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("policy,bad", [("stop", np.inf), ("skip", np.nan), ("skip", 1e30)])
def test_a_bad_step_changes_no_parameter_and_is_recorded(policy, bad):
  """A non-finite batch (NaN/Inf) or a finite one whose loss overflows (1e30) leaves the state as it was."""
  mesh = sharding.make_mesh(2, 1)
  cfg = CrosscoderConfig(2, 8, 64, "batchtopk", k=4)
  tx = step_lib.make_optimizer(train_config("/s", "/w", steps=100))
  state = step_lib.sharded_init(jax.random.key(0), cfg, tx, mesh, np.ones(2), None)
  fn = step_lib.make_train_step(cfg, LossConfig(dead_tokens=64), tx, mesh, state, nan_policy=policy)
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((32, 2, 8)).astype(np.float32) for _ in range(5)]
  xs[2][7, 1, 3] = bad  # one value of one token, on the second data shard
  seen = []
  for x in xs:
    state, metrics = fn(state, step_lib.global_batch(x, mesh))
    seen.append(_leaves(state))
  before, after_bad = seen[1], seen[2]
  batch_bad = not np.isfinite(bad)
  skipped = policy == "skip" and batch_bad
  for name, value in before.items():
    if name.endswith("['step']"):
      assert after_bad[name] == value + skipped, name  # a skipped batch still takes its step
    elif name.endswith("['skipped']"):
      assert after_bad[name] == value + skipped
    elif name.endswith("['diverged_at']"):
      assert after_bad[name] == (-1 if batch_bad else 2)
    elif name.endswith("['bad_batch_at']"):
      assert after_bad[name] == (2 if batch_bad and policy == "stop" else -1)
    else:  # params, θ, Adam moments and count, dead-latent counters
      np.testing.assert_array_equal(after_bad[name], value, err_msg=name)
  changed = [n for n in before if "params" in n and not np.array_equal(seen[4][n], before[n])]
  if skipped:  # training goes on after a skipped batch, from where it was
    assert changed and int(seen[4]["['train']['skipped']"]) == 1 and int(seen[4]["['train']['step']"]) == 5
    assert all(np.isfinite(v).all() for v in seen[4].values())
  else:  # stopped: nothing changes any more, whatever the later batches are
    assert not changed and all(np.array_equal(seen[4][n], after_bad[n]) for n in before)


def test_a_diverging_step_between_logs_stops_before_the_next_checkpoint(planted, tmp_path):
  """Huge but finite activations (they pass any batch check) make one step's loss Inf between two log steps."""
  _, store = planted
  x = store.read(0, 0, 16384)
  huge = write_arrays(tmp_path / "huge_store", {0: x}, shard_tokens=8192)  # statistics of the clean data
  config = train_config(huge, tmp_path / "run", steps=40, log_every=10, checkpoint_every=10)
  reader = windowed_batches(huge, 0, config.batch_size, seed=config.seed, window_bytes=config.window_mib << 20,
                            process_index=0, process_count=1)
  token = int(reader.tokens(13)[5])  # a token of the batch of step 13, read by no earlier step
  reader.close()
  x[token, 0, 2] = 1e30
  huge.layer(0)[token:token + 1].write(x[token:token + 1]).result()
  with pytest.raises(train_lib.DivergedError, match=r"diverged at step 13: .*the last checkpoint, step 10, is good"):
    train_lib.train(config)
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [10]  # none at or after the bad step
  cc = load(tmp_path / "run")
  assert all(np.isfinite(np.asarray(v)).all() for v in cc.params.values()) and np.isfinite(cc.theta)
  logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "tensorboard" / "metrics.jsonl").open()]
  assert logged == [10]  # step 20's log (after the bad step) is not written either
