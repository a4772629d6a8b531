"""model.py against numpy: init, encode/decode, scores, decoder norms, the Crosscoder's units, accessors and errors."""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.activations.reader import windowed_batches
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.crosscoder import model as M
from neurodiff_jax.crosscoder.checkpoint import Checkpointer, load

HIGHEST = jax.lax.Precision.HIGHEST


def _params(cfg, seed=0):
  """Random parameters with unequal decoder norms per model and non-zero biases."""
  rng = np.random.default_rng(seed)
  m, n, d = cfg.dict_size, cfg.num_models, cfg.d_model
  return {"w_enc": jnp.asarray(rng.normal(0, 0.3, (n, d, m)), jnp.float32),
          "b_enc": jnp.asarray(rng.normal(0, 0.5, (m,)), jnp.float32),
          "w_dec": jnp.asarray(rng.normal(0, 0.3, (m, n, d)) * rng.uniform(0.2, 2.0, (m, n, 1)), jnp.float32),
          "b_dec": jnp.asarray(rng.normal(0, 1.0, (n, d)), jnp.float32)}


def _np(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _ref_pre(p, x):
  return np.einsum("bMd,Mdm->bm", x, p["w_enc"]) + p["b_enc"]


def _ref_scores(p, a):
  return np.maximum(a, 0) * np.linalg.norm(p["w_dec"], axis=-1).sum(-1)


def _ref_decode(p, f):
  return np.einsum("bm,mMd->bMd", f, p["w_dec"]) + p["b_dec"]


CFG = M.CrosscoderConfig(num_models=2, d_model=8, dict_size=48, k=4)


def _x(n=32, seed=1, cfg=CFG):
  return np.random.default_rng(seed).normal(0, 1.0, (n, cfg.num_models, cfg.d_model)).astype(np.float32)


def test_init_params_decoder_rows_have_the_init_norm_and_the_encoder_is_their_transpose():
  mean = np.arange(16, dtype=np.float32).reshape(2, 8)
  p = M.init_params(jax.random.key(3), M.CrosscoderConfig(2, 8, 48, dec_init_norm=0.3), jnp.asarray(mean))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p["w_dec"]), axis=-1), 0.3, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(p["w_enc"]), np.transpose(np.asarray(p["w_dec"]), (1, 2, 0)))
  np.testing.assert_array_equal(np.asarray(p["b_dec"]), mean)
  np.testing.assert_array_equal(np.asarray(p["b_enc"]), 0.0)


def test_pre_activations_scores_decode_and_decoder_norms_match_numpy():
  params, x = _params(CFG), _x()
  p = _np(params)
  a = np.asarray(M.pre_activations(params, jnp.asarray(x), HIGHEST))
  np.testing.assert_allclose(a, _ref_pre(p, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(M.scores(params, jnp.asarray(a))), _ref_scores(p, a), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(M.decoder_norms(params)), np.linalg.norm(p["w_dec"], axis=-1), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(M.latent_norms(params)), np.linalg.norm(p["w_dec"], axis=-1).sum(-1),
                             rtol=1e-6)
  f = np.maximum(a, 0) * (np.random.default_rng(2).random(a.shape) < 0.2)
  np.testing.assert_allclose(np.asarray(M.decode(params, jnp.asarray(f, jnp.float32), HIGHEST)), _ref_decode(p, f),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["batchtopk", "topk", "l1"])
def test_encode_train_and_inference_select_by_numpy_scores(kind):
  cfg = M.CrosscoderConfig(2, 8, 48, sparsity=kind, k=4)
  params, x = _params(cfg, seed=4), _x(seed=5)
  p = _np(params)
  a = _ref_pre(p, x)
  relu, s = np.maximum(a, 0), _ref_scores(p, a)
  f, a_out, cut = M.encode_train(params, jnp.asarray(x), cfg, HIGHEST)
  np.testing.assert_allclose(np.asarray(a_out), a, rtol=1e-5, atol=1e-5)
  if kind == "batchtopk":
    ref_cut = np.sort(s.ravel())[::-1][cfg.k * len(x) - 1]
    mask = s >= ref_cut
    np.testing.assert_allclose(float(cut), ref_cut, rtol=1e-5)
    assert mask.sum() == cfg.k * len(x)
  elif kind == "topk":
    mask = s >= np.sort(s, axis=1)[:, -cfg.k][:, None]
    assert (mask.sum(1) == cfg.k).all() and float(cut) == 0.0
  else:
    mask = relu > 0
  np.testing.assert_allclose(np.asarray(f), np.where(mask, relu, 0.0), rtol=1e-5, atol=1e-5)
  theta = float(np.median(s[s > 0]))
  g = np.asarray(M.encode_inference(params, jnp.asarray(x), cfg, jnp.float32(theta), HIGHEST))
  want = {"batchtopk": s > theta, "topk": mask, "l1": relu > 0}[kind]
  np.testing.assert_allclose(g, np.where(want, relu, 0.0), rtol=1e-5, atol=1e-5)


def _crosscoder(cfg=CFG, seed=0, scale=(0.25, 3.0), theta=0.5):
  return M.Crosscoder(cfg=cfg, params=_params(cfg, seed), theta=theta, norm_scale=np.asarray(scale, np.float32))


def test_crosscoder_normalises_original_units_like_numpy():
  cc, x = _crosscoder(), _x(seed=6)
  p, scale = _np(cc.params), cc.norm_scale.astype(np.float64)[None, :, None]
  a = _ref_pre(p, x * scale)
  s = _ref_scores(p, a)
  f_ref = np.where(s > cc.theta, np.maximum(a, 0), 0.0)
  f = np.asarray(cc.encode(x))
  np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
  assert 0 < (f > 0).sum() < f.size  # the threshold selects some latents, not all
  np.testing.assert_allclose(np.asarray(cc.decode(f)), _ref_decode(p, f) / scale, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cc(x)), _ref_decode(p, f) / scale, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(cc.decoder_norms(), np.linalg.norm(p["w_dec"], axis=-1) / scale[0, :, 0], rtol=1e-6)


def test_accessors_give_the_same_maths_in_original_units():
  cc, x = _crosscoder(seed=7), _x(seed=8)
  enc, dec = cc.encoder(), cc.decoder()
  assert enc.shape == (2, 8, 48) and dec.shape == (48, 2, 8)
  # a = Σ_i x_i encoder()[i] + b_enc on original-unit x: the model's pre-activations of the normalised x.
  a = np.einsum("bMd,Mdm->bm", x.astype(np.float64), enc) + cc.encoder_bias()
  xn = jnp.asarray(x * cc.norm_scale[None, :, None])
  np.testing.assert_allclose(a, np.asarray(M.pre_activations(cc.params, xn, HIGHEST)), rtol=1e-5, atol=1e-5)
  # x̂ = f decoder() + decoder_bias() in original units: Crosscoder.decode.
  f = np.asarray(cc.encode(x))
  x_hat = np.einsum("bm,mMd->bMd", f.astype(np.float64), dec) + cc.decoder_bias()
  np.testing.assert_allclose(x_hat, np.asarray(cc.decode(f)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(dec, axis=-1), cc.decoder_norms(), rtol=1e-5)
  # Unequal scales: the accessors are not the raw parameters.
  assert not np.allclose(dec, np.asarray(cc.params["w_dec"]))


def test_normalized_inputs_are_not_normalised_twice():
  cc, x = _crosscoder(seed=9), _x(seed=10)
  xn = x * cc.norm_scale[None, :, None]
  np.testing.assert_allclose(np.asarray(cc.encode(xn, normalized=True)), np.asarray(cc.encode(x)), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(cc(xn, normalized=True)), np.asarray(cc(x)) * cc.norm_scale[None, :, None],
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(cc.encode(xn)), np.asarray(cc.encode(x)))  # what normalising twice would do


def test_reader_batches_normalised_by_the_store_encode_like_original_units(tmp_path):
  cfg = M.CrosscoderConfig(2, 8, 48, k=4)
  rng = np.random.default_rng(11)
  acts = (rng.normal(0, 1, (4096, 2, 8)) * np.array([0.5, 7.0])[None, :, None]).astype(np.float32)
  store = write_arrays(tmp_path / "store", {5: acts}, shard_tokens=1024, chunk_tokens=128)
  cc = M.Crosscoder(cfg=cfg, params=_params(cfg, 12), theta=0.3, norm_scale=store.norm_scale(5))
  raw = windowed_batches(store, 5, 256, seed=1, window_tokens=1024, process_index=0, process_count=1)
  normed = windowed_batches(store, 5, 256, seed=1, window_tokens=1024, process_index=0, process_count=1,
                            normalize=True)
  try:
    assert normed.normalized and not raw.normalized
    np.testing.assert_allclose(np.asarray(cc.encode(normed(3), normalized=True)), np.asarray(cc.encode(raw(3))),
                               rtol=1e-4, atol=1e-5)
  finally:
    raw.close()
    normed.close()


def test_encode_and_decode_name_the_shape_they_need():
  cc = _crosscoder()
  with pytest.raises(ValueError, match=r"needs \[n, M=2, d=8\].*got shape \(5, 8\).*np\.stack"):
    cc.encode(np.zeros((5, 8), np.float32))
  with pytest.raises(ValueError, match=r"got shape \(5, 3, 8\).*M=3 \(this crosscoder has M=2\)"):
    cc.encode(np.zeros((5, 3, 8), np.float32))
  with pytest.raises(ValueError, match=r"d=16 \(this crosscoder has d=8\)"):
    cc.encode(np.zeros((5, 2, 16), np.float32))
  with pytest.raises(ValueError, match=r"Crosscoder.decode needs \[n, m=48\].*m=40 \(this crosscoder has m=48\)"):
    cc.decode(np.zeros((5, 40), np.float32))


def test_config_rejects_k_above_the_dictionary_and_unknown_sparsity():
  with pytest.raises(ValueError, match=r"k=64 must be in \[1, dict_size=48\]"):
    M.CrosscoderConfig(2, 8, 48, k=64)
  with pytest.raises(ValueError, match="unknown sparsity 'top'"):
    M.CrosscoderConfig(2, 8, 48, sparsity="top")


def test_load_returns_the_saved_crosscoder_silently_and_writes_nothing(tmp_path, caplog):
  cc = _crosscoder(seed=13, scale=(0.5, 2.0), theta=1.25)
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  model = {"params": cc.params, "theta": jnp.float32(cc.theta), "norm_scale": jnp.asarray(cc.norm_scale)}
  ckpt.save(7, {"model": model, "train": {"step": jnp.int32(7)}}, {"next_index": 7},
            {"run": {}, "crosscoder": cc.cfg.to_dict()})
  ckpt.close()
  before = sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
  caplog.set_level(logging.DEBUG)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = load(tmp_path)
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert sorted((p, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
  assert got.cfg == cc.cfg and got.theta == 1.25
  np.testing.assert_array_equal(got.norm_scale, cc.norm_scale)
  for k, v in cc.params.items():
    np.testing.assert_array_equal(got.params[k], np.asarray(v), err_msg=k)
