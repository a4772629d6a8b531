"""The main job's embedded default: a tiny random Gemma 2 built offline, on CPU.

  python -m launch.demo                                  # the default: random weights, seconds
  python -m launch.demo --config=demo:organism           # the trained base organism (built once, ≈ 5 min)
  python -m launch.demo --config=demo:organism,small     # the small-scale base organism (≈ 2 min)
  python -m launch.demo --config=demo --config.model=/path/to/hf_checkpoint --config.dtype=bfloat16
"""

import ml_collections

from configs.organisms import get_config as organisms_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo config; `arg` picks the built-in random model's family (`demo:llama`) or `organism[,SCALE]`."""
  kind, _, scale = (arg or "gemma2").partition(",")
  c = ml_collections.ConfigDict()
  # HF checkpoint directory or cached repo id; organism:base builds (once) the base organism with `organisms`;
  # "" builds the tiny random model of `family`.
  c.model = "organism:base" if kind == "organism" else ""
  c.family = "gemma2" if kind == "organism" else kind  # the random model's family
  c.organisms = organisms_config(f"chat,{scale or 'default'}")  # how organism:NAME models are built
  c.seed = 0
  c.dtype = "float32"
  c.text = "The river runs past the old mill, and the miller counts his sacks of grain at dawn."
  c.layers = ()  # () = every layer
  return c
