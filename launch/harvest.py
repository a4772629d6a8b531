"""Harvest paired activations into a TensorStore store: `python -m launch.harvest --config=harvest_tiny`."""

from launch import flags
from neurodiff_jax.activations import harvest
from neurodiff_jax.organisms import build


def main(config) -> None:
  """Builds any `organism:` inputs, then harvests (or resumes harvesting) the store."""
  store = harvest.harvest(build.resolve_organism_refs(config))
  print(f"store: {store.root}")


if __name__ == "__main__":
  flags.run(main, default_config="harvest_tiny")
