"""Greedy decoding with the ports, optionally under interventions (steering while generating).

Without a KV cache: every step re-runs the fixed-shape buffer, all steps inside one jitted
`fori_loop`, so the whole generation compiles once. Right for the small models and short
completions of tests, organisms and steering demos. `GreedyGenerator` keeps its compiled program
across calls (the dashboard's live page).
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


def cut_at_stop(tokens: Sequence[int], stops: set[int]) -> list[int]:
  """The tokens up to (without) the first stop token."""
  out = []
  for t in tokens:
    if int(t) in stops:
      break
    out.append(int(t))
  return out


def _left_padded(prompts: Sequence[Sequence[int]], width: int, total: int,
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts left-padded so each ends at column `width` - 1, in a [B, total] buffer, and their mask."""
  ids = np.full((len(prompts), total), pad_id, np.int32)
  mask = np.zeros((len(prompts), total), bool)
  for i, prompt in enumerate(prompts):
    ids[i, width - len(prompt) : width] = prompt
    mask[i, width - len(prompt) : width] = True
  return ids, mask


def _decode(m: Transformer, ids: jax.Array, mask: jax.Array, width: int, max_new_tokens: int,
            interventions: Mapping[int, Intervention] | None) -> jax.Array:
  """The greedy loop (traced): fills columns width .. width + max_new_tokens - 1 of `ids`, one forward per token."""

  def step(i, carry):
    ids, mask = carry
    logits = m(ids, mask, interventions=interventions).logits  # [B, total, V]
    nxt = jnp.argmax(logits[:, width + i - 1], axis=-1).astype(ids.dtype)
    return ids.at[:, width + i].set(nxt), mask.at[:, width + i].set(True)

  return jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))[0]


def _cut(out: np.ndarray, eos_id: int | None) -> list[list[int]]:
  results = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id) + 1]
    results.append(row)
  return results


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token.")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")


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
  _check_prompts(prompts, max_new_tokens)
  p = max(len(x) for x in prompts)
  ids, mask = _left_padded(prompts, p, p + max_new_tokens, pad_id)
  graphdef, state = nnx.split(model)

  # Compiled per call: `interventions` are closures, part of the traced program.
  @jax.jit
  def run(state, ids, mask):
    return _decode(nnx.merge(graphdef, state), ids, mask, p, max_new_tokens, interventions)

  return _cut(np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask)))[:, p:], eos_id)


class GreedyGenerator:
  """Greedy decoding of one model for interactive use: compiled once per shape, the steering vector an argument.

  `greedy_generate` traces its interventions into the program, so every call compiles. Here the only
  intervention is a per-row addition after one block, passed as data, and prompts are left-padded to a
  multiple of `bucket`: a session compiles once per (rows, prompt bucket, new tokens, layer) and later
  prompts and steering strengths of those shapes reuse it. Outputs equal `greedy_generate`'s with the
  same addition (positions come from the mask, so the extra left padding changes nothing).
  """

  def __init__(self, model: Transformer, bucket: int = 16):
    if int(bucket) < 1:
      raise ValueError(f"bucket={bucket} must be at least 1.")
    self.bucket = int(bucket)
    self.hidden_size = int(model.cfg.hidden_size)
    self._graphdef, self._state = nnx.split(model)
    graphdef = self._graphdef

    def run(state, ids, mask, add, width, max_new_tokens, layer):
      interventions = None if layer < 0 else {layer: lambda x: x + add.astype(x.dtype)[:, None, :]}
      return _decode(nnx.merge(graphdef, state), ids, mask, width, max_new_tokens, interventions)

    self._run = jax.jit(run, static_argnames=("width", "max_new_tokens", "layer"))

  def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, add: Any = None, layer: int = -1,
               eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of `prompts`, with `add` [B, d] (or [d], every row) added after block `layer` if given."""
    _check_prompts(prompts, max_new_tokens)
    width = -(-max(len(x) for x in prompts) // self.bucket) * self.bucket
    ids, mask = _left_padded(prompts, width, width + int(max_new_tokens), pad_id)
    b = len(prompts)
    if add is None:
      vec, layer = jnp.zeros((b, self.hidden_size), jnp.float32), -1
    else:
      vec = np.asarray(add, np.float32)
      if vec.shape == (self.hidden_size,):
        vec = np.broadcast_to(vec, (b, self.hidden_size))
      if vec.shape != (b, self.hidden_size):
        raise ValueError(f"the addition has shape {np.shape(add)}; give [d] or [{b}, d] with d={self.hidden_size}.")
      vec = jnp.asarray(vec)
      if int(layer) < 0:
        raise ValueError(f"layer={layer}: name the block after which the addition is made.")
    out = self._run(self._state, jnp.asarray(ids), jnp.asarray(mask), vec, width=width,
                    max_new_tokens=int(max_new_tokens), layer=int(layer))
    return _cut(np.asarray(out)[:, width:], eos_id)


__all__ = ["END_OF_TURN_TOKENS", "GreedyGenerator", "cut_at_stop", "encode_prompt", "greedy_generate", "stop_ids"]
