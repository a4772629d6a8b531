"""What a results root holds: crosscoder runs (training workdirs with their analysis) and diff results.

`discover(path)` walks a results root a few levels deep and finds every crosscoder run (a directory with
`analysis/summary.json`, or with `tensorboard/metrics.jsonl` beside `checkpoints/`) and every diff result
(a directory with `diff/pair.json`), whatever wrote them: `launch.demo`'s `ROOT/runs/<name>` and
`ROOT/diffs/<name>`, or workdirs of `launch.train` / `launch.analyze` / `launch.diff` gathered by hand (symlinks
are followed). `demo.json`, when present, only gives the names. Files are read on demand, uncached (the app
caches them); a run or diff written by an older neurodiff-jax keeps its place in the lists with `error` naming
the command that rewrites it, so one old directory never hides the others.

`ResultsRoot.agents` is `launch.agent`'s `ROOT/agents/` (`AgentResults`): graded scores, the comparison of the
agent types, and one directory per agent run (`runs/<organism>/<agent>-s<seed>/`: transcript, answer, grade).
Each of its files may be missing (agents not run, comparison not fitted, a run killed before it answered); the
readers return None for a missing file and the pages say which command writes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurodiff_jax.utils.results import (AGENT_COMMAND, AGENT_COMPARISON_COLUMNS, AGENT_SCORE_COLUMNS,
                                          COMPARISON_COMMAND, OldResults, agent_command, check_format)

MAX_DEPTH = 5  # ROOT/runs/<name>/analysis/diff is the deepest layout the launchers write
# Directories that never hold a run or a diff and can be large (stores, checkpoints, models).
# `agents` holds launch.agent's transcripts, read through ResultsRoot.agents instead.
_SKIP = {"checkpoints", "tensorboard", "diff", "activations", "organisms", "hf_cache", "__pycache__", "node_modules",
         "agents"}


class NoResults(FileNotFoundError):
  """A results root that is missing or holds no crosscoder run and no diff result."""


def _make_command() -> str:
  return ("make results with `python -m launch.demo` (organisms, two crosscoders, their analysis and ADL in one "
          "command), or train and analyse a crosscoder with `python -m launch.train` then "
          "`python -m launch.analyze --config.workdir=RUN` (and `python -m launch.diff` for the activation-difference "
          "methods), then point the dashboard at that directory (`--results DIR` or $NEURODIFF_RESULTS)")


def analyze_command(run_path: str | Path) -> str:
  """The command that rewrites a run's analysis."""
  return f"python -m launch.analyze --config.workdir={run_path} --config.force=True"


def diff_command(result_path: str | Path, pair: dict[str, Any] | None = None) -> str:
  """The command that rewrites a diff result (`pair`: its pair.json, for the two models)."""
  pair = pair or {}
  models = f"--config.base_model={pair.get('base', 'BASE')} --config.finetuned_model={pair.get('finetuned', 'FT')} "
  return f"python -m launch.diff --config=diff {models}--config.out_dir={result_path} --config.force=True"


def _read_json(path: Path) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _missing(path: Path, what: str, command: str) -> FileNotFoundError:
  return FileNotFoundError(f"{path} is missing ({what}); make it with `{command}`")


@dataclasses.dataclass
class Run:
  """A crosscoder run: a `launch.train` workdir, with `launch.analyze`'s `analysis/` when it has been analysed."""
  name: str
  path: Path
  analysis: Path | None = None
  error: str | None = None  # why its analysis cannot be read (an older format), with the command that fixes it

  def _analysis_file(self, name: str) -> Path:
    if self.error:
      raise OldResults(self.error)
    if self.analysis is None:
      raise _missing(self.path / "analysis", "the run has not been analysed", analyze_command(self.path))
    path = self.analysis / name
    if not path.is_file():
      raise _missing(path, "written by launch.analyze", analyze_command(self.path))
    return path

  def summary(self) -> dict[str, Any]:
    """`analysis/summary.json` (format-checked: OldResults names the rerun)."""
    path = self._analysis_file("summary.json")
    record = _read_json(path)
    check_format(record, path, analyze_command(self.path))
    return record

  def config(self) -> dict[str, Any]:
    """The run's training config (from its checkpoint; else what the analysis summary and metrics record)."""
    if (self.path / "checkpoints").is_dir():
      # Orbax is imported only when a run has checkpoints.
      from neurodiff_jax.crosscoder.checkpoint import load_run_config
      try:
        step, saved = load_run_config(self.path)
      except Exception:  # noqa: BLE001  an unreadable checkpoint still leaves the summary's account
        saved = None
      if saved is not None:
        return {**saved.get("run", {}), **{f"crosscoder.{k}": v for k, v in saved.get("crosscoder", {}).items()},
                "checkpoint_step": step}
    out: dict[str, Any] = {}
    if self.analysis is not None and (self.analysis / "summary.json").is_file() and not self.error:
      s = _read_json(self.analysis / "summary.json")
      out.update({k: s[k] for k in ("sparsity", "k", "dict_size", "layer", "store", "checkpoint_step", "run")
                  if k in s})
    metrics = self.final_metrics()
    if "l1_lambda" in metrics:
      out.setdefault("l1_lambda", metrics["l1_lambda"])
    return out

  def metrics_history(self) -> pd.DataFrame:
    """One row per training log step (`tensorboard/metrics.jsonl`); empty without one."""
    path = self.path / "tensorboard" / "metrics.jsonl"
    if not path.is_file():
      return pd.DataFrame()
    rows = []
    with open(path, encoding="utf-8") as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return pd.DataFrame(rows)

  def final_metrics(self) -> dict[str, Any]:
    """`metrics.json`: the run's last logged metrics ({} before training has finished)."""
    path = self.path / "metrics.json"
    return _read_json(path) if path.is_file() else {}

  def latents(self) -> pd.DataFrame:
    """The latent table (`analysis/latents.parquet`, docs/analysis.md)."""
    return pd.read_parquet(self._analysis_file("latents.parquet"))

  def examples(self) -> pd.DataFrame:
    """Top and per-quantile contexts of the latents that have them (`analysis/examples.parquet`)."""
    return pd.read_parquet(self._analysis_file("examples.parquet"))

  def latent_logit_lens(self) -> pd.DataFrame:
    """Tokens each shown latent's chat decoder row promotes / suppresses (`analysis/logit_lens.parquet`)."""
    return pd.read_parquet(self._analysis_file("logit_lens.parquet"))

  def latent_histograms(self) -> dict[str, np.ndarray]:
    """`analysis/latent_histograms.npz`: counts [m, bins] of each latent's activations over every analysed token, and
    the bins' nominal edges [bins + 1] (bin 0 reaches down to 0, the last up to ∞; docs/analysis.md)."""
    with np.load(self._analysis_file("latent_histograms.npz")) as z:
      return {"counts": np.asarray(z["counts"]), "edges": np.asarray(z["edges"])}

  def table(self, file: str) -> pd.DataFrame:
    """Any other analysis table by file name (`causal.parquet`, `steering.parquet`)."""
    return pd.read_parquet(self._analysis_file(file if "." in file else f"{file}.parquet"))

  def has(self, file: str) -> bool:
    """Whether the analysis wrote `file` (and is readable)."""
    return self.error is None and self.analysis is not None and (self.analysis / file).is_file()

  def models(self) -> tuple[str, str] | None:
    """(base path, fine-tuned path) of the pair the crosscoder was trained on (None when nothing records it)."""
    records: list[dict[str, Any]] = []
    if self.analysis is not None and (self.analysis / "summary.json").is_file():
      records = _read_json(self.analysis / "summary.json").get("models", [])
    if not records:
      store = self.config().get("store")
      manifest = Path(store) / "manifest.json" if store else None
      if manifest is not None and manifest.is_file():
        records = _read_json(manifest).get("models", [])
    return _pair_of(records)


def _pair_of(records: list[dict[str, Any]]) -> tuple[str, str] | None:
  base = [r["path"] for r in records if r.get("role") == "base"]
  ft = [r["path"] for r in records if r.get("role") == "finetuned"]
  if base and ft:
    return str(base[0]), str(ft[0])
  if len(records) >= 2:  # no roles: model 0 is the base (the store's convention)
    return str(records[0]["path"]), str(records[1]["path"])
  return None


@dataclasses.dataclass
class DiffResult:
  """`launch.diff`'s results: `path/diff/pair.json` and a directory per method (`path/diff/<method>/`)."""
  name: str
  path: Path
  methods: list[str] = dataclasses.field(default_factory=list)
  error: str | None = None

  @property
  def diff_dir(self) -> Path:
    """The `diff/` directory."""
    return self.path / "diff"

  def pair(self) -> dict[str, Any]:
    """`diff/pair.json`: the base and fine-tuned models, the pair's key, the organism card, the datasets."""
    path = self.diff_dir / "pair.json"
    record = _read_json(path)
    check_format(record, path, diff_command(self.path, record))
    return record

  def _file(self, method: str, file: str) -> Path:
    if self.error:
      raise OldResults(self.error)
    path = self.diff_dir / method / file
    if not path.is_file():
      raise _missing(path, f"written by launch.diff's {method}", diff_command(self.path, _read_json(
          self.diff_dir / "pair.json")) + f" --config.methods='(\"{method}\",)'")
    return path

  def table(self, method: str, file: str) -> pd.DataFrame:
    """A method's table (`table("adl", "logit_lens")` reads `diff/adl/logit_lens.parquet`)."""
    return pd.read_parquet(self._file(method, file if "." in file else f"{file}.parquet"))

  def has(self, method: str, file: str) -> bool:
    """Whether `diff/<method>/<file>` exists (and the result is readable)."""
    return self.error is None and (self.diff_dir / method / file).is_file()

  def done(self, method: str) -> dict[str, Any]:
    """A method's `done.json` summary ({} when absent)."""
    path = self.diff_dir / method / "done.json"
    return _read_json(path).get("summary", {}) if path.is_file() and not self.error else {}

  def adl_means(self) -> dict[str, np.ndarray] | None:
    """ADL's `means.npz` (layers [L], positions [P] labels, delta [L, P, D], norm_ft, typical_norm_ft...) or None."""
    if not self.has("adl", "means.npz"):
      return None
    with np.load(self.diff_dir / "adl" / "means.npz") as f:
      means = {k: np.asarray(f[k]) for k in f.files}
    if "positions" not in means:  # written before position labels were kept: 0..n-1
      means["positions"] = np.arange(means["delta"].shape[1], dtype=np.int64)
    return means

  def models(self) -> tuple[str, str] | None:
    """(base path, fine-tuned path) from pair.json."""
    try:
      record = _read_json(self.diff_dir / "pair.json")
    except (OSError, json.JSONDecodeError):
      return None
    return (str(record["base"]), str(record["finetuned"])) if "base" in record and "finetuned" in record else None


SCORE_COLUMNS = AGENT_SCORE_COLUMNS
COMPARISON_COLUMNS = AGENT_COMPARISON_COLUMNS
_AGENT_RUN = re.compile(r"^(?P<agent>.+)-s(?P<seed>\d+)$")  # runs/<organism>/<agent>-s<seed>


def _optional_json(path: Path) -> dict[str, Any] | None:
  """A JSON file's object, None when it does not exist (a file that does exist but cannot be parsed raises)."""
  return _read_json(path) if path.is_file() else None


def _columns(frame: pd.DataFrame, path: Path, wanted: tuple[str, ...], rerun: str) -> pd.DataFrame:
  missing = [c for c in wanted if c not in frame.columns]
  if missing:
    raise OldResults(f"{path} lacks the column(s) {', '.join(missing)}: it was written by another version of "
                     f"launch.agent. Rerun: {rerun}")
  return frame


@dataclasses.dataclass
class AgentRun:
  """One agent's run on one organism: `agents/runs/<organism>/<agent>-s<seed>/`."""
  organism: str
  agent: str
  seed: int
  path: Path

  def transcript(self) -> tuple[list[dict[str, Any]], int]:
    """The transcript's events in file order, and how many lines could not be read (a killed run cuts its last)."""
    path = self.path / "transcript.jsonl"
    if not path.is_file():
      return [], 0
    events, bad = [], 0
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          event = json.loads(line)
        except json.JSONDecodeError:
          bad += 1
          continue
        if isinstance(event, dict):
          events.append(event)
        else:
          bad += 1
    return events, bad

  def answer(self) -> dict[str, Any] | None:
    """`answer.json`: the final structured answer, the stop reason and the budget used (None before it answered)."""
    return _optional_json(self.path / "answer.json")

  def grade(self) -> dict[str, Any] | None:
    """`grade.json`: both grades (1..5), the grader and its reasons (None before grading)."""
    return _optional_json(self.path / "grade.json")


@dataclasses.dataclass
class AgentResults:
  """`launch.agent`'s results under a results root: `agents/` (every file optional)."""
  path: Path

  @property
  def exists(self) -> bool:
    """Whether the agents directory exists at all."""
    return self.path.is_dir()

  @property
  def plot(self) -> Path:
    """comparison.png: the posterior of the agent-type difference."""
    return self.path / "comparison.png"

  def scores(self) -> pd.DataFrame | None:
    """scores.parquet, one row per graded answer (None when absent; OldResults when a column is missing)."""
    path = self.path / "scores.parquet"
    if not path.is_file():
      return None
    return _columns(pd.read_parquet(path), path, SCORE_COLUMNS, AGENT_COMMAND)

  def comparison(self) -> pd.DataFrame | None:
    """comparison.parquet: outcome, quantity, mean and 90% interval (None when the comparison was not fitted)."""
    path = self.path / "comparison.parquet"
    if not path.is_file():
      return None
    return _columns(pd.read_parquet(path), path, COMPARISON_COLUMNS, COMPARISON_COMMAND)

  def diagnostics(self) -> dict[str, Any]:
    """comparison.json: the sampler's diagnostics per outcome ({} when absent)."""
    return _optional_json(self.path / "comparison.json") or {}

  def runs(self) -> list[AgentRun]:
    """Every run directory, by organism, agent and seed (directories not named `<agent>-s<seed>` are not runs)."""
    out = []
    base = self.path / "runs"
    if not base.is_dir():
      return out
    for org in sorted(p for p in base.iterdir() if p.is_dir()):
      for d in sorted(p for p in org.iterdir() if p.is_dir()):
        hit = _AGENT_RUN.match(d.name)
        if hit:
          out.append(AgentRun(org.name, hit["agent"], int(hit["seed"]), d))
    return sorted(out, key=lambda r: (r.organism, r.agent, r.seed))


@dataclasses.dataclass
class ResultsRoot:
  """Everything under one results directory."""
  path: Path
  runs: list[Run]
  diffs: list[DiffResult]
  demo: dict[str, Any] | None = None  # demo.json, when launch.demo wrote the root

  @property
  def agents(self) -> AgentResults:
    """`launch.agent`'s results in this root (`agents/`; `.exists` says whether there are any)."""
    return AgentResults(self.path / "agents")

  def run(self, name: str) -> Run:
    """The run called `name` (KeyError naming the known runs)."""
    for r in self.runs:
      if r.name == name:
        return r
    raise KeyError(f"no run {name!r} under {self.path}; runs: {[r.name for r in self.runs]}")

  def diff(self, name: str) -> DiffResult:
    """The diff result called `name` (KeyError naming the known ones)."""
    for d in self.diffs:
      if d.name == name:
        return d
    raise KeyError(f"no diff result {name!r} under {self.path}; diffs: {[d.name for d in self.diffs]}")

  def model_pairs(self) -> list[tuple[str, str]]:
    """Distinct (base, fine-tuned) checkpoint pairs the runs and diffs were made from, in discovery order."""
    out: list[tuple[str, str]] = []
    for item in [*self.runs, *self.diffs]:
      try:
        pair = item.models()
      except (OSError, json.JSONDecodeError):
        pair = None
      if pair is not None and pair not in out:
        out.append(pair)
    return out


def _is_run(d: Path) -> bool:
  return (d / "analysis" / "summary.json").is_file() or (
      (d / "tensorboard" / "metrics.jsonl").is_file() and (d / "checkpoints").is_dir())


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
  """(run dirs, diff result dirs) under `root`, breadth-first, at most MAX_DEPTH levels, symlinks followed once."""
  runs, diffs, seen = [], [], set()
  level = [root]
  for _ in range(MAX_DEPTH + 1):
    nxt = []
    for d in level:
      try:
        real = d.resolve()
      except OSError:
        continue
      if real in seen:
        continue
      seen.add(real)
      if _is_run(d):
        runs.append(d)
      if (d / "diff" / "pair.json").is_file():
        diffs.append(d)
      try:
        children = sorted(os.scandir(d), key=lambda e: e.name)
      except OSError:
        continue
      nxt.extend(Path(e.path) for e in children
                 if e.name not in _SKIP and not e.name.startswith(".") and e.is_dir(follow_symlinks=True))
    level = nxt
  return runs, diffs


def _names(root: Path, dirs: list[Path], given: dict[str, str]) -> list[str]:
  """A short unique name per directory: demo.json's, else the directory's, else its path under the root."""
  by_path = {str((root / p).resolve()): n for n, p in given.items()}
  # A diff written into a run's analysis directory is named after the run.
  base = [by_path.get(str(d.resolve()), d.parent.name if d.name == "analysis" else d.name) for d in dirs]
  out = []
  for d, n in zip(dirs, base):
    if base.count(n) > 1 and str(d.resolve()) not in by_path:
      n = d.relative_to(root).as_posix() if d != root else d.name
    out.append(n)
  return out


def _read_error(read: Callable[[], Any], path: Path, rerun: str) -> str | None:
  """None when `read()` (of the file at `path`) works, else the message the pages show, naming `rerun`."""
  try:
    read()
  except OldResults as e:
    return str(e)
  except (OSError, json.JSONDecodeError) as e:
    return f"{path} cannot be read ({e}). Rerun: {rerun}"
  return None


def discover(path: str | Path) -> ResultsRoot:
  """Every crosscoder run and diff result under `path` (NoResults, naming the command to run, when there are none)."""
  root = Path(path).expanduser()
  if not root.is_dir():
    raise NoResults(f"results directory {root} does not exist: {_make_command()}.")
  demo = None
  if (root / "demo.json").is_file():
    try:
      demo = _read_json(root / "demo.json")
    except (OSError, json.JSONDecodeError):
      demo = None
  run_dirs, diff_dirs = _walk(root)
  if not run_dirs and not diff_dirs:
    raise NoResults(f"no crosscoder runs or diff results under {root}: {_make_command()}.")
  runs = []
  for name, d in zip(_names(root, run_dirs, (demo or {}).get("runs", {})), run_dirs):
    analysis = d / "analysis" if (d / "analysis" / "summary.json").is_file() else None
    run = Run(name=name, path=d, analysis=analysis)
    if analysis is not None:
      run.error = _read_error(run.summary, analysis / "summary.json", analyze_command(d))
    runs.append(run)
  diffs = []
  for name, d in zip(_names(root, diff_dirs, (demo or {}).get("diffs", {})), diff_dirs):
    methods = sorted(e.name for e in os.scandir(d / "diff") if e.is_dir() and (Path(e.path) / "done.json").is_file())
    result = DiffResult(name=name, path=d, methods=methods)
    result.error = _read_error(result.pair, d / "diff" / "pair.json", diff_command(d))
    diffs.append(result)
  return ResultsRoot(path=root, runs=runs, diffs=diffs, demo=demo)


__all__ = ["AGENT_COMMAND", "COMPARISON_COLUMNS", "COMPARISON_COMMAND", "MAX_DEPTH", "SCORE_COLUMNS", "AgentResults",
           "AgentRun", "DiffResult", "NoResults", "OldResults", "ResultsRoot", "Run", "agent_command",
           "analyze_command", "diff_command", "discover"]
