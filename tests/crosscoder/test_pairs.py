"""The pairs step (crosscoder/pairs.py): the same selection, loss and gradients as the dense step, or a fallback."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.crosscoder import pairs as pairs_lib
from neurodiff_jax.crosscoder import sharding, sparsity
from neurodiff_jax.crosscoder.model import (CrosscoderConfig, decode, decoder_norms, encode_train, init_params,
                                            pre_activations)
from neurodiff_jax.crosscoder.objective import LossConfig, loss_fn
from tests.numerics import assert_close, rounding

MESH = sharding.make_mesh(1, 1)
select = jax.jit(pairs_lib.select, static_argnums=(2, 3))  # one compile per (cfg, spec)


def _problem(sparsity_kind, B=96, d=16, m=128, k=4, seed=0):
  cfg = CrosscoderConfig(2, d, m, sparsity_kind, k=k)
  rng = np.random.default_rng(seed)
  # Token norms spread over 1-4x, as real activations' are: BatchTopK gives some tokens many more latents.
  x = rng.standard_normal((B, 2, d)).astype(np.float32) * rng.uniform(1, 4, (B, 1, 1)).astype(np.float32)
  params = init_params(jax.random.key(seed), cfg, jnp.asarray(x.mean(0)))
  params["b_enc"] = jnp.asarray(rng.normal(0, 0.05, m), jnp.float32)
  return cfg, params, jnp.asarray(x)


def _grads(params, x, cfg, spec=None, dead=None):
  dead = jnp.zeros(cfg.dict_size, bool) if dead is None else dead
  lcfg = LossConfig(dead_tokens=1, k_aux=8)
  extra = () if spec is None else (select(params, x, cfg, spec), spec)
  fn = jax.jit(lambda p, x: jax.value_and_grad(loss_fn, has_aux=True)(p, x, 0, dead, cfg, lcfg, None, jnp.float32,
                                                                       *extra))
  (loss, metrics), grads = fn(params, x)
  return float(loss), jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.parametrize("kind", ["batchtopk", "topk"])
def test_pairs_loss_and_gradients_equal_the_dense_step(kind):
  cfg, params, x = _problem(kind)
  spec = pairs_lib.PairSpec(MESH, heavy_candidates=cfg.dict_size)
  assert not bool(select(params, x, cfg, spec).overflow)
  # BatchTopK with AuxK on (the pairs step recomputes the pre-activations AuxK differentiates).
  dead = jnp.arange(cfg.dict_size) % 3 == 0 if kind == "batchtopk" else None
  dense_loss, dense_m, dense_g = _grads(params, x, cfg, dead=dead)
  loss, m, g = _grads(params, x, cfg, spec, dead=dead)
  B, n_models, d = x.shape
  # The two steps share the encoder and the selection; they round differently in the decode (a sum
  # over a token's pairs against a dense one over m) and in what follows it: the loss's sum over
  # B·M·d squared errors (all ≥ 0: the loss is its terms' magnitude) and AuxK's ratio of such sums.
  c_loss = rounding(n=B * n_models * d, depth=2)
  assert_close(loss, dense_loss, c=c_loss, what=f"{kind}: pairs-step loss equals the dense step's")
  if dead is not None:
    assert float(m["loss/aux"]) > 0
    assert_close(float(m["loss/aux"]), float(dense_m["loss/aux"]), c=c_loss,
                 what=f"{kind}: pairs-step AuxK loss equals the dense step's")
  # L0 is the same count over B in both (exactly); the cut is the same score of the same selection,
  # to the scores' rounding (the encoder's M·d terms, then the norms), whose magnitude is the largest's.
  assert float(m["l0"]) == float(dense_m["l0"])
  s = np.asarray(jax.nn.relu(pre_activations(params, x)) * decoder_norms(params).sum(-1))
  assert_close(float(m["cut"]), float(dense_m["cut"]), c=rounding(n=n_models * d, depth=2), scale=s.max(),
               what=f"{kind}: pairs-step cut equals the dense step's")
  np.testing.assert_array_equal(m["fired"], dense_m["fired"])
  # Gradients: back through the decode (sums of m, or of a token's pairs) and the encoder, each
  # parameter's gradient a sum over the B tokens; the scale is each parameter's largest gradient,
  # except b_dec's: it starts at the data mean, so its gradient, 2·mean_b(x̂ − x), nearly cancels,
  # and carries the rounding of its terms 2·|x̂ − x|.
  residual = np.asarray(x) - np.asarray(decode(params, encode_train(params, x, cfg)[0]))
  for name in g:
    assert np.abs(dense_g[name]).max() > 0, name
    scale = 2 * np.abs(residual).mean(0).max() if name == "b_dec" else None
    assert_close(g[name], dense_g[name], c=rounding(n=max(B, cfg.dict_size), depth=3), scale=scale,
                 what=f"{kind}: pairs-step gradient of {name} equals the dense step's")


@functools.partial(jax.jit, static_argnums=2)
def _dense_mask(params, x, cfg):
  s = jax.nn.relu(pre_activations(params, x)) * decoder_norms(params).sum(-1)
  return sparsity.batch_topk_mask(s, cfg.k)[0] if cfg.sparsity == "batchtopk" else sparsity.topk_mask(s, cfg.k)


def _dense_selection(params, x, cfg):
  return {tuple(p) for p in np.argwhere(np.asarray(_dense_mask(params, x, cfg)))}


def test_two_tiers_hold_the_exact_batchtopk_selection():
  cfg, params, x = _problem("batchtopk", k=4)
  want = _dense_selection(params, x, cfg)
  per_token = np.bincount([t for t, _ in want], minlength=x.shape[0])
  assert per_token.max() > 2 * cfg.k  # some tokens need the second tier
  # Tier 1 alone (k candidates each) cannot hold them: overflow, so the caller takes the dense step.
  narrow = select(params, x, cfg, pairs_lib.PairSpec(MESH, candidates=cfg.k, heavy_fraction=0.0))
  assert bool(narrow.overflow)
  # With the heaviest quarter of tokens given every latent, the pairs are exactly the dense mask.
  spec = pairs_lib.PairSpec(MESH, candidates=2 * cfg.k, heavy_fraction=0.25, heavy_candidates=cfg.dict_size)
  if (np.sort(per_token)[::-1][int(0.25 * len(per_token))] > 2 * cfg.k):
    pytest.fail("the problem needs more heavy tokens than the spec gives; change the seed or fraction")
  pairs = select(params, x, cfg, spec)
  assert not bool(pairs.overflow)
  used = int(pairs.count)
  got = set(zip(np.asarray(pairs.tokens[:used]).tolist(), np.asarray(pairs.latents[:used]).tolist()))
  assert used == len(want) and got == want
  assert np.all(np.diff(np.asarray(pairs.tokens)) >= 0)  # token-sorted, as decode's segment-sum assumes
  a = np.asarray(pre_activations(params, x))
  np.testing.assert_array_equal(np.asarray(pairs.pre[:used]), a[np.asarray(pairs.tokens[:used]),
                                                                np.asarray(pairs.latents[:used])])
  assert np.all(np.asarray(pairs.pre[used:]) == -1.0)


def test_topk_tie_at_the_kth_score_overflows():
  # a = x[:, 0] (identity encoder on model 0), unit decoder rows: the scores are the inputs themselves.
  m = 8
  cfg = CrosscoderConfig(2, m, m, "topk", k=3)
  eye = jnp.eye(m, dtype=jnp.float32)
  params = {"w_enc": jnp.stack([eye, jnp.zeros_like(eye)]), "b_enc": jnp.zeros(m),
            "w_dec": jnp.stack([eye, eye], axis=1) / np.sqrt(2), "b_dec": jnp.zeros((2, m))}
  x = np.zeros((4, 2, m), np.float32)
  x[:, 0, :4] = [5.0, 4.0, 3.0, 2.0]
  spec = pairs_lib.PairSpec(MESH)
  assert not bool(select(params, jnp.asarray(x), cfg, spec).overflow)
  x[2, 0, 3] = 3.0  # token 2: latents 2 and 3 tie at the 3rd score; the dense TopK keeps both
  assert bool(select(params, jnp.asarray(x), cfg, spec).overflow)
  assert len(_dense_selection(params, jnp.asarray(x), cfg)) == 4 * 3 + 1


def test_overflowing_batches_take_the_dense_step_and_are_counted():
  from configs._crosscoder import base_config
  from neurodiff_jax.crosscoder import step as step_lib

  cfg, _, _ = _problem("batchtopk", k=4)
  c = base_config()
  c.steps, c.warmup_frac, c.lr = 6, 1 / 6, 1e-3
  tx = step_lib.make_optimizer(c)
  rng = np.random.default_rng(3)
  xs = rng.standard_normal((6, 96, 2, 16)).astype(np.float32) * rng.uniform(1, 4, (6, 96, 1, 1)).astype(np.float32)
  finals = {}
  # (The pairs themselves, taken by a training run, are compared with the dense step in test_sharding.)
  for name, impl, settings in [("dense", "dense", None), ("narrow", "pairs", {"candidates": 4, "heavy_fraction": 0.0})]:
    state = step_lib.sharded_init(jax.random.key(0), cfg, tx, MESH, np.ones(2), None)
    step = step_lib.make_train_step(cfg, LossConfig(), tx, MESH, state, train_step=impl, pairs=settings)
    for xb in xs:
      state, metrics = step(state, step_lib.global_batch(xb, MESH))
    finals[name] = (jax.device_get(state["model"]["params"]), int(metrics["dense_steps"]))
  assert finals["dense"][1] == 0 and finals["narrow"][1] == 6
  # Every step of both runs is the dense step (compiled into another program): six steps of the same
  # sums, each parameter's largest value its scale.
  for key, ref in finals["dense"][0].items():
    assert_close(finals["narrow"][0][key], ref, c=rounding(n=max(xs.shape[1], cfg.dict_size), depth=6),
                 what=f"{key} after 6 overflowing pairs steps equals 6 dense steps'")


def test_train_step_setting_is_checked():
  cfg = CrosscoderConfig(2, 16, 128, "l1")
  with pytest.raises(ValueError, match="needs sparsity batchtopk or topk"):
    pairs_lib.use_pairs("pairs", cfg, MESH)
  with pytest.raises(ValueError, match="unknown train_step 'sparse'"):
    pairs_lib.use_pairs("sparse", cfg, MESH)
  assert not pairs_lib.use_pairs("auto", cfg, MESH)
  assert pairs_lib.use_pairs("auto", CrosscoderConfig(2, 16, 128, "topk"), MESH)


def test_auto_takes_pairs_only_where_they_were_measured_faster():
  assert pairs_lib.pairs_pay_off({"cpu"})
  # On an H200 the dense step was 3.2x faster at Gemma 2 2B size (docs/benchmarks.md).
  assert not pairs_lib.pairs_pay_off({"gpu"}) and not pairs_lib.pairs_pay_off({"tpu"})
  assert not pairs_lib.pairs_pay_off({"cpu", "gpu"})

