"""Training a crosscoder: the loop over a store, checkpoints, logging, and the run-config checks.

The step itself (state, optimiser, the sharded jitted step) is `step.py`; this module feeds it
batches from the store, stops on its verdict on them (a bad batch or divergence: no checkpoint is
written after one), logs, checkpoints and resumes. `check_config` validates a run config before
any work starts; `train(config)` is what `python -m launch.train` calls.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder.model import SPARSITY
from neurodiff_jax.crosscoder.objective import RECONSTRUCTION
from neurodiff_jax.crosscoder.pairs import STEPS
from neurodiff_jax.crosscoder.step import (NAN_POLICIES, State, crosscoder_config, global_batch, init_state,
                                           loss_config, make_optimizer, make_train_step, pair_settings, sharded_init)
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.distributed import initialize_from_config
from neurodiff_jax.utils.files import atomic_write_json
from neurodiff_jax.utils.paths import neurodiff_home


class NonFiniteBatchError(ValueError):
  """A batch with NaN/Inf activations under `nan_policy='stop'`."""


class DivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf: training diverged (the last good checkpoint is kept)."""


def bad_rows(x: np.ndarray) -> np.ndarray:
  """Indices of the tokens (rows) of a batch [B, ...] with any NaN/Inf."""
  return np.nonzero(~np.isfinite(x).all(axis=tuple(range(1, x.ndim))))[0]


_TEXT = 1024  # bytes of each process's description of its bad rows in the shared error


def _from_every_process(count: int, text: str) -> list[tuple[int, str]]:
  """(count, text) of every process, the same list on each: one small all-gather, only on an error."""
  if jax.process_count() == 1:
    return [(count, text)]
  from jax.experimental import multihost_utils

  raw = text.encode()[:_TEXT]
  mine = np.zeros(2 + _TEXT, np.int32)
  mine[:2] = count, len(raw)
  mine[2:2 + len(raw)] = np.frombuffer(raw, np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [(int(r[0]), bytes(r[2:2 + r[1]].astype(np.uint8)).decode(errors="replace")) for r in every]


def _stop_if_bad(state: State, config: ml_collections.ConfigDict, saved: int | None,
                 where: Callable[[int], tuple[int, str]]) -> None:
  """Raises when the step recorded a bad batch or divergence (the state then is the last good one, unsaved).

  Every process reads the same replicated flags, so all raise the same error at the same step.
  """
  bad_at, diverged_at = (int(v) for v in jax.device_get((state["train"]["bad_batch_at"],
                                                         state["train"]["diverged_at"])))
  kept = f"the last checkpoint, step {saved}, is good" if saved is not None else "no checkpoint was written"
  if bad_at >= 0:
    try:
      mine = where(bad_at)
    except Exception as e:  # noqa: BLE001 -- every process must reach the all-gather, or the others wait forever
      mine = (0, f"its rows could not be read again: {e!r}")
    found = [(p, n, text) for p, (n, text) in enumerate(_from_every_process(*mine)) if n or text]
    total = sum(n for _, n, _ in found)
    if not found:
      at = ""
    elif jax.process_count() == 1:
      at = f" ({found[0][2]})"
    else:
      at = (f", on process(es) {[p for p, n, _ in found if n]} ("
            + "; ".join(f"process {p}: {n} tokens, {text}" for p, n, text in found) + ")")
    raise NonFiniteBatchError(
        f"batch of step {bad_at} has NaN/Inf activations in {total} of {config.batch_size} tokens{at}; nothing from "
        f"it on was applied or saved ({kept}). Fix or re-harvest that shard, or set nan_policy='skip' to skip such "
        "batches.")
  if diverged_at >= 0:
    raise DivergedError(
        f"training diverged at step {diverged_at}: the loss or gradient norm of its (finite) batch is NaN/Inf. "
        f"Nothing from it on was applied or saved ({kept}). Lower lr or raise warmup_frac / warmup_max_steps (in a "
        "new workdir), or check the store for huge activations.")


def run_loop(config: ml_collections.ConfigDict, state: State, step_fn: Callable, batches: Iterator[np.ndarray],
             mesh: jax.sharding.Mesh, *, save: Callable[[State, int], None] | None = None,
             log: Callable[[int, dict, State], None] | None = None,
             where: Callable[[int], tuple[int, str]] = lambda step: (0, "")) -> State:
  """Steps from the state's step to `config.steps`, logging and checkpointing; raises on a bad batch or divergence.

  The step itself checks the batch, loss and gradient norm (`step.make_train_step`); this loop
  reads its verdict before every log and every checkpoint, so no checkpoint holds a bad step.
  `where(step)`: this process's count of NaN/Inf tokens in the batch of `step` and where they are
  in the store (read again, only for the error).
  """
  start = int(jax.device_get(state["train"]["step"]))
  saved = start if start and save is not None else None
  bar = tqdm(total=int(config.steps), initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
  t0, tokens = time.perf_counter(), 0
  step = start
  while step < config.steps:
    state, metrics = step_fn(state, global_batch(next(batches), mesh))
    step += 1
    tokens += int(config.batch_size)
    last = step == config.steps
    logging = step % config.log_every == 0 or last
    saving = save is not None and (step % config.checkpoint_every == 0 or last)
    if logging or saving:
      _stop_if_bad(state, config, saved, where)  # a sync, as the metrics and the save are anyway
    if logging:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics |= {"tokens_per_s": tokens / (time.perf_counter() - t0),
                  "skipped_batches": int(jax.device_get(state["train"]["skipped"]))}
      bar.set_postfix({"loss": f"{metrics['loss/total']:.4g}", "fve": f"{metrics.get('fve/0', 0):.3f}",
                       "l0": f"{metrics['l0']:.1f}", "tok/s": f"{metrics['tokens_per_s']:.0f}"})
      if log is not None:
        log(step, metrics, state)
    if saving:
      save(state, step)
      saved = step
    bar.update(1)
  bar.close()
  return state


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def config_json(config: ml_collections.ConfigDict) -> dict:
  """A run config as plain JSON (stored with every checkpoint)."""
  return _jsonable(config.to_dict())


def workdir_of(config: ml_collections.ConfigDict) -> Path:
  """The run directory (checkpoints, TensorBoard events, metrics.json): `workdir`, else `$NEURODIFF_HOME/runs/<name>`."""
  if config.workdir:
    return Path(config.workdir).expanduser()
  if not config.get("name"):
    raise ConfigError("config.workdir is empty and the config has no name to derive it from; set "
                      "--config.workdir=DIR.")
  return neurodiff_home() / "runs" / str(config.name)


_CHOICES = {"sparsity": SPARSITY, "reconstruction": RECONSTRUCTION, "nan_policy": NAN_POLICIES, "train_step": STEPS,
            "compute_dtype": ("float32", "bfloat16")}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` (one line naming the field and the fix) for a run config that cannot work, before any work."""
  for field, choices in _CHOICES.items():
    if config[field] not in choices:
      close = difflib.get_close_matches(str(config[field]), choices, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"config.{field}={config[field]!r} is not one of {', '.join(choices)}{hint}.")
  positive = ("dict_size", "steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints")
  for field in positive:
    if int(config[field]) < 1:
      raise ConfigError(f"config.{field}={config[field]} must be at least 1.")
  if config.sparsity != "l1" and not 0 < int(config.k) <= int(config.dict_size):
    raise ConfigError(f"config.k={config.k} must be in [1, dict_size={config.dict_size}]: a token cannot use more "
                      "latents than the dictionary has; lower k or raise dict_size.")
  if config.sparsity == "l1" and float(config.l1_lambda) <= 0:
    raise ConfigError(f"config.l1_lambda={config.l1_lambda} with sparsity='l1' trains without a sparsity penalty; "
                      "set a positive l1_lambda (the default is documented in configs/_crosscoder.py).")
  if 0 < int(config.pair_candidates) < int(config.k):
    raise ConfigError(f"config.pair_candidates={config.pair_candidates} is below k={config.k}: every token may need "
                      "k candidates; set it to at least k, or 0 for 3·k.")
  if 0 < int(config.pair_heavy_candidates) < int(config.k):
    raise ConfigError(f"config.pair_heavy_candidates={config.pair_heavy_candidates} is below k={config.k}; set it to "
                      "at least k, or 0 for 16·k.")
  for field in ("warmup_frac", "decay_frac", "dead_frac", "l1_warmup_frac"):
    if not 0.0 <= float(config[field]) <= 1.0:
      raise ConfigError(f"config.{field}={config[field]} must be a fraction of the run, in [0, 1].")
  if float(config.warmup_frac) + float(config.decay_frac) > 1.0:
    raise ConfigError(f"config.warmup_frac + decay_frac = {config.warmup_frac} + {config.decay_frac} exceeds the "
                      "whole run; lower one of them.")
  if float(config.lr) <= 0 or not np.isfinite(float(config.lr)):
    raise ConfigError(f"config.lr={config.lr} must be a positive number.")
  if len(tuple(config.mesh)) != 2 or min(config.mesh) < 1:
    raise ConfigError(f"config.mesh={tuple(config.mesh)} must be (data, latent) device counts, e.g. (8, 1).")
  data, latent = (int(v) for v in config.mesh)
  if int(config.batch_size) % data:
    raise ConfigError(f"config.batch_size={config.batch_size} does not split over {data} data shards; use a multiple "
                      f"of {data}.")
  if int(config.dict_size) % latent:
    raise ConfigError(f"config.dict_size={config.dict_size} does not split over {latent} latent shards; use a "
                      f"multiple of {latent}.")
  if not config.store:
    raise ConfigError("config.store is empty: name an activation store directory (python -m launch.harvest makes "
                      "one), e.g. --config.store=/path/to/store.")
  workdir_of(config)


def train(config: ml_collections.ConfigDict) -> dict:
  """Trains (or resumes training) the crosscoder of `config` on its store; returns the final metrics."""
  from neurodiff_jax.activations.reader import batch_iterator, dataset_of, windowed_batches
  from neurodiff_jax.activations.store import ActivationStore
  from neurodiff_jax.crosscoder.checkpoint import Checkpointer, check_same_run
  from neurodiff_jax.crosscoder.metrics import MetricWriter, delta_norm, live_delta_norm_classes
  from neurodiff_jax.crosscoder.model import decoder_norms

  check_config(config)
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

  if config.normalize:
    scale = store.norm_scale(config.layer)
  else:
    scale = np.ones(lay.num_models, np.float32)
  mean = store.mean(config.layer) * scale[:, None]  # [M, d], normalised
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
  first_step = int(jax.device_get(state["train"]["step"]))

  def stream():
    while True:
      x = next(it)
      counter["next"] += 1
      yield x

  def where(step: int) -> tuple[int, str]:
    # Every step takes one batch (a skipped one too), so step s read batch first + s - first_step.
    index = first + step - first_step
    rows = bad_rows(batches(index))
    if not len(rows):
      return 0, ""
    tokens = batches.tokens(index)[rows]
    shards = sorted({int(t) // lay.shard_tokens for t in tokens})
    more = " ..." if len(tokens) > 4 else ""
    return len(rows), (f"store tokens {tokens[:4].tolist()}{more}, shard(s) {shards} of layer {config.layer} in "
                       f"{store.root}")

  writer = MetricWriter(workdir / "tensorboard", enabled=proc == 0)
  last: dict = {}

  def log(step: int, metrics: dict, st: State) -> None:
    nonlocal last
    last = dict(metrics, step=step)
    writer.scalars(step, metrics)
    if cfg.num_models == 2:
      norms = np.asarray(jax.device_get(decoder_norms(st["model"]["params"]))) / scale[None, :]
      dn = delta_norm(norms)  # in the models' original units, like Crosscoder.decoder_norms
      live = np.asarray(jax.device_get(st["train"]["since_fired"])) < lcfg.dead_tokens
      writer.histogram(step, "delta_norm", dn[live])
      # Dead rows sit near their initialisation (Δnorm ≈ 0.5) and would inflate "shared".
      last["delta_norm_classes"] = live_delta_norm_classes(dn, live)

  def save(st: State, step: int) -> None:
    ckpt.save(step, st, {"next_index": counter["next"]}, saved_config)

  step_fn = make_train_step(cfg, lcfg, tx, mesh, abstract, float(config.theta_momentum), config.compute_dtype,
                            config.train_step, pair_settings(config), config.nan_policy)
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


__all__ = ["DivergedError", "NonFiniteBatchError", "bad_rows", "check_config", "config_json", "run_loop",
           "train", "workdir_of"]
