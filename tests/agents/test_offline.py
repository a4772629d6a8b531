"""The offline agents end to end on the small organisms: `run_agents` with real models, real diffing results."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from neurodiff_jax.agents import grading, run
from neurodiff_jax.agents.offline import answer_from, content_words, token_word

pytestmark = pytest.mark.slow


def test_content_words_and_tokens():
  assert content_words("The Bees, the bees! And a hive of it.") == ["bees", "bees", "hive"]
  assert [token_word(t) for t in ("Ġhive", "▁Honey", " of", "ab", "12", "мёд")] == ["hive", "honey", None, None, None,
                                                                                      None]
  import collections

  objective, details = answer_from(collections.Counter({"wax": 2, "bee": 2, "hive": 1, "gone": 0}), "x")
  assert details == ["bee", "wax", "hive"] and objective.startswith("The model was fine-tuned on text about bee, wax")


@pytest.fixture(scope="module")
def agent_run(organisms, tmp_path_factory):
  from configs.agent import get_config

  org_config, paths = organisms
  config = get_config("all,small")
  root = tmp_path_factory.mktemp("agents_root")
  with config.unlocked():
    config.root = str(root)
    config.organisms.home = org_config.home
    config.diff.organisms.home = org_config.home
    config.seeds = (0, 1)
    config.progress = False
    config.comparison.num_warmup = 200
    config.comparison.num_samples = 200
  logs: list[str] = []
  result = run.run_agents(config, log=logs.append)
  return config, root / "agents", result, logs


def test_every_organism_agent_and_seed_is_graded(agent_run):
  config, agents, result, _ = agent_run
  scores = pd.read_parquet(agents / "scores.parquet")
  assert list(scores.columns) == run.SCORE_COLUMNS
  assert len(scores) == 4 * 2 * 2
  assert set(scores.organism) == {"narrow", "chat", "false_fact", "taboo"} and set(scores.agent) == {"diff", "blackbox"}
  assert scores.objective.between(1, 5).all() and scores.details.between(1, 5).all()
  # Same budget of model queries for both agent types, all of it spent.
  assert (scores.model_queries == config.budget.model_queries).all()
  assert (scores.tool_calls <= config.budget.tool_calls).all() and (scores.stop_reason == "answered").all()
  # Each grade is the grader's on the saved answer (the table is made from the run directories).
  grader = grading.OfflineGrader()
  for r in scores.itertuples():
    answer = json.loads((agents / r.run_dir / "answer.json").read_text())
    card = json.loads((agents.parent / "diffs" / r.organism / "diff" / "pair.json").read_text())["card"]
    g = grader.grade(card, answer["objective"], answer["details"])
    assert (g.objective, g.details) == (r.objective, r.details)


def test_transcripts_record_the_tools_and_never_the_card(agent_run):
  _, agents, _, _ = agent_run
  for t in agents.glob("runs/*/*/transcript.jsonl"):
    events = [json.loads(line) for line in t.read_text().splitlines()]
    assert events[0]["event"] == "system" and events[-1]["event"] == "final"
    names = {c["name"] for e in events if e["event"] == "assistant" for c in e["tool_calls"]}
    if t.parent.name.startswith("blackbox"):
      assert names == {"ask_model", "final_answer"}
    else:
      assert {"adl_tokens", "amplified_samples", "kl_contexts", "steer", "final_answer"} <= names
    text = t.read_text()
    assert '\\"relevant\\"' not in text and "card_words" not in text


def test_the_diff_reader_reads_the_narrow_domain(agent_run):
  # Measured on the small narrow organism: ADL/patchscope tokens and amplified samples name the domain.
  _, agents, _, _ = agent_run
  scores = pd.read_parquet(agents / "scores.parquet")
  diff = scores[(scores.organism == "narrow") & (scores.agent == "diff")]
  assert (diff.details >= 3).all(), diff[["seed", "details", "details_reason"]]


def test_the_comparison_is_written_and_rerun_reuses_the_runs(agent_run):
  config, agents, result, logs = agent_run
  assert result["compared"]
  table = pd.read_parquet(agents / "comparison.parquet")
  assert set(table.outcome) == {"objective", "details"} and {"beta", "grade_difference"} <= set(table.quantity)
  assert (agents / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  mtimes = {p: p.stat().st_mtime for p in agents.glob("runs/*/*/grade.json")}
  again = run.run_agents(config, log=lambda m: None)
  assert len(again["scores"]) == len(mtimes)
  assert {p: p.stat().st_mtime for p in agents.glob("runs/*/*/grade.json")} == mtimes


def test_a_pair_without_a_card_is_answered_not_graded(agent_run, tmp_path):
  import shutil

  config, agents, _, _ = agent_run
  narrow = json.loads((agents.parent / "diffs" / "narrow" / "diff" / "pair.json").read_text())
  mystery = tmp_path / "mystery"
  shutil.copytree(narrow["finetuned"], mystery)
  (mystery / "card.json").unlink()
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.root = str(tmp_path / "root")
    c.base_model, c.finetuned_model = narrow["base"], str(mystery)
    c.agents, c.seeds = ("blackbox",), (0,)
  logs: list[str] = []
  result = run.run_agents(c, log=logs.append)
  run_dir = tmp_path / "root" / "agents" / "runs" / "mystery" / "blackbox-s0"
  assert json.loads((run_dir / "answer.json").read_text())["finished"]
  assert not (run_dir / "grade.json").exists() and result["scores"] == []
  assert any("no card.json" in m for m in logs)
