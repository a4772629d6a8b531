"""One crosscoder training step: the train state, the optimiser, and the sharded jitted step.

The state is a plain pytree, split in what analysis needs (`model`: params, θ, normalisation) and
what only training needs (`train`: Adam state, step, tokens since each latent fired, whether it
ever fired, skipped batches, dense fallbacks, where training stopped). The step is one `jax.jit`
with explicit in/out shardings on a ('data', 'latent') mesh and the state donated; there is no
Python graph traversal per step. Settings that depend on the run's length (warm-up, dead-latent
window) are resolved here from the run config, so a short planted run and a 200M-token run use
the same rules.

A step changes the state only when its batch, loss and gradient norm are finite. A batch with
NaN/Inf is skipped (`skipped` counts it) under `nan_policy="skip"`, and under "stop" sets
`bad_batch_at`; a non-finite loss or gradient norm on a finite batch sets `diverged_at`. Once
either is set, no later step changes anything, so the state stays the last good one without a
host sync per step; `train.run_loop` reads both before every log and every checkpoint and raises
instead of saving. The batch check runs on the global batch inside the step, so every process of
a multi-host run makes the same decision on the same step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from neurodiff_jax.crosscoder import pairs as pairs_lib
from neurodiff_jax.crosscoder import sharding, sparsity
from neurodiff_jax.crosscoder.model import CrosscoderConfig, init_params
from neurodiff_jax.crosscoder.objective import LossConfig, compute_params, loss_fn

State = dict[str, Any]
NAN_POLICIES = ("stop", "skip")  # a batch with NaN/Inf stops the run, or is skipped and counted


def crosscoder_config(config: ml_collections.ConfigDict, num_models: int, d_model: int) -> CrosscoderConfig:
  """The architecture from a run config and the data's shape."""
  return CrosscoderConfig(num_models=num_models, d_model=d_model, dict_size=int(config.dict_size),
                          sparsity=config.sparsity, k=int(config.k), dec_init_norm=float(config.dec_init_norm))


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """Linear lr warm-up: `warmup_frac` of the run, at most `warmup_max_steps` steps."""
  return min(int(round(float(config.warmup_frac) * int(config.steps))), int(config.warmup_max_steps))


def dead_tokens(config: ml_collections.ConfigDict) -> int:
  """Tokens without firing after which a latent is dead (AuxK revives it).

  `config.dead_tokens` when set; else (0) `dead_frac` of the run's tokens, at least one batch and at
  most `dead_max_tokens` (10M, Gao et al. 2024's window, reached at 200M tokens with the defaults).
  A fixed 10M would exceed a short run's whole length, so nothing could ever count as dead there.
  """
  if int(config.dead_tokens) > 0:
    return int(config.dead_tokens)
  run = int(config.steps) * int(config.batch_size)
  return int(min(int(config.dead_max_tokens), max(int(config.batch_size), math.ceil(float(config.dead_frac) * run))))


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """Loss settings from a run config (L1 warm-up and the dead-latent window resolved for the run's length)."""
  return LossConfig(reconstruction=config.reconstruction, l1_lambda=float(config.l1_lambda),
                    l1_warmup_steps=int(config.l1_warmup_frac * config.steps), k_aux=int(config.k_aux),
                    aux_coef=float(config.aux_coef), dead_tokens=dead_tokens(config))


def pair_settings(config: ml_collections.ConfigDict) -> dict:
  """The pairs step's settings from a run config (`pairs.PairSpec` fields)."""
  return {"candidates": int(config.pair_candidates), "heavy_fraction": float(config.pair_heavy_fraction),
          "heavy_candidates": int(config.pair_heavy_candidates), "capacity_factor": float(config.pair_capacity)}


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up (`warmup_steps`), constant, then linear decay to 0 over the last `decay_frac` of the run."""
  steps, lr = int(config.steps), float(config.lr)
  warm = warmup_steps(config)
  decay = min(int(round(float(config.decay_frac) * steps)), max(steps - warm, 0))
  flat = max(steps - warm - decay, 0)
  parts, bounds = [], []
  if warm:
    parts.append(optax.linear_schedule(0.0, lr, warm))
    bounds.append(warm)
  parts.append(optax.constant_schedule(lr))
  if decay:
    bounds.append(warm + flat)
    parts.append(optax.linear_schedule(lr, 0.0, decay))
  return optax.join_schedules(parts, bounds) if bounds else parts[0]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on `lr_schedule(config)` after global-norm clipping."""
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(lr_schedule(config), b1=0.9, b2=0.999))


def init_state(key: jax.Array, cfg: CrosscoderConfig, tx: optax.GradientTransformation, norm_scale: np.ndarray,
               mean: np.ndarray | None) -> State:
  """A fresh train state (`mean`: the normalised data mean, the decoder bias's start)."""
  params = init_params(key, cfg, None if mean is None else jnp.asarray(mean))
  return {
      "model": {"params": params, "theta": jnp.zeros((), jnp.float32),
                "norm_scale": jnp.asarray(norm_scale, jnp.float32)},
      "train": {"opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "since_fired": jnp.zeros((cfg.dict_size,), jnp.int32),
                "ever_fired": jnp.zeros((cfg.dict_size,), jnp.bool_), "skipped": jnp.zeros((), jnp.int32),
                "dense_steps": jnp.zeros((), jnp.int32), "diverged_at": jnp.full((), -1, jnp.int32),
                "bad_batch_at": jnp.full((), -1, jnp.int32)},
  }


def make_train_step(cfg: CrosscoderConfig, lcfg: LossConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    state_like: State, theta_momentum: float = 0.999, compute_dtype: str = "float32",
                    train_step: str = "auto", pairs: dict | None = None, nan_policy: str = "stop") -> Callable:
  """The jitted `(state, x [B, M, d] raw units) -> (state, metrics)`, sharded on `mesh`, state donated.

  `train_step`: "pairs" decodes and backpropagates through the selected (token, latent) pairs only
  (`pairs.py`; BatchTopK/TopK on a mesh without a latent split), falling back to the dense step for
  a batch the pairs cannot hold exactly; "dense" always multiplies the full [B, m] codes; "auto"
  takes pairs where they apply. `pairs`: PairSpec fields other than the mesh (`pair_settings(config)`),
  if not the defaults. `nan_policy`: what a batch with NaN/Inf does, "skip" (counted) or "stop" (sets
  `bad_batch_at`); see the module docstring.
  """
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy={nan_policy!r} is not 'stop' or 'skip'.")
  precision = jax.lax.Precision.HIGHEST if compute_dtype == "float32" else None
  cdtype = jnp.dtype(compute_dtype)
  cap = np.int32(min(2 * lcfg.dead_tokens, 2**30))
  spec = pairs_lib.PairSpec(mesh, **(pairs or {})) if pairs_lib.use_pairs(train_step, cfg, mesh) else None
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: State, x: jax.Array) -> tuple[State, dict]:
    model, train = state["model"], state["train"]
    # Over the global batch: every process gets the same answer with no host round trip.
    batch_ok = jnp.isfinite(x).all()
    x = x.astype(jnp.float32) * model["norm_scale"][None, :, None]
    dead = train["since_fired"] >= lcfg.dead_tokens
    args = (model["params"], x, train["step"], dead, cfg, lcfg, precision, cdtype)
    dense_steps = train["dense_steps"]
    if spec is None:
      (_, metrics), grads = grad_fn(*args)
    else:
      pairs = pairs_lib.select(compute_params(model["params"], cdtype), x.astype(cdtype), cfg, spec, precision)
      # Both branches are whole gradient computations, so the dense one's [B, m] residuals never
      # exist on the pairs path.
      (_, metrics), grads = jax.lax.cond(pairs.overflow, lambda: grad_fn(*args), lambda: grad_fn(*args, pairs, spec))
      dense_steps = dense_steps + pairs.overflow.astype(jnp.int32)
    updates, opt = tx.update(grads, train["opt"], model["params"])
    params = optax.apply_updates(model["params"], updates)
    fired = metrics.pop("fired")
    since = jnp.where(fired, 0, jnp.minimum(train["since_fired"] + x.shape[0], cap))
    ever = train["ever_fired"] | fired
    theta = model["theta"]
    if cfg.sparsity == "batchtopk":
      theta = sparsity.update_threshold(theta, metrics["cut"], theta_momentum)
    grad_norm = optax.global_norm(grads)  # the same sum of squares as clipping's: XLA computes it once
    running = (train["diverged_at"] < 0) & (train["bad_batch_at"] < 0)
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(grad_norm)
    apply = running & batch_ok & finite
    skip = running & ~batch_ok if nan_policy == "skip" else jnp.zeros((), jnp.bool_)
    metrics |= {"dead_fraction": jnp.mean(since >= lcfg.dead_tokens), "never_fired_fraction": jnp.mean(~ever),
                "theta": theta, "grad_norm": grad_norm, "dense_steps": dense_steps}
    new_model = {**model, "params": params, "theta": theta}
    new_train = {**train, "opt": opt, "since_fired": since, "ever_fired": ever, "dense_steps": dense_steps}
    # The elementwise select joins the Adam update's fusion: no extra pass over the parameters.
    new_model, new_train = jax.tree.map(lambda n, o: jnp.where(apply, n, o), (new_model, new_train), (model, train))
    new_train |= {"step": train["step"] + (apply | skip).astype(jnp.int32),
                  "skipped": train["skipped"] + skip.astype(jnp.int32),
                  # Set once: `running` is false from then on.
                  "bad_batch_at": jnp.where(running & ~batch_ok & ~skip, train["step"], train["bad_batch_at"]),
                  "diverged_at": jnp.where(running & batch_ok & ~finite, train["step"], train["diverged_at"])}
    return {"model": new_model, "train": new_train}, metrics

  shardings = sharding.state_shardings(state_like, mesh)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                 donate_argnums=0)


def sharded_init(key: jax.Array, cfg: CrosscoderConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 norm_scale: np.ndarray, mean: np.ndarray | None) -> State:
  """`init_state` created directly in its shardings (a large dictionary is never whole on one device)."""
  fn = lambda k: init_state(k, cfg, tx, norm_scale, mean)  # noqa: E731
  shapes = jax.eval_shape(fn, key)
  return jax.jit(fn, out_shardings=sharding.state_shardings(shapes, mesh))(key)


def global_batch(local: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """This process's rows of a batch as one global array split over `data`."""
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)


__all__ = ["NAN_POLICIES", "State", "crosscoder_config", "dead_tokens", "global_batch", "init_state", "loss_config",
           "lr_schedule", "make_optimizer", "make_train_step", "pair_settings", "sharded_init", "warmup_steps"]
