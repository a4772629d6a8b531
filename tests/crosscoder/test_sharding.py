"""The sharded step: every ('data', 'latent') mesh trains the same crosscoder as one device."""

import json

import jax
import numpy as np

from neurodiff_jax.crosscoder import load, sharding
from neurodiff_jax.crosscoder import step as step_lib
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.model import CrosscoderConfig
from neurodiff_jax.crosscoder.objective import LossConfig
from neurodiff_jax.crosscoder.sparsity import kth_largest, topk_mask
from tests.crosscoder.conftest import run_tolerances, train_config
from tests.numerics import UBF16, assert_close, rounding


def _logged(workdir, key):
  return np.array([json.loads(l)[key] for l in (workdir / "tensorboard" / "metrics.jsonl").open()])


def _losses(workdir):
  return _logged(workdir, "loss/total")


def test_meshes_match_one_device_after_20_steps(planted, tmp_path, sparsity="batchtopk"):
  _, store = planted
  assert jax.device_count() >= 8, "tests/conftest.py forces 8 host devices"
  runs = {}
  for mesh in [(1, 1), (8, 1), (1, 8), (2, 4)]:
    work = tmp_path / f"{sparsity}-{mesh[0]}x{mesh[1]}"
    # 8 shards of 32 tokens split a fresh BatchTopK's k·B very unevenly: room for 2x k·32 pairs each.
    c = train_config(store, work, steps=20, log_every=1, checkpoint_every=20, sparsity=sparsity, mesh=mesh,
                     l1_lambda=0.05 if sparsity == "l1" else 0.0, dead_tokens=1024, pair_capacity=2.0,
                     pair_heavy_fraction=0.25)
    train_lib.train(c)
    runs[mesh] = (_losses(work), load(work))
    # Meshes without a latent split take the pairs step (pairs.py), the others the dense one: this
    # also compares the two. A batch the pairs cannot hold exactly takes the dense step.
    dense_steps = _logged(work, "dense_steps")[-1]
    assert dense_steps < 10 if mesh[1] == 1 else dense_steps == 0, (mesh, dense_steps)
  ref_losses, ref = runs[(1, 1)]
  assert len(ref_losses) == 20 and ref_losses[-1] < ref_losses[0]
  c_loss, c_params, c_theta = run_tolerances(c.batch_size, ref.cfg.num_models, ref.cfg.d_model, c.steps)
  for mesh, (losses, cc) in runs.items():
    where = f"on a {mesh[0]}x{mesh[1]} mesh"
    assert_close(losses, ref_losses, c=c_loss, what=f"loss of every step {where} equals one device's")
    for name in ("w_enc", "b_enc", "w_dec", "b_dec"):
      assert_close(cc.params[name], ref.params[name], c=c_params,
                   what=f"{name} after {c.steps} steps {where} equals one device's")
    assert_close(cc.theta, ref.theta, c=c_theta, what=f"θ after {c.steps} steps {where} equals one device's")


def _fresh(cfg, mesh, compute_dtype="float32"):
  """A new sharded train state and its jitted step (10-step schedule, latents dead after 100 tokens)."""
  tx = step_lib.make_optimizer(train_config("unused", "unused", steps=10))
  state = step_lib.sharded_init(jax.random.key(0), cfg, tx, mesh, np.ones(2), None)
  step = step_lib.make_train_step(cfg, LossConfig(dead_tokens=100), tx, mesh, state, compute_dtype=compute_dtype)
  return state, step


def test_global_batch_topk_never_gathers_the_score_matrix():
  mesh = sharding.make_mesh(2, 4)
  state, step = _fresh(CrosscoderConfig(2, 16, 512, "batchtopk", k=4), mesh)
  x = step_lib.global_batch(np.random.default_rng(0).standard_normal((64, 2, 16), np.float32), mesh)
  hlo = step.lower(state, x).compile().as_text()
  gathers = [l for l in hlo.splitlines() if "all-gather" in l and " = " in l]
  big = [l for l in gathers if "[64,512]" in l or "[32,512]" in l or "[64,128]" in l]
  assert not big, big
  assert state["model"]["params"]["w_dec"].sharding.spec == jax.sharding.PartitionSpec("latent", None, None)


def test_kth_largest_is_exact_with_ties_and_zeros():
  rng = np.random.default_rng(0)
  s = np.maximum(rng.standard_normal((37, 101)), 0).astype(np.float32)
  s[3, :10] = s[5, 7]  # ties
  for k in (1, 5, 500, 1800, s.size):
    assert float(kth_largest(s, k)) == np.sort(s.ravel())[::-1][k - 1]
  rows = np.asarray(kth_largest(s, 7, axis=-1))
  np.testing.assert_array_equal(rows[:, 0], np.sort(s, axis=1)[:, ::-1][:, 6])
  s[4, :12] = s[4].max() + 1  # 12 tied largest: the 7th largest of token 4 is tied 12 times
  mask = np.asarray(topk_mask(s, 7))
  assert mask[4].sum() > 7 and (mask.sum(1) >= np.minimum(7, (s > 0).sum(1))).all()
  np.testing.assert_array_equal(np.asarray(topk_mask(s, 7, "top_k")), mask)


def test_bf16_compute_tracks_float32_and_keeps_float32_masters():
  mesh = sharding.make_mesh(1, 1)
  x = np.random.default_rng(1).standard_normal((10, 128, 2, 32)).astype(np.float32)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    state, step = _fresh(CrosscoderConfig(2, 32, 256, "batchtopk", k=8), mesh, dtype)
    out = []
    for xb in x:
      state, m = step(state, step_lib.global_batch(xb, mesh))
      out.append(float(m["loss/reconstruction"]))
    losses[dtype] = np.array(out)
    assert state["model"]["params"]["w_dec"].dtype == np.float32
  # bf16 rounds every operand and output of the encoder and decoder once (float32 accumulation, float32
  # masters): one bf16 stage of n = 1, as the mean over B·M·d squared errors only averages those roundings.
  assert_close(losses["bfloat16"], losses["float32"], c=rounding(u=UBF16),
               what="bf16-compute losses track float32 ones")
  assert not np.array_equal(losses["bfloat16"], losses["float32"])  # it did compute in bf16
