"""Greedy decoding with the ports, optionally under interventions (steering while generating).

Without a KV cache: every step re-runs the fixed-shape buffer, all steps inside one jitted
`fori_loop`, so the whole generation compiles once. Right for the small models and short
completions of tests, organisms and steering demos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurodiff_jax.models.transformer import Intervention, Transformer

# Tokens that close the model's turn in the chat templates of the ported families (Gemma, Llama 3,
# Qwen, Phi): a sample stops there as it does at EOS.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
  """A prompt's ids: one user turn plus the generation prompt (the template renders BOS), or plain text after BOS."""
  if chat:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return [int(t) for t in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  bos = getattr(tokenizer, "bos_token_id", None)
  return [int(t) for t in ([bos] if bos is not None else []) + list(ids)]


def stop_ids(tokenizer: Any) -> set[int]:
  """EOS and the end-of-turn tokens the tokenizer knows: where a sample ends."""
  vocab = tokenizer.get_vocab()
  stops = {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
  if getattr(tokenizer, "eos_token_id", None) is not None:
    stops.add(int(tokenizer.eos_token_id))
  return stops


def greedy_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    interventions: Mapping[int, Intervention] | None = None,
) -> list[list[int]]:
  """Greedy continuations (token ids, cut after `eos_id`) of each prompt."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token.")
  b, p = len(prompts), max(len(x) for x in prompts)
  total = p + max_new_tokens
  ids = np.full((b, total), pad_id, np.int32)
  mask = np.zeros((b, total), bool)
  for i, prompt in enumerate(prompts):  # left padding: every prompt ends at column p - 1
    ids[i, p - len(prompt) : p] = prompt
    mask[i, p - len(prompt) : p] = True
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    m = nnx.merge(graphdef, state)

    def step(i, carry):
      ids, mask = carry
      logits = m(ids, mask, interventions=interventions).logits  # [B, total, V]
      nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(ids.dtype)
      return ids.at[:, p + i].set(nxt), mask.at[:, p + i].set(True)

    return jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))[0]

  out = np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask)))[:, p:]
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    results.append(row)
  return results


__all__ = ["END_OF_TURN_TOKENS", "encode_prompt", "greedy_generate", "stop_ids"]
