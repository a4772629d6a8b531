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
  assert res["kl_unpatched"] == pytest.approx(float((w * _kl(lp_f, lp_b)).sum()), rel=1e-4)
  for layer in range(n):
    ref_b = _manual(tiny_pair.ft, tiny_pair.base, jids, jmask, layer)  # base with h_ft[L]
    ref_f = _manual(tiny_pair.base, tiny_pair.ft, jids, jmask, layer)  # ft with h_base[L]
    # The sweep's core, with a traced-style layer index: equal to the plain intervention at that layer only.
    got_b = np.asarray(patching.patched_forward(tiny_pair.base, jids, jmask, h_f, jnp.int32(layer)))
    got_f = np.asarray(patching.patched_forward(tiny_pair.ft, jids, jmask, h_b, jnp.int32(layer)))
    np.testing.assert_allclose(got_b[mask], ref_b[mask], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_f[mask], ref_f[mask], atol=1e-4, rtol=1e-4)
    for j, ref in enumerate((ref_b, ref_f)):
      want = float((w * _kl(lp_f, _log_softmax(ref))).sum())
      assert res["kl"][j, layer] == pytest.approx(want, rel=1e-4, abs=1e-6), (patching.DIRECTIONS[j], layer)
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
    lp = _log_softmax(logits)[0]
    return float(np.exp(sum(lp[len(prompt) - 1 + i, c] for i, c in enumerate(cont))))

  j, jm = jnp.asarray(ids), jnp.asarray(mask)
  assert scores["base"] == pytest.approx(p_cont(np.asarray(pair.base(j, jm).logits)), rel=1e-4)
  assert scores["ft"] == pytest.approx(p_cont(np.asarray(pair.ft(j, jm).logits)), rel=1e-4)
  layer = 1
  assert scores["patched"][0, layer] == pytest.approx(p_cont(_manual(pair.ft, pair.base, j, jm, layer)), rel=1e-4)
  assert scores["patched"][1, layer] == pytest.approx(p_cont(_manual(pair.base, pair.ft, j, jm, layer)), rel=1e-4)


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
  total = count = 0.0
  for b in ctx.batches(8, max_documents=12):
    ids, mask = padded(b, ctx.max_len, tiny_pair.tokenizer.pad_token_id or 0)  # the shape eager ops already saw
    keep = mask & (b.docs >= 0)[:, None]
    lp_f = _log_softmax(np.asarray(tiny_pair.ft(jnp.asarray(ids), jnp.asarray(mask)).logits))
    lp_b = _log_softmax(np.asarray(tiny_pair.base(jnp.asarray(ids), jnp.asarray(mask)).logits))
    total += float(_kl(lp_f, lp_b)[keep].sum())
    count += float(keep.sum())
  assert summary["num_tokens"] == int(count)
  assert summary["kl_unpatched"] == pytest.approx(total / count, rel=1e-4)
  np.testing.assert_allclose(table.fraction_carried, 1.0 - table.kl / summary["kl_unpatched"], rtol=1e-9)
  assert summary["metric_skipped"] == ""
  assert (tmp_path / "patching_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  section = (tmp_path / "section.html").read_text()
  assert section.startswith("<h2>") and "data:image/png;base64," in section and "<html" not in section
