"""Crosscoder checkpoints with Orbax: save and resume training, and `load` for analysis.

A checkpoint (one directory per step under `<workdir>/checkpoints/`) holds four items:

  model   params, θ, normalisation scalars   (all analysis needs)
  train   Adam state, step, tokens since each latent fired, whether it ever fired, skipped batches,
          dense fallbacks, and where training stopped (diverged_at, bad_batch_at; -1 while it has not)
  data    the Grain iterator state (JSON): where the batch stream continues
  config  the run config and the crosscoder architecture (JSON)

Saves are asynchronous (training continues while the arrays are written); Orbax writes each
step to a temporary directory and renames it when complete, so a process killed mid-save leaves
the previous checkpoint as the latest. The last `keep` checkpoints are kept.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from neurodiff_jax.crosscoder.model import Crosscoder, CrosscoderConfig
from neurodiff_jax.utils.errors import CheckpointError

# Fields that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_FIELDS = ("steps", "mesh", "train_step", "pair_candidates", "pair_heavy_fraction", "pair_heavy_candidates",
                    "pair_capacity", "log_every", "checkpoint_every", "keep_checkpoints", "workdir", "nan_policy",
                    "distributed", "coordinator_address", "process_index", "process_count")


class Checkpointer:
  """Saves and restores train states under `<directory>`."""

  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).expanduser().absolute()
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("model", "train", "data", "config"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict, config: dict) -> None:
    """Starts saving (asynchronously) the state after `step` steps."""
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(state["model"]), train=ocp.args.StandardSave(state["train"]),
        data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)))

  def config(self, step: int | None = None) -> dict:
    """The run config stored with a checkpoint."""
    step = self._step(step)
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
    """(state placed like `abstract_state`, data iterator state) of a checkpoint."""
    step = self._step(step)
    out = self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_state["model"]),
        train=ocp.args.StandardRestore(abstract_state["train"]),
        data=ocp.args.JsonRestore()))
    return {"model": out["model"], "train": out["train"]}, out["data"]

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}; train one with `python -m launch.train --config=...`.")
    return step

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self.manager.close()


def check_same_run(saved: dict, current: dict) -> None:
  """Resuming with another config is an error naming the fields that differ."""
  diff = sorted(k for k in set(saved) | set(current)
                if k not in RESUMABLE_FIELDS and saved.get(k) != current.get(k))
  if diff:
    show = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:6])
    raise CheckpointError(f"the checkpoint in this workdir was written by another run config ({show}); use a new "
                          "workdir, or the same config to resume.")


def _read_only_manager(checkpoint_dir: str | Path) -> tuple[ocp.CheckpointManager, Path]:
  """A manager over a run's checkpoints that writes nothing (the workdir or its `checkpoints/`)."""
  path = Path(checkpoint_dir).expanduser().absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise CheckpointError(f"no checkpoint directory at {path}: give the workdir of a training run (python -m "
                          "launch.train writes <workdir>/checkpoints/).")
  # Options that write nothing: no directory creation, tmp-directory cleanup or root metadata, and
  # `load` never saves or deletes. (`read_only=True` would do the same but logs three warnings,
  # one of them unconditionally.)
  options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0, max_to_keep=None,
                                         cleanup_tmp_directories=False, save_root_metadata=False,
                                         enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(path, options=options,
                                  item_handlers={"model": ocp.StandardCheckpointHandler(),
                                                 "train": ocp.StandardCheckpointHandler(),
                                                 "data": ocp.JsonCheckpointHandler(),
                                                 "config": ocp.JsonCheckpointHandler()})
  return manager, path


def _step_of(manager: ocp.CheckpointManager, path: Path, step: int | None) -> int:
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no complete checkpoint in {path}: the run has not saved one yet (train longer, or wait "
                          "for its first checkpoint_every steps).")
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {path}; it has steps {sorted(steps)}.")
  return step


def load_run_config(checkpoint_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
  """(step, {"run": run config, "crosscoder": architecture}) stored with a checkpoint (latest by default)."""
  manager, path = _read_only_manager(checkpoint_dir)
  try:
    step = _step_of(manager, path, step)
    return step, manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  finally:
    manager.close()


def load(checkpoint_dir: str | Path, step: int | None = None) -> Crosscoder:
  """A trained crosscoder from a run's workdir or its `checkpoints/` directory, for analysis (no training code)."""
  manager, path = _read_only_manager(checkpoint_dir)
  try:
    step = _step_of(manager, path, step)
    # Onto one local device, whatever mesh and processes wrote it (analysis runs anywhere).
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          manager.item_metadata(step)["model"])
    out = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target),
                                                        config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  model = out["model"]  # jax Arrays on one device: the Crosscoder computes with them there
  cfg = CrosscoderConfig(**out["config"]["crosscoder"])
  return Crosscoder(cfg=cfg, params=dict(model["params"]), theta=float(model["theta"]),
                    norm_scale=np.asarray(model["norm_scale"], np.float32))


__all__ = ["CheckpointError", "Checkpointer", "check_same_run", "load", "load_run_config"]
