"""Latent steering (issue 16 §6): greedy generation with a latent's decoder direction added to the residual.

The steered model runs with x_L ← x_L + s · v after block L, at every position (the prompt's and
each generated token's), where v is a direction in the model's original residual units, e.g. a
crosscoder latent's chat decoder row d_j^chat = `cc.decoder()[j, 1]`. Strength s is in the units
of the latent's codes f_j (`cc.encode`), so s = f_j adds exactly what the latent contributes to the
reconstruction when it fires at f_j; `steering_strengths` spells strengths as multiples of the
latent's maximum activation, the convention of the report.

All prompts × strengths are one batch of rows (row r carries its own strength s_r and the
intervention adds s[:, None, None] · v), so one call compiles and runs `models.greedy_generate` once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from neurodiff_jax.models.generate import END_OF_TURN_TOKENS, encode_prompt, greedy_generate, stop_ids
from neurodiff_jax.models.transformer import Transformer


def steering_strengths(max_act: float, multiples: Sequence[float] = (0, 1, 2, 4, 8)) -> list[float]:
  """Strengths s = k · max_act for each multiple k: the report's convention, in the latent's code units.

  `max_act` is the latent's largest activation f_j over the data, in the units `cc.encode`
  returns (the latent table's `max_act`). The added vector is s · d_j^chat with d_j^chat =
  `cc.decoder()[j, 1]` in original units, so multiple k = 1 adds what the latent reconstructs at its
  strongest firing, and k = 0 is the unsteered model. Call
  `steer(model, tok, cc.decoder()[j, 1], layer, steering_strengths(table.max_act[j]), prompts)`.
  """
  max_act = float(max_act)
  if not math.isfinite(max_act) or max_act <= 0:
    raise ValueError(f"max_act={max_act} is not a positive activation (a dead latent has none); steer it with "
                     "explicit strengths in code units instead, e.g. the median max_act of the live latents.")
  ks = [float(k) for k in multiples]
  if not ks or not all(math.isfinite(k) for k in ks):
    raise ValueError(f"multiples={tuple(multiples)} must be a non-empty list of finite numbers, e.g. (0, 1, 2, 4, 8).")
  return [k * max_act for k in ks]


def _prompt_ids(tokenizer: Any, prompts: Sequence[str], chat_template: bool) -> list[list[int]]:
  """Token ids of each prompt: one user turn plus the generation prompt, or plain text after BOS."""
  if chat_template and not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat template; use the chat model's tokenizer (or set "
                     "tokenizer.chat_template), or steer plain text with chat_template=False.")
  out = []
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a string; pass the prompts as text.")
    ids = encode_prompt(tokenizer, prompt, chat_template)
    if not ids:
      raise ValueError(f"prompt {i} ({prompt!r}) has no tokens; give it some text (or a tokenizer with a BOS token).")
    out.append(ids)
  return out


def steer(
    model: Transformer,
    tokenizer: Any,
    direction: np.ndarray,
    layer: int,
    strengths: Sequence[float],
    prompts: Sequence[str],
    *,
    chat_template: bool = True,
    max_new_tokens: int = 32,
) -> list[dict[str, Any]]:
  """Greedy completions of each prompt with `strength · direction` added after block `layer`, per strength.

  `direction` [d] is in the model's original residual units (`cc.decoder()[j, 1]`); strengths are
  in code units (see `steering_strengths`); 0 is the unsteered model. Prompts are rendered as one
  user turn with the generation prompt (`chat_template=True`, for chat models) or encoded as plain
  text after BOS (base models). Returns one dict per (prompt, strength), prompt-major:
  `prompt`, `strength`, `completion` (decoded, cut before EOS or an end-of-turn token) and
  `tokens` (the generated ids, cut after that stop token, as `greedy_generate` cuts at EOS).
  """
  d, n = model.cfg.hidden_size, model.cfg.num_layers
  v = np.asarray(direction, np.float32)
  if v.ndim != 1 or v.shape[0] != d:
    raise ValueError(f"direction has shape {v.shape} but the model's hidden size is {d}; pass one residual-space "
                     f"vector [d={d}], e.g. cc.decoder()[j, 1] of a crosscoder trained on this model's residuals.")
  if not np.all(np.isfinite(v)):
    raise ValueError("direction has NaN or inf entries; steer along a finite vector (a live latent's decoder row).")
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < n:
    raise ValueError(f"layer {layer!r} is out of range for a model with {n} layers; use 0 <= layer < {n} "
                     "(the crosscoder's layer: the residual after that block).")
  given = [float(x) for x in strengths]  # reported as given, not rounded to float32
  s = np.asarray(given, np.float32)
  if s.size == 0 or not np.all(np.isfinite(s)):
    raise ValueError(f"strengths={list(strengths)} must be a non-empty list of finite numbers, e.g. "
                     "steering_strengths(max_act).")
  if not prompts:
    raise ValueError("no prompts given; pass at least one prompt string.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} generates nothing; use max_new_tokens >= 1.")

  ids = _prompt_ids(tokenizer, prompts, chat_template)
  rows = [p for p in ids for _ in s]  # prompt-major: row r = (prompt r // S, strength r % S)
  row_s = jnp.asarray(np.tile(s, len(ids)))  # [B]
  delta = row_s[:, None] * jnp.asarray(v)[None, :]  # [B, d] float32, cast to the residual's dtype at the add

  def add(x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return x + delta[:, None, :].astype(x.dtype)

  pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
  out = greedy_generate(model, rows, max_new_tokens, eos_id=None, pad_id=int(pad), interventions={int(layer): add})
  stops = stop_ids(tokenizer)
  results = []
  for r, tokens in enumerate(out):
    cut = next((i for i, t in enumerate(tokens) if t in stops), None)
    text_ids = tokens if cut is None else tokens[:cut]
    tokens = tokens if cut is None else tokens[: cut + 1]
    results.append({"prompt": prompts[r // len(s)], "strength": given[r % len(s)],
                    "completion": tokenizer.decode(text_ids, skip_special_tokens=False), "tokens": tokens})
  return results


__all__ = ["END_OF_TURN_TOKENS", "steer", "steering_strengths"]
