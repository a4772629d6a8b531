"""The agent loop against a local stub endpoint: tool calls, bad calls, errors, timeouts, budgets, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.agents.llm import ChatClient, EndpointError
from neurodiff_jax.agents.loop import AgentLoop, Transcript, parse_answer
from neurodiff_jax.agents.tools import Budget, ToolError, Toolbox
from tests.agents.stub_server import StubServer

FINAL = ("final_answer", json.dumps({"objective": "text about bees", "details": ["honey", "hive"]}))


class CannedToolbox(Toolbox):
  """The real toolbox with the models replaced by canned replies (the loop is under test, not generation)."""

  def _generate(self, model, prompts, additions=None, layer=-1, fmt="chat"):
    who = "steered" if additions is not None else model
    return [f"{who} reply to {p}: honey bees" for p in prompts]


def write_diff_results(root: Path) -> Path:
  """A diff results directory with the files the tools read (ADL, KL, logit diff), card columns included."""
  adl, kl, ld = root / "adl", root / "kl", root / "logit_diff"
  for d in (adl, kl, ld):
    d.mkdir(parents=True)
  pd.DataFrame({"layer": 1, "position": [0, 0, 1, 1], "sign": ["+", "-", "+", "+"], "rank": [0, 0, 0, 1],
                "token_id": [1, 2, 3, 4], "token": [" hive", " rain", " honey", " wax"],
                "prob": [0.5, 0.4, 0.3, 0.2]}).to_parquet(adl / "logit_lens.parquet")
  pd.DataFrame({"layer": 1, "position": [0, 0, 0], "scale": [0.5, 2.0, 2.0], "rank": [0, 0, 1], "token_id": [5, 6, 7],
                "token": [" pollen", " nectar", " queen"], "prompts_agreeing": 2, "mean_prob": 0.1,
                "relevant": [True, True, True], "best": [True, False, False]}).to_parquet(adl / "patchscope.parquet")
  steer = pd.DataFrame({"layer": [-1, 1, 1], "position": pd.array([None, 0, 0], dtype="Int64"), "alpha": [0.0, 1, 4],
                        "steered": [False, True, True], "prompt": "Tell me a story.",
                        "text": ["a story", "bees buzz", "gibberish"], "coherent": [True, True, False],
                        "perplexity": [3.0, 4.0, 90.0], "chosen": [False, True, False]})
  steer.to_parquet(adl / "steering.parquet")
  np.savez(adl / "means.npz", layers=np.array([1]), positions=np.array([0, 1]), delta=np.ones((1, 2, 4)),
           typical_norm_ft=np.array([2.0]))
  pd.DataFrame({"kl": [3.0, 1.0], "context": ["the «hive»", "a «cat»"], "top_ft": [" honey", " dog"],
                "top_base": [" rain", " dog"]}).to_parquet(kl / "kl_top_contexts.parquet")
  pd.DataFrame({"alpha": [0.0, 2.0], "prompt": "Hi", "text": ["hello", "honey honey bees"]}).to_parquet(
      ld / "amplified.parquet")
  return root


@pytest.fixture
def diff_dir(tmp_path):
  return write_diff_results(tmp_path / "diff")


def _loop(server, tmp_path, diff_dir, agent="diff", budget=Budget(6, 8), **client_kw):
  client = ChatClient(server.base_url, "stub-model", retries=client_kw.pop("retries", 1), backoff_s=0.01,
                      sleep=lambda s: None, **client_kw)
  box = CannedToolbox(agent, budget, pair=SimpleNamespace(ft="ft", base="base", tokenizer=SimpleNamespace()),
                      diff_dir=diff_dir)
  return AgentLoop(client, box, tmp_path / "run", seed=3)


def _events(tmp_path):
  return Transcript(tmp_path / "run" / "transcript.jsonl").read()


def test_scripted_investigation_ends_with_the_structured_answer(tmp_path, diff_dir, monkeypatch):
  monkeypatch.setenv("NEURODIFF_AGENT_KEY", "sk-test")
  script = [{"tool_calls": [("adl_tokens", "{}")]},
            {"tool_calls": [("ask_model", json.dumps({"prompts": ["Hi", "Tell me a story."]})),
                            ("kl_contexts", '{"top_k": 1}')]},
            {"tool_calls": [FINAL]}]
  with StubServer(script) as s:
    answer = _loop(s, tmp_path, diff_dir).run()
  assert (answer.objective, answer.details, answer.finished, answer.stop_reason) == (
      "text about bees", ["honey", "hive"], True, "answered")
  saved = json.loads((tmp_path / "run" / "answer.json").read_text())
  assert saved["used"] == {"model_queries": 2, "tool_calls": 3} and saved["seed"] == 3
  kinds = [e["event"] for e in _events(tmp_path)]
  assert kinds == ["system", "user", "assistant", "tool_result", "assistant", "tool_result", "tool_result",
                   "assistant", "final"]
  # What the endpoint saw: the tools, the key, and each tool result as a tool message with its call id.
  first, last = s.requests[0], s.requests[-1]
  assert first["auth"] == "Bearer sk-test" and first["body"]["seed"] == 3
  assert {t["function"]["name"] for t in first["body"]["tools"]} == {
      "ask_model", "adl_tokens", "adl_steered_samples", "amplified_samples", "kl_contexts", "crosscoder_latents",
      "steer", "final_answer"}
  tools_msgs = [m for m in last["body"]["messages"] if m["role"] == "tool"]
  assert [m["tool_call_id"] for m in tools_msgs] == ["c1_0", "c2_0", "c2_1"]
  adl = json.loads(tools_msgs[0]["content"])
  # Card-derived columns never reach the agent; the patchscope scale is the one with most agreed tokens.
  assert "relevant" not in tools_msgs[0]["content"] and "best" not in tools_msgs[0]["content"]
  assert adl[0]["logit_lens"] == [" hive"] and adl[0]["patchscope_scale"] == 2.0
  assert adl[0]["patchscope"] == [" nectar", " queen"]
  asked = json.loads(tools_msgs[1]["content"])
  assert asked[1] == {"prompt": "Tell me a story.", "format": "text", "finetuned": "ft reply to Tell me a story.: honey bees",
                      "base": "base reply to Tell me a story.: honey bees"}


def test_bad_calls_are_answered_with_errors_and_the_run_goes_on(tmp_path, diff_dir):
  script = [{"tool_calls": [("ask_model", "{not json"), ("no_such_tool", "{}"), ("", "{}"),
                            ("kl_contexts", '{"top_k": "ten"}'), ("ask_model", '{"prompts": []}'),
                            ("ask_model", '{"prompts": ["a"], "extra": 1}'),
                            ("ask_model", '{"prompts": ["a"], "format": "chat"}')]},
            {"tool_calls": [("final_answer", '{"details": ["x"]}')]},  # no objective
            {"tool_calls": [FINAL]}]
  with StubServer(script) as s:
    answer = _loop(s, tmp_path, diff_dir).run()
  assert answer.stop_reason == "answered"
  errors = [e["error"] for e in _events(tmp_path) if e["event"] == "tool_error"]
  assert len(errors) == 8
  assert "not valid JSON" in errors[0]
  assert "unknown tool 'no_such_tool'" in errors[1] and "ask_model" in errors[1]
  assert "no function name" in errors[2]
  assert "top_k='ten'" in errors[3]
  assert "non-empty list" in errors[4]
  assert "has no argument extra" in errors[5]
  assert "no chat template; use format text" in errors[6]
  assert "needs objective" in errors[7]
  # Refused calls cost no model query; every call that reached a tool counted once.
  assert json.loads((tmp_path / "run" / "answer.json").read_text())["used"]["model_queries"] == 0


def test_a_blackbox_agent_cannot_read_the_diff(tmp_path, diff_dir):
  with StubServer([{"tool_calls": [("adl_tokens", "{}")]}, {"tool_calls": [FINAL]}]) as s:
    _loop(s, tmp_path, diff_dir, agent="blackbox").run()
    tools = {t["function"]["name"] for t in s.requests[0]["body"]["tools"]}
  assert tools == {"ask_model", "final_answer"}
  err = next(e["error"] for e in _events(tmp_path) if e["event"] == "tool_error")
  assert "diff tool" in err


def test_a_failing_tool_is_recorded_not_fatal(tmp_path, diff_dir):
  (diff_dir / "kl" / "kl_top_contexts.parquet").write_bytes(b"corrupt")
  with StubServer([{"tool_calls": [("kl_contexts", "{}")]}, {"tool_calls": [FINAL]}]) as s:
    answer = _loop(s, tmp_path, diff_dir).run()
  assert answer.finished
  err = next(e["error"] for e in _events(tmp_path) if e["event"] == "tool_error")
  assert err.startswith("the tool failed:")


def test_missing_results_name_the_command(tmp_path, diff_dir):
  (diff_dir / "logit_diff" / "amplified.parquet").unlink()
  with StubServer([{"tool_calls": [("amplified_samples", "{}"), ("crosscoder_latents", "{}")]},
                   {"tool_calls": [FINAL]}]) as s:
    _loop(s, tmp_path, diff_dir).run()
  errs = [e["error"] for e in _events(tmp_path) if e["event"] == "tool_error"]
  assert "launch.diff (method logit_diff)" in errs[0] and "launch.train" in errs[1]


def test_endpoint_errors_are_retried_then_end_the_run_with_the_transcript(tmp_path, diff_dir):
  with StubServer([{"status": 503}, {"tool_calls": [FINAL]}]) as s:
    assert _loop(s, tmp_path, diff_dir).run().finished  # one retry was enough
    assert len(s.requests) == 2
  with StubServer([{"status": 500}]) as s:
    answer = _loop(s, tmp_path / "b", diff_dir).run()
  assert (answer.finished, answer.stop_reason) == (False, "endpoint")
  ev = _events(tmp_path / "b")
  assert ev[-1]["event"] == "endpoint_error" and "HTTP 500" in ev[-1]["error"] and "2 attempt(s)" in ev[-1]["error"]
  assert json.loads((tmp_path / "b" / "run" / "answer.json").read_text())["stop_reason"] == "endpoint"


def test_a_slow_or_garbled_endpoint_is_an_endpoint_error(tmp_path, diff_dir):
  with StubServer([{"sleep": 1.0, "tool_calls": [FINAL]}]) as s:
    client = ChatClient(s.base_url, "m", timeout_s=0.2, retries=1, sleep=lambda x: None)
    with pytest.raises(EndpointError, match="no answer .*timeout 0.2 s"):
      client.complete([{"role": "user", "content": "hi"}])
  with StubServer([{"raw": b"<html>proxy error</html>"}]) as s:
    with pytest.raises(EndpointError, match="not JSON"):
      ChatClient(s.base_url, "m", retries=0).complete([{"role": "user", "content": "hi"}])
  with StubServer([{"raw": b'{"choices": []}'}]) as s:
    with pytest.raises(EndpointError, match="without choices"):
      ChatClient(s.base_url, "m", retries=0).complete([{"role": "user", "content": "hi"}])
  with StubServer([{"status": 401}]) as s:
    with pytest.raises(EndpointError, match="NEURODIFF_AGENT_KEY"):
      ChatClient(s.base_url, "m", retries=3, sleep=lambda x: None).complete([{"role": "user", "content": "x"}])
    assert len(s.requests) == 1  # an auth error is not retried


def test_budgets_are_enforced(tmp_path, diff_dir):
  many = json.dumps({"prompts": ["a", "b", "c"]})
  script = [{"tool_calls": [("ask_model", many)]}, {"tool_calls": [("ask_model", many)]},
            {"tool_calls": [("adl_tokens", "{}")]}, {"tool_calls": [("adl_tokens", "{}")]}, {"tool_calls": [FINAL]}]
  with StubServer(script) as s:
    answer = _loop(s, tmp_path, diff_dir, budget=Budget(model_queries=4, tool_calls=2)).run()
  assert answer.finished
  ev = _events(tmp_path)
  errs = [e["error"] for e in ev if e["event"] == "tool_error"]
  assert "needs 3 model queries but 1 are left" in errs[0]
  assert "tool-call budget (2) is spent" in errs[1]
  # Refused calls are not counted; the budget event comes once the calls are spent, before the refused one.
  kinds = [e["event"] for e in ev]
  assert kinds.index("budget") < [i for i, k in enumerate(kinds) if k == "tool_error"][1]
  assert json.loads((tmp_path / "run" / "answer.json").read_text())["used"] == {"model_queries": 3, "tool_calls": 2}


def test_an_agent_that_never_answers_stops_at_its_turn_limit(tmp_path, diff_dir):
  with StubServer([{"content": "I think it is about bees."}]) as s:
    loop = _loop(s, tmp_path, diff_dir)
    loop.max_turns = 3
    answer = loop.run()
  assert (answer.finished, answer.stop_reason, answer.objective) == (False, "budget", "")
  assert len(s.requests) == 3
  nudges = [e for e in _events(tmp_path) if e["event"] == "user"][1:]
  assert len(nudges) == 3 and "final_answer" in nudges[0]["content"]


class Killed(BaseException):
  """A kill between two steps (not an Exception: nothing in the loop may swallow it)."""


def test_a_killed_run_resumes_from_its_transcript(tmp_path, diff_dir):
  script = [{"tool_calls": [("ask_model", '{"prompts": ["a", "b"]}'), ("adl_tokens", "{}")]},
            {"tool_calls": [FINAL]}]
  with StubServer(script) as s:
    loop = _loop(s, tmp_path, diff_dir)
    calls = {"n": 0}
    real = loop.toolbox.call

    def dying(name, args):  # killed while running the second tool call of the first turn
      calls["n"] += 1
      if calls["n"] == 2:
        raise Killed
      return real(name, args)

    loop.toolbox.call = dying
    with pytest.raises(Killed):
      loop.run()
    before = _events(tmp_path)
    assert [e["event"] for e in before][-2:] == ["assistant", "tool_result"]
    # A half-written last line (the kill came mid-write) is dropped on reading.
    with open(tmp_path / "run" / "transcript.jsonl", "a") as f:
      f.write('{"step": 99, "event": "tool_res')
    resumed = _loop(s, tmp_path, diff_dir)
    answer = resumed.run()
  assert answer.finished and answer.objective == "text about bees"
  ev = [e for e in _events(tmp_path)]
  kinds = [e["event"] for e in ev]
  assert kinds.count("system") == 1 and "resume" in kinds
  # The pending call ran once after the resume, the finished one was not redone, the counts carried over.
  results = [e for e in ev if e["event"] == "tool_result"]
  assert [r["name"] for r in results] == ["ask_model", "adl_tokens"]
  assert json.loads((tmp_path / "run" / "answer.json").read_text())["used"] == {"model_queries": 2, "tool_calls": 2}
  assert len(s.requests) == 2  # the endpoint was asked once before the kill and once after
  # A finished run is read back, not redone.
  assert _loop(s, tmp_path, diff_dir).run().objective == "text about bees"


def test_parse_answer_accepts_a_single_detail_string():
  assert parse_answer('{"objective": " bees ", "details": "honey"}') == ("bees", ["honey"])
  with pytest.raises(ToolError, match="details must be a list"):
    parse_answer('{"objective": "x", "details": {"a": 1}}')
