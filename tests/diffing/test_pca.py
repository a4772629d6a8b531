"""Streaming PCA of the differences against numpy's PCA (eigh of the covariance) of the same differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ml_collections import ConfigDict

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEXT
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.diffing import pca
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models.lens import logit_lens
from tests.numerics import residual_c
from tests.numerics import U64, assert_close, rounding


@pytest.fixture
def ctx_of(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair and its dataset (PCA grades nothing: no grader)."""
  return lambda **kw: DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64,
                                  progress=False, **kw)


def _numpy_pca(delta):
  cov = np.cov(delta.astype(np.float64), rowvar=False, bias=True)
  w, v = np.linalg.eigh(cov)
  return w[::-1], v[:, ::-1].T


def _check(out_dir, delta, refs, k, top, c_moments, c_proj, source):
  """The run's outputs against numpy on `delta` [N, d]: `c_moments` the rounding of the mean and covariance
  (δ, then float32 sums over the tokens of a fold), `c_proj` that of a projection (δ, then a sum over d)."""
  w, v = _numpy_pca(delta)
  var = pd.read_parquet(out_dir / "pca_variance.parquet")
  # An eigenvalue moves by at most the covariance's error, whose scale is the largest eigenvalue's.
  assert_close(var.variance[:k], w[:k], c=c_moments, what=f"{source}: PCA variances equal numpy's eigenvalues")
  assert_close(var.explained_variance_ratio.sum(), 1.0, c=rounding(n=len(w), u=U64),
               what=f"{source}: explained variance ratios sum to 1")
  assert_close(var.explained_variance_ratio[:k], w[:k] / w.sum(), c=c_moments,
               what=f"{source}: explained variance ratios equal numpy's eigenvalue shares")
  comps = np.load(out_dir / "components.npy")
  assert comps.shape == (k, delta.shape[1])
  gaps = np.abs(np.diff(w[:k + 1])) / w[0]
  for i in range(k):
    # Not a rounding comparison: a well-separated eigenvalue's vector is unique up to sign, so the component must
    # point along numpy's (|cos| > 0.999); near-degenerate ones may rotate within their eigenspace.
    if min(gaps[i], gaps[i - 1] if i else 1.0) > 1e-3:
      assert abs(comps[i] @ v[i]) > 0.999, i
  # A mean of signed differences: its rounding is that of the terms, the mean |δ|, however small the mean.
  assert_close(np.load(out_dir / "mean_difference.npy"), delta.mean(0), c=c_moments,
               scale=np.abs(delta).mean(0).max(), what=f"{source}: mean difference equals numpy's mean of δ")
  # Top contexts: the largest projections on ±v_i of numpy's own projections with the saved components.
  proj = (delta - delta.mean(0)) @ comps.T.astype(np.float64)  # [N, k]
  # A projection (δ − μ)·v_i sums signed terms of total magnitude at most ‖δ − μ‖ (‖v_i‖ = 1).
  scale = np.linalg.norm(delta - delta.mean(0), axis=1).max()
  ctxs = pd.read_parquet(out_dir / "pca_top_contexts.parquet")
  for i in range(k):
    for sign, s in (("+", 1.0), ("-", -1.0)):
      order = np.argsort(-s * proj[:, i], kind="stable")[:top]
      got = ctxs[(ctxs.component == i) & (ctxs.sign == sign)]
      assert_close(got.projection, proj[order, i], c=c_proj, scale=scale,
                   what=f"{source}: top-context projections on {sign}v_{i} equal numpy's")
      assert set(got.ref) == set(refs[order])


def test_pca_on_the_fly_equals_numpy(ctx_of, tmp_path):
  ctx = ctx_of()
  pair = ctx.pair
  cfg = ConfigDict({"layer": 0.5, "components": 4, "batch_size": 4, "top_contexts": 3})
  summary = pca.run(ctx, cfg, tmp_path)
  assert summary["layer"] == 2
  deltas, refs = [], []
  for b in ctx.batches(4):
    rb = np.asarray(pair.base(b.ids, b.mask, capture=(2,)).residuals[2], np.float64)
    rf = np.asarray(pair.ft(b.ids, b.mask, capture=(2,)).residuals[2], np.float64)
    keep = b.mask & (b.docs >= 0)[:, None] & (b.kinds != KIND_SPECIAL)
    deltas.append((rf - rb)[keep])
    rows, cols = np.nonzero(keep)
    refs.append(b.docs[rows] * 65536 + cols)
  delta, refs = np.concatenate(deltas), np.concatenate(refs)
  assert summary["tokens"] == len(delta)
  # The run's jitted forwards against these eager ones (residuals after block 2), then float32 sums over at most
  # every token (a fold) or over d.
  cfg = pair.ft.cfg
  _check(tmp_path, delta, refs, 4, 3, residual_c(cfg, 2, after=1, n=len(delta)), residual_c(cfg, 2, after=1),
         "on the fly")
  # The lens table is the fine-tuned model's logit lens of ±v_i.
  comps = np.load(tmp_path / "components.npy")
  lens = pd.read_parquet(tmp_path / "pca_lens.parquet")
  logits = logit_lens(pair.ft, -comps[1:2])[0]
  got = lens[(lens.component == 1) & (lens.sign == "-")]
  np.testing.assert_array_equal(got.token_id, np.argsort(-logits, kind="stable")[:len(got)])
  html = (tmp_path / "section.html").read_text()
  assert html.startswith("<section><h2>PCA of the activation differences</h2>") and "components.npy" in html


def test_pca_on_a_store_equals_numpy(ctx_of, tmp_path):
  """Planted low-rank differences with a large mean (the shifted sums must not cancel), 3 float32 folds."""
  rng = np.random.default_rng(1)
  n, d = 1500, 64
  base = rng.normal(size=(n, d)).astype(np.float32) * 3
  basis = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # [3, d]
  delta = (rng.normal(size=(n, 3)) * [4.0, 2.0, 1.0]) @ basis + 0.05 * rng.normal(size=(n, d)) + 50.0
  x = np.stack([base, base + delta], 1).astype(np.float32)
  kinds = np.where(np.arange(n) % 100 == 0, KIND_SPECIAL, KIND_TEXT)
  store = write_arrays(tmp_path / "store", {1: x}, shard_tokens=512, chunk_tokens=64,
                       metadata={"token_kind": kinds, "token_id": rng.integers(3, 200, n)})
  out = tmp_path / "out"
  out.mkdir()
  old = pca.FOLD_EVERY
  pca.FOLD_EVERY = 7  # 1500 rows in chunks of 1 · 32: 47 chunks, 7 folds
  try:
    pca.run(ctx_of(store=store), ConfigDict({"layer": 0.34, "components": 3, "batch_size": 1,
                                                         "top_contexts": 4}), out)
  finally:
    pca.FOLD_EVERY = old
  keep = kinds != KIND_SPECIAL
  d64 = (x[:, 1].astype(np.float64) - x[:, 0])[keep]
  # The same float32 activations: δ rounded once, then float32 sums over a fold's 7 · 32 tokens, or over d.
  _check(out, d64, np.nonzero(keep)[0], 3, 4, rounding(n=7 * 32, depth=2), rounding(n=d, depth=2), "store")
  comps = np.load(out / "components.npy")
  # Not a rounding comparison: the planted directions are recovered despite the 0.05 noise (|cos| within 0.02 of 1,
  # orthogonal to the others within 0.02).
  np.testing.assert_allclose(np.abs(comps @ basis.T), np.eye(3), atol=0.02)
