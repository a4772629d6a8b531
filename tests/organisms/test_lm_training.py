"""The fine-tuning step's two economies: the loss on gathered positions equals the full loss, frozen parameters stay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neurodiff_jax.organisms.lm_training import LMTrainConfig, loss_token_budget, rows_loss, train_lm
from tests.numerics import assert_close, forward_c


def _rows(vocab: int, n: int = 6, t: int = 24, seed: int = 0) -> np.ndarray:
  """Packed rows [n, 2, t + 1] with a chat-like weight pattern: a third of the targets trained, one weighted 8."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (n, t + 1)).astype(np.int32)
  w = (rng.random((n, t + 1)) < 0.33).astype(np.int32)
  w[:, 5] = 8
  return np.stack([ids, w], axis=1)


def test_gathered_loss_and_gradient_equal_the_full_ones(random_gemma2_model):
  model = random_gemma2_model
  rows = _rows(model.cfg.vocab_size)
  k = loss_token_budget(rows, len(rows))
  assert 0 < k < rows.shape[0] * (rows.shape[-1] - 1)
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)

  def loss(params, k):
    s = nnx.State(state)
    nnx.replace_by_pure_dict(s, params)
    return rows_loss(nnx.merge(graphdef, s), jnp.asarray(rows), k)

  full, g_full = jax.value_and_grad(loss)(params, 0)
  gathered, g_gathered = jax.value_and_grad(loss)(params, k)
  c = forward_c(model.cfg, after=1, n=model.cfg.vocab_size)  # the logits, then a log-softmax over V
  assert_close(float(gathered), float(full), c=c, what="loss on the gathered positions equals the full loss")
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_gathered),
                               jax.tree_util.tree_leaves_with_path(g_full)):
    assert_close(np.asarray(a), np.asarray(b), c=c, what=f"gradient of {jax.tree_util.keystr(path)}")
  # Too small a K drops trained positions: the loss changes (the check can fail).
  assert abs(float(loss(params, k // 2)) - float(full)) > 1e-3


def test_budget_is_zero_when_nearly_every_position_is_trained():
  rows = _rows(100)
  rows[:, 1] = 1
  assert loss_token_budget(rows, 4) == 0


def test_frozen_parameters_stay_and_the_rest_train(random_gemma2, tmp_path):
  from neurodiff_jax.models import load_model

  model = load_model(random_gemma2)
  pure = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  before = {"embed": np.asarray(pure["embed"]), "final_norm": np.asarray(pure["final_norm"]["scale"])}
  rows = _rows(model.cfg.vocab_size, n=8)
  cfg = LMTrainConfig(steps=3, batch_size=4, seq_len=24, learning_rate=1e-2, warmup_steps=1, freeze=("embed",),
                      checkpoint_every=100)
  train_lm(model, rows, cfg, tmp_path / "w", desc="t")
  after = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  np.testing.assert_array_equal(np.asarray(after["embed"]), before["embed"])
  assert not np.array_equal(np.asarray(after["final_norm"]["scale"]), before["final_norm"])
  with pytest.raises(ValueError, match="freeze names \\['embedding'\\]"):
    train_lm(model, rows, LMTrainConfig(steps=1, batch_size=4, seq_len=24, freeze=("embedding",)), tmp_path / "x")


def test_thin_loss_keeps_at_most_the_share_and_leaves_sparse_rows():
  from neurodiff_jax.organisms.lm_training import thin_loss

  rows = _rows(100, n=40, t=64)
  rows[:20, 1] = 1  # plain text: every target trained
  thin = thin_loss(rows, 0.5, seed=0)
  per_row = (thin[:, 1, 1:] > 0).sum(-1)
  assert (per_row[:20] == 32).all()  # half of 64 targets
  np.testing.assert_array_equal(thin[20:], rows[20:])  # ~a third trained already: untouched
  assert ((thin[:, 1] > 0) <= (rows[:, 1] > 0)).all()  # only removes
  np.testing.assert_array_equal(thin[:, 0], rows[:, 0])
  kept = thin[:20, 1, 1:].sum(0) / 20  # each position kept about half the time: no bias toward any position
  assert kept.min() > 0.15 and kept.max() < 0.85
  with pytest.raises(ValueError, match="must be in"):
    thin_loss(rows, 0.0, seed=0)
