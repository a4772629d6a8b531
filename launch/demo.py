"""Main job: `python -m launch.demo [--config=demo[:family]] [--config.model=PATH]`."""

from launch import flags
from neurodiff_jax import demo


def main(config) -> None:
  """Prints the residual-stream statistics of the configured model."""
  print(demo.run(config))


if __name__ == "__main__":
  flags.run(main, default_config="demo")
