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
from tests.numerics import assert_close, rounding

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
# float32 against a float64 reference of the same float32 numbers. Pre-activations: one sum of M·d
# terms; decoder norms: a sum of d squares, then the norm's sqrt, the sum over models or a division;
# reconstructions: a sum of m terms. Scores (relu(a) · summed norms) and codes carry the pre-activations'
# rounding and the norms'. Where a model's units are divided out, the two models' values differ in
# magnitude (scales 0.25 and 3): `_per_model` gives each model its own scale.
C_PRE = rounding(n=CFG.num_models * CFG.d_model)
C_NORM = rounding(n=CFG.d_model, depth=2)
C_SCORE = rounding(n=CFG.num_models * CFG.d_model, depth=2)
C_DEC = rounding(n=CFG.dict_size)
# In original units one more stage: x·norm_scale (or W·norm_scale) rounds before the sum, ÷ norm_scale after it.
C_UNITS_PRE = rounding(n=CFG.num_models * CFG.d_model, depth=2)
C_UNITS_DEC = rounding(n=CFG.dict_size, depth=2)


def _per_model(ref):
  """The scale of each model's values in a [n, M, d] reference: its largest |value|, broadcast over [n, M, d]."""
  return np.abs(np.asarray(ref, np.float64)).max(axis=(0, 2), keepdims=True)


def _x(n=32, seed=1, cfg=CFG):
  return np.random.default_rng(seed).normal(0, 1.0, (n, cfg.num_models, cfg.d_model)).astype(np.float32)


def test_init_params_decoder_rows_have_the_init_norm_and_the_encoder_is_their_transpose():
  mean = np.arange(16, dtype=np.float32).reshape(2, 8)
  p = M.init_params(jax.random.key(3), M.CrosscoderConfig(2, 8, 48, dec_init_norm=0.3), jnp.asarray(mean))
  # Normalised by a norm of d terms, then measured again (numpy, float32): two norms.
  assert_close(np.linalg.norm(np.asarray(p["w_dec"]), axis=-1), 0.3, c=rounding(n=8, depth=2),
               what="init decoder rows have norm dec_init_norm")
  np.testing.assert_array_equal(np.asarray(p["w_enc"]), np.transpose(np.asarray(p["w_dec"]), (1, 2, 0)))
  np.testing.assert_array_equal(np.asarray(p["b_dec"]), mean)
  np.testing.assert_array_equal(np.asarray(p["b_enc"]), 0.0)


def test_pre_activations_scores_decode_and_decoder_norms_match_numpy():
  params, x = _params(CFG), _x()
  p = _np(params)
  a = np.asarray(M.pre_activations(params, jnp.asarray(x), HIGHEST))
  assert_close(a, _ref_pre(p, x), c=C_PRE, what="pre-activations equal the numpy einsum")
  # Scores, norms: products and norms of positive sums (no cancellation), so each element its own scale.
  ref_s = _ref_scores(p, a)
  assert_close(np.asarray(M.scores(params, jnp.asarray(a))), ref_s, c=C_NORM, scale=np.abs(ref_s),
               what="scores relu(a)·Σ_i‖W_dec[j, i]‖ equal numpy's, elementwise")
  ref_n = np.linalg.norm(p["w_dec"], axis=-1)
  assert_close(np.asarray(M.decoder_norms(params)), ref_n, c=C_NORM, scale=ref_n,
               what="decoder norms equal numpy's, elementwise")
  assert_close(np.asarray(M.latent_norms(params)), ref_n.sum(-1), c=C_NORM, scale=ref_n.sum(-1),
               what="latent norms (summed over models) equal numpy's, elementwise")
  f = np.maximum(a, 0) * (np.random.default_rng(2).random(a.shape) < 0.2)
  assert_close(np.asarray(M.decode(params, jnp.asarray(f, jnp.float32), HIGHEST)), _ref_decode(p, f), c=C_DEC,
               what="decode equals the numpy einsum")


@pytest.mark.parametrize("kind", ["batchtopk", "topk", "l1"])
def test_encode_train_and_inference_select_by_numpy_scores(kind):
  cfg = M.CrosscoderConfig(2, 8, 48, sparsity=kind, k=4)
  params, x = _params(cfg, seed=4), _x(seed=5)
  p = _np(params)
  a = _ref_pre(p, x)
  relu, s = np.maximum(a, 0), _ref_scores(p, a)
  f, a_out, cut = M.encode_train(params, jnp.asarray(x), cfg, HIGHEST)
  assert_close(np.asarray(a_out), a, c=C_PRE, what=f"{kind}: encode_train's pre-activations equal numpy's")
  if kind == "batchtopk":
    ref_cut = np.sort(s.ravel())[::-1][cfg.k * len(x) - 1]
    mask = s >= ref_cut
    # The cut is one of the scores: it carries the rounding of the pre-activations' terms, whose
    # magnitude the batch's largest score stands for (not the cut's own, which is smaller).
    assert_close(float(cut), ref_cut, c=C_SCORE, scale=s.max(), what="BatchTopK cut equals the numpy k·B-th score")
    assert mask.sum() == cfg.k * len(x)
  elif kind == "topk":
    mask = s >= np.sort(s, axis=1)[:, -cfg.k][:, None]
    assert (mask.sum(1) == cfg.k).all() and float(cut) == 0.0
  else:
    mask = relu > 0
  assert_close(np.asarray(f), np.where(mask, relu, 0.0), c=C_PRE, what=f"{kind}: training codes equal numpy's")
  theta = float(np.median(s[s > 0]))
  g = np.asarray(M.encode_inference(params, jnp.asarray(x), cfg, jnp.float32(theta), HIGHEST))
  want = {"batchtopk": s > theta, "topk": mask, "l1": relu > 0}[kind]
  assert_close(g, np.where(want, relu, 0.0), c=C_PRE, what=f"{kind}: inference codes equal numpy's")


def _crosscoder(cfg=CFG, seed=0, scale=(0.25, 3.0), theta=0.5):
  return M.Crosscoder(cfg=cfg, params=_params(cfg, seed), theta=theta, norm_scale=np.asarray(scale, np.float32))


def test_crosscoder_normalises_original_units_like_numpy():
  cc, x = _crosscoder(), _x(seed=6)
  p, scale = _np(cc.params), cc.norm_scale.astype(np.float64)[None, :, None]
  a = _ref_pre(p, x * scale)
  s = _ref_scores(p, a)
  f_ref = np.where(s > cc.theta, np.maximum(a, 0), 0.0)
  f = np.asarray(cc.encode(x))
  assert_close(f, f_ref, c=C_UNITS_PRE, what="Crosscoder.encode of original units equals numpy's")
  assert 0 < (f > 0).sum() < f.size  # the threshold selects some latents, not all
  x_ref = _ref_decode(p, f) / scale
  assert_close(np.asarray(cc.decode(f)), x_ref, c=C_UNITS_DEC, scale=_per_model(x_ref),
               what="Crosscoder.decode in original units equals numpy's, per model")
  assert_close(np.asarray(cc(x)), x_ref, c=C_UNITS_DEC, scale=_per_model(x_ref),
               what="Crosscoder(x) reconstruction in original units equals numpy's, per model")
  ref_n = np.linalg.norm(p["w_dec"], axis=-1) / scale[0, :, 0]
  assert_close(cc.decoder_norms(), ref_n, c=C_NORM, scale=ref_n,
               what="Crosscoder.decoder_norms in original units equal numpy's, elementwise")


def test_accessors_give_the_same_maths_in_original_units():
  cc, x = _crosscoder(seed=7), _x(seed=8)
  enc, dec = cc.encoder(), cc.decoder()
  assert enc.shape == (2, 8, 48) and dec.shape == (48, 2, 8)
  # a = Σ_i x_i encoder()[i] + b_enc on original-unit x: the model's pre-activations of the normalised x.
  a = np.einsum("bMd,Mdm->bm", x.astype(np.float64), enc) + cc.encoder_bias()
  xn = jnp.asarray(x * cc.norm_scale[None, :, None])
  # Each side rounds once before its sum: encoder() = W_enc·scale, xn = x·scale.
  assert_close(a, np.asarray(M.pre_activations(cc.params, xn, HIGHEST)), c=C_UNITS_PRE,
               what="encoder()/encoder_bias() on original units give the model's pre-activations")
  # x̂ = f decoder() + decoder_bias() in original units: Crosscoder.decode.
  f = np.asarray(cc.encode(x))
  x_hat = np.einsum("bm,mMd->bMd", f.astype(np.float64), dec) + cc.decoder_bias()
  assert_close(x_hat, np.asarray(cc.decode(f)), c=C_UNITS_DEC, scale=_per_model(x_hat),
               what="decoder()/decoder_bias() in original units give Crosscoder.decode, per model")
  ref_n = cc.decoder_norms()
  assert_close(np.linalg.norm(dec, axis=-1), ref_n, c=C_NORM, scale=ref_n,
               what="norms of decoder() rows equal Crosscoder.decoder_norms, elementwise")
  # Unequal scales: the accessors are not the raw parameters.
  assert not np.allclose(dec, np.asarray(cc.params["w_dec"]))


def test_normalized_inputs_are_not_normalised_twice():
  cc, x = _crosscoder(seed=9), _x(seed=10)
  xn = x * cc.norm_scale[None, :, None]
  assert_close(np.asarray(cc.encode(xn, normalized=True)), np.asarray(cc.encode(x)), c=C_PRE,
               what="encode(normalized=True) of x·norm_scale equals encode(x)")
  want = np.asarray(cc(x)) * cc.norm_scale[None, :, None]  # ÷ then · norm_scale: one more rounding
  assert_close(np.asarray(cc(xn, normalized=True)), want, c=C_UNITS_DEC, scale=_per_model(want),
               what="Crosscoder(normalized=True) returns normalised units, per model")
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
    # Both sides multiply the same float32 batch by the same float32 norm_scale, then encode (M·d terms).
    assert_close(np.asarray(cc.encode(normed(3), normalized=True)), np.asarray(cc.encode(raw(3))),
                 c=C_UNITS_PRE, what="codes of reader-normalised batches equal those of raw ones")
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
