"""The logit lens of residual-space vectors: which tokens a direction promotes and suppresses.

A vector v (a decoder row, a mean activation difference, a steering direction) is read as if it
were the residual at the last layer: the final norm, the unembedding and the final soft-cap
(`Transformer.unembed`). The norm makes the reading independent of v's scale, so directions of
any size compare; the soft-cap is monotone and does not change the ranking.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from neurodiff_jax.models.transformer import Transformer


def logit_lens(model: Transformer, vectors: np.ndarray, batch: int = 64) -> np.ndarray:
  """Logits [n, V] (float32) of each vector [n, d] read through the final norm and unembedding."""
  v = np.asarray(vectors, np.float32)
  if v.ndim != 2 or v.shape[1] != model.cfg.hidden_size:
    raise ValueError(f"logit_lens needs vectors [n, d={model.cfg.hidden_size}] in the model's residual space; got "
                     f"shape {v.shape}.")
  out = []
  for s in range(0, len(v), batch):
    x = jnp.asarray(v[s:s + batch], model.dtype)[:, None, :]  # [n, 1, d]
    out.append(np.asarray(model.unembed(x)[:, 0], np.float32))
  return np.concatenate(out) if out else np.zeros((0, model.cfg.vocab_size), np.float32)


def top_tokens(logits: np.ndarray, tokenizer: Any, k: int = 10) -> list[dict[str, list]]:
  """Per row: the k promoted (highest logit) and k suppressed (lowest) tokens, decoded, with their logits."""
  out = []
  for row in np.asarray(logits):
    k = min(k, row.shape[0])
    # argpartition first: a full sort of a 262k-token vocabulary per row was most of the time
    hi = np.flatnonzero(row >= np.partition(row, row.shape[0] - k)[row.shape[0] - k])  # the top k and their ties
    lo = np.flatnonzero(row <= np.partition(row, k - 1)[k - 1])
    up = hi[np.lexsort((hi, -row[hi]))][:k]  # highest first, ties by token id
    down = lo[np.lexsort((lo, row[lo]))][:k]  # lowest first, ties by token id
    dec = (lambda ids: [tokenizer.decode([int(i)]) for i in ids]) if tokenizer is not None else \
        (lambda ids: [str(int(i)) for i in ids])
    out.append({"promoted": dec(up), "promoted_logits": row[up].tolist(), "suppressed": dec(down),
                "suppressed_logits": row[down].tolist(), "promoted_ids": up.tolist(), "suppressed_ids": down.tolist()})
  return out


__all__ = ["logit_lens", "top_tokens"]
