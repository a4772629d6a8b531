"""A l1 crosscoder on the tiny model organisms (base vs chat), on CPU in a few minutes.

  python -m launch.train --config=tiny_l1              # harvests harvest_tiny first when needed
  python -m launch.train --config=tiny_l1:default      # the default-scale organisms
"""

from configs._crosscoder import base_config
from neurodiff_jax.utils.paths import neurodiff_home

_D = {"small": 64, "default": 128}  # the organisms' widths (configs/organisms.py)


def get_config(arg: str | None = None):
  """A dictionary of 8 × d latents, batch 256, 600 steps."""
  scale = arg or "small"
  if scale not in _D:
    raise ValueError(f"unknown organism scale {scale!r}; known: {', '.join(_D)}.")
  c = base_config()
  c.harvest = f"harvest_tiny:{scale}"
  c.layer = {"small": 1, "default": 2}[scale]
  c.dict_size = 8 * _D[scale]
  c.sparsity = "l1"
  c.k = 16
  c.l1_lambda = 0.5 if c.sparsity == "l1" else 0.0
  c.dec_init_norm = 0.05 if c.sparsity == "l1" else 0.1
  c.steps = 600
  c.batch_size = 256
  c.lr = 1e-3
  c.warmup_steps = 50
  c.dead_tokens = 20_000
  c.theta_momentum = 0.99
  c.window_mib = 64
  c.log_every = 50
  c.checkpoint_every = 200
  c.workdir = str(neurodiff_home() / "runs" / f"tiny_l1-{scale}")
  c.lock()
  return c
