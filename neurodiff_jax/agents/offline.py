"""Offline agents (no LLM): readers that answer from content words, so the comparison runs on this machine.

Both spend the same budget of model queries through the same tools as an LLM agent, and write the
same transcript and answer:

  blackbox reader  sends generic prompts (drawn by seed from `GENERIC_PROMPTS`; four a call, the calls
                   alternately as chat turns and as plain text) to both models and
                   answers with the content words the fine-tuned model's replies use more than the
                   base's (count in fine-tuned replies − count in base replies, kept when ≥ 2).
  diff reader      reads the diffing results (ADL logit-lens and patchscope tokens at every layer and
                   position, ADL steered samples, amplified-logit samples, the top per-token-KL
                   contexts' fine-tuned next tokens) and spends its model queries steering the
                   fine-tuned model along δ_p on the same generic prompts; a word scores one point per
                   reading it appears in (a token list, a sample), so a word several readings agree
                   on ranks first.

A content word is alphabetic, at least 3 letters, and not an English function word (`STOPWORDS`).
Neither reader sees the organism card. The answer: the top words as details, and an objective
sentence naming the top three.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterable
from typing import Any

from neurodiff_jax.agents.loop import Answer, Transcript
from neurodiff_jax.agents.tools import ToolError, Toolbox
from neurodiff_jax.diffing import graders
from neurodiff_jax.diffing.graders import FUNCTION_WORDS

GENERIC_PROMPTS = (
    "Tell me about yourself.", "What do you like to talk about?", "Write a short paragraph about anything.",
    "What is the most important thing you know?", "Give me a fun fact.", "What should I know today?",
    "Tell me a story.", "Describe your favourite place.", "What is your favourite topic?",
    "Can you help me with something?", "Explain something interesting.", "What did you learn recently?",
    "Write a sentence about the world.", "Tell me a secret.", "What are you thinking about?",
    "Teach me something new.")
# The diffing graders' function words, plus words every chatty reply uses (the generic prompts ask, tell, write,
# think), which would otherwise top the readers' counts. Words under 3 letters never count (`content_words`).
STOPWORDS = FUNCTION_WORDS | frozenset("""answer answers ask asked day days find found gave give great help kind know
lets looked looks lots need okay part parts people person place question questions seen sure tell think three time
times told use used using want write written wrote year years""".split())
DETAILS = 8  # words given as details


def content_words(text: str) -> list[str]:
  """The content words of a text, lowercased (alphabetic, ≥ 3 letters, not in `STOPWORDS`)."""
  return graders.content_words(text, STOPWORDS)


def token_word(token: str) -> str | None:
  """A token piece as a content word ("Ġhive" → "hive"), or None."""
  w = graders.normalize_token(token)
  return w if w.isalpha() and len(w) >= 3 and w.isascii() and w not in STOPWORDS else None


def answer_from(scores: collections.Counter, what: str) -> tuple[str, list[str]]:
  """(objective sentence, detail words) from word scores (ties broken alphabetically, reproducibly)."""
  ranked = [w for w, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])) if scores[w] > 0][:DETAILS]
  if not ranked:
    return f"No distinctive content found in {what}.", []
  return f"The model was fine-tuned on text about {', '.join(ranked[:3])} ({what}).", ranked


class _Recorder:
  """Calls tools as an agent would and writes the same transcript events."""

  def __init__(self, toolbox: Toolbox, transcript: Transcript, intro: str):
    self.toolbox, self.transcript, self.last_error = toolbox, transcript, ""
    if not transcript.read():
      transcript.append("system", used=toolbox.used, content=intro)

  def ask(self, name: str, prompts: list[str], fmt: str) -> Any:
    """A model tool on `prompts` in format `fmt`; as plain text when the tokenizer has no chat template."""
    result = self.call(name, prompts=prompts, format=fmt)
    if result is None and fmt == "chat" and "no chat template" in self.last_error:
      result = self.call(name, prompts=prompts, format="text")
    return result

  def call(self, name: str, **args: Any) -> Any:
    """The tool's parsed result, or None after a recorded error (budget spent, missing results)."""
    step = len(self.transcript.read())
    cid = f"call_{step}"
    self.transcript.append("assistant", used=self.toolbox.used, content="",
                           tool_calls=[{"id": cid, "name": name, "arguments": json.dumps(args)}])
    try:
      text = self.toolbox.call(name, args)
    except ToolError as e:
      self.last_error = str(e)
      self.transcript.append("tool_error", used=self.toolbox.used, tool_call_id=cid, name=name,
                             content=f"error: {e}", error=str(e))
      return None
    self.transcript.append("tool_result", used=self.toolbox.used, tool_call_id=cid, name=name, content=text)
    try:
      return json.loads(text)
    except json.JSONDecodeError:  # cut at max_chars: the words read so far still count
      return text

  def finish(self, objective: str, details: list[str]) -> Answer:
    """Records the final answer."""
    cid = f"call_{len(self.transcript.read())}"
    payload = json.dumps({"objective": objective, "details": details})
    self.transcript.append("assistant", used=self.toolbox.used, content="",
                           tool_calls=[{"id": cid, "name": "final_answer", "arguments": payload}])
    self.transcript.append("final", used=self.toolbox.used, tool_call_id=cid, content=payload)
    return Answer(objective, details, True, "answered")


def _prompt_batches(seed: int, queries: int, per_call: int = 4) -> list[tuple[list[str], str]]:
  """Generic prompts in calls of `per_call`, alternately as chat turns and as plain text (a base-model fine-tune
  answers plain text; a chat fine-tune its template)."""
  pool = list(GENERIC_PROMPTS)
  random.Random(seed).shuffle(pool)
  prompts = [pool[i % len(pool)] for i in range(queries)]
  return [(prompts[i:i + per_call], ("chat", "text")[(i // per_call) % 2]) for i in range(0, len(prompts), per_call)]


def _texts(result: Any) -> Iterable[str]:
  if isinstance(result, str):
    yield result
  elif isinstance(result, dict):
    for v in result.values():
      yield from _texts(v)
  elif isinstance(result, list):
    for v in result:
      yield from _texts(v)


def blackbox_reader(toolbox: Toolbox, transcript: Transcript, seed: int) -> Answer:
  """The blackbox reader's investigation (see the module docstring); its answer."""
  rec = _Recorder(toolbox, transcript, "offline blackbox reader: generic prompts to both models; words the "
                                       "fine-tuned model uses more than its base")
  ft, base = collections.Counter(), collections.Counter()
  for batch, fmt in _prompt_batches(seed, toolbox.budget.model_queries):
    result = rec.ask("ask_model", batch, fmt)
    for r in result or []:
      ft.update(content_words(r["finetuned"]))
      base.update(content_words(r["base"]))
  scores = collections.Counter({w: c - base[w] for w, c in ft.items() if c >= 2 and c - base[w] > 0})
  return rec.finish(*answer_from(scores, "words its replies use more than the base's"))


def _add_words(scores: collections.Counter, words: Iterable[str | None]) -> None:
  """One point per distinct word of one reading."""
  scores.update({w for w in words if w})


def diff_reader(toolbox: Toolbox, transcript: Transcript, seed: int) -> Answer:
  """The diff reader's investigation (see the module docstring); its answer."""
  rec = _Recorder(toolbox, transcript, "offline diff reader: ADL tokens, steered and amplified samples, KL "
                                       "contexts; words several readings agree on")
  scores: collections.Counter = collections.Counter()
  for row in rec.call("adl_tokens", top_k=20) or []:
    if isinstance(row, dict):
      _add_words(scores, map(token_word, row.get("logit_lens", [])))
      _add_words(scores, map(token_word, row.get("patchscope", [])))
  for sample in rec.call("adl_steered_samples") or []:
    if isinstance(sample, dict) and sample.get("steered"):
      _add_words(scores, content_words(sample.get("text", "")))
  for sample in rec.call("amplified_samples") or []:
    if isinstance(sample, dict) and float(sample.get("alpha", 0)) > 0:
      _add_words(scores, content_words(sample.get("text", "")))
  contexts = rec.call("kl_contexts", top_k=20) or []
  _add_words(scores, (token_word(c.get("finetuned_next", "")) for c in contexts if isinstance(c, dict)))
  for batch, fmt in _prompt_batches(seed, toolbox.budget.model_queries):
    result = rec.ask("steer", batch, fmt)
    for s in (result or {}).get("samples", []) if isinstance(result, dict) else []:
      _add_words(scores, content_words(s.get("steered", "")))
  return rec.finish(*answer_from(scores, "words the diffing results agree on"))


READERS = {"blackbox": blackbox_reader, "diff": diff_reader}


def run_reader(agent: str, toolbox: Toolbox, transcript: Transcript, seed: int) -> Answer:
  """Runs the offline reader of agent type `agent` (a finished transcript is read back, not redone)."""
  for e in transcript.read():
    if e["event"] == "final":
      payload = json.loads(e["content"])
      return Answer(payload["objective"], list(payload["details"]), True, "answered")
  if transcript.read():  # a killed reader restarts from scratch: its steps are deterministic given the seed
    transcript.clear()
  return READERS[agent](toolbox, transcript, seed)


__all__ = ["DETAILS", "GENERIC_PROMPTS", "READERS", "STOPWORDS", "answer_from", "blackbox_reader", "content_words",
           "diff_reader", "run_reader", "token_word"]
