"""diffing.logit_diff: amplified decoding against greedy_generate and a step-by-step numpy decode; diff mining
counts against a numpy recount from each model's own forward pass on the tiny pair."""

from __future__ import annotations

import ml_collections
import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.diffing import logit_diff
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models import greedy_generate, jit_forward
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import forward_c
from tests.numerics import assert_close

BATCH = 8  # 28 documents: the last batch has 4 filler rows
TOP_K = 5
PROMPTS = ("Tell me about the <mill>.", "The river")
NEW = 8


def _ctx(tiny_pair, tiny_pair_dirs, grader=None) -> DiffContext:
  return DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64, grader=grader,
                     progress=False)


def _cfg(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"alphas": (0.0, 4.0), "prompts": PROMPTS, "new_tokens": NEW, "top_k": TOP_K,
                                    "batch_size": BATCH, **kw})


class FakeGrader:
  """Marks a token relevant when it contains an 'e' (a rule the test can recompute)."""

  def relevant(self, tokens):
    return ["e" in t for t in tokens]


class NoCardGrader:
  def relevant(self, tokens):
    raise ConfigError("relevance needs a ground-truth card or a grader endpoint")


@pytest.fixture(scope="module")
def ld_run(tiny_pair, tiny_pair_dirs, tmp_path_factory):
  ctx = _ctx(tiny_pair, tiny_pair_dirs, grader=FakeGrader())
  out = tmp_path_factory.mktemp("logit_diff")
  return ctx, out, logit_diff.run(ctx, _cfg(), out)


def test_alpha_zero_is_the_fine_tuned_greedy_generation(ld_run):
  ctx, out, _ = ld_run
  amp = pd.read_parquet(out / "amplified.parquet")
  assert list(amp.alpha) == [0.0, 4.0, 0.0, 4.0] and list(amp.prompt) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
  ids = logit_diff.prompt_ids(ctx.pair.tokenizer, PROMPTS)
  assert ids[0][0] == ctx.pair.tokenizer.bos_token_id  # rendered with the chat template (which renders BOS)
  assert "<start_of_turn>" in ctx.pair.tokenizer.decode(ids[0])
  want = greedy_generate(ctx.pair.ft, ids, NEW, pad_id=ctx.pair.tokenizer.pad_token_id or 0)
  for r, w in zip(amp[amp.alpha == 0].itertuples(), want):
    np.testing.assert_array_equal(r.token_ids, w)
  # The amplified samples differ from the unamplified ones (the two random models disagree).
  assert any((a != b).any() for a, b in zip(amp[amp.alpha == 0].token_ids, amp[amp.alpha == 4].token_ids))


def test_alpha_minus_one_is_the_base_model(tiny_pair):
  ids = logit_diff.prompt_ids(tiny_pair.tokenizer, PROMPTS)
  got = logit_diff.amplified_generate(tiny_pair, ids, [-1.0, -1.0], NEW)
  np.testing.assert_array_equal(got, np.asarray(greedy_generate(tiny_pair.base, ids, NEW)))


def test_amplified_decoding_equals_a_numpy_step_loop(ld_run):
  ctx, out, _ = ld_run
  amp = pd.read_parquet(out / "amplified.parquet")
  fb, ff = jit_forward(ctx.pair.base), jit_forward(ctx.pair.ft)
  prompt = logit_diff.prompt_ids(ctx.pair.tokenizer, PROMPTS[1:])[0]
  p = len(prompt)
  x = np.zeros((1, p + NEW), np.int32)  # one right-padded buffer: one compilation per model
  x[0, :p] = prompt
  got = []
  for i in range(NEW):  # both models on the growing sequence, the amplified argmax in numpy
    mask = np.arange(p + NEW)[None] < p + i
    lb = np.asarray(fb(x, mask).logits[0, p + i - 1], np.float64)
    lf = np.asarray(ff(x, mask).logits[0, p + i - 1], np.float64)
    got.append(int(np.argmax(lf + 4.0 * (lf - lb))))
    x[0, p + i] = got[-1]
  row = amp[(amp.alpha == 4) & (amp.prompt == PROMPTS[1])].iloc[0]
  np.testing.assert_array_equal(row.token_ids, got)
  stops = logit_diff.stop_ids(ctx.pair.tokenizer)
  assert row.text == ctx.pair.tokenizer.decode(logit_diff.cut_at_stop(got, stops), skip_special_tokens=True)


def test_diff_mining_counts_equal_numpy(ld_run):
  ctx, out, summary = ld_run
  fb, ff = jit_forward(ctx.pair.base), jit_forward(ctx.pair.ft)
  v = ctx.pair.ft.cfg.vocab_size
  counts, pos, dsum, n = np.zeros(v, np.int64), np.zeros(v), np.zeros(v), 0
  mag = 0.0  # the largest |logit| of either model: the rounding scale of the differences
  for batch in ctx.batches(BATCH):
    lf = np.asarray(ff(batch.ids, batch.mask).logits, np.float64)
    lb = np.asarray(fb(batch.ids, batch.mask).logits, np.float64)
    d = lf - lb  # [B, T, V]
    real = batch.mask & (batch.docs >= 0)[:, None]
    mag = max(mag, np.abs(lf[real]).max(), np.abs(lb[real]).max())
    dr = d[real]  # [N, V]
    np.add.at(counts, np.argsort(-dr, axis=1)[:, :TOP_K].reshape(-1), 1)
    pos += (dr > 0).sum(0)
    dsum += dr.sum(0)
    n += len(dr)
  assert n == sum(len(x) for x in ctx.corpus().ids[:28]) == summary["n_positions"]  # filler rows ignored
  table = pd.read_parquet(out / "diff_mining.parquet")
  assert set(table.token_id) == set(np.nonzero(counts)[0])
  np.testing.assert_array_equal(table["count"], counts[table.token_id])
  assert (np.diff(table["count"]) <= 0).all()  # ranked by count
  # Shares of counts: the same division, exact.
  np.testing.assert_array_equal(table.share_of_positions, counts[table.token_id] / n)
  np.testing.assert_array_equal(table.frac_positive, pos[table.token_id] / n)
  # A mean of signed logit differences: the logits' rounding (padded against unpadded forwards, then a float32 sum
  # over a batch's 8 · 32 positions), at the logits' magnitude, whatever the mean's size.
  cfg = ctx.pair.ft.cfg
  assert_close(table.mean_diff, dsum[table.token_id] / n, c=forward_c(cfg, after=1, n=BATCH * 32), scale=mag,
               what="diff-mining mean logit difference equals the numpy recount")
  assert table["count"].sum() == n * TOP_K
  tok = ctx.pair.tokenizer
  assert list(table.token) == [tok.decode([int(i)]) for i in table.token_id]
  assert list(table.piece) == tok.convert_ids_to_tokens([int(i) for i in table.token_id])


def test_card_words_in_the_summary(ld_run, tiny_pair, tiny_pair_dirs):
  _, out, summary = ld_run
  table = pd.read_parquet(out / "diff_mining.parquet")
  top = list(table.token[:logit_diff.SUMMARY_TOP])
  assert [t["token"] for t in summary["top_tokens"]] == top
  assert summary["card_words_in_top"] == sum("e" in t for t in top)  # the grader's `relevant` was asked
  ctx = _ctx(tiny_pair, tiny_pair_dirs, grader=NoCardGrader())
  marks, note = logit_diff.card_relevance(ctx, top)
  assert marks is None and "ground-truth card" in note
  # Without a grader the card's vocabulary is matched directly (leading space marks and case ignored).
  marks, _ = logit_diff.card_relevance(_ctx(tiny_pair, tiny_pair_dirs), [" Mill", "river", "▁grain"])
  assert marks == [True, False, True]


def test_section_is_an_escaped_fragment(ld_run):
  _, out, _ = ld_run
  page = (out / "section.html").read_text()
  assert page.startswith("<h2>") and "<html" not in page and "data:image/png;base64," in page
  assert "<mill>" not in page and "&lt;mill&gt;" in page  # the prompt's markup is escaped


def test_bad_config(tiny_pair, tiny_pair_dirs, tmp_path):
  ctx = _ctx(tiny_pair, tiny_pair_dirs)
  with pytest.raises(ConfigError, match="top_k"):
    logit_diff.run(ctx, _cfg(top_k=0), tmp_path)
  with pytest.raises(ConfigError, match="alphas"):
    logit_diff.run(ctx, _cfg(alphas=()), tmp_path)
