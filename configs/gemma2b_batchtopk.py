"""BatchTopK crosscoder on Gemma 2 2B base vs -it, layer 13 (Minder et al. 2025's setting).

  python -m launch.harvest --config=harvest_gemma2b          # the store first (local checkpoints)
  python -m launch.train --config=gemma2b_batchtopk --config.store=/data/acts/gemma2b_l13
  python -m launch.train --config=gemma2b_batchtopk --config.mesh='(8,1)'   # 8 GPUs, data parallel
"""

from configs._crosscoder import gemma2b_config


def get_config(arg: str | None = None):
  """m = 32 × 2304 = 73,728 latents, k = 100, lr 1e-4, batch 2048."""
  del arg
  c = gemma2b_config()
  c.sparsity = "batchtopk"
  c.k = 100
  c.name = "gemma2b_batchtopk"
  c.lock()
  return c
