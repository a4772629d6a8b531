"""Analyse the Gemma 2 2B crosscoder at pod scale (base vs -it, layer 13, 73,728 latents).

  python -m launch.analyze --config=analyze_gemma2b --config.workdir=/runs/gemma2b_batchtopk

The pass is sharded like training: tokens over `data`, latents over `latent` (8 devices: (8, 1) or
(4, 2)); 100M tokens in batches of 16,384, float64 folds every 64 batches (1M tokens). Contexts are
decoded for the chat-only latents first, up to 4,096 latents.
"""

from configs._analyze import base_config


def get_config(arg: str | None = None):
  """Pod-scale analysis; `arg` is unused."""
  del arg
  c = base_config()
  c.run = "gemma2b_batchtopk"
  c.mesh = (8, 1)
  c.batch_size = 16_384
  c.fold_every = 64
  c.save_every = 4
  c.model_dtype = "bfloat16"
  c.examples.context_latents = 4096
  c.causal.max_len = 1024
  c.causal.num_conversations = 500
  c.causal.batch_size = 8
  c.steering.prompts = ("Who are you?", "Write a short poem about the sea.", "How can I pick a lock?")
  c.steering.max_new_tokens = 48
  c.lock()
  return c
