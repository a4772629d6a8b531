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


@pytest.fixture
def ctx_of(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair and its dataset (PCA grades nothing: no grader)."""
  return lambda **kw: DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64,
                                  progress=False, **kw)


def _numpy_pca(delta):
  cov = np.cov(delta.astype(np.float64), rowvar=False, bias=True)
  w, v = np.linalg.eigh(cov)
  return w[::-1], v[:, ::-1].T


def _check(out_dir, delta, refs, k, top):
  w, v = _numpy_pca(delta)
  var = pd.read_parquet(out_dir / "pca_variance.parquet")
  np.testing.assert_allclose(var.variance[:k], w[:k], rtol=1e-4, atol=1e-6 * w[0])
  np.testing.assert_allclose(var.explained_variance_ratio.sum(), 1.0, rtol=1e-9)
  np.testing.assert_allclose(var.explained_variance_ratio[:k], w[:k] / w.sum(), rtol=1e-4, atol=1e-7)
  comps = np.load(out_dir / "components.npy")
  assert comps.shape == (k, delta.shape[1])
  gaps = np.abs(np.diff(w[:k + 1])) / w[0]
  for i in range(k):
    if min(gaps[i], gaps[i - 1] if i else 1.0) > 1e-3:  # a well-separated eigenvalue: its vector is unique up to sign
      assert abs(comps[i] @ v[i]) > 0.999, i
  np.testing.assert_allclose(np.load(out_dir / "mean_difference.npy"), delta.mean(0), rtol=1e-4, atol=1e-5)
  # Top contexts: the largest projections on ±v_i of numpy's own projections with the saved components.
  proj = (delta - delta.mean(0)) @ comps.T.astype(np.float64)  # [N, k]
  ctxs = pd.read_parquet(out_dir / "pca_top_contexts.parquet")
  for i in range(k):
    for sign, s in (("+", 1.0), ("-", -1.0)):
      order = np.argsort(-s * proj[:, i], kind="stable")[:top]
      got = ctxs[(ctxs.component == i) & (ctxs.sign == sign)]
      np.testing.assert_allclose(got.projection, proj[order, i], rtol=1e-3, atol=1e-4 * np.abs(proj).max())
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
  _check(tmp_path, delta, refs, 4, 3)
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
  _check(out, d64, np.nonzero(keep)[0], 3, 4)
  comps = np.load(out / "components.npy")
  np.testing.assert_allclose(np.abs(comps @ basis.T), np.eye(3), atol=0.02)  # the planted directions
