"""The Agents page driven headless on a small hand-written agents directory (tests/agent_results.py): the mean grades
and every graded answer as written, the verdict sentence from the interval, the transcript of the run the URL names,
refusals naming the valid choices, and the commands named where a file is missing."""

from __future__ import annotations

import json

import pytest

from neurodiff_jax.analysis.verdicts import agent_verdict
from tests.agent_results import (
  GRADES,
  MEANS,
  SENTENCES,
  TOOL_ARGUMENTS,
  TOOL_ERROR,
  answer_text,
  transcript,
  write_agents,
  write_root,
)
from tests.dashboard.test_app import _sidebar, _table, open_page


@pytest.fixture
def root(tmp_path):
  """A minimal results root with the agents directory."""
  root = write_root(tmp_path / "results")
  write_agents(root / "agents")
  return root


SHOWN_TOOL_ERROR = f"tool error in `adl_tokens`: {TOOL_ERROR}"  # every fixture transcript has this failing call


def _errors(at) -> list[str]:
  return [e.value for e in at.error]


def _event_kinds(at) -> list[str]:
  """The kinds of the transcript events shown, in order (each event's caption: `step N · kind · time`)."""
  return [c.value.split(" · ")[1] for c in at.caption if c.value.startswith("step ")]


def test_mean_grades_every_answer_and_the_verdicts(root, monkeypatch):
  at = open_page(root, "agents", monkeypatch)
  assert _errors(at) == [SHOWN_TOOL_ERROR]  # the first run's transcript's, nothing else
  means = _table(at, "organism", "agent", "answers", "broad objective", "specific details")
  assert dict(zip(zip(means["organism"], means["agent"]),
                  zip(means["broad objective"], means["specific details"]))) == MEANS
  assert means["answers"].tolist() == [2, 2, 2, 2]
  assert list(zip(means["organism"], means["agent"])) == [("narrow", "blackbox"), ("narrow", "diff"),
                                                          ("taboo", "blackbox"), ("taboo", "diff")]
  scores = _table(at, "organism", "agent", "seed", "broad objective", "specific details", "stop reason")
  assert dict(zip(zip(scores["organism"], scores["agent"], scores["seed"]),
                  zip(scores["broad objective"], scores["specific details"], scores["stop reason"]))) == GRADES
  assert scores["transcript"].iloc[0] == "/agent-results?organism=narrow&agent=blackbox&seed=0"
  # One sentence per outcome: the details interval excludes 0, the objective one includes it.
  shown = [m.value for m in at.markdown]
  assert f"**Broad objective.** {SENTENCES['objective']}" in shown
  assert f"**Specific details.** {SENTENCES['details']}" in shown
  assert not at.warning  # the sampler converged: no caution
  comparison = _table(at, "outcome", "quantity", "mean", "90 % CI low", "90 % CI high")
  row = comparison[(comparison["outcome"] == "specific details") & comparison["quantity"].str.startswith("grade diff")]
  assert row[["mean", "90 % CI low", "90 % CI high"]].values.tolist() == [[1.9, 1.2, 2.6]]
  assert [i.proto.imgs[0].caption for i in at.get("image")] == ["comparison.png"]
  # The browser starts on the first run, and the URL names it.
  assert at.query_params == {"page": "agents", "organism": "narrow", "agent": "blackbox", "seed": "0"}


def test_the_transcript_of_the_run_the_url_names(root, monkeypatch):
  at = open_page(root, "agents", monkeypatch, organism="taboo", agent="diff", seed=1)
  assert at.query_params == {"page": "agents", "organism": "taboo", "agent": "diff", "seed": "1"}
  assert _errors(at) == [SHOWN_TOOL_ERROR]
  warnings = [w.value for w in at.warning]
  assert "budget: tool calls spent (4 of 4)" in warnings
  assert any(w.startswith("This run did not finish on its own (stop reason: budget)") for w in warnings)
  assert _event_kinds(at) == [e["event"] for e in transcript("taboo", "diff", 1, "budget")]
  codes = [c.value for c in at.code]
  assert json.dumps(json.loads(TOOL_ARGUMENTS), indent=1) in codes  # the failing call's arguments
  assert "layer 1, position 0: ' ocean', ' tide', ' reef'" in codes  # the tool's result
  assert f"**broad objective:** {answer_text('taboo', 'diff', 1)}" in [m.value for m in at.markdown]
  assert {m.label: m.value for m in at.metric} == {"broad objective": "4/5", "specific details": "2/5"}
  assert "objective reason taboo/diff/1" in [c.value for c in at.caption]
  # Another seed from the picker: its run, and the URL follows.
  at.selectbox(key="agents_seed").select("0").run()
  assert at.query_params["seed"] == "0" and not any(w.startswith("budget") for w in (x.value for x in at.warning))
  assert {m.label: m.value for m in at.metric} == {"broad objective": "3/5", "specific details": "5/5"}


@pytest.mark.parametrize("params, error", [
    ({"organism": "nosuch"}, "organism 'nosuch' not found; organisms in this root: narrow, taboo."),
    ({"organism": "taboo", "agent": "oracle"}, "agent 'oracle' not found; agents in this root: blackbox, diff."),
    ({"organism": "taboo", "agent": "diff", "seed": "7"}, "seed '7' not found; seeds in this root: 0, 1."),
    ({"organism": "taboo", "agent": "diff", "seed": "2"},
     "seed '2' cannot be shown here: the diff agent on taboo has no run with seed 2; seeds you can open here: 0, 1."),
])
def test_a_name_the_agents_directory_lacks_is_refused(root, monkeypatch, params, error):
  at = open_page(root, "agents", monkeypatch, **params)
  assert _errors(at) == [error]
  # No other run's answer or transcript in its place; the URL keeps what was asked.
  assert not at.metric and not _event_kinds(at)
  assert all(at.query_params[k] == v for k, v in params.items())


def test_a_killed_run_and_the_stale_choice_after_a_change(root, monkeypatch):
  at = open_page(root, "agents", monkeypatch, organism="narrow", agent="blackbox", seed=2)
  assert not _errors(at), _errors(at)
  infos = [i.value for i in at.info]
  assert any(i.startswith("No answer.json") and "`python -m launch.agent --config=agent:narrow,small`" in i
             for i in infos), infos
  assert any(i.startswith("Not graded yet") for i in infos)
  assert "1 line(s) of transcript.jsonl could not be read (a run killed mid-write cuts its last line)." in [
      w.value for w in at.warning]
  assert _event_kinds(at) == ["system"]
  # The diff agent on narrow has no seed 2: a choice carried from the last selection is dropped, not refused.
  at.selectbox(key="agents_agent").select("diff").run()
  assert _errors(at) == [SHOWN_TOOL_ERROR] and at.query_params["agent"] == "diff" and at.query_params["seed"] == "0"
  # The selection goes with the sidebar to another page and back.
  at = _sidebar(at, "overview")
  assert at.query_params == {"page": "overview"}
  at = _sidebar(at, "agents")
  assert at.query_params == {"page": "agents", "organism": "narrow", "agent": "diff", "seed": "0"}


def test_missing_files_name_the_command(tmp_path, monkeypatch):
  bare = write_root(tmp_path / "bare")
  at = open_page(bare, "agents", monkeypatch)
  assert not _errors(at) and not at.dataframe
  (info,) = [i.value for i in at.info]
  assert "`python -m launch.agent --config=agent:ORGANISM[,SCALE]`" in info
  assert "`python -m launch.agent --config=agent:all,SCALE`" in info
  at = open_page(bare, "agents", monkeypatch, organism="narrow")
  assert _errors(at) == ["organism 'narrow' not found; organisms in this root: none."]
  # Scores but no comparison fitted yet: the grades, and the sentence naming the comparison's command.
  unfitted = write_root(tmp_path / "unfitted")
  write_agents(unfitted / "agents", comparison=False)
  at = open_page(unfitted, "agents", monkeypatch)
  assert _errors(at) == [SHOWN_TOOL_ERROR]
  assert len(_table(at, "organism", "agent", "answers")) == 4
  assert any(i.startswith("No comparison of the agent types yet") and
             "`python -m launch.agent --config=agent:all,SCALE`" in i for i in (x.value for x in at.info))
  assert not at.get("image")


def test_an_interval_below_zero_reads_lower(tmp_path, monkeypatch):
  lower = write_root(tmp_path / "lower")
  write_agents(lower / "agents", differences={"objective": (-0.8, -1.5, -0.2), "details": (1.9, 1.2, 2.6)})
  at = open_page(lower, "agents", monkeypatch)
  want = "diff agents score 0.8 grades lower than blackbox agents on broad objective (90 % CI 0.2–1.5)."
  assert f"**Broad objective.** {want}" in [m.value for m in at.markdown]
  assert agent_verdict("objective", -0.8, -1.5, -0.2).sentence == want and agent_verdict(
      "objective", -0.8, -1.5, -0.2).shown


def test_an_unreadable_file_is_named_with_its_rerun(root, monkeypatch):
  (root / "agents" / "comparison.json").write_text('{"objective": {"max_r_hat": 1.0')  # cut short by a killed write
  at = open_page(root, "agents", monkeypatch)
  errors = [e for e in _errors(at) if e != SHOWN_TOOL_ERROR]
  assert len(errors) == 1 and errors[0].startswith(f"{root / 'agents' / 'comparison.json'} cannot be read (")
  assert errors[0].endswith("Rerun: `python -m launch.agent --config=agent:all,SCALE`")
  assert f"**Specific details.** {SENTENCES['details']}" in [m.value for m in at.markdown]  # the rest still shown
