"""models.generate: GreedyGenerator against transformers' greedy decoding and teacher-forced forwards; no recompiles."""

from __future__ import annotations

import numpy as np
import pytest

from neurodiff_jax.models import load_tokenizer
from neurodiff_jax.models.generate import GreedyGenerator, greedy_generate

NEW = 6
LAYER = 1


@pytest.fixture(scope="module")
def model(random_gemma2_model):
  return random_gemma2_model


@pytest.fixture(scope="module")
def prompts(random_gemma2):
  tok = load_tokenizer(random_gemma2)
  return [tok(t)["input_ids"] for t in ("The river runs", "Where are the stars tonight, and why", "Count")]


def is_greedy(model, prompt: list[int], out: list[int], add: np.ndarray | None = None) -> bool:
  """Whether `out` is the greedy continuation of `prompt`: one unpadded teacher-forced forward of prompt + out, the
  addition made by a Python closure (no code shared with the generator)."""
  import jax.numpy as jnp

  interventions = None if add is None else {LAYER: lambda x: x + jnp.asarray(add, x.dtype)[None, None, :]}
  x = jnp.asarray([list(prompt) + list(out)], jnp.int32)
  logits = np.asarray(model(x, jnp.ones_like(x, bool), interventions=interventions).logits[0])
  return len(out) == NEW and all(int(np.argmax(logits[len(prompt) - 1 + i])) == t for i, t in enumerate(out))


def test_unsteered_matches_transformers_generate(random_gemma2, model, prompts):
  import torch
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(random_gemma2, attn_implementation="eager").eval()
  gen = GreedyGenerator(model, bucket=8)
  got = gen(prompts, NEW)
  for prompt, out in zip(prompts, got):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert out == ref[0, len(prompt):].tolist()


def test_steered_rows_are_greedy_under_their_addition(model, prompts):
  d = model.cfg.hidden_size
  rng = np.random.default_rng(0)
  push = (8.0 * rng.standard_normal(d)).astype(np.float32)
  gen = GreedyGenerator(model, bucket=8)
  adds = np.stack([np.zeros(d, np.float32), push, -push])
  got = gen(prompts, NEW, add=adds, layer=LAYER)
  for prompt, out, add in zip(prompts, got, adds):
    assert is_greedy(model, prompt, out, add if add.any() else None)
  assert got[1] != gen([prompts[1]], NEW)[0], "the push must change the sample for the test to bite"
  assert not is_greedy(model, prompts[1], got[1]), "without its addition the steered row is not greedy"
  # The same as greedy_generate with the addition traced in as a closure.
  import jax.numpy as jnp
  closure = {LAYER: lambda x: x + jnp.asarray(adds, x.dtype)[:, None, :]}
  assert got == greedy_generate(model, prompts, NEW, interventions=closure)


def test_compiles_once_per_shape(model, prompts):
  gen = GreedyGenerator(model, bucket=16)
  d = model.cfg.hidden_size
  gen([prompts[0]], NEW, add=np.ones(d, np.float32), layer=LAYER)
  compiled = gen._run._cache_size()
  # Another prompt in the same length bucket and another strength: no new program.
  gen([prompts[2]], NEW, add=-3 * np.ones(d, np.float32), layer=LAYER)
  assert gen._run._cache_size() == compiled
  gen([prompts[0]], NEW + 1, add=np.ones(d, np.float32), layer=LAYER)  # another length: one more
  assert gen._run._cache_size() == compiled + 1


def test_another_state_of_the_graph_reuses_the_program(model, prompts):
  """`state=` decodes with another model's parameters (an amplified copy, the base) in the compiled program."""
  import dataclasses

  from flax import nnx

  from neurodiff_jax.models import Transformer

  other = Transformer(model.cfg, rngs=nnx.Rngs(7))
  gen = GreedyGenerator(model, bucket=16)
  mine = gen(prompts, NEW)
  compiled = gen._run._cache_size()
  theirs = gen(prompts, NEW, state=nnx.state(other))
  assert gen._run._cache_size() == compiled
  assert theirs == GreedyGenerator(other, bucket=16)(prompts, NEW) and theirs != mine
  shallow = Transformer(dataclasses.replace(model.cfg, num_layers=1, layer_types=model.cfg.layer_types[:1]),
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not a parameter state of this generator's model graph"):
    gen(prompts, NEW, state=nnx.state(shallow))


def test_bad_input_is_named(model, prompts):
  gen = GreedyGenerator(model)
  with pytest.raises(ValueError, match="at least one token"):
    gen([[]], NEW)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    gen(prompts, 0)
  with pytest.raises(ValueError, match=r"the addition has shape \(3,\)"):
    gen(prompts, NEW, add=np.ones(3), layer=LAYER)
  with pytest.raises(ValueError, match="layer=-1"):
    gen(prompts, NEW, add=np.ones(model.cfg.hidden_size))


@pytest.mark.parametrize("name", ["gemma3_text", "gemma2_gqa_window", "qwen2_window", "llama3_scaled_untied"])
def test_cached_generation_past_the_sliding_window_is_greedy_under_transformers(name, hf_checkpoint):
  """Batched, left-padded prompts whose continuations run past the sliding window (4-5 tokens here).

  The reference is transformers' own full forward (eager, no cache): each generated token is its
  argmax given the tokens before. transformers' `generate` agrees except on Gemma 3, where its
  sliding-window cache departs from its own forward once the sequence passes the window (5.25.0:
  prompt [88, 105, 3] gives token 8 = 86 in `generate`, 1 in the forward); there our tokens are the
  forward's.
  """
  import torch

  from neurodiff_jax.models import load_model
  from tests.models.test_parity import CONFIGS

  config = CONFIGS[name]()
  hf, path = hf_checkpoint(config)
  model = load_model(path)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in (3, 9, 6)]
  got = greedy_generate(model, prompts, 12)
  for prompt, out in zip(prompts, got):
    with torch.no_grad():
      logits = hf(torch.tensor([prompt + out])).logits[0].numpy()
    assert [int(t) for t in logits[len(prompt) - 1:-1].argmax(-1)] == out, (name, prompt)
    if name != "gemma3_text":
      with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
      assert out == ref[0, len(prompt):].tolist(), (name, prompt)
