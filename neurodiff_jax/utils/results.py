"""The format stamp on results files: what wrote them, so a reader can tell an older layout and say what to rerun.

`launch.analyze` writes `format_version` into `analysis/summary.json`, `launch.diff` into
`diff/pair.json`, `launch.demo` into the results root's `demo.json`. A reader (the dashboard)
calls `check_format` and gets `OldResults` naming the file, both versions and the command that
rewrites it, instead of a KeyError deep in a page.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_FORMAT = 1  # bump when a results file's layout changes in a way readers must know

# The agents' results (`<root>/agents/`, docs/agents.md): the columns other tools read, and the commands that
# write them. launch.agent writes them, the dashboard and the report read them; neither may import the other.
AGENT_SCORE_COLUMNS = ("organism", "scale", "agent", "implementation", "llm_model", "seed", "grader", "objective",
                       "details", "objective_reason", "details_reason", "model_queries", "tool_calls", "stop_reason",
                       "run_dir")
AGENT_COMPARISON_COLUMNS = ("outcome", "quantity", "mean", "lo", "hi")
AGENT_COMMAND = "python -m launch.agent --config=agent:ORGANISM[,SCALE]"  # runs and grades the agents
COMPARISON_COMMAND = "python -m launch.agent --config=agent:all,SCALE"  # also fits the comparison (several seeds)


def agent_command(organism: str | None = None, scale: str | None = None) -> str:
  """The command that runs and grades the agents on `organism` (the general form without one)."""
  if organism is None:
    return AGENT_COMMAND
  return f"python -m launch.agent --config=agent:{organism}{f',{scale}' if scale else ''}"


class OldResults(ValueError):
  """A results file written by an older (or newer) neurodiff-jax than this reader's format."""


def package_version() -> str:
  """The installed neurodiff-jax version ("unknown" from a source tree without metadata)."""
  try:
    return metadata.version("neurodiff-jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def stamp(record: dict[str, Any]) -> dict[str, Any]:
  """`record` with `format_version` and `neurodiff_jax_version` set (returned for chaining)."""
  record["format_version"] = RESULTS_FORMAT
  record["neurodiff_jax_version"] = package_version()
  return record


def check_format(record: dict[str, Any], path: str | Path, rerun: str) -> None:
  """Raises OldResults unless `record` (read from `path`) carries this reader's format; `rerun` is the fix."""
  found = record.get("format_version")
  if found == RESULTS_FORMAT:
    return
  written = "an older neurodiff-jax (no format stamp)" if found is None else \
      f"neurodiff-jax {record.get('neurodiff_jax_version', '?')} (results format {found})"
  raise OldResults(f"{path} was written by {written}; this version reads results format {RESULTS_FORMAT}. "
                   f"Rerun: {rerun}")


__all__ = ["AGENT_COMMAND", "AGENT_COMPARISON_COLUMNS", "AGENT_SCORE_COLUMNS", "COMPARISON_COMMAND", "RESULTS_FORMAT",
           "OldResults", "agent_command", "check_format", "package_version", "stamp"]
