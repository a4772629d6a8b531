"""Greedy decoding with the ports, optionally under interventions (steering while generating).

Without a KV cache: every step re-runs the fixed-shape buffer, all steps inside one jitted
`fori_loop`, so the whole generation compiles once. Right for the small models and short
completions of tests, organisms and steering demos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurodiff_jax.models.transformer import Intervention, Transformer


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
