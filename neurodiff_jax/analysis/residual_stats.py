"""Per-layer statistics of the residual stream on a text, with a logit-lens read of each layer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from neurodiff_jax.models import Transformer


@dataclasses.dataclass(frozen=True)
class LayerStats:
  """Residual stream after one block: norms over tokens, value spread, logit-lens top token."""

  layer: int
  mean_norm: float
  std_norm: float
  mean: float
  std: float
  max_abs: float
  lens_top_token: str


def residual_stream_stats(model: Transformer, tokenizer: Any, text: str, layers: tuple[int, ...] = ()) -> list[LayerStats]:
  """Runs `text` through the model and summarises the residual after each layer in `layers` (all if empty)."""
  ids = np.asarray(tokenizer(text)["input_ids"], np.int32)[None]  # [1, T]
  if ids.shape[1] < 1:
    raise ValueError("the text tokenizes to no tokens.")
  layers = tuple(layers) or tuple(range(model.cfg.num_layers))
  out = model(jnp.asarray(ids), capture=layers)
  stats = []
  for layer in sorted(out.residuals):
    x = out.residuals[layer][0].astype(jnp.float32)  # [T, D]
    if not bool(jnp.all(jnp.isfinite(x))):
      raise FloatingPointError(f"non-finite residual at layer {layer}; check the checkpoint and dtype.")
    norms = np.asarray(jnp.linalg.norm(x, axis=-1))
    lens = np.asarray(model.unembed(x[None, -1:]))[0, 0]  # logit lens on the last token
    stats.append(LayerStats(layer, float(norms.mean()), float(norms.std()), float(x.mean()), float(x.std()),
                            float(jnp.abs(x).max()), tokenizer.decode([int(lens.argmax())])))
  return stats


def format_stats(stats: list[LayerStats]) -> str:
  """A fixed-width table of `LayerStats`."""
  head = f"{'layer':>5} {'mean‖x‖':>9} {'std‖x‖':>8} {'mean':>8} {'std':>8} {'max|x|':>8}  lens top token"
  rows = [f"{s.layer:>5} {s.mean_norm:>9.3f} {s.std_norm:>8.3f} {s.mean:>8.4f} {s.std:>8.4f} {s.max_abs:>8.3f}  {s.lens_top_token!r}"
          for s in stats]
  return "\n".join([head, *rows])
