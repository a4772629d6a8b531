"""Main job: `python -m launch.demo [--config=demo[:small]]`: the whole story on the model organisms, on CPU."""

from launch import flags
from neurodiff_jax.demo import pipeline


def main(config) -> None:
  """Runs (or resumes) every stage and writes the story report into the results root."""
  pipeline.run_demo(config)


if __name__ == "__main__":
  flags.run(main, default_config="demo", check=pipeline.check_config)
