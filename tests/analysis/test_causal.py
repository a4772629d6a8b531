"""The causal test: reply masks on a hand-checked conversation, KL against a by-hand numpy patch, bootstrap table."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.analysis.causal import ChatEvalSet, causal_kl, causal_plot, causal_table, chat_eval_set
from neurodiff_jax.crosscoder.model import Crosscoder, CrosscoderConfig, init_params
from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.organisms.random_model import build_random_checkpoint
from tests.numerics import assert_close, kl_c, kl_magnitude, rounding

LAYER = 1
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "The river runs past the old mill."}],
    [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "one, two"},
     {"role": "user", "content": "more"}, {"role": "assistant", "content": " three "}],
    [{"role": "user", "content": "Where are the stars?"}, {"role": "assistant", "content": "Over the quiet harbour."}],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(base dir, chat dir): two tiny random Gemma 2 checkpoints with the same tokenizer, different weights."""
  root = tmp_path_factory.mktemp("causal")
  return build_random_checkpoint(root / "base", seed=0), build_random_checkpoint(root / "chat", seed=1)


@pytest.fixture(scope="module")
def tok(checkpoints):
  return load_tokenizer(checkpoints[1])


@pytest.fixture(scope="module")
def models(checkpoints):
  return load_model(checkpoints[0]), load_model(checkpoints[1])


def random_crosscoder(seed=0, tie_decoders=False) -> Crosscoder:
  """An L1 crosscoder with large decoder rows and a positive encoder bias, so that codes fire and patches matter."""
  cfg = CrosscoderConfig(num_models=2, d_model=64, dict_size=32, sparsity="l1", dec_init_norm=2.0)
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = init_params(k1, cfg)
  params["b_enc"] = 0.5 + 0.5 * jax.random.uniform(k2, (cfg.dict_size,))
  # Different scales per model: codes and decoder rows must be taken in original units.
  scale = np.asarray([0.5, 2.0], np.float32)
  if tie_decoders:  # equal rows in original units (decoder() divides model i's rows by scale[i])
    params["w_dec"] = jnp.stack([params["w_dec"][:, 0], params["w_dec"][:, 0] * (scale[1] / scale[0])], axis=1)
  return Crosscoder(cfg, params, norm_scale=scale)


def test_chat_eval_set_marks_reply_first_and_template_tokens(tok):
  data = chat_eval_set(tok, CONVERSATIONS[:2], max_len=64, first_n=3)
  decoded = [[tok.decode([int(i)]) for i in row[m]] for row, m in zip(data.ids, data.mask, strict=True)]
  # Hand-checked tokenization of conversation 0 (the tiny BPE spells the role names out in pieces).
  assert decoded[0] == [
      "<bos>", "<start_of_turn>", "u", "s", "er", "\n", "H", "i", " the", "re", "<end_of_turn>", "\n",
      "<start_of_turn>", "m", "o", "d", "el", "\n",
      "The", " river", " runs", " pas", "t", " the", " old", " mill", ".", "<end_of_turn>", "\n"]
  where = lambda a: np.flatnonzero(a).tolist()
  # Position t is scored for token t + 1: the reply is "The" … the closing "\n" (tokens 18–28).
  assert where(data.reply[0]) == list(range(17, 28))
  assert where(data.first[0]) == [17, 18, 19]  # predicts "The", " river", " runs"
  assert where(data.rest[0]) == list(range(20, 28))
  assert where(data.template[0]) == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 27, 28]  # never the BOS
  # Conversation 1: only the last assistant turn is the reply; its content is trimmed by the template to 2 tokens,
  # so `first` holds 2 positions and the closing <end_of_turn> (a template token) is in `rest`.
  assert "".join(decoded[1][38:]) == "three<end_of_turn>\n"
  assert where(data.reply[1]) == [37, 38, 39, 40]
  assert where(data.first[1]) == [37, 38] and where(data.rest[1]) == [39, 40]
  assert data.template[1, 40] and not data.template[1, 38]
  # Right padding with the pad id, masks all off there.
  assert data.ids.shape == (2, 42) and data.ids.dtype == np.int32
  assert data.mask.sum(1).tolist() == [29, 42] and (data.ids[0, 29:] == tok.pad_token_id).all()
  assert not (data.reply | data.first | data.template)[~data.mask].any()

  # Truncation keeps what fits of the reply; cutting the whole reply off is an error naming the fix.
  cut = chat_eval_set(tok, CONVERSATIONS[:1], max_len=20)
  assert cut.ids.shape == (1, 20) and where(cut.reply[0]) == [17, 18] and where(cut.first[0]) == [17, 18]
  with pytest.raises(ValueError, match="max_len=18 cuts the whole reply off; raise max_len above 18"):
    chat_eval_set(tok, CONVERSATIONS[:1], max_len=18)


def test_chat_eval_set_errors_name_the_fix(tok):
  with pytest.raises(ValueError, match="no conversations given"):
    chat_eval_set(tok, [], max_len=64)
  with pytest.raises(ValueError, match="conversation 1 ends with a 'user' message.*role 'assistant'"):
    chat_eval_set(tok, [CONVERSATIONS[0], CONVERSATIONS[1][:3]], max_len=64)
  with pytest.raises(ValueError, match="assistant reply is empty"):
    chat_eval_set(tok, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]], max_len=64)
  no_template = copy.deepcopy(tok)
  no_template.chat_template = None
  with pytest.raises(ValueError, match="no chat template; use the chat model's tokenizer"):
    chat_eval_set(no_template, CONVERSATIONS, max_len=64)


def _log_probs(model, ids) -> np.ndarray:
  logits = np.asarray(model(jnp.asarray(ids)).logits, np.float64)
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_identical_models_and_decoders_give_zero_kl(models, tok):
  model = models[1]
  cc = random_crosscoder(tie_decoders=True)
  data = chat_eval_set(tok, CONVERSATIONS, max_len=64)
  groups = {"all_base": np.array([], int), "all": np.arange(32), "some": np.array([3, 7, 30]), "template": "template"}
  kl = causal_kl(model, model, cc, LAYER, data, groups, batch_size=2)
  assert set(kl) == set(groups)
  lp = _log_probs(model, data.ids)
  scale = kl_magnitude(lp, lp)  # [B, T]
  for name, values in kl.items():
    assert values.shape == data.ids.shape and values.dtype == np.float32
    # The patched run is compiled apart from the clean one: only their rounding may differ.
    assert_close(values, 0.0, c=kl_c(model.cfg), scale=scale, what=f"{name}: identical models and decoders, KL 0")


def _reference_kl(chat, base, cc, ids, template, groups) -> dict[str, np.ndarray]:
  """KL per token of one unpadded conversation per group, patched by hand in numpy (eager models, float64 KL)."""
  ids = jnp.asarray(ids)[None]
  clean = chat(ids, capture=(LAYER,))
  x_chat = np.asarray(clean.residuals[LAYER][0], np.float64)  # [T, d]
  x_base = np.asarray(base(ids, capture=(LAYER,)).residuals[LAYER][0], np.float64)
  f = np.asarray(cc.encode(np.stack([x_base, x_chat], axis=1)), np.float64)  # [T, m]
  dec = cc.decoder().astype(np.float64)  # [m, 2, d]
  logits_p = np.asarray(clean.logits[0], np.float64)
  logp = logits_p - np.logaddexp.reduce(logits_p, axis=-1, keepdims=True)
  out = {}
  for name, group in groups.items():
    if isinstance(group, str):
      patched = np.where(template[:, None], x_chat, x_base)
    else:
      patched = x_base + f[:, group] @ (dec[group, 1] - dec[group, 0])
    patched[0] = x_chat[0]  # BOS is never patched
    patch = jnp.asarray(patched[None], jnp.float32)
    logits_q = np.asarray(chat(ids, interventions={LAYER: lambda x, patch=patch: patch}).logits[0], np.float64)
    logq = logits_q - np.logaddexp.reduce(logits_q, axis=-1, keepdims=True)
    out[name] = (np.exp(logp) * (logp - logq)).sum(-1)
    out[f"{name}/magnitude"] = kl_magnitude(logp, logq)
  return out


@pytest.fixture(scope="module")
def measured(models, tok):
  """(data, groups, kl) of a random crosscoder between two different models: 3 conversations, batches of 2."""
  base, chat = models
  cc = random_crosscoder(seed=1)
  data = chat_eval_set(tok, CONVERSATIONS, max_len=64)
  groups = {"all_base": np.array([], int), "all": np.arange(32), "half": np.arange(0, 32, 2),
            "template": "template"}
  return base, chat, cc, data, groups, causal_kl(chat, base, cc, LAYER, data, groups, batch_size=2)


def test_causal_kl_matches_a_by_hand_patch(measured):
  base, chat, cc, data, groups, kl = measured
  # Conversation 2 is right-padded in its row and sits in the last batch, padded with a repeated row; the
  # reference runs it alone and unpadded.
  i = 2
  n = int(data.mask[i].sum())
  assert n < data.ids.shape[1]
  ref = _reference_kl(chat, base, cc, data.ids[i, :n], data.template[i, :n], groups)
  c = kl_c(chat.cfg)
  for name in groups:
    scale = ref[f"{name}/magnitude"]  # per token
    assert_close(kl[name][i, :n], ref[name], c=c, scale=scale, what=f"{name}: KL per token equals a by-hand patch")
    assert (kl[name][i, n:] == 0).all()  # padding unscored
    assert_close(kl[name][i, 0], 0.0, c=c, scale=scale[0], what=f"{name}: BOS is never patched, KL 0")
  # Not vacuous: every patch moves the chat model, and the patches differ from each other.
  means = {name: kl[name][data.reply].mean() for name in groups}
  assert min(means.values()) > 1e-3 and len({round(float(v), 6) for v in means.values()}) == len(groups)


def test_kl_nonnegative_and_bootstrap_intervals(measured, tmp_path):
  base, chat, _, data, groups, kl = measured
  lp = _log_probs(chat, data.ids)
  floor = kl_c(chat.cfg) * kl_magnitude(lp, lp)  # a KL is ≥ 0 up to its rounding
  for values in kl.values():
    assert (values >= -floor).all()
  rows = causal_table(kl, data, n_boot=200)
  assert [(r["group"], r["region"]) for r in rows] == [(g, r) for g in groups for r in ("reply", "first", "rest")]
  for r in rows:
    where = data.region(r["region"])
    assert r["n_tokens"] == where.sum() and r["n_docs"] == (where.sum(1) > 0).sum()
    ref = kl[r["group"]][where].astype(np.float64)
    # A mean of terms that are ≥ 0 up to rounding: its scale is the mean of their magnitudes.
    assert_close(r["kl_mean"], ref.mean(), c=rounding(n=ref.size), scale=np.abs(ref).mean(),
                 what=f"{r['group']} / {r['region']}: table's KL mean equals numpy's")
    assert r["ci_low"] <= r["kl_mean"] <= r["ci_high"]
  png = causal_plot(rows, tmp_path / "plots" / "causal.png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _synthetic(n: int, rng) -> tuple[dict[str, np.ndarray], ChatEvalSet]:
  """n conversations of 12 tokens with random reply regions and per-conversation KL levels."""
  t = 12
  mask = np.ones((n, t), bool)
  starts = rng.integers(2, 8, n)
  reply = np.arange(t)[None] >= starts[:, None]
  reply[:, -1] = False
  first = reply & (np.arange(t)[None] < starts[:, None] + 2)
  level = rng.exponential(1.0, (n, 1))  # conversations differ: the interval has something to measure
  kl = (level * rng.uniform(0.5, 1.5, (n, t))).astype(np.float32) * mask
  data = ChatEvalSet(ids=np.zeros((n, t), np.int32), mask=mask, reply=reply, first=first, rest=reply & ~first,
                     template=np.zeros((n, t), bool))
  return {"g": kl}, data


def test_bootstrap_contains_the_mean_and_narrows_with_more_conversations():
  rng = np.random.default_rng(0)
  widths = []
  for n in (20, 500):
    kl, data = _synthetic(n, rng)
    rows = causal_table(kl, data, n_boot=500, seed=1)
    for r in rows:
      where = data.region(r["region"])
      ref = kl["g"][where].astype(np.float64)  # positive terms: no cancellation
      assert_close(r["kl_mean"], ref.mean(), c=rounding(n=ref.size), what=f"n={n}, {r['region']}: KL mean")
      assert r["ci_low"] < r["kl_mean"] < r["ci_high"]
    widths.append(rows[0]["ci_high"] - rows[0]["ci_low"])
  assert widths[1] < 0.5 * widths[0]  # ~ 1/√n: 25× the conversations, about a fifth of the width
  # Identical conversations leave nothing to resample: the interval collapses onto the mean.
  kl, data = _synthetic(5, rng)
  kl = {"g": np.where(data.mask, 0.25, 0).astype(np.float32)}
  for r in causal_table(kl, data, n_boot=50):
    assert_close([r["ci_low"], r["ci_high"]], 0.25, c=rounding(n=int(data.region(r["region"]).sum())), scale=0.25,
                 what=f"{r['region']}: bootstrap interval of identical conversations is their mean")


def test_bad_groups_and_crosscoders_are_errors_naming_the_fix(models, tok):
  base, chat = models
  # The checks come before any parameter is read, so these crosscoders need no parameters.
  cc = Crosscoder(CrosscoderConfig(num_models=2, d_model=64, dict_size=32, sparsity="l1"), {})
  data = chat_eval_set(tok, CONVERSATIONS[:1], max_len=64)
  with pytest.raises(ValueError, match=r"group 'top' has latent index 32, out of range for a crosscoder with m=32"):
    causal_kl(chat, base, cc, LAYER, data, {"top": np.array([0, 32])})
  with pytest.raises(ValueError, match=r"latent index -1"):
    causal_kl(chat, base, cc, LAYER, data, {"neg": np.array([-1])})
  with pytest.raises(ValueError, match="the only string group is 'template'"):
    causal_kl(chat, base, cc, LAYER, data, {"x": "templates"})
  with pytest.raises(ValueError, match="no groups given"):
    causal_kl(chat, base, cc, LAYER, data, {})
  three = Crosscoder(CrosscoderConfig(num_models=3, d_model=64, dict_size=8, sparsity="l1"), {})
  with pytest.raises(ValueError, match="num_models=3. Use a crosscoder trained on the .base, chat. pair"):
    causal_kl(chat, base, three, LAYER, data, {"all_base": np.array([], int)})
  narrow = Crosscoder(CrosscoderConfig(num_models=2, d_model=32, dict_size=8, sparsity="l1"), {})
  with pytest.raises(ValueError, match="hidden size is 64 but the crosscoder's d_model is 32; load the models"):
    causal_kl(chat, base, narrow, LAYER, data, {"all_base": np.array([], int)})
