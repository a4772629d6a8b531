"""Activation-difference methods on a model pair: `python -m launch.diff --config=diff:narrow`.

Writes <results>/diff/<method>/ (tables, plots, section.html) and <results>/diff/summary.json
(neurodiff_jax/diffing/run.py); finished methods are reused on a rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launch import flags
from neurodiff_jax.diffing import report, run


def main(config: Any) -> None:
  """Runs the chosen methods, then writes the results directory's report.html (with the crosscoder's, if any)."""
  result = run.diff(config)
  root = Path(result["results_dir"])
  if (root / "latents.parquet").is_file():  # a crosscoder analysis lives here: its report takes the sections
    from neurodiff_jax.analysis import report as analysis_report

    path = analysis_report.write_report(root)
  else:
    path = report.write_report(root)
  print(f"diff: done; {', '.join(result['methods'])}; report {path}")


__all__ = ["main"]


if __name__ == "__main__":
  flags.run(main, default_config="diff", check=run.check_config)
