"""Interpretability agents on model pairs: `python -m launch.agent --config=agent:ORGANISM[,SCALE]`.

Writes <root>/agents/ (transcripts, answers, grades, scores.parquet, the comparison;
neurodiff_jax/agents/run.py); finished runs are reused, a killed run resumes. When the root is a
demo's results root, its report.html is rewritten with the Agents section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch import flags
from neurodiff_jax.agents import run


def main(config: Any) -> None:
  """Runs the agents, then refreshes the demo report beside them (if there is one)."""
  result = run.run_agents(config)
  root = Path(result["root"]).parent
  if (root / "demo.json").is_file():
    from neurodiff_jax.demo.story import write_story

    path = write_story(root, json.loads((root / "demo.json").read_text()))
    print(f"agent: report {path}")
  print(f"agent: done; {len(result['scores'])} graded runs in {result['root']}"
        + ("; comparison written" if result["compared"] else ""))


__all__ = ["main"]


if __name__ == "__main__":
  flags.run(main, default_config="agent", check=run.check_config)
