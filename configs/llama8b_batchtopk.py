"""BatchTopK crosscoder on Llama 3.1 8B vs Llama 3.1 8B Instruct, layer 16 (d = 4096).

  python -m launch.train --config=llama8b_batchtopk --config.store=/data/acts/llama8b_l16 --config.mesh='(4,2)'
"""

from configs._crosscoder import base_config


def get_config(arg: str | None = None):
  """m = 32 × 4096 = 131,072 latents, k = 100, lr 1e-4, batch 2048."""
  del arg
  c = base_config()
  c.store = "llama8b_l16_acts"
  c.layer = 16
  c.dict_size = 131_072
  c.sparsity = "batchtopk"
  c.k = 100
  c.name = "llama8b_batchtopk"
  c.lock()
  return c
