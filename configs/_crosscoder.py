"""Shared defaults of the crosscoder training configs (not a run: the leading underscore hides it)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field `neurodiff_jax.crosscoder.train.train` reads, with the Minder et al. 2025 defaults."""
  c = ml_collections.ConfigDict()
  c.name = ""  # the run's name: workdir "" means $NEURODIFF_HOME/runs/<name>
  # Data.
  c.store = ""  # an activation store directory (python -m launch.harvest)
  c.harvest = ""  # a harvest config NAME[:arg] that makes the store when it is missing ("" = none)
  c.layer = 13
  c.num_models = 0  # 0 = from the store; otherwise must agree with it
  c.d_model = 0  # 0 = from the store; otherwise must agree with it
  c.normalize = True  # one scalar per model so that E‖x_i‖ = √d (from the store's statistics)
  c.window_mib = 512  # reader shuffle window
  # Model.
  c.dict_size = 16384
  c.sparsity = "batchtopk"  # batchtopk | topk | l1
  c.k = 100
  c.dec_init_norm = 0.3  # decoder rows start at this norm per model (0.3 beat 0.1: docs/results.md)
  # Loss.
  c.reconstruction = "squared"  # squared | l2
  c.l1_lambda = 1.0  # L1 only: penalty weight on Σ_j f_j Σ_i ‖W_dec[j, i]‖ (normalised units; docs/crosscoder.md)
  c.l1_warmup_frac = 0.05
  c.k_aux = 0  # 0 = d / 2
  c.aux_coef = 1 / 32
  # A latent is dead (AuxK revives it; dead_fraction counts it) after this many tokens without firing:
  # 0 = dead_frac of the run's tokens, at most dead_max_tokens (10M is reached by 200M-token runs).
  c.dead_tokens = 0
  c.dead_frac = 0.05
  c.dead_max_tokens = 10_000_000
  c.theta_momentum = 0.999
  # Optimisation.
  c.steps = 100_000
  c.batch_size = 2048  # global (split over processes and the mesh's data axis)
  c.lr = 1e-4
  c.warmup_frac = 0.01  # linear lr warm-up over this fraction of the steps ...
  c.warmup_max_steps = 1000  # ... but never longer than this
  c.decay_frac = 0.2
  c.clip_norm = 1.0
  c.compute_dtype = "float32"  # float32 | bfloat16 (master parameters stay float32)
  # The step's implementation (same codes, loss and gradients; see neurodiff_jax/crosscoder/pairs.py).
  c.train_step = "auto"  # auto | pairs (decode and backprop only the selected pairs) | dense
  # BatchTopK candidates: every token's best pair_candidates scores (0 = 3·k), and pair_heavy_candidates
  # (0 = 16·k) for the pair_heavy_fraction of tokens that need more. Larger: a slower step, but fewer
  # batches that fall back to the dense step (counted in the dense_steps metric).
  c.pair_candidates = 0
  c.pair_heavy_fraction = 0.125
  c.pair_heavy_candidates = 0
  c.pair_capacity = 1.25  # pairs per data shard, in units of k · tokens per shard (several data shards only)
  c.seed = 0
  # Devices and processes.
  c.mesh = (1, 1)  # (data, latent) devices
  c.distributed = False  # True: jax.distributed.initialize() (one process per host)
  c.coordinator_address = ""
  c.process_index = 0
  c.process_count = 0
  # Run directory, logging, checkpoints, bad input.
  c.workdir = ""  # checkpoints/, tensorboard/, metrics.json ("" = $NEURODIFF_HOME/runs/<config name>)
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.nan_policy = "stop"  # stop (naming step and shard) | skip (count and go on)
  return c


_TINY_D = {"small": 64, "default": 128}  # the organisms' widths (configs/organisms.py)


def tiny_config(sparsity: str, arg: str | None) -> ml_collections.ConfigDict:
  """A crosscoder on the tiny organisms (`arg`: small | default): 8 × d latents, batch 256, 600 steps; locked."""
  scale = arg or "default"  # the scale configs/organisms.py and harvest_tiny default to: one pair of models
  if scale not in _TINY_D:
    raise ValueError(f"unknown organism scale {scale!r}; known: {', '.join(_TINY_D)}.")
  c = base_config()
  c.harvest = f"harvest_tiny:{scale}"
  c.layer = {"small": 1, "default": 2}[scale]
  c.dict_size = 8 * _TINY_D[scale]
  c.sparsity = sparsity
  c.k = 16
  if sparsity == "l1":
    c.l1_lambda = 0.5
    c.dec_init_norm = 0.05
  c.steps = 600
  c.batch_size = 256
  c.lr = 1e-3
  c.theta_momentum = 0.99
  c.window_mib = 64
  c.log_every = 50
  c.checkpoint_every = 200
  c.name = f"tiny_{sparsity}-{scale}"
  c.lock()
  return c


def gemma3_config(sparsity: str) -> ml_collections.ConfigDict:
  """A crosscoder on Gemma 3 270M base vs its chat organism (d = 640, layer 8): 4096 latents, batch 512; locked.

  The store holds ~300k token pairs (configs/harvest_gemma3.py), far fewer than the papers' 100M+:
  4096 latents (6.4 × d) and 3000 steps (~5 passes over the data) suit it on 2 CPU cores.
  """
  c = base_config()
  c.harvest = "harvest_gemma3"
  c.layer = 8
  c.dict_size = 4096
  c.sparsity = sparsity
  c.k = 32
  if sparsity == "l1":
    c.l1_lambda = 0.5
    c.dec_init_norm = 0.05
  c.steps = 3000
  c.batch_size = 512
  c.lr = 5e-4
  c.theta_momentum = 0.99
  c.window_mib = 256
  c.log_every = 100
  c.checkpoint_every = 500
  c.name = f"gemma3_{sparsity}"
  c.lock()
  return c


def gemma2b_config() -> ml_collections.ConfigDict:
  """Gemma 2 2B base vs -it at layer 13: m = 32 × 2304 = 73,728, lr 1e-4, batch 2048 (unlocked: the caller picks the sparsity)."""
  c = base_config()
  c.store = "gemma2b_l13_acts"
  c.layer = 13
  c.dict_size = 73_728
  c.lr = 1e-4
  c.batch_size = 2048
  return c
