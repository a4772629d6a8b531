"""Joining the processes of a multi-host job, shared by the harvest and training."""

from __future__ import annotations

import jax
import ml_collections


def initialize_from_config(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize()` from a config's distributed/coordinator_address/process_* fields (once)."""
  if not config.get("distributed") or jax.distributed.is_initialized():
    return
  count = int(config.get("process_count") or 0)
  # Unset fields are auto-detected by JAX on TPU pods, SLURM and Open MPI clusters.
  jax.distributed.initialize(coordinator_address=config.get("coordinator_address") or None,
                             num_processes=count or None, process_id=config.process_index if count else None)
