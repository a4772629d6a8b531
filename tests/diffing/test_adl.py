"""ADL (diffing/adl.py) on the tiny pair: values against separate forward passes, the lens, greedy decoding."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.diffing import adl
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models.generate import encode_prompt, greedy_generate
from neurodiff_jax.models.lens import logit_lens
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import forward_c, residual_c
from tests.numerics import U64, assert_close, rounding


class FakeGrader:
  """Relevant = in a hand-made vocabulary; coherent = fewer than `max_chars` characters."""

  def __init__(self, vocab=("mill", "the", " the"), max_chars=10_000, fail: Exception | None = None):
    self.vocab, self.max_chars, self.fail, self.calibrated = set(vocab), max_chars, fail, None

  def relevant(self, tokens):
    if self.fail is not None:
      raise self.fail
    return [t.strip() in self.vocab for t in tokens]

  def calibrate(self, texts):
    self.calibrated = list(texts)

  def coherence(self, texts):
    return [float(len(t)) for t in texts]

  def is_coherent(self, texts):
    return [len(t) < self.max_chars for t in texts]


@pytest.fixture
def make_ctx(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair with a given (fake) grader; independent of the graders module."""

  def make(grader):
    return DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64, grader=grader,
                       progress=False, log=lambda m: None)

  return make


def _cfg(**kw):
  c = ml_collections.ConfigDict({"layers": (0.34, 1.0), "positions": 4, "num_documents": 10, "batch_size": 4,
                                 "top_k": 8, "patchscope_scales": (0.0, 1.0, 4.0),
                                 "steering_prompts": ("Tell me a story.", "The mill"),
                                 "steering_alphas": (0.0, 2.0, 64.0), "steering_tokens": 6})
  c.update(kw)
  return c


def test_mean_difference_equals_separate_forward_passes(make_ctx, tiny_pair_dirs):
  import torch
  import transformers

  ctx = make_ctx(grader=FakeGrader())
  layers, n = [1, 2], 4
  got = adl.mean_difference(ctx, layers, n, num_documents=10, batch_size=4)
  docs = [d for d in ctx.corpus().ids if len(d) >= n][:10]
  # The reference: HF PyTorch, each document alone (hidden_states[L + 1] is the residual after block L).
  hf = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in tiny_pair_dirs[:2]]
  diffs, tok_norms, mag = {l: [] for l in layers}, {l: [] for l in layers}, {l: 0.0 for l in layers}
  with torch.no_grad():
    for d in docs:
      ids = torch.tensor(np.asarray(d, np.int64)[None])
      hb, hf_ = (m(input_ids=ids, output_hidden_states=True).hidden_states for m in hf)
      for l in layers:
        b, f = hb[l + 1][0].double().numpy(), hf_[l + 1][0].double().numpy()
        diffs[l].append(f[:n] - b[:n])
        tok_norms[l].extend(np.linalg.norm(f[1:], axis=-1))
        mag[l] = max(mag[l], np.abs(b[:n]).max(), np.abs(f[:n]).max())
  assert int(got["documents"]) == len(docs) == 10
  cfg = ctx.pair.ft.cfg
  for i, l in enumerate(layers):
    want = np.mean(diffs[l], axis=0)  # [n, D]
    # Two implementations' residuals, then float32 sums over a batch; δ is a difference of signed residuals, so
    # its rounding is that of the residuals (scale: their largest magnitude), not of δ.
    c = residual_c(cfg, l, after=1)
    assert_close(got["delta"][i], want, c=c, scale=mag[l], what=f"δ_p at layer {l} equals HF per-document forwards")
    assert_close(got["mean_ft"][i] - got["mean_base"][i], want, c=c, scale=mag[l],
                 what=f"mean_ft − mean_base at layer {l} equals HF's δ_p")
    # Norms (a sum over d), then a float32 sum over a batch's tokens: positive terms, no cancellation.
    assert_close(got["typical_norm_ft"][i], np.mean(tok_norms[l]), c=residual_c(cfg, l, after=2, n=4 * 32),
                 what=f"typical ‖h_ft‖ at layer {l} equals HF's mean token norm")
  assert np.linalg.norm(got["delta"]) > 0.1  # two different random models do differ


def test_chat_positions_read_around_the_assistant_turn(make_ctx, tiny_pair_dirs):
  import torch
  import transformers

  ctx = make_ctx(grader=FakeGrader())
  n, pre = 3, 2
  got = adl.mean_difference(ctx, [1], n, num_documents=64, batch_size=8, pre_assistant=pre)
  corpus = ctx.corpus()
  tok = ctx.pair.tokenizer
  hf = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in tiny_pair_dirs[:2]]
  sums, counts = {p: 0.0 for p in range(-pre, n)}, {p: 0 for p in range(-pre, n)}
  mag = 0.0  # the largest |residual| summed: δ's rounding scale
  chats = 0
  with torch.no_grad():
    for ids in corpus.ids:
      ids = np.asarray(ids, np.int64)
      if len(ids) < n:
        continue
      # The reference finds the assistant turn itself: the user turn rendered with the generation prompt.
      rendered = tok.decode(ids)
      start = -1
      if "<start_of_turn>" in rendered:
        user = rendered.split("<start_of_turn>user\n")[1].split("<end_of_turn>")[0]
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])
        chats += 1
      hb, hf_ = (m(input_ids=torch.tensor(ids[None]), output_hidden_states=True).hidden_states[2][0].double().numpy()
                 for m in hf)
      for p in range(-pre, n):
        if start < 0 and p < 0:
          continue
        at = max(start, 0) + p
        if at < len(ids):
          sums[p] = sums[p] + hf_[at] - hb[at]
          counts[p] += 1
          mag = max(mag, np.abs(hf_[at]).max(), np.abs(hb[at]).max())
  assert chats == 4
  assert got["positions"].tolist() == list(range(-pre, n))
  assert got["count"].tolist() == [counts[p] for p in range(-pre, n)] == [4, 4] + [len(corpus.ids)] * n
  c = residual_c(ctx.pair.ft.cfg, 1, after=1, n=8)  # HF's residuals after block 1, then float32 sums over a batch
  for i, p in enumerate(range(-pre, n)):
    assert_close(got["delta"][0, i], sums[p] / counts[p], c=c, scale=mag,
                 what=f"δ_p at chat position label {p} equals HF forwards around the assistant turn")
  # Plain text alone: no template tokens, so no negative positions are kept.
  text_only = adl.mean_difference(ctx, [1], n, num_documents=10, batch_size=4, pre_assistant=pre)
  assert text_only["positions"].tolist() == list(range(n))


def test_logit_lens_table_equals_direct_lens(tiny_pair):
  rng = np.random.default_rng(0)
  delta = rng.normal(size=(2, 3, tiny_pair.ft.cfg.hidden_size))
  table = adl.logit_lens_table(tiny_pair.ft, tiny_pair.tokenizer, delta, [1, 3], top_k=5)
  assert len(table) == 2 * 3 * 2 * 5
  for li, layer in enumerate([1, 3]):
    for pos in range(3):
      for sign, s in (("+", 1.0), ("-", -1.0)):
        logits = logit_lens(tiny_pair.ft, s * delta[li, pos][None])[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want = np.argsort(-p, kind="stable")[:5]
        sub = table[(table.layer == layer) & (table.position == pos) & (table.sign == sign)].sort_values("rank")
        assert sub.token_id.tolist() == want.tolist()
        # Both softmaxes are float64 of the lens' logits, whose rounding (final norm, unembedding) differs only by the
        # table's batching: a probability's relative error is the logits' absolute error, at their magnitude.
        assert_close(sub.prob, p[want], c=rounding(n=tiny_pair.ft.cfg.hidden_size, depth=2),
                     scale=p[want] * np.abs(logits).max(),
                     what="logit-lens table probabilities equal a softmax of the direct lens")
        assert sub.token.tolist() == [tiny_pair.tokenizer.decode([int(t)]) for t in want]


def test_relevance_shares_and_baseline_against_hand_counts(make_ctx):
  share, weighted = adl.relevance_shares([True, False, True, False], [0.4, 0.3, 0.2, 0.1])
  assert share == 0.5
  assert_close(weighted, 0.6, c=rounding(n=4, u=U64), what="weighted relevance share = Σ w·relevant / Σ w")
  assert all(math.isnan(x) for x in adl.relevance_shares([], []))
  ctx = make_ctx(grader=FakeGrader())
  ids, freq = adl.frequent_tokens(ctx, 5, 64)
  corpus = ctx.corpus()
  counts = np.bincount(np.concatenate([i[k == 0] for i, k in zip(corpus.ids, corpus.kinds)]),
                       minlength=ctx.pair.ft.cfg.vocab_size)
  assert sorted(counts[ids].tolist(), reverse=True) == sorted(counts.tolist(), reverse=True)[:5]
  np.testing.assert_array_equal(freq, counts[ids] / counts.sum())  # shares of counts: the same division, exact


def test_patchscope_patch_mechanics(tiny_pair):
  tok, model = tiny_pair.tokenizer, tiny_pair.ft
  prompts = [encode_prompt(tok, p, chat=False) for p in adl.IDENTITY_PROMPTS[:2]]
  ids, mask = adl._prompt_batch(prompts, 0)
  out = model(jnp.asarray(ids), jnp.asarray(mask), capture=(1,))
  own = np.asarray(out.residuals[1][:, -1])  # [2, D]
  unpatched = np.argsort(-np.asarray(out.logits[:, -1]), axis=-1, kind="stable")[:, :5]
  # Patching a prompt's own residual back in is the unpatched run; row_layer -1 is unpatched too.
  top, _ = adl.patched_top_tokens(model, prompts, [1, -1], np.stack([own[0], np.zeros_like(own[1])]), 5)
  np.testing.assert_array_equal(top, unpatched)
  # Scale 0 replaces the residual by zeros: equal to the model run with that replacement by hand.
  top0, p0 = adl.patched_top_tokens(model, prompts, [1, 1], np.zeros_like(own), 5)
  zero = model(jnp.asarray(ids), jnp.asarray(mask), interventions={1: lambda x: x.at[:, -1].set(0.0)}).logits[:, -1]
  zp = np.array(jnp.exp(zero - zero.max(-1, keepdims=True)), np.float64)
  zp /= zp.sum(-1, keepdims=True)
  np.testing.assert_array_equal(top0, np.argsort(-zp, axis=-1, kind="stable")[:, :5])
  # A jitted forward and float32 softmax against the eager forward and a float64 softmax. A probability's relative
  # error is the logits' absolute error (the forward's, at the logits' magnitude) plus the float32 softmax's own
  # (relative, of size 1): scale p · max(1, max |logit|).
  want0 = np.take_along_axis(zp, top0, -1)
  mag = max(1.0, float(np.abs(np.asarray(zero)).max()))
  assert_close(p0, want0, c=forward_c(model.cfg, after=1, n=model.cfg.vocab_size), scale=want0 * mag,
               what="patchscope top-token probabilities equal the hand-patched forward's softmax")
  assert not np.array_equal(top0, unpatched)


def test_steering_alpha_zero_is_greedy_and_push_changes_text(tiny_pair):
  tok, model = tiny_pair.tokenizer, tiny_pair.ft
  prompts = [encode_prompt(tok, p, chat=True) for p in ("Tell me a story.", "Hi")]
  d = model.cfg.hidden_size
  v = np.random.default_rng(1).normal(size=d)
  rows = prompts + prompts
  adds = np.stack([np.zeros(d), np.zeros(d), 0 * v, 50.0 * v])
  got = adl.steered_generate(model, rows, [-1, -1, 2, 2], adds, 6)
  want = [greedy_generate(model, [p], 6)[0] for p in prompts]
  assert got[0] == want[0] and got[1] == want[1] and got[2] == want[0]
  assert got[3] != want[1]


def test_run_end_to_end(make_ctx, tmp_path):
  grader = FakeGrader(max_chars=10_000)
  ctx = make_ctx(grader=grader)
  summary = adl.run(ctx, _cfg(), tmp_path)
  for f in ("logit_lens.parquet", "relevance.parquet", "patchscope.parquet", "steering.parquet", "means.npz",
            "delta_norms.png"):
    assert (tmp_path / f).is_file(), f
  assert summary["layers"] == [1, 3] and summary["positions"] == 4 and summary["documents"] == 10
  lens = pd.read_parquet(tmp_path / "logit_lens.parquet")
  rel = pd.read_parquet(tmp_path / "relevance.parquet")
  for (layer, pos), part in lens[lens.sign == "+"].groupby(["layer", "position"]):
    flags = [t.strip() in grader.vocab for t in part.token]
    row = rel[(rel.source == "logit_lens") & (rel.layer == layer) & (rel.position == pos)]
    assert row.share.item() == pytest.approx(np.mean(flags))  # a share of counts
  assert "baseline" in set(rel.source) and "relevance" in summary
  steer = pd.read_parquet(tmp_path / "steering.parquet")
  assert grader.calibrated == steer.text[~steer.steered].tolist()
  assert len(steer) == 2 + 2 * 4 * 3 * 2
  # Everything coherent: the chosen α is the largest.
  assert set(steer[steer.chosen].alpha) == {64.0} and set(summary["steering_alpha"].values()) == {64.0}
  patch = pd.read_parquet(tmp_path / "patchscope.parquet")
  assert (patch.prompts_agreeing >= 2).all()
  assert patch[patch.best].groupby(["layer", "position"]).scale.nunique().eq(1).all()
  page = (tmp_path / "section.html").read_text()
  assert page.startswith("<h2>") and "<html" not in page and "data:image/png;base64," in page


def test_steering_alpha_search_picks_largest_coherent(make_ctx, tmp_path):
  ctx = make_ctx(grader=FakeGrader())
  means = adl.mean_difference(ctx, [2], 2, 4, 4)
  # Coherent = the same text as unsteered: α = 0 always qualifies; a huge α never does.
  table0 = adl.steering(ctx, means, _cfg(steering_alphas=(0.0, 1000.0)))
  unsteered = set(table0.text[~table0.steered])

  class SameAsUnsteered(FakeGrader):
    def is_coherent(self, texts):
      return [t in unsteered for t in texts]

  table = adl.steering(make_ctx(grader=SameAsUnsteered()), means, _cfg(steering_alphas=(0.0, 1000.0)))
  assert set(table[table.chosen].alpha) == {0.0}


def test_relevance_skipped_when_grader_cannot_grade(make_ctx, tmp_path):
  ctx = make_ctx(grader=FakeGrader(fail=ConfigError("no ground-truth card and no grader endpoint")))
  summary = adl.run(ctx, _cfg(layers=(0.5,), positions=2, steering_alphas=(1.0,), patchscope_scales=(1.0,)), tmp_path)
  assert "no ground-truth card" in summary["relevance_skipped"] and "relevance" not in summary
  assert len(pd.read_parquet(tmp_path / "relevance.parquet")) == 0
  assert "Skipped" in (tmp_path / "section.html").read_text()


def test_errors(make_ctx, tmp_path):
  ctx = make_ctx(grader=FakeGrader())
  with pytest.raises(ConfigError, match="outside"):
    adl.run(ctx, _cfg(layers=(1.5,)), tmp_path)
  with pytest.raises(ConfigError, match=r"adl.positions=40.*max_len=32"):
    adl.run(ctx, _cfg(positions=40), tmp_path)
  long = DiffContext(pair=ctx.pair, datasets=ctx.datasets, max_len=200, grader=FakeGrader(), progress=False)
  with pytest.raises(ConfigError, match="no document of the datasets has 150 tokens"):
    adl.run(long, _cfg(positions=150), tmp_path)
  with pytest.raises(ConfigError, match="positive number of positions"):
    adl.run(ctx, _cfg(positions=0), tmp_path)
  with pytest.raises(ConfigError, match=r"adl.pre_assistant=-1 must be a number of tokens ≥ 0"):
    adl.run(ctx, _cfg(pre_assistant=-1), tmp_path)
