"""Harvest paired activations into a TensorStore store: `python -m launch.harvest --config=harvest_tiny`."""

from __future__ import annotations

from typing import Any

from launch import flags
from neurodiff_jax.activations import harvest


def check(config: Any) -> None:
  """Before any work (organism builds included): the models are named right and the store directory can be written."""
  from neurodiff_jax.organisms.build import check_model_ref

  check_model_ref(config.base_model, "base_model")
  check_model_ref(config.finetuned_model, "finetuned_model")
  harvest.check_out_dir(harvest.out_dir_of(config))


def main(config: Any) -> None:
  """Builds any `organism:` inputs, then harvests (or resumes harvesting) the store."""
  store = harvest.harvest(config)
  print(f"store: {store.root}")


__all__ = ["check", "main"]


if __name__ == "__main__":
  flags.run(main, default_config="harvest_tiny", check=check)
