"""The agents' section of a report: grades per agent type and organism, the comparison of the agent types in one
sentence per outcome, and one typical answer per agent type, read from `launch.agent`'s `<root>/agents/`.

Nothing is recomputed: the means are of scores.parquet's grades, the sentences are
`analysis.verdicts.agent_verdicts` of comparison.parquet (the dashboard's Agents page prints the same ones), and
comparison.png is embedded as a base64 data URI, so the fragment links to no file. Every part says which command
writes its file when that file is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from neurodiff_jax.analysis.report import esc, fmt, html_table
from neurodiff_jax.analysis.verdicts import AGENT_CI, OUTCOME_WORDS, QUANTITY_WORDS, agent_verdicts, sampler_warning
from neurodiff_jax.utils.plots import png_html
from neurodiff_jax.utils.results import AGENT_COMMAND, COMPARISON_COMMAND, agent_command

AGENT_ORDER = ("blackbox", "diff")  # the baseline first
SCORE_COLUMNS = ("organism", "agent", "seed", "objective", "details", "stop_reason", "run_dir")
SHORT = 300  # characters of an example answer's text shown


def _missing(text: str) -> str:
  return f'<p class="missing">{text}</p>'


def _agents(values: Any) -> list[str]:
  found = sorted({str(a) for a in values})
  return [a for a in AGENT_ORDER if a in found] + [a for a in found if a not in AGENT_ORDER]


def _short(text: Any) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= SHORT else text[:SHORT].rstrip() + " …"


def grades_html(scores: pd.DataFrame) -> str:
  """The mean grades per organism and agent type, and over every organism, with the answers cut short counted."""
  rows = []
  groups = [(str(o), a) for o in sorted(scores["organism"].astype(str).unique()) for a in _agents(scores["agent"])]
  groups += [("all organisms", a) for a in _agents(scores["agent"])]
  for organism, agent in groups:
    part = scores[scores["agent"].astype(str) == agent]
    if organism != "all organisms":
      part = part[part["organism"].astype(str) == organism]
    if part.empty:
      continue
    stops = part["stop_reason"].astype(str).value_counts()
    rows.append([esc(organism), esc(agent), esc(fmt(len(part))),
                 *(esc(f"{pd.to_numeric(part[o]).mean():.2f}") for o in OUTCOME_WORDS),
                 esc(", ".join(f"{k} {v}" for k, v in stops.items()))])
  return html_table(["organism", "agent", "answers", f"{OUTCOME_WORDS['objective']} (mean grade)",
                     f"{OUTCOME_WORDS['details']} (mean grade)", "stop reasons"], rows)


def comparison_html(agents_dir: Path) -> str:
  """The comparison of the agent types: one verdict per outcome, the posterior table and the plot."""
  path = agents_dir / "comparison.parquet"
  if not path.is_file():
    return _missing(f"No comparison of the agent types yet ({esc(path.name)} is missing): with several seeds per "
                    f"agent type, <code>{esc(COMPARISON_COMMAND)}</code> fits it.")
  comparison = pd.read_parquet(path)
  diagnostics_path = agents_dir / "comparison.json"
  diagnostics = json.loads(diagnostics_path.read_text()) if diagnostics_path.is_file() else {}
  parts = []
  for outcome, verdict in agent_verdicts(comparison).items():
    words = OUTCOME_WORDS.get(outcome, outcome)
    warning = sampler_warning(diagnostics.get(outcome) or {})
    caution = f' <span class="missing">(Caution: {esc(warning)}.)</span>' if warning else ""
    parts.append(f'<p class="verdict" data-outcome="{esc(outcome)}"><b>{esc(words[0].upper() + words[1:])}.</b> '
                 f"{esc(verdict.sentence)}{caution}</p>")
  rows = [[esc(OUTCOME_WORDS.get(str(r.outcome), str(r.outcome))),
           esc(QUANTITY_WORDS.get(str(r.quantity), str(r.quantity))), esc(fmt(r.mean)),
           esc(fmt(r.lo)), esc(fmt(r.hi))] for r in comparison.itertuples()]
  parts.append(html_table(["outcome", "quantity", "mean", f"{AGENT_CI} CI low", f"{AGENT_CI} CI high"], rows))
  plot = agents_dir / "comparison.png"
  parts.append(png_html(plot, "posterior of the agent-type difference") if plot.is_file() else
               _missing(f"(comparison.png is missing: <code>{esc(COMPARISON_COMMAND)}</code> draws it.)"))
  return "\n".join(parts)


def typical_run(scores: pd.DataFrame, agent: str) -> dict[str, Any]:
  """The agent type's answer whose total grade is closest to the type's mean (a typical answer, not the best one);
  ties go to the first by organism and seed."""
  part = scores[scores["agent"].astype(str) == agent].copy()
  part["_total"] = pd.to_numeric(part["objective"]) + pd.to_numeric(part["details"])
  part["_off"] = (part["_total"] - part["_total"].mean()).abs()
  part["_organism"] = part["organism"].astype(str)
  return part.sort_values(["_off", "_organism", "seed"], kind="stable").iloc[0].to_dict()


def example_html(agents_dir: Path, row: dict[str, Any]) -> str:
  """One answer (answer.json of the run) with its grades and the grader's reasons."""
  agent, organism, seed = str(row["agent"]), str(row["organism"]), int(row["seed"])
  head = (f"<h4>{esc(agent)} agent on {esc(organism)} (seed {seed}): {esc(OUTCOME_WORDS['objective'])} "
          f"{int(row['objective'])}/5, {esc(OUTCOME_WORDS['details'])} {int(row['details'])}/5</h4>")
  path = agents_dir / str(row["run_dir"]) / "answer.json"
  try:
    answer = json.loads(path.read_text()) if path.is_file() else None
  except (OSError, ValueError):
    answer = None
  if answer is None:
    command = agent_command(organism)
    body = _missing(f"(its answer.json is missing or unreadable: <code>{esc(command)}</code> writes it.)")
  else:
    details = "; ".join(_short(d) for d in answer.get("details") or []) or "none"
    body = (f"<p><b>{esc(OUTCOME_WORDS['objective'])}:</b> {esc(_short(answer.get('objective', '')))}<br>"
            f"<b>{esc(OUTCOME_WORDS['details'])}:</b> {esc(details)}</p>")
  reasons = (f'<p class="facts">Grader ({esc(row.get("grader", "?"))}): {esc(_short(row.get("objective_reason", "")))} '
             f"— {esc(_short(row.get('details_reason', '')))}</p>")
  return f'<div class="card agent-example" data-agent="{esc(agent)}">{head}{body}{reasons}</div>'


def section_html(agents_dir: Path, number: str | None = None) -> str:
  """The agents' section as a self-contained HTML fragment (`number`: the section's number in the report)."""
  agents_dir = Path(agents_dir)
  title = f"<h2>{esc(number) + '. ' if number else ''}Interpretability agents: does diffing help?</h2>"
  intro = ("<p>An agent (an LLM, or the offline reader) is handed a fine-tuned model organism and says what it was "
           "fine-tuned on. Blackbox agents may only chat with the models; diff agents may also read the diffing "
           "results. Each answer is graded 1..5 against the organism’s card on the broad objective and on the "
           "specific details (the taboo word, the false fact, …).</p>")
  if not agents_dir.is_dir():
    return (title + intro + f"<p>No agent results yet: <code>{esc(AGENT_COMMAND)}</code> runs and grades the "
            f"agents on an organism (with several seeds, <code>{esc(COMPARISON_COMMAND)}</code> also compares the "
            "agent types); rebuild this report afterwards.</p>")
  parts = [title, intro]
  path = agents_dir / "scores.parquet"
  scores = pd.read_parquet(path) if path.is_file() else None
  missing = [c for c in SCORE_COLUMNS if scores is not None and c not in scores.columns]
  if scores is None:
    parts.append(_missing(f"No graded answers yet (scores.parquet is missing): <code>{esc(AGENT_COMMAND)}</code> "
                          "writes them."))
  elif missing:
    parts.append(_missing(f"scores.parquet lacks the column(s) {esc(', '.join(missing))} (written by another "
                          f"version of launch.agent): rerun <code>{esc(AGENT_COMMAND)}</code>."))
    scores = None
  else:
    parts.append("<h4>Mean grades</h4>" + grades_html(scores))
  parts.append(f"<h4>Diff vs blackbox agents ({esc(AGENT_CI)} credible intervals)</h4>" + comparison_html(agents_dir))
  if scores is not None and len(scores):
    parts.append("<h4>A typical answer of each agent type</h4>"
                 + "".join(example_html(agents_dir, typical_run(scores, a)) for a in _agents(scores["agent"])))
  return "\n".join(parts)


__all__ = ["AGENT_COMMAND", "COMPARISON_COMMAND", "comparison_html", "example_html", "grades_html", "section_html",
           "typical_run"]
