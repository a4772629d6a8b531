"""Harvest Gemma 3 270M base vs its chat organism: real English and chat conversations, residual after block 8.

  python -m launch.harvest --config=harvest_gemma3           # builds the organism first if it is missing

The real-model counterpart of `harvest_tiny`: `organism:general` is real English here (the `fortunes`
texts, neurodiff_jax/organisms/real_text.py), `organism:chat` conversations in Gemma 3's chat format.
Layer 8 is the residual after the ninth of 18 blocks, the middle of the model (docs/methods.md §6).
"""

import ml_collections

from configs.harvest_tiny import get_config as tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The gemma3-scale harvest (no arg)."""
  if arg:
    raise ValueError(f"harvest_gemma3 takes no argument (got {arg!r})")
  c = tiny("default")
  c.name = "harvest_gemma3"
  from configs.organisms import get_config as organisms_config

  c.organisms = organisms_config("chat,gemma3")
  c.num_documents = 3000  # per dataset: ~135k tokens of real text, ~180k of conversations
  c.layers = (8,)
  c.batch_size = 16
  c.seq_len = 128
  c.shard_tokens = 32768
  return c
