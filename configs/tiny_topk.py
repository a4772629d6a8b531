"""A topk crosscoder on the tiny model organisms (base vs chat), on CPU in a few minutes.

  python -m launch.train --config=tiny_topk              # default-scale organisms; harvests them first if needed
  python -m launch.train --config=tiny_topk:small        # the small (test) scale
"""

from configs._crosscoder import tiny_config


def get_config(arg: str | None = None):
  """A dictionary of 8 × d latents, batch 256, 600 steps (configs/_crosscoder.py)."""
  return tiny_config("topk", arg)
