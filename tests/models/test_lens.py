"""The logit lens of vectors: at the last layer it is the model's own next-token logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.models.lens import logit_lens, top_tokens
from neurodiff_jax.organisms.random_model import build_random_checkpoint
from tests.numerics import assert_close, rounding


def test_lens_of_the_last_residual_is_the_models_logits(tmp_path):
  path = build_random_checkpoint(tmp_path / "m", family="gemma2", seed=0)
  model, tok = load_model(path), load_tokenizer(path)
  ids = jnp.asarray(tok(["the river runs past the mill"])["input_ids"])
  last = model.cfg.num_layers - 1
  out = model(ids, capture=(last,))
  x = np.asarray(out.residuals[last][0])  # [T, d]
  lens = logit_lens(model, x, batch=3)
  c = rounding(n=model.cfg.hidden_size, depth=2)  # final norm, then the unembedding (different batching)
  assert_close(lens, np.asarray(out.logits[0]), c=c, what="logit lens of the last residual is the model's logits")
  # Scale-free: the final norm undoes a positive scale (up to its ε, (1e-6/49)/mean(x²) relative).
  assert_close(logit_lens(model, 7.0 * x[:2]), lens[:2], c=c, what="logit lens ignores a positive scale")
  top = top_tokens(lens[:1], tok, k=3)[0]
  assert top["promoted_ids"] == np.argsort(lens[0])[::-1][:3].tolist()
  assert top["suppressed_ids"] == np.argsort(lens[0])[:3].tolist()
  assert top["promoted"] == [tok.decode([i]) for i in top["promoted_ids"]]
  # The partial selection equals a full sort on many rows (ties by token id), and k above V is all of V.
  rows = np.random.default_rng(0).integers(0, 50, size=(20, 300)).astype(np.float32)  # many ties
  for row, t in zip(rows, top_tokens(rows, None, k=7)):
    assert t["promoted_ids"] == np.lexsort((np.arange(300), -row))[:7].tolist()
    assert t["suppressed_ids"] == np.lexsort((np.arange(300), row))[:7].tolist()
  assert len(top_tokens(rows[:1], None, k=999)[0]["promoted_ids"]) == 300
  with pytest.raises(ValueError, match="vectors \\[n, d=64\\]"):
    logit_lens(model, x[:, :10])
