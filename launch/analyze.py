"""Analyse a trained crosscoder: `python -m launch.analyze --config=analyze --config.workdir=RUN`.

Writes RUN/analysis/: latents.parquet, examples.parquet, causal.parquet, steering.parquet, PNG plots,
summary.json and report.html (neurodiff_jax/analysis/analyze.py). Rerunning reuses finished parts.
"""

from __future__ import annotations

from typing import Any

from launch import flags
from neurodiff_jax.activations.store import StoreError
from neurodiff_jax.analysis import analyze
from neurodiff_jax.utils.errors import CheckpointError


def main(config: Any) -> None:
  """Runs the analysis and prints where its report is; bad inputs end it with one line naming the fix."""
  try:
    summary = analyze.analyze(config)
  except (CheckpointError, StoreError, analyze.AnalysisError) as e:
    flags.fail(e)
  print(f"analyze: done in {summary['seconds']} s; classes {summary['classes']}; results in "
        f"{analyze.out_dir_of(config)}")


__all__ = ["main"]


if __name__ == "__main__":
  flags.run(main, default_config="analyze", check=analyze.check_config)
