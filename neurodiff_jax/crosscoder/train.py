"""Training a crosscoder: the train state, the sharded jitted step, and the loop over a store.

The state is a plain pytree, split in what analysis needs (`model`: params, θ, normalisation) and
what only training needs (`train`: Adam state, step, tokens since each latent fired, skipped
batches). The step is one `jax.jit` with explicit in/out shardings on a ('data', 'latent') mesh
and the state donated; there is no Python graph traversal per step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from neurodiff_jax.crosscoder import pairs as pairs_lib
from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder.model import CrosscoderConfig, init_params
from neurodiff_jax.crosscoder.objective import LossConfig, compute_params, loss_fn
from neurodiff_jax.utils.distributed import initialize_from_config

State = dict[str, Any]


class NonFiniteBatchError(ValueError):
  """A batch with NaN/Inf activations under `nan_policy='stop'`."""


class DivergedError(FloatingPointError):
  """The loss became NaN/Inf: training diverged (the last good checkpoint is kept)."""


def crosscoder_config(config: ml_collections.ConfigDict, num_models: int, d_model: int) -> CrosscoderConfig:
  """The architecture from a run config and the data's shape."""
  return CrosscoderConfig(num_models=num_models, d_model=d_model, dict_size=int(config.dict_size),
                          sparsity=config.sparsity, k=int(config.k), dec_init_norm=float(config.dec_init_norm))


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """Loss settings from a run config."""
  return LossConfig(reconstruction=config.reconstruction, l1_lambda=float(config.l1_lambda),
                    l1_warmup_steps=int(config.l1_warmup_frac * config.steps), k_aux=int(config.k_aux),
                    aux_coef=float(config.aux_coef), dead_tokens=int(config.dead_tokens))


def pair_settings(config: ml_collections.ConfigDict) -> dict:
  """The pairs step's settings from a run config (`pairs.PairSpec` fields)."""
  return {"candidates": int(config.pair_candidates), "heavy_fraction": float(config.pair_heavy_fraction),
          "heavy_candidates": int(config.pair_heavy_candidates), "capacity_factor": float(config.pair_capacity)}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with linear warm-up, constant, then linear decay to 0 over the last `decay_frac`; global-norm clipping."""
  steps, warm = int(config.steps), int(config.warmup_steps)
  decay = max(int(config.decay_frac * steps), 1)
  flat = max(steps - warm - decay, 0)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.lr, max(warm, 1)), optax.constant_schedule(config.lr),
       optax.linear_schedule(config.lr, 0.0, decay)], [max(warm, 1), max(warm, 1) + flat])
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adam(schedule, b1=0.9, b2=0.999))


def init_state(key: jax.Array, cfg: CrosscoderConfig, tx: optax.GradientTransformation, norm_scale: np.ndarray,
               mean: np.ndarray | None) -> State:
  """A fresh train state (`mean`: the normalised data mean, the decoder bias's start)."""
  params = init_params(key, cfg, None if mean is None else jnp.asarray(mean))
  return {
      "model": {"params": params, "theta": jnp.zeros((), jnp.float32),
                "norm_scale": jnp.asarray(norm_scale, jnp.float32)},
      "train": {"opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "since_fired": jnp.zeros((cfg.dict_size,), jnp.int32), "skipped": jnp.zeros((), jnp.int32),
                "dense_steps": jnp.zeros((), jnp.int32)},
  }


def make_train_step(cfg: CrosscoderConfig, lcfg: LossConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    state_like: State, theta_momentum: float = 0.999, compute_dtype: str = "float32",
                    train_step: str = "auto", pairs: dict | None = None) -> Callable:
  """The jitted `(state, x [B, M, d] raw units) -> (state, metrics)`, sharded on `mesh`, state donated.

  `train_step`: "pairs" decodes and backpropagates through the selected (token, latent) pairs only
  (`pairs.py`; BatchTopK/TopK on a mesh without a latent split), falling back to the dense step for
  a batch the pairs cannot hold exactly; "dense" always multiplies the full [B, m] codes; "auto"
  takes pairs where they apply. `pairs`: PairSpec fields other than the mesh (`pair_settings(config)`),
  if not the defaults.
  """
  precision = jax.lax.Precision.HIGHEST if compute_dtype == "float32" else None
  cdtype = jnp.dtype(compute_dtype)
  cap = np.int32(min(2 * lcfg.dead_tokens, 2**30))
  spec = pairs_lib.PairSpec(mesh, **(pairs or {})) if pairs_lib.use_pairs(train_step, cfg, mesh) else None
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: State, x: jax.Array) -> tuple[State, dict]:
    model, train = state["model"], state["train"]
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
    theta = model["theta"]
    if cfg.sparsity == "batchtopk":
      cut = metrics["cut"]
      # A batch with fewer than k·B positive scores has cut 0: it says nothing about θ.
      theta = jnp.where(cut <= 0, theta,
                        jnp.where(theta <= 0, cut, theta_momentum * theta + (1 - theta_momentum) * cut))
    metrics |= {"dead_fraction": jnp.mean(since >= lcfg.dead_tokens), "theta": theta,
                "grad_norm": optax.global_norm(grads), "dense_steps": dense_steps}
    new = {"model": {**model, "params": params, "theta": theta},
           "train": {**train, "opt": opt, "step": train["step"] + 1, "since_fired": since, "dense_steps": dense_steps}}
    return new, metrics

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


def check_batch(x: np.ndarray, step: int, where: Callable[[np.ndarray], str]) -> bool:
  """Whether the batch is finite; the caller skips or stops. `where(rows)` names the store shards of bad rows."""
  ok = np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
  if ok.all():
    return True
  bad = np.nonzero(~ok)[0]
  raise NonFiniteBatchError(f"batch of step {step} has NaN/Inf activations in {len(bad)} of {len(x)} tokens "
                            f"({where(bad)}); fix or re-harvest that shard, or set nan_policy='skip' to skip such batches.")


def run_loop(config: ml_collections.ConfigDict, state: State, step_fn: Callable, batches: Iterator[np.ndarray],
             mesh: jax.sharding.Mesh, *, save: Callable[[State, int], None] | None = None,
             log: Callable[[int, dict, State], None] | None = None,
             where: Callable[[np.ndarray], str] = lambda rows: f"rows {rows[:5].tolist()}") -> State:
  """Steps from the state's step to `config.steps`, checking batches, logging and checkpointing."""
  start = int(jax.device_get(state["train"]["step"]))
  skipped = start_skipped = int(jax.device_get(state["train"]["skipped"]))
  bar = tqdm(total=int(config.steps), initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
  t0, tokens = time.perf_counter(), 0
  step = start
  while step < config.steps:
    x = next(batches)
    try:
      check_batch(x, step, where)
    except NonFiniteBatchError:
      if config.nan_policy != "skip":
        raise
      skipped += 1
      continue
    state, metrics = step_fn(state, global_batch(x, mesh))
    step += 1
    tokens += int(config.batch_size)
    if skipped != start_skipped:
      state["train"]["skipped"] = jax.device_put(np.int32(skipped), state["train"]["skipped"].sharding)
      start_skipped = skipped
    last = step == config.steps
    if step % config.log_every == 0 or last:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss/total"]):
        raise DivergedError(f"loss is {metrics['loss/total']} at step {step}: training diverged. The last checkpoint "
                            "is kept; lower lr or raise warmup_steps and run again.")
      metrics |= {"tokens_per_s": tokens / (time.perf_counter() - t0), "skipped_batches": skipped}
      bar.set_postfix({"loss": f"{metrics['loss/total']:.4g}", "fve": f"{metrics.get('fve/0', 0):.3f}",
                       "l0": f"{metrics['l0']:.1f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"})
      if log is not None:
        log(step, metrics, state)
    if save is not None and (step % config.checkpoint_every == 0 or last):
      save(state, step)
    bar.update(1)
  bar.close()
  return state


__all__ = ["DivergedError", "NonFiniteBatchError", "State", "check_batch", "crosscoder_config", "global_batch",
           "init_state", "loss_config", "make_optimizer", "make_train_step", "pair_settings", "run_loop", "sharded_init"]


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def config_json(config: ml_collections.ConfigDict) -> dict:
  """A run config as plain JSON (stored with every checkpoint)."""
  return _jsonable(config.to_dict())


def workdir_of(config: ml_collections.ConfigDict) -> Path:
  """The run directory: checkpoints, TensorBoard events, metrics.json."""
  return Path(config.workdir).expanduser()


def train(config: ml_collections.ConfigDict) -> dict:
  """Trains (or resumes training) the crosscoder of `config` on its store; returns the final metrics."""
  from neurodiff_jax.activations.reader import batch_iterator, dataset_of, windowed_batches
  from neurodiff_jax.activations.store import ActivationStore, atomic_write_json
  from neurodiff_jax.crosscoder.checkpoint import Checkpointer, check_same_run
  from neurodiff_jax.crosscoder.metrics import MetricWriter, delta_norm, delta_norm_classes
  from neurodiff_jax.crosscoder.model import decoder_norms

  initialize_from_config(config)
  proc, nproc = jax.process_index(), jax.process_count()
  store = ActivationStore.open(config.store)
  lay = store.layout
  for field, have in (("num_models", lay.num_models), ("d_model", lay.d_model)):
    want = int(config.get(field) or 0)
    if want and want != have:
      raise ValueError(f"config.{field}={want} but the store {store.root} has {field}={have}; set "
                       f"--config.{field}={have} (or 0 to take it from the store), or point config.store elsewhere.")
  cfg = crosscoder_config(config, lay.num_models, lay.d_model)
  lcfg = loss_config(config)
  if config.batch_size % nproc:
    raise ValueError(f"batch_size={config.batch_size} does not split over {nproc} processes.")
  mesh = sharding.make_mesh(*config.mesh)
  sharding.check_divisible(mesh, config.batch_size, cfg.dict_size)

  if config.normalize:
    scale = store.norm_scale(config.layer)
  else:
    scale = np.ones(lay.num_models, np.float32)
  stats = store.manifest["stats"][str(config.layer)]
  mean = np.stack([np.asarray(stats[m["role"]]["mean"], np.float32) for m in store.manifest["models"]]) * scale[:, None]
  if not (np.isfinite(scale).all() and np.isfinite(mean).all()):
    raise ValueError(f"the statistics of layer {config.layer} in {store.root}/manifest.json are not finite (NaN/Inf "
                     "activations were stored); re-harvest the store, or set normalize=False to train without them.")

  tx = make_optimizer(config)
  saved_config = {"run": config_json(config), "crosscoder": cfg.to_dict()}
  workdir = workdir_of(config)
  ckpt = Checkpointer(workdir / "checkpoints", keep=int(config.keep_checkpoints))
  abstract = jax.eval_shape(lambda k: init_state(k, cfg, tx, scale, mean), jax.random.key(config.seed))
  shardings = sharding.state_shardings(abstract, mesh)
  data_state = None
  if ckpt.latest_step() is not None:
    check_same_run(ckpt.config()["run"], saved_config["run"])
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state, data_state = ckpt.restore(target)
    if proc == 0:
      print(f"train: resuming from step {ckpt.latest_step()} in {ckpt.directory}")
  else:
    state = sharded_init(jax.random.key(config.seed), cfg, tx, mesh, scale, mean)

  batches = windowed_batches(store, config.layer, config.batch_size // nproc, seed=config.seed,
                             window_bytes=int(config.window_mib) << 20, process_index=proc, process_count=nproc)
  it = batch_iterator(dataset_of(batches))
  first = 0
  if data_state is not None:
    it.set_state(data_state)
    first = int(data_state["next_index"])
  counter = {"next": first}

  def stream():
    while True:
      x = next(it)
      counter["current"] = counter["next"]
      counter["next"] += 1
      yield x

  def where(rows: np.ndarray) -> str:
    tokens = batches.tokens(counter["current"])[rows]
    shards = sorted({int(t) // lay.shard_tokens for t in tokens})
    return f"store tokens {tokens[:4].tolist()}{' ...' if len(tokens) > 4 else ''}, shard(s) {shards} of {config.layer} in {store.root}"

  writer = MetricWriter(workdir / "tensorboard", enabled=proc == 0)
  last: dict = {}

  def log(step: int, metrics: dict, st: State) -> None:
    nonlocal last
    last = dict(metrics, step=step)
    writer.scalars(step, metrics)
    if cfg.num_models == 2:
      norms = np.asarray(jax.device_get(decoder_norms(st["model"]["params"]))) / scale[None, :]
      dn = delta_norm(norms)  # in the models' original units, like Crosscoder.decoder_norms
      writer.histogram(step, "delta_norm", dn)
      last["delta_norm_classes"] = delta_norm_classes(dn)

  def save(st: State, step: int) -> None:
    ckpt.save(step, st, {"next_index": counter["next"]}, saved_config)

  step_fn = make_train_step(cfg, lcfg, tx, mesh, abstract, float(config.theta_momentum), config.compute_dtype,
                            config.train_step, pair_settings(config))
  try:
    state = run_loop(config, state, step_fn, stream(), mesh, save=save, log=log, where=where)
  finally:
    ckpt.close()
    writer.close()
    batches.close()
  path = workdir / "metrics.json"
  if not last and path.is_file():  # nothing left to train: the finished run's metrics stand
    return json.loads(path.read_text())
  if proc == 0:
    atomic_write_json(path, last)
  return last


__all__ += ["train"]
