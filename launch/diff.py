"""Activation-difference methods on a model pair: `python -m launch.diff --config=diff:narrow`.

Writes <results>/diff/<method>/ (tables, plots, section.html) and <results>/diff/summary.json
(neurodiff_jax/diffing/run.py); finished methods are reused on a rerun.
"""

from __future__ import annotations

from typing import Any

from launch import flags
from neurodiff_jax.diffing import run


def main(config: Any) -> None:
  """Runs the chosen methods and says where their results are."""
  summaries = run.diff(config)
  print(f"diff: done; {', '.join(summaries)}")


__all__ = ["main"]


if __name__ == "__main__":
  flags.run(main, default_config="diff", check=run.check_config)
