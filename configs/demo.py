"""The main job's embedded default: a tiny random Gemma 2 built offline, on CPU.

  python -m launch.demo                                  # the default
  python -m launch.demo --config=demo --config.model=/path/to/hf_checkpoint --config.dtype=bfloat16
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo config; `arg` picks the built-in model family (e.g. `demo:llama`)."""
  c = ml_collections.ConfigDict()
  c.model = ""  # HF checkpoint directory or cached repo id; "" builds the tiny built-in model.
  c.family = arg or "gemma2"
  c.seed = 0
  c.dtype = "float32"
  c.text = "The river runs past the old mill, and the miller counts his sacks of grain at dawn."
  c.layers = ()  # () = every layer
  return c
