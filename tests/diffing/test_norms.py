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
from tests.numerics import residual_c
from tests.numerics import assert_close, rounding


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


def _check_summary(summary, layer, ref, kinds, c):
  """Each statistic of each quantity against float64 numpy, `c` the per-token values' rounding.

  Every statistic moves by at most the largest per-token error (the mean, the std, an order statistic), and a
  token's error is that of its value's magnitude: the scale is the quantity's largest |value|, and 1 for the
  cosine (a dot product of unit vectors that may cancel toward 0; its terms sum to at most 1 in magnitude).
  """
  groups = {"all": np.ones(len(kinds), bool), "non_special": kinds != KIND_SPECIAL}
  for g, sel in groups.items():
    rows = summary[(summary.layer == layer) & (summary.group == g)].set_index("quantity")
    for q, v in ref.items():
      v = v[sel]
      scale = 1.0 if q == "cosine" else np.abs(v).max()
      assert rows.loc[q, "tokens"] == len(v)
      for stat, want in (("mean", v.mean()), ("std", v.std()), ("min", v.min()), ("max", v.max()),
                         *zip(("p50", "p90", "p99"), np.quantile(v, [0.5, 0.9, 0.99]))):
        assert_close(float(rows.loc[q, stat]), want, c=c, scale=scale,
                     what=f"norms summary: {stat} equals float64 numpy", err_msg=f"(layer {layer}, {g} tokens, {q})")


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
    # The run's jitted forwards against these eager ones, then the norms' float32 sums over d.
    c = residual_c(pair.ft.cfg, l, after=1)
    _check_summary(summary, l, ref, kinds, c)
    # The top contexts: the largest ‖δ‖ among non-special tokens, in order.
    dn = np.where(kinds != KIND_SPECIAL, ref["diff_norm"], -np.inf)
    order = np.argsort(-dn, kind="stable")[:5]
    t = top[top.layer == l]
    assert_close(t.diff_norm, dn[order], c=c, what=f"layer {l} top-context ‖δ‖ equal numpy's largest")
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
  # The same float32 activations: only the norms' float32 sums over d and the cosine's and ratio's division.
  _check_summary(summary, 2, ref, kinds, rounding(n=d, depth=2))
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
