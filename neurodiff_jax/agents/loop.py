"""The agent loop: an LLM with tools investigates a model pair; every step is appended to a JSONL transcript.

The transcript is the run's state. Each line is one event (`system`, `user`, `assistant` with its tool
calls, `tool_result`, `tool_error`, `endpoint_error`, `budget`, `final`, `resume`) with the budget spent
so far, flushed and fsynced as it is written; a killed run rebuilds the conversation from it, runs the
tool calls the last assistant turn left unanswered, and goes on. Nothing the agent or the endpoint
does ends the run without a transcript: a malformed or unknown tool call, a tool's error and a budget
overrun go back to the agent as the tool's result; an endpoint that still fails after its retries, or
an agent that does not answer within its turns, ends the run with `answer.json` saying why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from neurodiff_jax.agents.llm import EndpointError
from neurodiff_jax.agents.tools import FINAL, ToolError, Toolbox, parse_arguments
from neurodiff_jax.utils.files import atomic_write_json

SYSTEM_PROMPT = """You are an interpretability researcher. A language model (the "fine-tuned model") was made by \
fine-tuning a base model on something unknown to you. Find out what it was fine-tuned on or to do: the broad \
objective, and the specific details (particular words, facts, names, behaviours) as precisely as you can.

You work only through the tools. {access} Your budget: {queries} model queries (one per prompt sent) and \
{calls} tool calls in all. When you are done, or the budget runs out, call final_answer with the objective \
(one or two sentences) and a list of specific details. Be concrete: name the topic, words and facts you found."""
ACCESS = {
    "blackbox": "You can only send prompts to the fine-tuned model and its base and read their replies.",
    "diff": ("You can send prompts to both models, and you can read model-diffing results of the pair: what the "
             "activation difference between the models encodes (Activation Difference Lens tokens, steering with "
             "it), samples from amplified logit differences, the contexts where the two models disagree most, and "
             "crosscoder latents when there are any. Diffing results are cheap (no model queries): start there."),
}
TASK = "Investigate the fine-tuned model. Budget left: {left}."
NUDGE = ("Reply with tool calls only: call a tool, or call final_answer(objective, details) to finish. "
         "Budget left: {left}.")
BUDGET_SPENT = "The tool-call budget is spent. Call final_answer now with what you found."


class Transcript:
  """An append-only JSONL file of events, each durable once `append` returns."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._events: list[dict[str, Any]] | None = None  # the file's events, read once, then kept in step with it

  def _load(self) -> list[dict[str, Any]]:
    if not self.path.is_file():
      return []
    out = []
    for line in self.path.read_text(encoding="utf-8").splitlines():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # only the line being written when the process died can be partial
    return out

  def read(self) -> list[dict[str, Any]]:
    """The events so far (a last line cut by a kill is dropped)."""
    if self._events is None:
      self._events = self._load()
    return list(self._events)

  def repair(self) -> int:
    """Drops a last line cut by a kill (so new events start on a line of their own); returns the events kept."""
    events = self._load()
    if self.path.is_file():
      good = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
      if self.path.read_text(encoding="utf-8") != good:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(good, encoding="utf-8")
        os.replace(tmp, self.path)
    self._events = events
    return len(events)

  def clear(self) -> None:
    """Deletes the transcript (a run that restarts from scratch)."""
    self.path.unlink(missing_ok=True)
    self._events = []

  def append(self, event: str, used: dict[str, int] | None = None, **fields: Any) -> dict[str, Any]:
    """Writes one event (with the step number, time and budget spent) and returns it."""
    if self._events is None:
      self._events = self._load()
    record = {"step": len(self._events), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
    if used is not None:
      record["used"] = dict(used)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self._events.append(record)
    return record


@dataclasses.dataclass
class Answer:
  """An agent's structured answer and how its run ended."""

  objective: str
  details: list[str]
  finished: bool
  stop_reason: str  # answered | budget | endpoint | error

  def to_json(self) -> dict[str, Any]:
    """As written in answer.json."""
    return dataclasses.asdict(self)


def parse_answer(raw: Any) -> tuple[str, list[str]]:
  """final_answer's (objective, details); ToolError naming what is malformed."""
  args = parse_arguments(raw)
  objective, details = args.get("objective"), args.get("details", [])
  if not isinstance(objective, str) or not objective.strip():
    raise ToolError("final_answer needs objective: a non-empty string.")
  if isinstance(details, str):
    details = [details]
  if not isinstance(details, list) or not all(isinstance(d, (str, int, float)) for d in details):
    raise ToolError("final_answer's details must be a list of strings.")
  return objective.strip(), [str(d).strip() for d in details if str(d).strip()]


def _calls(message: dict[str, Any], step: int) -> list[dict[str, str]]:
  """The assistant turn's tool calls as {id, name, arguments} (ids made up where the endpoint gave none)."""
  out = []
  for i, call in enumerate(message.get("tool_calls") or []):
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    args = fn.get("arguments", "")
    out.append({"id": str(call.get("id") or f"call_{step}_{i}") if isinstance(call, dict) else f"call_{step}_{i}",
                "name": str(fn.get("name") or ""),
                "arguments": args if isinstance(args, str) else json.dumps(args)})
  return out


def _messages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The chat messages the transcript's events make (what the endpoint sees)."""
  msgs: list[dict[str, Any]] = []
  for e in events:
    kind = e["event"]
    if kind in ("system", "user", "budget"):
      msgs.append({"role": "system" if kind == "system" else "user", "content": e.get("content", "")})
    elif kind == "assistant":
      m: dict[str, Any] = {"role": "assistant", "content": e.get("content") or ""}
      if e.get("tool_calls"):
        m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"],
                                                                          "arguments": c["arguments"]}}
                           for c in e["tool_calls"]]
      msgs.append(m)
    elif kind in ("tool_result", "tool_error"):
      msgs.append({"role": "tool", "tool_call_id": e["tool_call_id"], "content": e.get("content", "")})
  return msgs


def _answered_ids(events: list[dict[str, Any]]) -> set[str]:
  return {e["tool_call_id"] for e in events if e["event"] in ("tool_result", "tool_error")}


class AgentLoop:
  """One LLM agent run: `client` (a ChatClient), `toolbox` (its budget), the transcript in `run_dir`."""

  def __init__(self, client: Any, toolbox: Toolbox, run_dir: str | Path, *, seed: int = 0, max_turns: int | None = None,
               log: Any = None):
    self.client, self.toolbox, self.run_dir, self.seed = client, toolbox, Path(run_dir), int(seed)
    self.max_turns = int(max_turns) if max_turns else toolbox.budget.tool_calls + 6
    self.transcript = Transcript(self.run_dir / "transcript.jsonl")
    self.log = log or (lambda msg: None)

  def _event(self, event: str, **fields: Any) -> dict[str, Any]:
    return self.transcript.append(event, used=self.toolbox.used, **fields)

  def _finish(self, answer: Answer) -> Answer:
    atomic_write_json(self.run_dir / "answer.json", {
        **answer.to_json(), "agent": self.toolbox.agent, "seed": self.seed, "used": dict(self.toolbox.used),
        "budget": dataclasses.asdict(self.toolbox.budget)})
    return answer

  def _run_call(self, call: dict[str, str]) -> Answer | None:
    """Runs one tool call and records its result (or error); the Answer when it is a valid final answer."""
    name = call["name"]
    if name == FINAL:
      try:
        objective, details = parse_answer(call["arguments"])
      except ToolError as e:
        self._event("tool_error", tool_call_id=call["id"], name=name, content=f"error: {e}", error=str(e))
        return None
      self._event("final", tool_call_id=call["id"], content=json.dumps({"objective": objective, "details": details}))
      return Answer(objective, details, True, "answered")
    try:
      if not name:
        raise ToolError("the tool call has no function name; call one of: " + ", ".join(self.toolbox.names) + ".")
      result = self.toolbox.call(name, call["arguments"])
      self._event("tool_result", tool_call_id=call["id"], name=name, content=result)
    except ToolError as e:
      self._event("tool_error", tool_call_id=call["id"], name=name, content=f"error: {e}", error=str(e))
    except Exception as e:  # a tool's own failure must not end the run: the agent reads it and goes on
      msg = f"the tool failed: {type(e).__name__}: {e}"
      self._event("tool_error", tool_call_id=call["id"], name=name, content=f"error: {msg}", error=msg)
    return None

  def run(self) -> Answer:
    """Runs (or resumes) the investigation until a final answer, the turn limit or a failed endpoint."""
    self.transcript.repair()
    events = self.transcript.read()
    for e in events:
      if e["event"] == "final":
        objective, details = parse_answer(e["content"])
        return self._finish(Answer(objective, details, True, "answered"))
    if events:
      self.toolbox.restore(events[-1].get("used", {}))
      self._event("resume", content=f"resumed after {len(events)} events")
      last = next((e for e in reversed(events) if e["event"] == "assistant"), None)
      if last is not None:
        done = _answered_ids(events)
        for call in last.get("tool_calls") or []:
          if call["id"] not in done:
            answer = self._run_call(call)
            if answer is not None:
              return self._finish(answer)
    else:
      access = ACCESS[self.toolbox.agent]
      self._event("system", content=SYSTEM_PROMPT.format(access=access, queries=self.toolbox.budget.model_queries,
                                                         calls=self.toolbox.budget.tool_calls))
      self._event("user", content=TASK.format(left=self.toolbox.remaining()))
    warned = any(e["event"] == "budget" for e in self.transcript.read())
    turns = sum(e["event"] == "assistant" for e in self.transcript.read())
    while turns < self.max_turns:
      messages = _messages(self.transcript.read())
      try:
        reply = self.client.complete(messages, self.toolbox.specs(), seed=self.seed)
      except EndpointError as e:
        self._event("endpoint_error", error=str(e))
        self.log(f"endpoint error: {e}")
        return self._finish(Answer("", [], False, "endpoint"))
      turns += 1
      calls = _calls(reply, len(self.transcript.read()))
      self._event("assistant", content=reply.get("content") or "", tool_calls=calls)
      if not calls:
        self._event("user", content=NUDGE.format(left=self.toolbox.remaining()))
        continue
      for call in calls:
        answer = self._run_call(call)
        if answer is not None:
          return self._finish(answer)
      if self.toolbox.remaining()["tool_calls"] <= 0 and not warned:
        self._event("budget", content=BUDGET_SPENT)
        warned = True
    self._event("budget", content=f"no final answer within {self.max_turns} turns; the run ends unanswered.")
    return self._finish(Answer("", [], False, "budget"))


__all__ = ["ACCESS", "SYSTEM_PROMPT", "AgentLoop", "Answer", "Transcript", "parse_answer"]
