"""Train a crosscoder on an activation store: `python -m launch.train --config=gemma2b_batchtopk`."""

from pathlib import Path

from launch import flags
from neurodiff_jax.crosscoder import train


def main(config) -> None:
  """Harvests the store first when the config names a harvest and the store is missing, then trains (or resumes)."""
  if config.harvest and not (config.store and (Path(config.store) / "manifest.json").is_file()):
    from neurodiff_jax.activations import harvest
    from neurodiff_jax.organisms import build

    store = harvest.harvest(build.resolve_organism_refs(flags.load_config(config.harvest)))
    with config.unlocked():
      config.store = str(store.root)
  metrics = train.train(config)
  print(f"train: done; step {metrics.get('step')}, loss {metrics.get('loss/total', float('nan')):.4g}, "
        f"FVE {[round(metrics[k], 3) for k in sorted(metrics) if k.startswith('fve/')]}, L0 {metrics.get('l0', 0):.1f}; "
        f"checkpoints and metrics.json in {config.workdir}")


if __name__ == "__main__":
  flags.run(main, default_config="tiny_batchtopk")
