"""Greedy decoding with the ports, optionally under interventions (steering while generating).

With a KV cache (`Transformer.step`): the prompt is one forward that fills the cache, then each
token is one cached step, all inside one jitted `fori_loop`, so a generation compiles once.
Interventions see the new tokens' residuals only (the prompt's in the prefill, one token a step),
so an addition steers every position as it would in a full forward. `GreedyGenerator` keeps its
compiled program across calls (the dashboard's live page). A model loaded onto a mesh
(`load_model(..., mesh)`) generates there: its prompts' rows go on the mesh's data axis where they
divide it, and the parameters' shardings carry the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurodiff_jax.models.sharding import mesh_of, put_batch
from neurodiff_jax.models.transformer import Intervention, Transformer, positions_from_mask

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


def _pick(logits: jax.Array, key: jax.Array | None, temperature: float, top_k: int) -> jax.Array:
  """The next token of each row: the argmax, or a sample from the top-k softmax at `temperature`."""
  if key is None:
    return jnp.argmax(logits, axis=-1)
  top, idx = jax.lax.top_k(logits.astype(jnp.float32), top_k)  # [B, k]
  choice = jax.random.categorical(key, top / temperature, axis=-1)  # [B]
  return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]


def _decode(m: Transformer, ids: jax.Array, mask: jax.Array, width: int, max_new_tokens: int,
            interventions: Mapping[int, Intervention] | None, key: jax.Array | None = None,
            temperature: float = 1.0, top_k: int = 1) -> jax.Array:
  """The decoding loop (traced): fills columns width .. width + max_new_tokens - 1 of `ids`.

  One forward of the prompt fills a KV cache as wide as the buffer (sliding layers keep every column
  and mask by window, which is exact); each new token is then one cached step of one token. Greedy
  when `key` is None, else sampled (top-k at `temperature`, one key split per step).
  """
  batch, total = ids.shape
  cache = m.init_cache(batch, total)
  logits, cache = m.step(ids[:, :width], mask, positions_from_mask(mask[:, :width]), cache, 0, interventions,
                         last_only=True)
  keys = None if key is None else jax.random.split(key, max_new_tokens)
  nxt = _pick(logits[:, -1], None if keys is None else keys[0], temperature, top_k).astype(ids.dtype)
  count = jnp.sum(mask[:, :width], axis=-1, dtype=jnp.int32)  # the next token's position in each row

  def step(i, carry):
    ids, mask, cache, nxt, count = carry
    col = width + i
    ids, mask = ids.at[:, col].set(nxt), mask.at[:, col].set(True)
    logits, cache = m.step(nxt[:, None], mask, count[:, None], cache, col, interventions)
    nxt = _pick(logits[:, 0], None if keys is None else keys[i + 1], temperature, top_k).astype(ids.dtype)
    return ids, mask, cache, nxt, count + 1

  ids, mask, cache, nxt, count = jax.lax.fori_loop(0, max_new_tokens - 1, step, (ids, mask, cache, nxt, count))
  return ids.at[:, width + max_new_tokens - 1].set(nxt)


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

  return _cut(np.asarray(run(state, *put_batch(mesh_of(model), ids, mask)))[:, p:], eos_id)


# Module-level, the graph definition static: every call with the same architecture and shapes (a base and
# its fine-tune too: they share a graph) reuses one compiled program; an agent asks many times.
@functools.partial(jax.jit, static_argnames=("graphdef", "width", "max_new_tokens", "temperature", "top_k"))
def _sample_run(state: nnx.State, ids: jax.Array, mask: jax.Array, key: jax.Array, *, graphdef: nnx.GraphDef,
                width: int, max_new_tokens: int, temperature: float, top_k: int) -> jax.Array:
  return _decode(nnx.merge(graphdef, state), ids, mask, width, max_new_tokens, None, key, temperature, top_k)


def sample_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    seed: int,
    temperature: float = 0.8,
    top_k: int = 40,
    eos_id: int | None = None,
    pad_id: int = 0,
    batch_size: int = 32,
) -> list[list[int]]:
  """Sampled continuations (top-k at `temperature`, reproducible from `seed`), in batches of `batch_size` prompts."""
  _check_prompts(prompts, max_new_tokens)
  if not temperature > 0 or int(top_k) < 1:
    raise ValueError(f"temperature={temperature} must be > 0 and top_k={top_k} >= 1.")
  graphdef, state = nnx.split(model)
  mesh = mesh_of(model)
  width = max(len(x) for x in prompts)
  out: list[list[int]] = []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    chunk += [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape for every batch
    ids, mask = _left_padded(chunk, width, width + max_new_tokens, pad_id)
    key = jax.random.fold_in(jax.random.key(seed), i)
    res = np.asarray(_sample_run(state, *put_batch(mesh, ids, mask), key, graphdef=graphdef, width=width,
                                 max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                 top_k=int(top_k)))[:, width:]
    out += _cut(res, eos_id)[:min(batch_size, len(prompts) - i)]
  return out


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
    self._mesh = mesh_of(model)
    graphdef = self._graphdef

    def run(state, ids, mask, add, width, max_new_tokens, layer):
      interventions = None if layer < 0 else {layer: lambda x: x + add.astype(x.dtype)[:, None, :]}
      return _decode(nnx.merge(graphdef, state), ids, mask, width, max_new_tokens, interventions)

    self._run = jax.jit(run, static_argnames=("width", "max_new_tokens", "layer"))

  def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, add: Any = None, layer: int = -1,
               eos_id: int | None = None, pad_id: int = 0, state: nnx.State | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts`, with `add` [B, d] (or [d], every row) added after block `layer` if given.

    `state` decodes with other parameters of the same graph (the fine-tune's, a weight-amplified copy) in
    the program already compiled: parameters are an argument, not part of the trace.
    """
    _check_prompts(prompts, max_new_tokens)
    if state is not None and jax.tree.structure(state) != jax.tree.structure(self._state):
      raise ValueError("state is not a parameter state of this generator's model graph; pass nnx.split(m)[1] of a "
                       "model m of the same architecture.")
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
      if int(layer) < 0:
        raise ValueError(f"layer={layer}: name the block after which the addition is made.")
    out = self._run(self._state if state is None else state, *put_batch(self._mesh, ids, mask, vec), width=width,
                    max_new_tokens=int(max_new_tokens), layer=int(layer))
    return _cut(np.asarray(out)[:, width:], eos_id)


__all__ = ["END_OF_TURN_TOKENS", "GreedyGenerator", "cut_at_stop", "encode_prompt", "greedy_generate",
           "sample_generate", "stop_ids"]
