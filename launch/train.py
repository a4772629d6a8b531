"""Train a crosscoder on an activation store: `python -m launch.train --config=gemma2b_batchtopk`.

`config.store` names the store; it is never swapped for another. When it is missing or half-written
and `config.harvest` names a harvest config, that harvest makes or finishes it in that directory
first (`store=""` means the harvest config's own out_dir); without one, that is an error.
"""

from __future__ import annotations

from typing import Any

from launch import flags
from neurodiff_jax.activations import harvest
from neurodiff_jax.crosscoder import train


def harvest_config(config: Any) -> Any:
  """The harvest config `config.harvest` names (None when it is empty)."""
  return flags.load_config(config.harvest) if config.harvest else None


def check(config: Any) -> None:
  """Before any work: the store's directory is resolved and usable, and the run config can train."""
  config.store = str(harvest.check_store(config.store, harvest_config(config)))
  train.check_config(config)


def main(config: Any) -> None:
  """Makes or finishes the store when needed (in `config.store`), then trains (or resumes)."""
  harvest.ensure_store(config.store, harvest_config(config))
  metrics = train.train(config)
  fve = [round(metrics[k], 3) for k in sorted(metrics) if k.startswith("fve/")]
  print(f"train: done; step {metrics.get('step')}, loss {metrics.get('loss/total', float('nan')):.4g}, FVE {fve}, "
        f"L0 {metrics.get('l0', 0):.1f}; checkpoints and metrics.json in {train.workdir_of(config)}")


__all__ = ["check", "harvest_config", "main"]


if __name__ == "__main__":
  flags.run(main, default_config="tiny_batchtopk", check=check)
