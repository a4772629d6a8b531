"""Agent runs on model pairs: each agent type × seed investigates, is graded, and the grades are compared.

For every target pair (an organism against the base, or one given checkpoint pair) this makes the
diffing results the diff agent reads (`diffing.run.diff`, reused when finished), then runs each agent
type once per seed with the same budget into `<root>/agents/runs/<target>/<agent>-s<seed>/`
(transcript.jsonl, answer.json, grade.json), rebuilds `<root>/agents/scores.parquet` from every run
found there, and, when both agent types and several seeds are graded, fits the hierarchical
comparison (comparison.parquet / .png / .json). A finished run is reused; a killed one resumes from
its transcript.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import pandas as pd

from neurodiff_jax.agents import grading, offline
from neurodiff_jax.agents.loop import AgentLoop, Transcript
from neurodiff_jax.agents.tools import AGENT_TYPES, Budget, Toolbox
from neurodiff_jax.utils.config import ConfigError, did_you_mean
from neurodiff_jax.utils.files import atomic_write_json
from neurodiff_jax.utils.paths import neurodiff_home
from neurodiff_jax.utils.results import AGENT_SCORE_COLUMNS, stamp

KINDS = ("offline", "llm")
SCORE_COLUMNS = list(AGENT_SCORE_COLUMNS)  # scores.parquet (utils/results.py: the dashboard reads it too)


def _log(msg: str) -> None:
  print(f"agent: {msg}", flush=True)


def agents_root(config: ml_collections.ConfigDict) -> Path:
  """`<root>/agents`, root = `config.root` or the demo's results root of the scale."""
  root = Path(config.root).expanduser() if config.root else neurodiff_home() / "demo" / str(config.scale)
  return root / "agents"


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the fix for settings that cannot work, before any model is loaded."""
  if config.kind not in KINDS:
    raise ConfigError(f"config.kind={config.kind!r}{did_you_mean(str(config.kind), KINDS)}; kinds: offline (the "
                      "readers, no LLM), llm (an OpenAI-compatible endpoint).")
  for a in config.agents:
    if a not in AGENT_TYPES:
      raise ConfigError(f"config.agents has {a!r}{did_you_mean(str(a), AGENT_TYPES)}; agent types: "
                        f"{', '.join(AGENT_TYPES)}.")
  if not config.agents:
    raise ConfigError("config.agents is empty; give blackbox, diff or both.")
  if not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in config.seeds):
    raise ConfigError(f"config.seeds={tuple(config.seeds)!r} must be a non-empty tuple of integers, e.g. (0, 1, 2).")
  if int(config.budget.model_queries) < 1 or int(config.budget.tool_calls) < 1:
    raise ConfigError(f"config.budget model_queries={config.budget.model_queries} and tool_calls="
                      f"{config.budget.tool_calls} must both be at least 1.")
  if config.kind == "llm" and (not config.llm.base_url or not config.llm.model):
    raise ConfigError("config.kind=llm needs --config.llm.base_url=URL (an OpenAI-compatible server) and "
                      "--config.llm.model=NAME (key in $" + str(config.llm.key_env) + "); or --config.kind=offline.")
  if config.grader.kind not in ("offline", "llm"):
    raise ConfigError(f"config.grader.kind={config.grader.kind!r}; graders: offline, llm.")
  if config.grader.kind == "llm" and not ((config.grader.base_url or config.llm.base_url) and
                                          (config.grader.model or config.llm.model)):
    raise ConfigError("config.grader.kind=llm needs an endpoint: --config.grader.base_url and --config.grader.model "
                      "(or the agent's llm.base_url / llm.model); or --config.grader.kind=offline.")
  if not config.finetuned_model:
    from neurodiff_jax.organisms.finetune_data import ORGANISMS

    for t in config.targets:
      if t not in ORGANISMS:
        raise ConfigError(f"config.targets has {t!r}{did_you_mean(str(t), ORGANISMS)}; organisms: "
                          f"{', '.join(ORGANISMS)} (or set config.finetuned_model to a checkpoint).")


def targets(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(name, base ref, fine-tuned ref) of each pair to investigate."""
  if config.finetuned_model:
    ft = str(config.finetuned_model)
    name = ft.split(":", 1)[1] if ft.startswith("organism:") else Path(ft).expanduser().name
    return [(name, str(config.base_model), ft)]
  return [(t, str(config.base_model), f"organism:{t}") for t in config.targets]


def _client(cfg: ml_collections.ConfigDict, base_url: str = "", model: str = "") -> Any:
  from neurodiff_jax.agents.llm import ChatClient

  return ChatClient(base_url or cfg.base_url, model or cfg.model, key_env=str(cfg.key_env),
                    timeout_s=float(cfg.timeout_s), retries=int(cfg.retries), temperature=float(cfg.temperature),
                    max_tokens=int(cfg.max_tokens))


def make_grader(config: ml_collections.ConfigDict) -> Any:
  """The configured grader (offline rubric, or the rubric read by the endpoint)."""
  if config.grader.kind == "offline":
    return grading.OfflineGrader()
  return grading.LLMGrader(_client(config.llm, config.grader.base_url, config.grader.model))


def _diff_results(config: ml_collections.ConfigDict, name: str, base: str, ft: str, log: Callable[[str], None]) -> Path:
  """The pair's diffing results (made with `config.diff`, reused when finished): its `diff/` directory."""
  from neurodiff_jax.diffing import run as diff_run

  d = ml_collections.ConfigDict(config.diff.to_dict())
  d.base_model, d.finetuned_model, d.organisms = base, ft, config.organisms
  d.out_dir = str(agents_root(config).parent / "diffs" / name)
  d.progress = bool(config.progress)
  return Path(diff_run.diff(d, log=lambda m: log(f"{name}: diff: {m}"))["results_dir"]) / "diff"


def _crosscoder_dir(config: ml_collections.ConfigDict, name: str) -> Path | None:
  if config.crosscoder_run:
    return Path(config.crosscoder_run).expanduser()
  default = agents_root(config).parent / "runs" / "batchtopk" / "analysis"
  return default if name == "chat" and (default / "latents.parquet").is_file() else None


def run_one(config: ml_collections.ConfigDict, name: str, agent: str, seed: int, pair: Callable[[], Any],
            card: dict | None, diff_dir: Path | None, grader: Any, log: Callable[[str], None]) -> dict[str, Any] | None:
  """One agent run (reused when answered, resumed when killed), graded against `card`; its scores-table row (None
  without a card: the answer is kept, ungraded)."""
  run_dir = agents_root(config) / "runs" / name / f"{agent}-s{seed}"
  answer_file, grade_file = run_dir / "answer.json", run_dir / "grade.json"
  if config.force and run_dir.exists():
    for f in ("transcript.jsonl", "answer.json", "grade.json"):
      (run_dir / f).unlink(missing_ok=True)
  if not answer_file.is_file():
    run_dir.mkdir(parents=True, exist_ok=True)
    toolbox = Toolbox(agent, Budget(int(config.budget.model_queries), int(config.budget.tool_calls)), pair=pair,
                      diff_dir=diff_dir, crosscoder_dir=_crosscoder_dir(config, name),
                      new_tokens=int(config.generation.new_tokens), temperature=float(config.generation.temperature),
                      seed=seed)
    transcript = Transcript(run_dir / "transcript.jsonl")
    if config.kind == "offline":
      answer = offline.run_reader(agent, toolbox, transcript, seed)
    else:
      answer = AgentLoop(_client(config.llm), toolbox, run_dir, seed=seed, max_turns=int(config.llm.max_turns) or None,
                         log=log).run()
    grade_file.unlink(missing_ok=True)  # a new answer is graded anew
    atomic_write_json(answer_file, stamp({
        **answer.to_json(), "agent": agent, "organism": name, "scale": str(config.scale), "seed": seed,
        "implementation": str(config.kind), "llm_model": str(config.llm.model) if config.kind == "llm" else "",
        "used": dict(toolbox.used), "budget": dataclasses.asdict(toolbox.budget)}))
  saved = json.loads(answer_file.read_text())
  if card is None:
    log(f"{name}: {agent} seed {seed}: answered ({saved['stop_reason']}): {saved['objective']!r}; not graded (the "
        "fine-tuned model has no card.json)")
    return None
  if not grade_file.is_file():
    g = grader.grade(card, saved["objective"], saved["details"])
    atomic_write_json(grade_file, {"objective": g.objective, "details": g.details, "grader": g.grader,
                                   "reasons": {"objective": g.objective_reason, "details": g.details_reason}})
    log(f"{name}: {agent} seed {seed}: objective {g.objective}/5, details {g.details}/5 ({saved['stop_reason']}; "
        f"{saved['used']['model_queries']} queries, {saved['used']['tool_calls']} tool calls)")
  return score_row(agents_root(config), run_dir)


def score_row(root: Path, run_dir: Path) -> dict[str, Any]:
  """The scores-table row of a finished run directory."""
  a = json.loads((run_dir / "answer.json").read_text())
  g = json.loads((run_dir / "grade.json").read_text())
  return {"organism": a["organism"], "scale": a.get("scale", ""), "agent": a["agent"],
          "implementation": a.get("implementation", "offline"), "llm_model": a.get("llm_model", ""),
          "seed": int(a["seed"]), "grader": g["grader"], "objective": int(g["objective"]),
          "details": int(g["details"]), "objective_reason": g["reasons"]["objective"],
          "details_reason": g["reasons"]["details"], "model_queries": int(a["used"]["model_queries"]),
          "tool_calls": int(a["used"]["tool_calls"]), "stop_reason": a["stop_reason"],
          "run_dir": str(run_dir.relative_to(root))}


def scores_table(root: Path) -> pd.DataFrame:
  """Every graded run under `root/runs` as the scores table (SCORE_COLUMNS)."""
  rows = [score_row(root, d) for d in sorted((root / "runs").glob("*/*"))
          if (d / "answer.json").is_file() and (d / "grade.json").is_file()]
  return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def compare(root: Path, scores: pd.DataFrame, cfg: ml_collections.ConfigDict, log: Callable[[str], None]) -> bool:
  """The hierarchical comparison of diff vs blackbox grades (one implementation's rows), when there is enough."""
  from neurodiff_jax.agents import comparison

  if set(scores.agent) != {"diff", "blackbox"} or scores.seed.nunique() < 2:
    log(f"comparison: needs both agent types and >= 2 seeds (have agents {sorted(set(scores.agent))}, "
        f"{scores.seed.nunique()} seed(s)); not fitted")
    return False
  results = [comparison.compare(scores, outcome, num_warmup=int(cfg.num_warmup), num_samples=int(cfg.num_samples),
                                num_chains=int(cfg.num_chains)) for outcome in ("objective", "details")]
  comparison.comparison_table(results).to_parquet(root / "comparison.parquet", index=False)
  comparison.plot(results, root / "comparison.png")
  atomic_write_json(root / "comparison.json", stamp({r["outcome"]: r for r in results}))
  for r in results:
    log(f"comparison {r['outcome']}: " + json.dumps({k: r[k] for k in ("beta", "grade_difference") if k in r}))
  return True


def run_agents(config: ml_collections.ConfigDict, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Runs every target × agent type × seed; returns {"root": agents dir, "scores": rows, "compared": bool}."""
  check_config(config)
  from neurodiff_jax.diffing.context import load_pair, read_card, resolve_model

  root = agents_root(config)
  root.mkdir(parents=True, exist_ok=True)
  grader = make_grader(config)
  for name, base_ref, ft_ref in targets(config):
    base = resolve_model(base_ref, config.organisms)
    ft = resolve_model(ft_ref, config.organisms)
    card = read_card(ft)
    if card is None:
      log(f"{name}: {ft} has no card.json (ground truth): the agents run and answer, but nothing is graded")
    else:
      grading.card_kind(card)  # a card no rubric reads: say so before any run
    diff_dir = _diff_results(config, name, base_ref, ft_ref, log) if "diff" in config.agents else None
    loaded: dict[str, Any] = {}

    def pair(base=base, ft=ft, loaded=loaded) -> Any:
      if "pair" not in loaded:
        loaded["pair"] = load_pair(base, ft)
      return loaded["pair"]

    for seed in config.seeds:
      for agent in config.agents:
        run_one(config, name, agent, int(seed), pair, card, diff_dir, grader, log)
  scores = scores_table(root)
  scores.to_parquet(root / "scores.parquet", index=False)
  log(f"scores: {len(scores)} graded runs in {root / 'scores.parquet'}")
  for (org, agent), part in scores.groupby(["organism", "agent"]):
    log(f"  {org:10s} {agent:8s} objective {part.objective.mean():.2f}  details {part.details.mean():.2f} "
        f"(n={len(part)})")
  # One implementation per comparison: offline readers and LLM agents are different experiments.
  compared = compare(root, scores[scores.implementation == config.kind], config.comparison, log)
  return {"root": str(root), "scores": scores.to_dict("records"), "compared": compared}


__all__ = ["KINDS", "SCORE_COLUMNS", "agents_root", "check_config", "compare", "make_grader", "run_agents", "run_one",
           "score_row", "scores_table", "targets"]
