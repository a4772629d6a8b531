"""The main job on its embedded default: load a (tiny) model and describe its residual stream.

Later issues extend this into the whole pipeline (organisms → harvest → crosscoder → analysis).
"""

from __future__ import annotations

import ml_collections

from neurodiff_jax.analysis.residual_stats import format_stats, residual_stream_stats
from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.organisms import build
from neurodiff_jax.organisms.random_model import build_random_checkpoint
from neurodiff_jax.utils.paths import neurodiff_home

LEGEND = """\
Each row is the residual stream after one block (layer), over the text's tokens:
  mean‖x‖ std‖x‖  mean and spread over the tokens of each token's residual norm (blocks add to it, so it grows)
  mean std        mean and spread of all the residual's entries
  max|x|          the largest entry in absolute value (outlier dimensions show up here)
  lens top token  logit lens: the token the final norm and unembedding read from the last token's residual
                  at that layer; at the last layer it is the model's own next-token prediction"""

RANDOM_NOTE = """\
This model has random weights (built offline: nothing is downloaded), so its tokens mean nothing and
the table only shows the machinery working. `--config=demo:organism` reads the trained base organism
instead (built once, ≈ 5 min on 2 CPU cores); `--config.model=DIR` any Hugging Face checkpoint."""


def model_path(config: ml_collections.ConfigDict) -> tuple[str, bool]:
  """(checkpoint dir, whether it has random weights): `config.model`, an organism, or the built-in random model."""
  if config.model.startswith(build.ORGANISM_PREFIX):
    name = config.model[len(build.ORGANISM_PREFIX):]
    oc = config.organisms
    return str(build.build_base(oc) if name == "base" else build.build_organism(oc, name)), False
  if config.model:
    return config.model, False
  path = build_random_checkpoint(neurodiff_home() / f"random_{config.family}_seed{config.seed}", family=config.family,
                                 seed=config.seed)
  return path, True


def run(config: ml_collections.ConfigDict) -> str:
  """Loads `config.model` (default: a built-in tiny random model) and returns its residual-stream table, explained."""
  path, random = model_path(config)
  model = load_model(path, dtype=config.dtype)
  tokenizer = load_tokenizer(path)
  stats = residual_stream_stats(model, tokenizer, config.text, tuple(config.layers))
  c = model.cfg
  header = (f"model: {path}{' (random weights)' if random else ''}\n{c.family}: {c.num_layers} layers, "
            f"d={c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} KV), {c.num_params / 1e6:.2f}M params, "
            f"dtype {config.dtype}\ntext: {config.text!r} ({len(tokenizer(config.text)['input_ids'])} tokens)\n")
  return "\n".join([header + format_stats(stats), "", LEGEND, *(["", RANDOM_NOTE] if random else [])])


__all__ = ["LEGEND", "RANDOM_NOTE", "model_path", "run"]
