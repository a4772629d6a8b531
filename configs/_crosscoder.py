"""Shared defaults of the crosscoder training configs (not a run: the leading underscore hides it)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field `neurodiff_jax.crosscoder.train.train` reads, with the Minder et al. 2025 defaults."""
  c = ml_collections.ConfigDict()
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
  c.dec_init_norm = 0.1
  # Loss.
  c.reconstruction = "squared"  # squared | l2
  c.l1_lambda = 0.0
  c.l1_warmup_frac = 0.05
  c.k_aux = 0  # 0 = d / 2
  c.aux_coef = 1 / 32
  c.dead_tokens = 10_000_000
  c.theta_momentum = 0.999
  # Optimisation.
  c.steps = 100_000
  c.batch_size = 2048  # global (split over processes and the mesh's data axis)
  c.lr = 1e-4
  c.warmup_steps = 1000
  c.decay_frac = 0.2
  c.clip_norm = 1.0
  c.compute_dtype = "float32"  # float32 | bfloat16 (master parameters stay float32)
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
