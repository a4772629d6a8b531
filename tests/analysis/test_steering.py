"""Latent steering: strength 0 is plain greedy decoding, a hard push forces its token, batching changes nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from neurodiff_jax.analysis.steering import steer, steering_strengths
from neurodiff_jax.models import greedy_generate, load_tokenizer

LAYER = 1  # a middle layer of the 4-layer tiny Gemma 2: blocks 2 and 3 still run after the push
PROMPTS = ["Where are the stars?", "Count to five", "The river"]
NEW = 8


@pytest.fixture(scope="module")
def model(random_gemma2_model):
  return random_gemma2_model


@pytest.fixture(scope="module")
def tok(random_gemma2):
  return load_tokenizer(random_gemma2)


def random_direction(d: int, seed: int = 0) -> np.ndarray:
  v = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
  return v / np.linalg.norm(v)


def stop_ids(tok) -> set[int]:
  return {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}


def cut(tokens: list[int], stops: set[int]) -> list[int]:
  """By hand: the tokens up to and including the first stop token."""
  for i, t in enumerate(tokens):
    if t in stops:
      return tokens[: i + 1]
  return tokens


@pytest.mark.parametrize("chat_template", [True, False])
def test_strength_zero_is_greedy_generate(model, tok, chat_template):
  if chat_template:  # the reference renders and tokenizes in one call (no second BOS: the template has it)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                        return_dict=False)) for p in PROMPTS]
    assert all(x[0] == tok.bos_token_id and x.count(tok.bos_token_id) == 1 for x in ids)
  else:
    ids = [tok(p)["input_ids"] for p in PROMPTS]  # the tokenizer's own post-processor adds BOS
    assert all(x[0] == tok.bos_token_id for x in ids)
  ref = greedy_generate(model, ids, NEW, pad_id=tok.pad_token_id)
  # A nonzero direction: strength 0 must switch it off exactly, not merely be a zero vector.
  res = steer(model, tok, 50 * random_direction(64), LAYER, [0.0], PROMPTS, chat_template=chat_template,
              max_new_tokens=NEW)
  assert [r["prompt"] for r in res] == PROMPTS and [r["strength"] for r in res] == [0.0] * len(PROMPTS)
  stops = stop_ids(tok)
  for r, want in zip(res, ref, strict=True):
    want = cut(want, stops)
    assert r["tokens"] == want
    text = want[:-1] if want and want[-1] in stops else want
    assert r["completion"] == tok.decode(text, skip_special_tokens=False)


def test_hard_push_forces_the_token(model, tok):
  # Push along token t's (tied) embedding row. After block LAYER the residual is ~1000 × e_t/‖e_t‖ plus
  # O(1) terms, and blocks 2-3 see it only through their pre-norms and add bounded outputs, so the
  # final residual stays ≈ c·e_t. The final RMSNorm removes the scale but keeps the direction
  # ((1 + w) = 1 in this random checkpoint; the check below uses the real w), and with tied
  # embeddings the logit of v is then ∝ <e_t, e_v>, largest at v = t for random rows (asserted).
  # The final soft-cap is monotone, so it cannot change the argmax.
  embed = np.asarray(model.embed[...], np.float32)  # [V, d]
  w = np.asarray(model.final_norm.scale[...], np.float32)  # [d]
  t = tok.convert_tokens_to_ids("Ġriver")
  assert t != tok.unk_token_id
  assert int(np.argmax(embed @ ((1.0 + w) * embed[t]))) == t  # the premise: e_t read through the lens is t
  direction = embed[t] / np.linalg.norm(embed[t])
  res = steer(model, tok, direction, LAYER, [0.0, 1000.0], PROMPTS, max_new_tokens=NEW)
  assert [(r["prompt"], r["strength"]) for r in res] == [(p, s) for p in PROMPTS for s in (0.0, 1000.0)]
  for r in res:
    if r["strength"] == 0.0:
      assert r["tokens"] != [t] * NEW
    else:
      assert r["tokens"] == [t] * NEW
      assert r["completion"] == tok.decode([t] * NEW)

  # Pushing towards <end_of_turn> stops at once: the stop token is kept in `tokens`, cut from the text.
  eot = tok.convert_tokens_to_ids("<end_of_turn>")
  res = steer(model, tok, embed[eot] / np.linalg.norm(embed[eot]), LAYER, [1000.0], PROMPTS[:1], max_new_tokens=NEW)
  assert res[0]["tokens"] == [eot] and res[0]["completion"] == ""


def test_batched_strengths_equal_separate_runs(model, tok):
  direction = random_direction(64, seed=1)
  strengths = [0.0, 2.0, 10.0, -10.0]  # in this checkpoint, 10 stops one prompt's reply at once (a cut row)
  batched = steer(model, tok, direction, LAYER, strengths, PROMPTS, max_new_tokens=NEW)
  assert any(len(r["tokens"]) < NEW for r in batched)  # a row stopped early: cuts line up across the batch
  separate = {s: steer(model, tok, direction, LAYER, [s], PROMPTS, max_new_tokens=NEW) for s in strengths}
  for i, p in enumerate(PROMPTS):
    rows = batched[i * len(strengths):(i + 1) * len(strengths)]
    assert [(r["prompt"], r["strength"]) for r in rows] == [(p, s) for s in strengths]
    for r, s in zip(rows, strengths, strict=True):
      assert r == separate[s][i]
    # The strengths must matter, or a mix-up of rows and strengths would go unnoticed.
    assert len({tuple(r["tokens"]) for r in rows}) >= 3


def test_steering_strengths_are_multiples_of_max_act():
  assert steering_strengths(2.5) == [0.0, 2.5, 5.0, 10.0, 20.0]
  assert steering_strengths(0.5, multiples=(-1, 3)) == [-0.5, 1.5]
  for bad in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="not a positive activation"):
      steering_strengths(bad)
  with pytest.raises(ValueError, match="multiples"):
    steering_strengths(1.0, multiples=())


def test_errors_name_the_fix(model, tok):
  v = random_direction(64)
  with pytest.raises(ValueError, match=r"hidden size is 64; pass one residual-space vector \[d=64\]"):
    steer(model, tok, np.ones(32, np.float32), LAYER, [1.0], PROMPTS)
  with pytest.raises(ValueError, match="hidden size is 64"):
    steer(model, tok, np.ones((2, 64), np.float32), LAYER, [1.0], PROMPTS)
  with pytest.raises(ValueError, match="NaN or inf"):
    steer(model, tok, np.full(64, np.nan, np.float32), LAYER, [1.0], PROMPTS)
  for layer in (4, -1, 10):
    with pytest.raises(ValueError, match=rf"layer {layer} is out of range for a model with 4 layers; use 0 <= layer"):
      steer(model, tok, v, layer, [1.0], PROMPTS)
  with pytest.raises(ValueError, match="strengths"):
    steer(model, tok, v, LAYER, [], PROMPTS)
  with pytest.raises(ValueError, match="strengths"):
    steer(model, tok, v, LAYER, [float("nan")], PROMPTS)
  # (the tests check annotations too: the type hint or steer's own check, whichever comes first)
  with pytest.raises(TypeError, match="not a string|parameter 'prompts'"):
    steer(model, tok, v, LAYER, [1.0], [3])
  with pytest.raises(ValueError, match="no prompts"):
    steer(model, tok, v, LAYER, [1.0], [])
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    steer(model, tok, v, LAYER, [1.0], PROMPTS, max_new_tokens=0)
  no_template = copy.deepcopy(tok)
  no_template.chat_template = None
  with pytest.raises(ValueError, match="no chat template; use the chat model's tokenizer .* chat_template=False"):
    steer(model, no_template, v, LAYER, [1.0], PROMPTS)
  # Plain text needs no template.
  assert len(steer(model, no_template, v, LAYER, [1.0], PROMPTS[:1], chat_template=False, max_new_tokens=2)) == 1
