"""Agents: what interpretability agents said a mystery organism was fine-tuned on, how their answers were graded, and
whether diffing results help (`launch.agent`'s `agents/` in the results root; files only, no agent is run here).

An agent (an LLM, or the offline reader) gets a fine-tuned organism: a `blackbox` agent may only chat with the
models, a `diff` agent may also read the diffing results. Each answer is graded 1..5 against the organism's card on
the broad objective and the specific details. The page shows the mean grade per agent type and organism, every
graded answer (scores.parquet), the comparison of the agent types (comparison.parquet, .png, .json) read as one
sentence per outcome (`analysis.verdicts.agent_verdicts`, the sentence the report prints), and a transcript browser.

Query parameters `organism=NAME`, `agent=TYPE`, `seed=S` pick the run whose transcript is shown; a value the
agents directory does not hold is refused with the valid ones, and nothing else is shown in its place. A missing
file is a sentence naming the command that writes it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.analysis.verdicts import AGENT_CI, OUTCOME_WORDS, QUANTITY_WORDS, agent_verdicts, sampler_warning
from neurodiff_jax.dashboard.views import _stamp, pick, query_param, set_param
from neurodiff_jax.dashboard.results import (
  AGENT_COMMAND,
  COMPARISON_COMMAND,
  AgentResults,
  AgentRun,
  OldResults,
  ResultsRoot,
  agent_command,
)

AGENT_ORDER = ("blackbox", "diff")  # the baseline first, then the agent with diffing results
SCORE_NAMES = {"agent": "agent", "objective": OUTCOME_WORDS["objective"], "details": OUTCOME_WORDS["details"],
               "stop_reason": "stop reason", "implementation": "implementation", "llm_model": "LLM",
               "grader": "grader", "model_queries": "model queries", "tool_calls": "tool calls",
               "objective_reason": f"{OUTCOME_WORDS['objective']}: why",
               "details_reason": f"{OUTCOME_WORDS['details']}: why"}
# Columns that split the mean grades further when they are not the same for every answer.
SPLIT_BY = (("scale", "scale"), ("implementation", "implementation"), ("llm_model", "LLM"), ("grader", "grader"))
_SHOWN = "agents_shown"  # session-state key: the (organism, agent) shown on the last rerun


def _agent_key(agent: str) -> tuple[int, str]:
  return (AGENT_ORDER.index(agent) if agent in AGENT_ORDER else len(AGENT_ORDER), agent)


@st.cache_resource(show_spinner=False, max_entries=16)
def _agents_read(path: str, what: str, stamp: float, _agents: AgentResults) -> Any:
  return getattr(_agents, what)()


def agents_read(agents: AgentResults, what: str) -> Any:
  """`agents.<what>()` cached by the file's modification time (what: scores, comparison, diagnostics)."""
  files = {"scores": "scores.parquet", "comparison": "comparison.parquet", "diagnostics": "comparison.json"}
  return _agents_read(str(agents.path), what, _stamp(agents.path / files[what]), agents)


@st.cache_resource(show_spinner=False, max_entries=32)
def _transcript(path: str, stamp: float, _run: AgentRun) -> tuple[list[dict[str, Any]], int]:
  return _run.transcript()


def _ordered(scores: pd.DataFrame) -> pd.DataFrame:
  key = scores["agent"].astype(str).map(lambda a: _agent_key(a)[0])
  return (scores.assign(_order=key).sort_values(["organism", "_order", "agent", "seed"], kind="stable")
          .drop(columns="_order").reset_index(drop=True))


def run_link(organism: str, agent: str, seed: int) -> str:
  """The page's URL showing one run's transcript."""
  return "/agent-results?" + urlencode({"organism": organism, "agent": agent, "seed": int(seed)})


def scores_table(scores: pd.DataFrame) -> pd.DataFrame:
  """Every graded answer as the page shows it: organism, agent, seed, both grades, stop reason, the rest, a link."""
  s = _ordered(scores)
  out = pd.DataFrame({"organism": s["organism"].astype(str), "agent": s["agent"].astype(str),
                      "seed": s["seed"].astype(int)})
  for col in ("objective", "details", "stop_reason", "implementation", "llm_model", "grader", "model_queries",
              "tool_calls", "objective_reason", "details_reason"):
    out[SCORE_NAMES[col]] = s[col].to_numpy()
  out["transcript"] = [run_link(o, a, d) for o, a, d in zip(out["organism"], out["agent"], out["seed"])]
  return out


def mean_grades(scores: pd.DataFrame) -> pd.DataFrame:
  """The mean grade per organism and agent type (split further by scale, implementation, LLM or grader where those
  differ between answers), with the number of graded answers."""
  keys = ["organism", "agent"] + [c for c, _ in SPLIT_BY if scores[c].astype(str).nunique() > 1]
  frame = scores.assign(**{k: scores[k].astype(str) for k in keys})
  rows = []
  for key, part in frame.groupby(keys, sort=False):
    row = dict(zip(keys, key))
    row["answers"] = len(part)
    for outcome, words in OUTCOME_WORDS.items():
      row[words] = float(pd.to_numeric(part[outcome]).mean())
    rows.append(row)
  out = pd.DataFrame(rows)
  out = out.assign(_order=out["agent"].map(lambda a: _agent_key(a)[0]))
  out = out.sort_values(["organism", "_order", *keys[1:]], kind="stable").drop(columns="_order")
  return out.rename(columns=dict(SPLIT_BY)).reset_index(drop=True)


def comparison_rows(comparison: pd.DataFrame) -> pd.DataFrame:
  """comparison.parquet with the outcomes and quantities in words (objective first, in QUANTITY_WORDS' order)."""
  c = comparison.copy()
  c["_o"] = c["outcome"].astype(str).map(lambda o: list(OUTCOME_WORDS).index(o) if o in OUTCOME_WORDS else 9)
  c["_q"] = c["quantity"].astype(str).map(lambda q: list(QUANTITY_WORDS).index(q) if q in QUANTITY_WORDS else 9)
  c = c.sort_values(["_o", "_q"], kind="stable")
  return pd.DataFrame({"outcome": [OUTCOME_WORDS.get(str(o), str(o)) for o in c["outcome"]],
                       "quantity": [QUANTITY_WORDS.get(str(q), str(q)) for q in c["quantity"]],
                       "mean": c["mean"].to_numpy(np.float64), f"{AGENT_CI} CI low": c["lo"].to_numpy(np.float64),
                       f"{AGENT_CI} CI high": c["hi"].to_numpy(np.float64)})


def fit_diagnostics(record: dict[str, Any]) -> dict[str, Any]:
  """One outcome's scalar diagnostics from comparison.json (flat, or under a "diagnostics" key)."""
  flat = {**record, **(record.get("diagnostics") or {})}
  return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _unreadable(error: Exception, path: Any, command: str) -> str:
  """The message for a file that exists but cannot be read (an OldResults names its own rerun)."""
  return str(error) if isinstance(error, OldResults) else f"{path} cannot be read ({error}). Rerun: `{command}`"


def render_grades(agents: AgentResults) -> pd.DataFrame | None:
  """The mean grades and every graded answer; returns scores.parquet (None when it is missing or unreadable)."""
  st.header("Grades")
  try:
    scores = agents_read(agents, "scores")
  except (OSError, ValueError) as e:
    st.error(_unreadable(e, agents.path / "scores.parquet", AGENT_COMMAND))
    return None
  if scores is None:
    st.info(f"No graded answers yet ({agents.path / 'scores.parquet'} is missing): `{AGENT_COMMAND}` runs the "
            "agents on an organism and grades their answers.")
    return None
  st.caption("Each answer is graded 1..5 against the organism's card: the broad objective of the fine-tuning, and "
             "its specific details (the taboo word, the false fact, ...).")
  st.subheader("Mean grade per agent type and organism")
  numbers = {w: st.column_config.NumberColumn(format="%.2f") for w in OUTCOME_WORDS.values()}
  st.dataframe(mean_grades(scores), hide_index=True, key="agents_means", column_config=numbers)
  st.subheader("Every graded answer")
  cut = scores[scores["stop_reason"].astype(str) != "answered"]
  if len(cut):
    counts = cut["stop_reason"].astype(str).value_counts()
    st.caption(f"{len(cut)} of {len(scores)} runs stopped before the agent answered on its own "
               f"({', '.join(f'{k}: {v}' for k, v in counts.items())}): each was graded on what it had by then.")
  st.dataframe(scores_table(scores), hide_index=True, key="agents_scores",
               column_config={"transcript": st.column_config.LinkColumn(display_text="open")})
  return scores


def render_comparison(agents: AgentResults) -> None:
  """The agent-type comparison: one sentence per outcome, the posterior table, the plot and the diagnostics."""
  st.header("Diff vs blackbox agents")
  try:
    comparison = agents_read(agents, "comparison")
  except (OSError, ValueError) as e:
    st.error(_unreadable(e, agents.path / "comparison.parquet", COMPARISON_COMMAND))
    return
  if comparison is None:
    st.info(f"No comparison of the agent types yet ({agents.path / 'comparison.parquet'} is missing): with several "
            f"seeds per agent type, `{COMPARISON_COMMAND}` fits it (hierarchical model: grade ~ agent type + organism "
            "+ seed).")
    return
  try:
    diagnostics = agents_read(agents, "diagnostics")
  except (OSError, ValueError) as e:
    st.error(_unreadable(e, agents.path / "comparison.json", COMPARISON_COMMAND))
    diagnostics = {}
  verdicts = agent_verdicts(comparison)
  with st.container(border=True, key="agents_verdict"):
    if not verdicts:
      st.markdown("**Verdict.** comparison.parquet holds no grade difference to read.")
    for outcome, verdict in verdicts.items():
      words = OUTCOME_WORDS.get(outcome, outcome)
      st.markdown(f"**{words[0].upper() + words[1:]}.** {verdict.sentence}")
      warning = sampler_warning(diagnostics.get(outcome, {}))
      if warning:
        st.warning(f"{words}: {warning}.")
  st.caption(f"Posterior of a hierarchical model of the grades (agent type + organism + seed effects), {AGENT_CI} "
             "credible intervals; differences are diff − blackbox, so a positive value favours the diff agent.")
  st.dataframe(comparison_rows(comparison), hide_index=True, key="agents_comparison")
  if agents.plot.is_file():
    st.image(str(agents.plot), caption="comparison.png")
  else:
    st.info(f"No comparison plot ({agents.plot} is missing): `{COMPARISON_COMMAND}` draws it with the table.")
  rows = [{"outcome": OUTCOME_WORDS.get(o, o), **fit_diagnostics(d)} for o, d in diagnostics.items()
          if isinstance(d, dict)]
  if rows:
    with st.expander("sampler diagnostics (comparison.json)"):
      st.dataframe(pd.DataFrame(rows), hide_index=True, key="agents_diagnostics")


def _pretty(arguments: Any) -> str:
  """A tool call's arguments (a JSON string) indented for reading; as given when it is not JSON."""
  try:
    return json.dumps(json.loads(arguments), indent=1, ensure_ascii=False)
  except (TypeError, ValueError):
    return str(arguments)


def render_event(i: int, event: dict[str, Any]) -> None:
  """One transcript event: text as written, tool calls with their arguments, errors and budget stops highlighted."""
  kind = str(event.get("event", "?"))
  content = event.get("content")
  text = "" if content is None else str(content)
  name = event.get("name")
  with st.container(border=True, key=f"agents_event_{i}"):
    st.caption(f"step {event.get('step', '?')} · {kind}" + (f" · {event['time']}" if event.get("time") else ""))
    if kind == "system":
      with st.expander("system prompt"):
        st.text(text)
    elif kind == "user":
      st.markdown("**user**")
      st.text(text)
    elif kind == "assistant":
      if text:
        st.markdown(text)
      for call in event.get("tool_calls") or []:
        st.markdown(f"**tool call** `{call.get('name', '?')}` (id `{call.get('id', '?')}`)")
        st.code(_pretty(call.get("arguments", "")), language="json", wrap_lines=True)
    elif kind == "tool_result":
      st.markdown(f"**`{name or '?'}` returned** (call `{event.get('tool_call_id', '?')}`)")
      st.code(text, language=None, wrap_lines=True)
    elif kind == "tool_error":
      st.error(f"tool error in `{name or '?'}`: {event.get('error') or text}")
    elif kind == "endpoint_error":
      st.error(f"LLM endpoint error: {event.get('error') or text}")
    elif kind == "budget":
      st.warning(f"budget: {text or event.get('error') or 'spent'}")
    elif kind == "final":
      st.success("final answer")
      st.code(text, language=None, wrap_lines=True)
    elif kind == "resume":
      st.info(f"resumed{': ' + text if text else ''}")
    else:
      st.warning(f"event '{kind}' is not one this page knows; as written:")
      st.json(event)


def render_answer(run: AgentRun, command: str) -> None:
  """The run's final answer (answer.json) and its grade with the grader's reasons (grade.json)."""
  answer = run.answer()
  st.subheader("Final answer")
  if answer is None:
    st.info(f"No answer.json: this run stopped before it answered (its transcript is below). `{command}` runs it "
            "again.")
  else:
    st.markdown(f"**{OUTCOME_WORDS['objective']}:** {answer.get('objective', '')}")
    details = [str(d) for d in answer.get("details") or []]
    st.markdown(f"**{OUTCOME_WORDS['details']}:**" + ("".join(f"\n- {d}" for d in details) if details else " none"))
    used, budget = answer.get("used") or {}, answer.get("budget") or {}
    reason = str(answer.get("stop_reason", "?"))
    st.caption(f"stop reason: {reason}; used {used.get('model_queries', '?')} of {budget.get('model_queries', '?')} "
               f"model queries and {used.get('tool_calls', '?')} of {budget.get('tool_calls', '?')} tool calls.")
    if reason != "answered" or not answer.get("finished", True):
      st.warning(f"This run did not finish on its own (stop reason: {reason}): the answer is what it had by then.")
  grade = run.grade()
  st.subheader("Grade")
  if grade is None:
    st.info(f"Not graded yet (no grade.json): `{command}` grades the answers it writes.")
    return
  reasons = grade.get("reasons") or {}
  cols = st.columns(2)
  for col, outcome in zip(cols, OUTCOME_WORDS):
    col.metric(OUTCOME_WORDS[outcome], f"{grade.get(outcome, '?')}/5")
    col.caption(str(reasons.get(outcome, "")))
  st.caption(f"grader: {grade.get('grader', '?')}")


def _drop_stale(param: str, options: list[str], key: str, changed: bool) -> None:
  """After the user changed the organism or agent, a URL value the new choice lacks came from the old selection,
  not from a link: it is dropped instead of refused."""
  if changed and query_param(param) is not None and query_param(param) not in options:
    set_param(param, None)
  if changed and st.session_state.get(key) not in options:
    st.session_state.pop(key, None)


def render_transcripts(agents: AgentResults, scores: pd.DataFrame | None) -> None:
  """The run browser: organism, agent and seed (URL parameters), then the answer, grade and transcript."""
  st.header("Transcripts")
  runs = agents.runs()
  if not runs and agents.exists:  # without an agents directory the page has said so already
    st.info(f"No agent runs in {agents.path / 'runs'}: `{AGENT_COMMAND}` writes one directory per agent and seed "
            "(transcript, answer, grade).")
  organisms = sorted({r.organism for r in runs})
  organism = pick("organism", organisms, "organism", key="agents_organism")
  if organism is None:  # none here, or one the URL names that no agent ran on: refused by pick
    return
  shown = st.session_state.get(_SHOWN)
  mine = [r for r in runs if r.organism == organism]
  types = sorted({r.agent for r in mine}, key=_agent_key)
  every = sorted({r.agent for r in runs}, key=_agent_key)
  _drop_stale("agent", types, "agents_agent", shown is not None and shown[0] != organism)
  agent = pick("agent type", types, "agent", key="agents_agent", noun="agent", every=every,
               why={a: f"no {a} agent ran on {organism}" for a in every if a not in types})
  if agent is None:
    return
  seeds = [str(r.seed) for r in mine if r.agent == agent]
  _drop_stale("seed", seeds, "agents_seed", shown is not None and tuple(shown) != (organism, agent))
  st.session_state[_SHOWN] = (organism, agent)
  others = sorted({str(r.seed) for r in runs} - set(seeds), key=int)
  seed = pick("seed", seeds, "seed", key="agents_seed",
              why={s: f"the {agent} agent on {organism} has no run with seed {s}" for s in others})
  if seed is None:
    return
  run = next(r for r in mine if r.agent == agent and str(r.seed) == seed)
  scale = None
  if scores is not None:
    scales = scores.loc[scores["organism"].astype(str) == organism, "scale"].astype(str).unique()
    scale = scales[0] if len(scales) == 1 else None
  command = agent_command(organism, scale)
  st.caption(f"`{run.path}`")
  try:
    render_answer(run, command)
    events, bad = _transcript(str(run.path), _stamp(run.path / "transcript.jsonl"), run)
  except (OSError, ValueError) as e:
    st.error(f"A file of {run.path} cannot be read ({e}). Rerun: `{command}`")
    return
  st.subheader("Transcript")
  if bad:
    st.warning(f"{bad} line(s) of transcript.jsonl could not be read (a run killed mid-write cuts its last line).")
  if not events:
    st.info(f"No transcript ({run.path / 'transcript.jsonl'} is missing or empty): `{command}` writes it.")
    return
  st.caption(f"{len(events)} events, in order.")
  for i, event in enumerate(events):
    render_event(i, event)


def render(root: ResultsRoot) -> None:
  """The agents page."""
  st.title("Agents")
  agents = root.agents
  st.caption("An agent (an LLM, or the offline reader) is handed a fine-tuned model organism and says what it was "
             "fine-tuned on. Blackbox agents may only chat with the models; diff agents may also read the diffing "
             f"results. From `{agents.path}`.")
  if not agents.exists:
    st.info(f"No agent results in {root.path}: `{AGENT_COMMAND}` runs the blackbox and diff agents on an organism "
            f"and grades their answers into {agents.path}; with several seeds per agent type, `{COMPARISON_COMMAND}` "
            "also fits the comparison of the agent types.")
    render_transcripts(agents, None)  # still refuses an organism the URL names
    return
  scores = render_grades(agents)
  render_comparison(agents)
  render_transcripts(agents, scores)


__all__ = ["AGENT_ORDER", "agents_read", "comparison_rows", "fit_diagnostics", "mean_grades", "render",
           "render_answer", "render_event", "render_transcripts", "run_link", "scores_table"]
