"""diffing.kl: per-token KL against numpy from each model's own forward pass on the tiny pair."""

from __future__ import annotations

import ml_collections
import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.activations.datasets import KIND_TEMPLATE
from neurodiff_jax.diffing import kl as kl_method
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models import jit_forward
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import kl_c, kl_magnitude
from tests.numerics import assert_close

BATCH = 8  # 28 documents: the last batch has 4 filler rows


def _ctx(tiny_pair, tiny_pair_dirs) -> DiffContext:
  return DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64, grader=None,
                     progress=False)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(ctx: DiffContext) -> pd.DataFrame:
  """One row per real token: doc, position, kind, KL, each model's argmax, the magnitude `mag` of the log-probs the KL
  sums (its rounding scale); separate forward passes, float64 numpy."""
  fb, ff = jit_forward(ctx.pair.base), jit_forward(ctx.pair.ft)
  rows = []
  for batch in ctx.batches(BATCH):
    lb = np.asarray(fb(batch.ids, batch.mask).logits)
    lf = np.asarray(ff(batch.ids, batch.mask).logits)
    lpb, lpf = _log_softmax(lb), _log_softmax(lf)
    kl = (np.exp(lpf) * (lpf - lpb)).sum(-1)
    mag = kl_magnitude(lpf, lpb)
    for r, doc in enumerate(batch.docs):
      if doc < 0:
        continue
      for t in np.nonzero(batch.mask[r])[0]:
        rows.append({"doc": int(doc), "position": int(t), "kind": int(batch.kinds[r, t]), "kl": kl[r, t],
                     "mag": mag[r, t], "top_ft": int(lf[r, t].argmax()), "top_base": int(lb[r, t].argmax())})
  return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def kl_run(tiny_pair, tiny_pair_dirs, tmp_path_factory):
  ctx = _ctx(tiny_pair, tiny_pair_dirs)
  out = tmp_path_factory.mktemp("kl")
  summary = kl_method.run(ctx, ml_collections.ConfigDict({"batch_size": BATCH, "top_contexts": 6}), out)
  return ctx, out, summary, _reference(ctx)


def test_kl_statistics_equal_numpy(kl_run):
  ctx, out, summary, ref = kl_run
  assert ref.doc.nunique() == 28 and summary["n_documents"] == 28
  lengths = sum(len(d) for d in ctx.corpus().ids[:28])
  assert summary["n_tokens"] == len(ref) == lengths  # filler rows ignored, every real token counted once
  assert ref.kl.mean() > 1e-3  # the two random models differ: a test that can fail
  # The run's forwards are padded to another length than the reference's: KL rounding of the whole forward, at the
  # scale of the log-probs summed. An order statistic moves by at most the largest per-token error.
  c = kl_c(ctx.pair.ft.cfg)
  assert_close(summary["mean"], ref.kl.mean(), c=c, scale=ref.mag.mean(), what="KL mean equals the numpy reference")
  for key, want in (("median", ref.kl.median()), ("p99", np.quantile(ref.kl, 0.99)), ("max", ref.kl.max())):
    assert_close(summary[key], want, c=c, scale=ref.mag.max(), what=f"KL {key} equals the numpy reference")
  table = pd.read_parquet(out / "kl_summary.parquet").set_index("kind")
  tmpl = ref[ref.kind == KIND_TEMPLATE].kl
  assert len(tmpl) > 0 and table.loc["template", "n_tokens"] == len(tmpl)
  assert_close(table.loc["template", "mean"], tmpl.mean(), c=c, scale=ref[ref.kind == KIND_TEMPLATE].mag.mean(),
               what="KL mean of chat-template tokens equals the numpy reference")
  assert table.loc[["text", "special", "template"], "n_tokens"].sum() == table.loc["all", "n_tokens"]


def test_kl_profile_is_groupby_of_positions(kl_run):
  ctx, out, _, ref = kl_run
  prof = pd.read_parquet(out / "kl_by_position.parquet")
  want = ref.groupby("position").agg(mean=("kl", "mean"), size=("kl", "size"), mag=("mag", "mean")).reset_index()
  np.testing.assert_array_equal(prof.position, want.position)
  np.testing.assert_array_equal(prof.n_tokens, want["size"])
  # Each position's mean at the magnitude of its own tokens' log-probs.
  assert_close(prof.mean_kl, want["mean"], c=kl_c(ctx.pair.ft.cfg), scale=want["mag"].to_numpy(),
               what="mean KL by position equals a groupby of the numpy reference")
  assert (out / "kl_by_position.png").stat().st_size > 1000


def test_kl_top_contexts_are_the_argmax_ones(kl_run):
  ctx, out, _, ref = kl_run
  top = pd.read_parquet(out / "kl_top_contexts.parquet")
  # The dataset repeats each text 4 times: a context is shown once, from its first document.
  corpus = ctx.corpus().ids
  ref = ref.assign(window=[(corpus[d][max(0, t - 12):t + 5].tobytes(), min(t, 12))
                           for d, t in zip(ref.doc, ref.position)])
  want = ref.sort_values(["kl", "doc"], ascending=[False, True]).drop_duplicates("window").head(6)
  assert len(set(top.context)) == 6
  c = kl_c(ctx.pair.ft.cfg)
  assert_close(top.kl, want.kl, c=c, scale=want.mag.to_numpy(), what="top-context KLs equal the reference's largest")
  got_windows = [(corpus[d][max(0, t - 12):t + 5].tobytes(), min(t, 12)) for d, t in zip(top.doc, top.position)]
  assert set(got_windows) == set(want.window)  # the same contexts (equal texts may come from another copy)
  at = ref.set_index(["doc", "position"]).loc[list(zip(top.doc, top.position))]
  assert_close(top.kl, at.kl, c=c, scale=at.mag.to_numpy(), what="each top context's KL equals the reference's there")
  np.testing.assert_array_equal(top.top_ft_id, at.top_ft)
  np.testing.assert_array_equal(top.top_base_id, at.top_base)
  tok = ctx.pair.tokenizer
  for r in top.itertuples():
    ids = ctx.corpus().ids[r.doc]
    assert r.token == tok.decode([int(ids[r.position])])
    assert r.context_tokens[r.marked] == r.token and f"«{r.token}»" in r.context
    assert len(r.context_tokens) <= kl_method.CONTEXT_BEFORE + 1 + kl_method.CONTEXT_AFTER
    # The KL at every token of the window (the dashboard colours the text by it): the reference's at those positions.
    assert len(r.context_kl) == len(r.context_tokens) and r.context_kl[r.marked] == r.kl
    here = ref.set_index(["doc", "position"]).loc[[(r.doc, r.position - r.marked + i)
                                                   for i in range(len(r.context_kl))]]
    assert_close(np.asarray(r.context_kl), here.kl.to_numpy(), c=c, scale=here.mag.to_numpy(),
                 what="context_kl equals the reference's KL at each token of the window")


def test_kl_section_is_escaped_fragment(kl_run):
  _, out, _, _ = kl_run
  page = (out / "section.html").read_text()
  assert page.startswith("<h2>") and "<html" not in page and "data:image/png;base64," in page
  assert page.count("<tr>") >= 6 + 4  # the four kinds' rows and the six contexts
  # Decoded tokens can hold markup: every piece of text is escaped.
  top = pd.read_parquet(out / "kl_top_contexts.parquet").head(1)
  top["context_tokens"] = [["<bos>", "<script>", "x"]]
  top["marked"], top["top_ft"] = 1, "<end_of_turn>"
  summary = {"n_tokens": 3, "n_documents": 1, "mean": 0.1, "median": 0.1, "p99": 0.2, "max": 0.3}
  frag = kl_method.section_html(summary, pd.read_parquet(out / "kl_summary.parquet"), top, out / "kl_by_position.png")
  assert "<script>" not in frag and "<bos>" not in frag and "<end_of_turn>" not in frag
  assert '<span class="tok fire">&lt;script&gt;</span>' in frag


def test_kl_bad_config(tiny_pair, tiny_pair_dirs, tmp_path):
  with pytest.raises(ConfigError, match="batch_size"):
    kl_method.run(_ctx(tiny_pair, tiny_pair_dirs), ml_collections.ConfigDict({"batch_size": 0, "top_contexts": 3}),
                  tmp_path)
