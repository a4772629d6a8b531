"""L1 crosscoder on Gemma 2 2B base vs -it, layer 13 (the crosscoder whose artifacts Minder et al. show).

  python -m launch.train --config=gemma2b_l1 --config.store=/data/acts/gemma2b_l13
"""

from configs._crosscoder import gemma2b_config


def get_config(arg: str | None = None):
  """m = 73,728, ReLU with the decoder-norm-weighted L1 penalty λ = 0.041, decoder rows start at norm 0.005."""
  del arg
  c = gemma2b_config()
  c.sparsity = "l1"
  c.l1_lambda = 0.041
  c.dec_init_norm = 0.005
  c.name = "gemma2b_l1"
  c.lock()
  return c
