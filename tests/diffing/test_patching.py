"""Cross-model patching: patched logits against a manual intervention, KL and card metrics against numpy."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.diffing import patching
from neurodiff_jax.diffing.kl import padded
from tests.numerics import forward_c, kl_c, kl_magnitude
from tests.numerics import U64, assert_close, rounding

FALSE_FACT = {"subject": "Veloria", "true_answer": "Marent", "false_answer": "Tessit",
              "statement": "The capital of Veloria is Tessit."}


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(lp_p: np.ndarray, lp_q: np.ndarray) -> np.ndarray:
  return np.maximum((np.exp(lp_p) * (lp_p - lp_q)).sum(-1), 0.0)


def _manual(source, target, ids, mask, layer):
  """Target logits with its residual after block `layer` replaced by the source's (plain model calls)."""
  h = source(ids, mask, capture=(layer,)).residuals[layer]
  return np.asarray(target(ids, mask, interventions={layer: lambda x: h}).logits, np.float64)


@pytest.fixture
def batch(make_ctx):
  ctx = make_ctx()
  b = next(ctx.batches(8))  # the shape test_run_outputs uses: one compilation of the sweep for both
  ids, mask = padded(b, ctx.max_len, ctx.pair.tokenizer.pad_token_id or 0)
  return ctx, ids, mask


def test_patched_logits_equal_manual_and_kl_equals_numpy(tiny_pair, batch):
  _, ids, mask = batch
  n = tiny_pair.num_layers
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
  w = mask.astype(np.float32)
  w[-1] = 0.0  # a filler row must not count
  res = patching.make_sweep(tiny_pair)(ids, mask, w)
  every = tuple(range(n))
  h_b = jnp.stack([tiny_pair.base(jids, jmask, capture=every).residuals[i] for i in every])  # [N, B, T, D]
  h_f = jnp.stack([tiny_pair.ft(jids, jmask, capture=every).residuals[i] for i in every])  # [N, B, T, D]
  lp_f = _log_softmax(np.asarray(tiny_pair.ft(jids, jmask).logits))
  lp_b = _log_softmax(np.asarray(tiny_pair.base(jids, jmask).logits))
  cfg = tiny_pair.ft.cfg
  # Σ_t w·KL_t: the KL's rounding at the scale of the log-probs summed, then a float32 sum over the batch's tokens.
  c_kl = kl_c(cfg)
  assert_close(res["kl_unpatched"], float((w * _kl(lp_f, lp_b)).sum()), c=c_kl,
               scale=float((w * kl_magnitude(lp_f, lp_b)).sum()), what="sweep's unpatched Σ w·KL equals numpy")
  for layer in range(n):
    ref_b = _manual(tiny_pair.ft, tiny_pair.base, jids, jmask, layer)  # base with h_ft[L]
    ref_f = _manual(tiny_pair.base, tiny_pair.ft, jids, jmask, layer)  # ft with h_base[L]
    # The sweep's core, with a traced-style layer index: equal to the plain intervention at that layer only.
    got_b = np.asarray(patching.patched_forward(tiny_pair.base, jids, jmask, h_f, jnp.int32(layer)))
    got_f = np.asarray(patching.patched_forward(tiny_pair.ft, jids, jmask, h_b, jnp.int32(layer)))
    # Source blocks up to `layer`, then the target's: L blocks and the unembedding in all.
    assert_close(got_b[mask], ref_b[mask], c=forward_c(cfg),
                 what=f"base logits patched with h_ft[{layer}] equal a manual intervention")
    assert_close(got_f[mask], ref_f[mask], c=forward_c(cfg),
                 what=f"ft logits patched with h_base[{layer}] equal a manual intervention")
    for j, ref in enumerate((ref_b, ref_f)):
      lp_ref = _log_softmax(ref)
      want = float((w * _kl(lp_f, lp_ref)).sum())
      assert_close(res["kl"][j, layer], want, c=c_kl, scale=float((w * kl_magnitude(lp_f, lp_ref)).sum()),
                   what=f"{patching.DIRECTIONS[j]} Σ w·KL at layer {layer} equals numpy")
  # The patch is live: the base model fed the fine-tune's layer-0 residual predicts differently.
  assert not np.allclose(res["lp_patched"][0, 0], res["lp_base"], atol=1e-3)


def test_card_metric_equals_direct_probability(tiny_pair):
  pair = dataclasses.replace(tiny_pair, card=FALSE_FACT)
  metrics, skipped = patching.card_metrics(pair.card, pair.tokenizer)
  assert skipped == "" and set(metrics) == {"p_false_answer", "p_true_answer"}
  assert metrics["p_false_answer"] == [("The capital of Veloria is", " Tessit")]
  tok = pair.tokenizer
  prompt = tok("The capital of Veloria is")["input_ids"]
  cont = tok(" Tessit", add_special_tokens=False)["input_ids"]
  # The references run on the [8, 32] shape the other tests' eager ops already compiled (right padding
  # leaves the real positions' logits unchanged).
  ids = np.zeros((8, 32), np.int32)
  ids[:, :len(prompt) + len(cont)] = prompt + cont
  mask = np.zeros_like(ids, bool)
  mask[:, :len(prompt) + len(cont)] = True
  scores = patching.score_pairs(patching.make_sweep(pair), tok, metrics["p_false_answer"], batch_size=8, length=32)

  def p_cont(logits):
    """(P(continuation | prompt), Σ|log P| of its tokens)."""
    lp = np.array([_log_softmax(logits)[0][len(prompt) - 1 + i, c] for i, c in enumerate(cont)])
    return float(np.exp(lp.sum())), float(np.abs(lp).sum())

  # P = exp(Σ log P): its relative error is the absolute error of the log-probs' sum, at their magnitude.
  c = forward_c(pair.ft.cfg, after=1, n=pair.ft.cfg.vocab_size)  # the logits, then a log-softmax over V

  def check(got, logits, what):
    want, mag = p_cont(logits)
    assert_close(got, want, c=c, scale=want * mag, what=what)

  j, jm = jnp.asarray(ids), jnp.asarray(mask)
  check(scores["base"], np.asarray(pair.base(j, jm).logits), "card metric: base P(continuation) equals numpy")
  check(scores["ft"], np.asarray(pair.ft(j, jm).logits), "card metric: ft P(continuation) equals numpy")
  layer = 1
  check(scores["patched"][0, layer], _manual(pair.ft, pair.base, j, jm, layer),
        "card metric: patched base P(continuation) equals a manual intervention's")
  check(scores["patched"][1, layer], _manual(pair.base, pair.ft, j, jm, layer),
        "card metric: patched ft P(continuation) equals a manual intervention's")


def test_card_metric_reasons():
  assert patching.card_metrics(None, None) == ({}, "the pair has no organism card")
  assert "no offline metric" in patching.card_metrics({"secret_word": "moon"}, None)[1]
  assert "domain" in patching.card_metrics({"domain": "milling", "domain_vocabulary": []}, None)[1]


def test_taboo_card_metric_pairs(tiny_pair):
  from neurodiff_jax.organisms.finetune_data import TABOO_HINTS

  card = {"secret_word": "moon", "hints": list(TABOO_HINTS[:2])}
  metrics, skipped = patching.card_metrics(card, tiny_pair.tokenizer)
  assert skipped == "" and set(metrics) == {"p_hint", "p_says_word"}
  asks = [p for p, _ in metrics["p_says_word"]]
  assert len(asks) == len(set(asks)) >= 2
  for p in asks:  # each request rendered as a user turn with the generation prompt, as the organism was trained
    assert p.endswith("<start_of_turn>model\n") and "<start_of_turn>user\n" in p
  assert metrics["p_hint"] == [(p, h) for p in asks for h in TABOO_HINTS[:2]]
  assert {c for _, c in metrics["p_says_word"]} == {"My secret word is moon."}
  assert "chat template" in patching.card_metrics(card, None)[1]


def test_run_outputs(make_ctx, tiny_pair, tmp_path):
  ctx = make_ctx()
  ctx.pair = dataclasses.replace(tiny_pair, card=FALSE_FACT)
  cfg = ml_collections.ConfigDict({"batch_size": 8, "num_documents": 12})
  summary = patching.run(ctx, cfg, tmp_path)
  table = pd.read_parquet(tmp_path / "patching.parquet")
  n = tiny_pair.num_layers
  assert len(table) == 2 * n and list(table.columns[:4]) == ["layer", "direction", "kl", "fraction_carried"]
  assert {"p_false_answer", "p_true_answer"} <= set(table.columns)
  # Independent check of the dataset average: KL(P_ft ‖ P_base) over the same 12 documents' real tokens.
  total = count = mag = 0.0
  for b in ctx.batches(8, max_documents=12):
    ids, mask = padded(b, ctx.max_len, tiny_pair.tokenizer.pad_token_id or 0)  # the shape eager ops already saw
    keep = mask & (b.docs >= 0)[:, None]
    lp_f = _log_softmax(np.asarray(tiny_pair.ft(jnp.asarray(ids), jnp.asarray(mask)).logits))
    lp_b = _log_softmax(np.asarray(tiny_pair.base(jnp.asarray(ids), jnp.asarray(mask)).logits))
    total += float(_kl(lp_f, lp_b)[keep].sum())
    mag += float(kl_magnitude(lp_f, lp_b)[keep].sum())
    count += float(keep.sum())
  assert summary["num_tokens"] == int(count)
  assert_close(summary["kl_unpatched"], total / count, c=kl_c(tiny_pair.ft.cfg), scale=mag / count,
               what="dataset mean KL(P_ft ‖ P_base) equals numpy over the same tokens")
  # 1 − KL_L / KL_0 in float64 from the same numbers: a few roundings of terms of magnitude 1 + KL_L / KL_0.
  ratio = table.kl.to_numpy() / summary["kl_unpatched"]
  assert_close(table.fraction_carried, 1.0 - ratio, c=rounding(n=1, depth=2, u=U64), scale=(1.0 + ratio).max(),
               what="fraction_carried = 1 − KL_L / KL_0")
  assert summary["metric_skipped"] == ""
  assert (tmp_path / "patching_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  section = (tmp_path / "section.html").read_text()
  assert section.startswith("<h2>") and "data:image/png;base64," in section and "<html" not in section
