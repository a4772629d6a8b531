"""Streaming statistics, max-activating examples and contexts against numpy on the whole code matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, KIND_TEXT
from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.analysis.examples import (
  ActivationHistogram,
  LatentStats,
  TopExamples,
  contexts,
  example_rows,
  quantile_examples,
)
from neurodiff_jax.analysis.latent_table import latent_table, nu_ranking
from neurodiff_jax.analysis.stream import run_pass
from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder.model import Crosscoder, CrosscoderConfig, init_params
from tests.numerics import assert_close, rounding

N, D, M_LAT = 5000, 16, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, 2, D)).astype(np.float32)
  kind = rng.choice([KIND_TEXT, KIND_SPECIAL, KIND_TEMPLATE], size=N, p=[0.6, 0.1, 0.3])
  meta = {"token_kind": kind, "position": np.arange(N) % 50, "doc_index": np.arange(N) // 50,
          "token_id": rng.integers(0, 100, N)}
  store = write_arrays(tmp_path_factory.mktemp("ex") / "s", {0: x}, shard_tokens=1024, metadata=meta)
  cfg = CrosscoderConfig(num_models=2, d_model=D, dict_size=M_LAT, sparsity="topk", k=8)
  p = init_params(jax.random.key(0), cfg)
  p["b_enc"] = p["b_enc"].at[0].set(-100.0)  # never fires
  cc = Crosscoder(cfg, p, 0.0, np.array([1.3, 0.8], np.float32))
  f = np.asarray(cc.encode(x))  # [N, m] original units in, the same codes the pass computes
  return store, cc, f, meta


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_stats_and_top_examples_match_numpy(setup, mesh_shape):
  store, cc, f, meta = setup
  mesh = sharding.make_mesh(*mesh_shape)
  res = run_pass(cc, store, 0, [LatentStats(M_LAT, mesh_shape[1]), TopExamples(M_LAT, 5, 16, mesh_shape[1], mesh)],
                 batch_size=512, exclude=(), progress=False, fold_every=3, mesh=mesh)
  st, ex = res["stats"], res["examples"]
  on = f > 0
  tpl = np.isin(meta["token_kind"], (KIND_SPECIAL, KIND_TEMPLATE))
  np.testing.assert_array_equal(st["count"], on.sum(0))
  # Codes are relu of encoder sums over the 2·d inputs; the pass and `cc.encode` batch them differently.
  c_code = rounding(n=2 * D)
  assert_close(st["max_act"], f.max(0), c=c_code, what="max activation per latent equals numpy's")
  np.testing.assert_array_equal(st["freq"], on.sum(0) / N)  # a count over N: exact in float64
  with np.errstate(invalid="ignore"):
    np.testing.assert_array_equal(st["template_share"], (on & tpl[:, None]).sum(0) / on.sum(0))
  assert np.isnan(st["template_share"][0]) and st["count"][0] == 0
  assert int(st["tokens"]) == N
  for j in range(1, M_LAT):
    assert_close(ex["top_val"][j], np.sort(f[:, j])[::-1][:5], c=c_code, scale=f.max(),
                 what=f"latent {j}: top-5 activations equal numpy's sorted codes")
    assert_close(ex["top_val"][j], f[ex["top_tok"][j], j], c=c_code, scale=f.max(),
                 what=f"latent {j}: top tokens' codes are the reported values")
    ok = ex["sample_tok"][j] >= 0
    assert ok.sum() == min(16, on[:, j].sum())
    assert len(set(ex["sample_tok"][j][ok])) == ok.sum()  # distinct firings
    assert_close(ex["sample_val"][j][ok], f[ex["sample_tok"][j][ok], j], c=c_code, scale=f.max(),
                 what=f"latent {j}: sampled tokens' codes are the reported values")
  assert (ex["top_tok"][0] == -1).all() and (ex["sample_tok"][0] == -1).all()


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_activation_histogram_counts_every_analysed_firing(setup, mesh_shape):
  """Each latent's histogram is numpy's histogram of its codes over every analysed token in the same bins (bin 0 down
  to 0, the last up to ∞), so its bins sum to the number of analysed tokens where it fired; excluded tokens count
  nowhere. A code within float32 rounding of an edge may fall on either side of it."""
  store, cc, f, meta = setup
  mesh = sharding.make_mesh(*mesh_shape)
  exclude_kind = meta["token_kind"] == KIND_TEMPLATE
  # The bins span the middle of the codes' range, so that both open ends (below and above) are exercised too.
  lo, hi = np.log10(np.quantile(f[f > 0], [0.1, 0.9]))
  hist = ActivationHistogram(M_LAT, mesh_shape[1], bins=12, decades=(float(lo), float(hi)))
  res = run_pass(cc, store, 0, [hist, LatentStats(M_LAT, mesh_shape[1])], batch_size=512,
                 exclude=("chat_template",), progress=False, fold_every=3, mesh=mesh)
  counts, edges = res["histogram"]["counts"], res["histogram"]["edges"]
  assert counts.shape == (M_LAT, 12) and counts.dtype == np.int64
  np.testing.assert_allclose(edges, np.logspace(lo, hi, 13))
  g = np.where(exclude_kind[:, None], 0.0, f)  # the analysed codes: excluded tokens are 0
  on = g > 0
  np.testing.assert_array_equal(counts.sum(1), on.sum(0))  # every firing in one bin
  np.testing.assert_array_equal(counts.sum(1), res["stats"]["count"])
  assert counts[0].sum() == 0 and counts[:, 0].sum() > 0 and counts[:, -1].sum() > 0
  inner = edges[1:-1]
  near = np.abs(np.log10(np.where(on, g, 1.0))[..., None] - np.log10(inner)).min(-1) < 1e-5  # [N, m]
  for j in range(M_LAT):
    v = g[on[:, j], j]
    want = np.bincount(np.searchsorted(inner, v, side="right"), minlength=12)  # bin k: [e_k, e_k+1)
    ambiguous = int((near[:, j] & on[:, j]).sum())
    assert np.abs(counts[j] - want).sum() <= 2 * ambiguous, (j, counts[j], want)
  assert near[on].mean() < 1e-3  # the rounding allowance covers a handful of codes at most


def test_the_sample_is_uniform_over_firings(setup):
  """The bottom-k hash sample does not favour early or strong firings: its mean rank is central."""
  store, cc, f, _ = setup
  ex = run_pass(cc, store, 0, [TopExamples(M_LAT, 1, 32)], batch_size=512, exclude=(), progress=False)["examples"]
  ranks = []
  for j in range(1, M_LAT):
    fire = np.flatnonzero(f[:, j] > 0)
    if len(fire) < 200:
      continue
    order = {t: i / (len(fire) - 1) for i, t in enumerate(fire)}  # position of the firing in the stream
    ranks += [order[t] for t in ex["sample_tok"][j]]
    vals = np.sort(f[fire, j])
    ranks_v = np.searchsorted(vals, ex["sample_val"][j]) / len(vals)
    ranks += list(ranks_v)
  assert len(ranks) > 500
  assert abs(np.mean(ranks) - 0.5) < 0.03


def test_quantile_examples_cover_each_quantile():
  vals = np.arange(1, 41, dtype=np.float32)
  toks = np.arange(100, 140)
  out = quantile_examples(vals, toks, n_quantiles=4, per_quantile=3)
  assert [q for q, _, _ in out] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  assert all((q - 1) * 10 < v <= q * 10 for q, v, _ in out)
  assert all(t == int(v) + 99 for _, v, t in out)
  assert quantile_examples(vals, np.full(40, -1)) == []


def test_contexts_decode_the_document_window_with_activations(setup):
  store, cc, f, meta = setup
  ex = run_pass(cc, store, 0, [TopExamples(M_LAT, 3, 8)], batch_size=512, exclude=(), progress=False)["examples"]
  rows = contexts(cc, store, 0, example_rows([5, 9], ex), None, before=4, after=2)
  assert len(rows) > 6
  for r in rows.itertuples():
    t, lo = r.token, r.token - r.context_index
    doc = meta["doc_index"][t]
    span = np.arange(lo, lo + len(r.context_tokens))
    assert (meta["doc_index"][span] == doc).all()  # never crosses a document boundary
    assert r.context_index <= 4 and len(span) - r.context_index - 1 <= 2
    assert r.context_tokens == [str(i) for i in meta["token_id"][span]]  # no tokenizer: ids
    assert_close(r.context_acts, f[span, r.latent], c=rounding(n=2 * D), scale=f.max(),
                 what=f"latent {r.latent}: context activations equal numpy's codes")
    assert r.position == meta["position"][t] and r.doc_index == doc


def test_latent_table_tags_dead_genuine_and_ranks(setup):
  _, cc, f, _ = setup
  m = M_LAT
  w = np.asarray(cc.params["w_dec"]).copy()
  w[1:10, 0] *= 0.01  # chat-only by Δnorm
  w[10:14, 1] *= 0.01  # base-only
  cc2 = Crosscoder(cc.cfg, dict(cc.params, w_dec=jnp.asarray(w)), cc.theta, cc.norm_scale)
  count = (f > 0).sum(0)
  stats = {"count": count, "freq": count / N, "max_act": f.max(0), "template_share": np.full(m, 0.25),
           "template_mass_share": np.full(m, 0.3)}
  rng = np.random.default_rng(1)
  nu_e, nu_r = rng.uniform(0, 1, m), rng.uniform(0, 1, m)
  betas = np.ones((1, 2, m))
  scaling = {"latent": np.arange(m), "beta_recon": betas, "beta_error": betas, "beta_act": betas,
             "nu_error": nu_e[None], "nu_recon": nu_r[None]}
  t = latent_table(cc2, stats, scaling, nu_error_max=0.3, nu_recon_max=0.6)
  assert t.loc[0, "tag"] == "dead" and np.isnan(t.loc[0, "nu_error"]) and t.loc[0, "freq"] == 0
  assert (t.loc[1:9, "tag"] == "chat_only").all() and (t.loc[10:13, "tag"] == "base_only").all()
  norms = cc2.decoder_norms()
  assert_close(t["delta_norm"], 0.5 * ((norms[:, 1] - norms[:, 0]) / norms.max(1) + 1), c=rounding(n=4), scale=1.0,
               what="Δnorm of each latent (a few operations on two norms, in [0, 1])")
  chat = t["tag"] == "chat_only"
  expect = (nu_e < 0.3) & (nu_r < 0.6)
  assert (t.loc[chat, "genuine"].to_numpy() == expect[chat.to_numpy()]).all()
  assert t.loc[~chat, "genuine"].isna().all()
  rank, half = nu_ranking(nu_e, nu_r, chat.to_numpy())
  np.testing.assert_array_equal(t["nu_rank"], rank)  # ranks: the same function on the same values
  best = t[t["nu_half"] == "best"]["nu_rank"].max()
  assert best <= t[t["nu_half"] == "worst"]["nu_rank"].min()
  assert (half != "").sum() == chat.sum() == 9
