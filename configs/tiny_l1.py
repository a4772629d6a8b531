"""A l1 crosscoder on the tiny model organisms (base vs chat), on CPU in a few minutes.

  python -m launch.train --config=tiny_l1              # default-scale organisms; harvests them first if needed
  python -m launch.train --config=tiny_l1:small        # the small (test) scale
"""

from configs._crosscoder import tiny_config


def get_config(arg: str | None = None):
  """A dictionary of 8 × d latents, batch 256, 600 steps (configs/_crosscoder.py)."""
  return tiny_config("l1", arg)
