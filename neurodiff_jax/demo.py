"""The main job on its embedded default: load a (tiny) model and describe its residual stream.

Later issues extend this into the whole pipeline (organisms → harvest → crosscoder → analysis).
"""

from __future__ import annotations

import ml_collections

from neurodiff_jax.analysis.residual_stats import format_stats, residual_stream_stats
from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.organisms.random_model import build_random_checkpoint
from neurodiff_jax.utils.paths import neurodiff_home


def run(config: ml_collections.ConfigDict) -> str:
  """Loads `config.model` (default: a built-in tiny random model) and returns its residual-stream table."""
  path = config.model or build_random_checkpoint(
      neurodiff_home() / f"random_{config.family}_seed{config.seed}", family=config.family, seed=config.seed)
  model = load_model(path, dtype=config.dtype)
  tokenizer = load_tokenizer(path)
  stats = residual_stream_stats(model, tokenizer, config.text, tuple(config.layers))
  c = model.cfg
  header = (f"model: {path}\n{c.family}: {c.num_layers} layers, d={c.hidden_size}, {c.num_heads} heads "
            f"({c.num_kv_heads} KV), {c.num_params / 1e6:.2f}M params, dtype {config.dtype}\n"
            f"text: {config.text!r} ({len(tokenizer(config.text)['input_ids'])} tokens)\n")
  return header + format_stats(stats)
