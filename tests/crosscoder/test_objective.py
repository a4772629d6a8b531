"""objective.py against numpy: reconstruction, L1 penalty and its warm-up, AuxK, FVE, L0 and the loss total."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.crosscoder import objective as O
from neurodiff_jax.crosscoder.model import CrosscoderConfig
from tests.numerics import assert_close, rounding

HIGHEST = jax.lax.Precision.HIGHEST
M_, D_, M_LAT, B_ = 2, 6, 40, 24  # _setup's models, d, dictionary and batch
# The JAX side computes in float32 from float32 copies of the float64 numbers numpy uses: the encoder
# (sums of M·d), the decoder (sums of m), then the loss's sum over B·M·d squared errors, which are all
# ≥ 0 (the loss's own magnitude is its terms'): three stages, the longest sum B·M·d.
C_LOSS = rounding(n=B_ * M_ * D_, depth=3)
# A score (and the BatchTopK cut, one of them): the encoder's sum, then relu · Σ_i ‖W_dec[j, i]‖.
C_SCORE = rounding(n=M_ * D_, depth=2)


def _setup(kind, seed=0, m=40, B=24, k=3):
  cfg = CrosscoderConfig(num_models=2, d_model=6, dict_size=m, sparsity=kind, k=k)
  rng = np.random.default_rng(seed)
  params = {"w_enc": rng.normal(0, 0.4, (2, 6, m)), "b_enc": rng.normal(0, 0.3, (m,)),
            "w_dec": rng.normal(0, 0.4, (m, 2, 6)) * rng.uniform(0.3, 1.5, (m, 2, 1)),
            "b_dec": rng.normal(0, 0.5, (2, 6))}
  x = rng.normal(0, 1, (B, 2, 6)) * np.array([1.0, 2.0])[None, :, None] + 0.5
  return cfg, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, params, jnp.asarray(x, jnp.float32), x


def _ref_codes(p, x, cfg):
  """numpy codes of the dense training step."""
  a = np.einsum("bMd,Mdm->bm", x, p["w_enc"]) + p["b_enc"]
  relu = np.maximum(a, 0)
  s = relu * np.linalg.norm(p["w_dec"], axis=-1).sum(-1)
  if cfg.sparsity == "l1":
    return relu, a
  if cfg.sparsity == "batchtopk":
    mask = s >= np.sort(s.ravel())[::-1][cfg.k * len(x) - 1]
  else:
    mask = s >= np.sort(s, axis=1)[:, -cfg.k][:, None]
  return np.where(mask & (s > 0), relu, 0.0), a


def _ref_aux(p, x, a, residual, dead, k_aux):
  """numpy AuxK: each token's k_aux largest dead pre-activations reconstruct the residual (no decoder bias)."""
  relu = np.where(dead[None], np.maximum(a, 0), 0.0)
  kth = np.sort(relu, axis=1)[:, -k_aux][:, None]
  f = np.where((relu >= kth) & (relu > 0), relu, 0.0)
  e_hat = np.einsum("bm,mMd->bMd", f, p["w_dec"])
  return np.sum((residual - e_hat) ** 2) / np.sum((residual - residual.mean(0, keepdims=True)) ** 2)


def test_reconstruction_error_squared_and_l2():
  rng = np.random.default_rng(1)
  x, x_hat = rng.normal(size=(5, 2, 7)), rng.normal(size=(5, 2, 7))
  sq = ((x - x_hat) ** 2).sum(-1)
  got = O.reconstruction_error(jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32), "squared")
  # float32 copies of the inputs, then a sum of d = 7 squares (and a sqrt).
  assert_close(np.asarray(got), sq, c=rounding(n=7, depth=2), what="squared reconstruction error equals numpy's")
  got = O.reconstruction_error(jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32), "l2")
  assert_close(np.asarray(got), np.sqrt(sq), c=rounding(n=7, depth=2), what="l2 reconstruction error equals numpy's")


@pytest.mark.parametrize("kind", ["batchtopk", "topk"])
def test_loss_without_dead_latents_is_the_reconstruction_and_metrics_match_numpy(kind):
  cfg, params, p, xj, x = _setup(kind)
  lcfg = O.LossConfig(aux_coef=1 / 32)
  dead = jnp.zeros(cfg.dict_size, bool)
  total, metrics = O.loss_fn(params, xj, 0, dead, cfg, lcfg, HIGHEST)
  f, _ = _ref_codes(p, x, cfg)
  x_hat = np.einsum("bm,mMd->bMd", f, p["w_dec"]) + p["b_dec"]
  sq = ((x - x_hat) ** 2).sum(-1)  # [B, M]
  recon = sq.sum(-1).mean()
  assert_close(float(total), recon, c=C_LOSS, what=f"{kind}: total loss without dead latents is the reconstruction")
  assert_close(float(metrics["loss/reconstruction"]), recon, c=C_LOSS,
               what=f"{kind}: reconstruction loss equals numpy's")
  assert float(metrics["loss/aux"]) == 0.0  # nothing dead: AuxK is not computed
  for i in range(2):
    ratio = sq[:, i].sum() / ((x[:, i] - x[:, i].mean(0)) ** 2).sum()
    # FVE = 1 − ratio (sums over B·d): near 1 it cancels, so the scale is its terms', max(1, ratio).
    assert_close(float(metrics[f"fve/{i}"]), 1 - ratio, c=rounding(n=B_ * D_, depth=3), scale=max(1.0, ratio),
                 what=f"{kind}: FVE of model {i} equals numpy's")
  # A count's mean: an exact integer sum, then one division by B.
  assert_close(float(metrics["l0"]), (f > 0).sum(1).mean(), c=rounding(), what=f"{kind}: L0 equals numpy's")
  np.testing.assert_array_equal(np.asarray(metrics["fired"]), (f > 0).any(0))
  if kind == "batchtopk":
    a = np.einsum("bMd,Mdm->bm", x, p["w_enc"]) + p["b_enc"]
    s = np.maximum(a, 0) * np.linalg.norm(p["w_dec"], axis=-1).sum(-1)
    # The cut carries the rounding of the scores' terms, whose magnitude the largest score stands for.
    assert_close(float(metrics["cut"]), np.sort(s.ravel())[::-1][cfg.k * len(x) - 1], c=C_SCORE, scale=s.max(),
                 what="BatchTopK cut equals the numpy k·B-th score")


def test_l2_reconstruction_sums_norms_not_squares():
  cfg, params, p, xj, x = _setup("topk", seed=2)
  total, _ = O.loss_fn(params, xj, 0, jnp.zeros(cfg.dict_size, bool), cfg, O.LossConfig(reconstruction="l2"),
                       HIGHEST)
  f, _ = _ref_codes(p, x, cfg)
  x_hat = np.einsum("bm,mMd->bMd", f, p["w_dec"]) + p["b_dec"]
  assert_close(float(total), np.sqrt(((x - x_hat) ** 2).sum(-1)).sum(-1).mean(), c=C_LOSS,
               what="l2 loss is the mean summed norm of the errors")


@pytest.mark.parametrize("step, warm", [(0, 0.1), (4, 0.5), (9, 1.0), (50, 1.0)])
def test_l1_penalty_weighs_codes_by_summed_decoder_norms_with_a_linear_warmup(step, warm):
  cfg, params, p, xj, x = _setup("l1", seed=3)
  lcfg = O.LossConfig(l1_lambda=0.2, l1_warmup_steps=10)
  total, metrics = O.loss_fn(params, xj, step, jnp.zeros(cfg.dict_size, bool), cfg, lcfg, HIGHEST)
  f, _ = _ref_codes(p, x, cfg)
  penalty = (f * np.linalg.norm(p["w_dec"], axis=-1).sum(-1)).sum(-1).mean()
  x_hat = np.einsum("bm,mMd->bMd", f, p["w_dec"]) + p["b_dec"]
  recon = ((x - x_hat) ** 2).sum(-1).sum(-1).mean()
  # The penalty: a mean over B of sums over m of codes (the encoder's sums) times norms (sums of d), all ≥ 0.
  c_l1 = rounding(n=B_ * M_LAT, depth=3)
  assert_close(float(metrics["loss/l1"]), penalty, c=c_l1, what=f"step {step}: L1 penalty equals numpy's")
  # λ·min(1, (step + 1) / warm-up steps) in float32: a division and a product.
  assert_close(float(metrics["l1_lambda"]), 0.2 * warm, c=rounding(depth=2), what=f"step {step}: warmed-up λ")
  assert_close(float(total), recon + 0.2 * warm * penalty, c=max(c_l1, C_LOSS),
               what=f"step {step}: total loss is reconstruction + λ·penalty")
  assert "loss/aux" not in metrics  # L1 runs have no AuxK


def test_auxk_with_dead_latents_matches_numpy():
  cfg, params, p, xj, x = _setup("batchtopk", seed=4)
  dead = np.zeros(cfg.dict_size, bool)
  dead[::3] = True
  k_aux = 4
  lcfg = O.LossConfig(k_aux=k_aux, aux_coef=0.5)
  total, metrics = O.loss_fn(params, xj, 0, jnp.asarray(dead), cfg, lcfg, HIGHEST)
  f, a = _ref_codes(p, x, cfg)
  x_hat = np.einsum("bm,mMd->bMd", f, p["w_dec"]) + p["b_dec"]
  aux = _ref_aux(p, x, a, x - x_hat, dead, k_aux)
  # AuxK: a ratio of sums over B·M·d of squares, after the encoder, the decoder (its residual) and AuxK's decode.
  c_aux = rounding(n=B_ * M_ * D_, depth=4)
  assert_close(float(metrics["loss/aux"]), aux, c=c_aux, what="AuxK loss with dead latents equals numpy's")
  assert_close(float(total), ((x - x_hat) ** 2).sum(-1).sum(-1).mean() + 0.5 * aux, c=c_aux,
               what="total loss is reconstruction + aux_coef·AuxK")
  assert aux > 0.05


@pytest.mark.parametrize("method", ["bisect", "top_k"])
def test_aux_loss_alone_and_its_default_k_aux(method):
  cfg, params, p, xj, x = _setup("batchtopk", seed=5)
  dead = np.arange(cfg.dict_size) % 2 == 0
  residual = np.random.default_rng(6).normal(size=x.shape)
  a = np.einsum("bMd,Mdm->bm", x, p["w_enc"]) + p["b_enc"]
  got = O.aux_loss(params, xj, None, jnp.asarray(residual, jnp.float32), jnp.asarray(dead), 3, HIGHEST, method)
  # The encoder, AuxK's decode, then the ratio of sums over B·M·d squares.
  assert_close(float(got), _ref_aux(p, x, a, residual, dead, 3), c=C_LOSS,
               what=f"aux_loss ({method}) on a given residual equals numpy's")
  # k_aux = 0 means d / 2 = 3 dead latents per token.
  _, m0 = O.loss_fn(params, xj, 0, jnp.asarray(dead), cfg, O.LossConfig(k_aux=0), HIGHEST)
  _, m3 = O.loss_fn(params, xj, 0, jnp.asarray(dead), cfg, O.LossConfig(k_aux=3), HIGHEST)
  assert float(m0["loss/aux"]) == float(m3["loss/aux"]) > 0


def test_gradient_of_the_loss_matches_finite_differences():
  cfg, params, _, xj, _ = _setup("topk", seed=7)
  lcfg = O.LossConfig(aux_coef=0.0)
  dead = jnp.zeros(cfg.dict_size, bool)
  loss = lambda p: O.loss_fn(p, xj, 0, dead, cfg, lcfg, HIGHEST)[0]  # noqa: E731
  grads = jax.grad(loss)(params)
  # The selection is piecewise constant, but b_dec enters only the decoder: no step along it moves a
  # score, and the squared loss is quadratic in it, so the central difference is exact for any step.
  # What it differs by is the two losses' rounding divided by the step (scale (|L+| + |L−|) / 2ε):
  # a unit step keeps that small against the gradient (at ε = 1e-3 it alone was 0.5 % of it).
  direction = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6)), jnp.float32)
  eps = 1.0
  plus = loss({**params, "b_dec": params["b_dec"] + eps * direction})
  minus = loss({**params, "b_dec": params["b_dec"] - eps * direction})
  assert_close(float((plus - minus) / (2 * eps)), float(jnp.sum(grads["b_dec"] * direction)), c=C_LOSS,
               scale=(abs(float(plus)) + abs(float(minus))) / (2 * eps),
               what="gradient along b_dec equals the central difference of the loss")


def test_loss_config_rejects_an_unknown_reconstruction():
  with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'.*'squared' or 'l2'"):
    O.LossConfig(reconstruction="l3")
