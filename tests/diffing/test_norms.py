"""Norm difference against numpy on directly captured activations, and on a store of known arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ml_collections import ConfigDict

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEXT
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.diffing import norms
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.utils.config import ConfigError


@pytest.fixture
def ctx_of(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair and its dataset (norms grade nothing: no grader)."""
  return lambda **kw: DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64,
                                  progress=False, **kw)


def _cfg(layers, batch_size=4, top=5):
  return ConfigDict({"layers": layers, "batch_size": batch_size, "top_contexts": top})


def _reference(b, f):
  """QUANTITIES of paired rows [n, d] in float64."""
  b, f = b.astype(np.float64), f.astype(np.float64)
  dn, bn, fn = (np.linalg.norm(v, axis=-1) for v in (f - b, b, f))
  return {"diff_norm": dn, "base_norm": bn, "ft_norm": fn, "cosine": (b * f).sum(-1) / (bn * fn),
          "relative_diff": dn / bn}


def _check_summary(summary, layer, ref, kinds):
  groups = {"all": np.ones(len(kinds), bool), "non_special": kinds != KIND_SPECIAL}
  for g, sel in groups.items():
    rows = summary[(summary.layer == layer) & (summary.group == g)].set_index("quantity")
    for q, v in ref.items():
      v = v[sel]
      tol = {"rtol": 2e-5, "atol": 1e-5 * np.abs(v).max()}  # float32 on the device vs float64 here
      assert rows.loc[q, "tokens"] == len(v)
      np.testing.assert_allclose(rows.loc[q, "mean"], v.mean(), **tol)
      np.testing.assert_allclose(rows.loc[q, "std"], v.std(), rtol=2e-3, atol=1e-6)
      np.testing.assert_allclose(rows.loc[q, ["min", "max"]].astype(float), [v.min(), v.max()], **tol)
      np.testing.assert_allclose(rows.loc[q, ["p50", "p90", "p99"]].astype(float),
                                 np.quantile(v, [0.5, 0.9, 0.99]), **tol)


def test_norms_on_the_fly_match_numpy(ctx_of, tmp_path):
  ctx = ctx_of()
  pair = ctx.pair
  out = norms.run(ctx, _cfg((0.34, 1.0)), tmp_path)
  layers = [1, 3]
  assert sorted(map(int, out["layers"])) == layers
  # Reference: each model run on its own (no jit), the same documents.
  acts = {l: [] for l in layers}
  kinds, refs = [], []
  for b in ctx.batches(4):
    rb = pair.base(b.ids, b.mask, capture=layers).residuals
    rf = pair.ft(b.ids, b.mask, capture=layers).residuals
    valid = b.mask & (b.docs >= 0)[:, None]
    for l in layers:
      acts[l].append((np.asarray(rb[l])[valid], np.asarray(rf[l])[valid]))
    kinds.append(b.kinds[valid])
    rows, cols = np.nonzero(valid)
    refs.append(b.docs[rows] * 65536 + cols)
  kinds, refs = np.concatenate(kinds), np.concatenate(refs)
  summary = pd.read_parquet(tmp_path / "norms_summary.parquet")
  top = pd.read_parquet(tmp_path / "norms_top_contexts.parquet")
  for l in layers:
    ref = _reference(np.concatenate([a for a, _ in acts[l]]), np.concatenate([b for _, b in acts[l]]))
    _check_summary(summary, l, ref, kinds)
    # The top contexts: the largest ‖δ‖ among non-special tokens, in order.
    dn = np.where(kinds != KIND_SPECIAL, ref["diff_norm"], -np.inf)
    order = np.argsort(-dn, kind="stable")[:5]
    t = top[top.layer == l]
    np.testing.assert_allclose(t.diff_norm, dn[order], rtol=2e-5)
    np.testing.assert_array_equal(t.ref, refs[order])
    docs, pos = divmod(refs[order], 65536)
    ids = ctx.corpus().ids
    assert list(t.token) == [pair.tokenizer.decode([int(ids[d][p])]) for d, p in zip(docs, pos)]
  html = (tmp_path / "section.html").read_text()
  assert html.startswith("<section><h2>Norm difference</h2>") and "data:image/png;base64," in html


def test_norms_on_a_store_match_numpy(ctx_of, tmp_path):
  rng = np.random.default_rng(0)
  n, d = 700, 64
  x = rng.normal(size=(n, 2, d)).astype(np.float32)
  x[:, 1] += 0.3 * rng.normal(size=(n, d)) * rng.random((n, 1))
  docs = np.repeat(np.arange(n // 50), 50)
  pos = np.tile(np.arange(50), n // 50)
  kinds = np.where(pos == 0, KIND_SPECIAL, KIND_TEXT)
  tok_ids = rng.integers(3, 200, n)
  store = write_arrays(tmp_path / "store", {2: x}, shard_tokens=256, chunk_tokens=64,
                       metadata={"token_id": tok_ids, "doc_index": docs, "position": pos, "token_kind": kinds})
  ctx = ctx_of(store=store)
  out = norms.run(ctx, _cfg((0.67,), batch_size=3, top=7), tmp_path)  # 3 · max_len 32 = 96-row chunks
  assert out["source"] == "store" and out["tokens"] == n
  summary = pd.read_parquet(tmp_path / "norms_summary.parquet")
  ref = _reference(x[:, 0], x[:, 1])
  _check_summary(summary, 2, ref, kinds)
  top = pd.read_parquet(tmp_path / "norms_top_contexts.parquet")
  dn = np.where(kinds != KIND_SPECIAL, ref["diff_norm"], -np.inf)
  order = np.argsort(-dn, kind="stable")[:7]
  np.testing.assert_array_equal(top.ref, order)
  tok = ctx.pair.tokenizer
  for r, row in zip(order, top.itertuples()):
    assert row.token == tok.decode([int(tok_ids[r])])
    # The context stays inside the token's document.
    lo = max(r - 16, docs[r] * 50)
    assert row.before == tok.decode([int(i) for i in tok_ids[lo:r]])


def test_norms_store_without_the_layer_is_a_clear_error(ctx_of, tmp_path):
  x = np.zeros((64, 2, 64), np.float32)
  store = write_arrays(tmp_path / "store", {2: x}, shard_tokens=64, chunk_tokens=64)
  with pytest.raises(ConfigError, match=r"layer\(s\) \[1\].*holds layers 2 \(fraction 0.667\)"):
    norms.run(ctx_of(store=store), _cfg((0.34,)), tmp_path)
