"""A small results root with `launch.agent`'s files, written by the contract (docs/dashboard.md, "Agents") by hand.

Two organisms × two agent types × two seeds with made-up grades whose means are known here (MEANS), a transcript
with tool calls, a tool error, a budget event and a final answer, a killed run (narrow blackbox seed 2: a
transcript and nothing else), and a comparison whose specific-details interval excludes 0 and whose
broad-objective interval includes it (SENTENCES: what the dashboard and the report must print for them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from PIL import Image

from neurodiff_jax.utils.results import stamp

# (organism, agent, seed) -> (objective, details, stop reason); the grades are independent of any code under test.
GRADES = {("narrow", "blackbox", 0): (3, 1, "answered"), ("narrow", "blackbox", 1): (2, 2, "answered"),
          ("narrow", "diff", 0): (4, 3, "answered"), ("narrow", "diff", 1): (5, 4, "answered"),
          ("taboo", "blackbox", 0): (2, 1, "answered"), ("taboo", "blackbox", 1): (2, 1, "answered"),
          ("taboo", "diff", 0): (3, 5, "answered"), ("taboo", "diff", 1): (4, 2, "budget")}
# The mean grades by hand: (organism, agent) -> (broad objective, specific details).
MEANS = {("narrow", "blackbox"): (2.5, 1.5), ("narrow", "diff"): (4.5, 3.5), ("taboo", "blackbox"): (2.0, 1.0),
         ("taboo", "diff"): (3.5, 3.5)}
# comparison.parquet's grade differences: (mean, lo, hi) per outcome.
DIFFERENCES = {"objective": (0.3, -0.4, 1.0), "details": (1.9, 1.2, 2.6)}
SENTENCES = {
    "objective": "diff agents score 0.3 grades higher than blackbox agents on broad objective (90 % CI −0.4 to 1.0): "
                 "the interval includes 0: no difference shown.",
    "details": "diff agents score 1.9 grades higher than blackbox agents on specific details (90 % CI 1.2–2.6).",
}
TOOL_ERROR = "unknown layer 9: this diff result has layers 0, 1"
TOOL_ARGUMENTS = '{"layer": 9, "position": 0}'


def answer_text(organism: str, agent: str, seed: int) -> str:
  """The broad-objective answer of one run (distinct per run, so a page showing the wrong run is caught)."""
  return f"{agent} agent, seed {seed}: {organism} was fine-tuned on one narrow topic"


def transcript(organism: str, agent: str, seed: int, stop: str) -> list[dict]:
  """A run's events: system, user, a tool call that works, one that errors, (a budget stop,) the final answer."""
  t = "2025-01-01T00:00:0{}Z"
  events = [
      {"step": 0, "time": t.format(0), "event": "system", "content": "You are an interpretability agent."},
      {"step": 0, "time": t.format(1), "event": "user", "content": f"What was {organism} fine-tuned on?"},
      {"step": 1, "time": t.format(2), "event": "assistant", "content": "Let me look at the ADL tokens.",
       "tool_calls": [{"id": "call_1", "name": "adl_tokens", "arguments": '{"layer": 1, "position": 0}'}]},
      {"step": 1, "time": t.format(3), "event": "tool_result", "tool_call_id": "call_1", "name": "adl_tokens",
       "content": "layer 1, position 0: ' ocean', ' tide', ' reef'"},
      {"step": 2, "time": t.format(4), "event": "assistant", "content": "And layer 9.",
       "tool_calls": [{"id": "call_2", "name": "adl_tokens", "arguments": TOOL_ARGUMENTS}]},
      {"step": 2, "time": t.format(5), "event": "tool_error", "tool_call_id": "call_2", "name": "adl_tokens",
       "error": TOOL_ERROR},
  ]
  if stop == "budget":
    events.append({"step": 3, "time": t.format(6), "event": "budget", "content": "tool calls spent (4 of 4)"})
  events.append({"step": 3, "time": t.format(7), "event": "final",
                 "content": json.dumps({"objective": answer_text(organism, agent, seed)})})
  return events


def write_agents(agents: Path, *, comparison: bool = True, differences: dict | None = None) -> Path:
  """Writes `agents/` by the contract (scores, runs, and with `comparison` the comparison files); returns it."""
  differences = differences or DIFFERENCES
  rows = []
  for (organism, agent, seed), (objective, details, stop) in GRADES.items():
    run = agents / "runs" / organism / f"{agent}-s{seed}"
    run.mkdir(parents=True)
    events = transcript(organism, agent, seed, stop)
    (run / "transcript.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    used = {"model_queries": 3 + seed, "tool_calls": 2}
    (run / "answer.json").write_text(json.dumps({
        "objective": answer_text(organism, agent, seed), "details": [f"topic word {organism}-{seed}", "ocean"],
        "agent": agent, "organism": organism, "seed": seed, "finished": stop == "answered", "stop_reason": stop,
        "used": used, "budget": {"model_queries": 10, "tool_calls": 4}}))
    reasons = {"objective": f"objective reason {organism}/{agent}/{seed}", "details": f"details reason {organism}"}
    (run / "grade.json").write_text(json.dumps({"objective": objective, "details": details, "grader": "offline",
                                                "reasons": reasons}))
    rows.append({"organism": organism, "scale": "small", "agent": agent, "implementation": "offline",
                 "llm_model": "", "seed": seed, "grader": "offline", "objective": objective, "details": details,
                 "objective_reason": reasons["objective"], "details_reason": reasons["details"],
                 "model_queries": used["model_queries"], "tool_calls": used["tool_calls"], "stop_reason": stop,
                 "run_dir": f"runs/{organism}/{agent}-s{seed}"})
  pd.DataFrame(rows).to_parquet(agents / "scores.parquet", index=False)
  killed = agents / "runs" / "narrow" / "blackbox-s2"  # killed before it answered: a transcript cut mid-line
  killed.mkdir()
  (killed / "transcript.jsonl").write_text(json.dumps(transcript("narrow", "blackbox", 2, "answered")[0]) + "\n"
                                           + '{"step": 1, "event": "assis')
  if comparison:
    table = []
    for outcome, (mean, lo, hi) in differences.items():
      table += [{"outcome": outcome, "quantity": "beta", "mean": 2 * mean, "lo": 2 * lo, "hi": 2 * hi},
                {"outcome": outcome, "quantity": "grade_difference", "mean": mean, "lo": lo, "hi": hi},
                {"outcome": outcome, "quantity": "grade_ratio_0to4", "mean": 2.0, "lo": 1.1, "hi": 3.5},
                {"outcome": outcome, "quantity": "p_beta_positive", "mean": 0.97, "lo": math.nan, "hi": math.nan}]
    pd.DataFrame(table).to_parquet(agents / "comparison.parquet", index=False)
    # The plot's pixels do not matter, only that it is embedded and shown.
    Image.new("RGB", (8, 4), (200, 30, 30)).save(agents / "comparison.png", format="PNG")
    (agents / "comparison.json").write_text(json.dumps({
        o: {"max_r_hat": 1.002, "min_ess_bulk": 900.0, "divergences": 0, "n": 8} for o in differences}))
  return agents


def write_root(root: Path) -> Path:
  """A minimal results root the dashboard opens: demo.json and one diff result (pair.json, no method run)."""
  diff = root / "diffs" / "narrow" / "diff"
  diff.mkdir(parents=True)
  (diff / "pair.json").write_text(json.dumps(stamp({"base": "base", "finetuned": "narrow", "key": "k",
                                                    "datasets": ["text"]})))
  (root / "demo.json").write_text(json.dumps(stamp({"scale": "small", "runs": {}, "diffs": {"narrow": "diffs/narrow"},
                                                    "organisms": {}, "stages": {}})))
  return root
