"""The demo's stages, in order, each reusing what it finds finished (so a killed demo rerun finishes the rest).

  organisms  build (or reuse) the base, `chat` and `narrow` organisms          organisms.build
  harvest    paired base/chat activations of general text and conversations   activations.harvest
  train      a BatchTopK and an L1 crosscoder on that store                    crosscoder.train
  analyze    Δnorm classes, latent scaling, causal KL, examples of each        analysis.analyze
  adl        ADL and per-token KL of base vs each diff organism (narrow, ...)   diffing.run
  report     the story, in order, as one self-contained report.html            demo.story

The results root holds `runs/<name>/` (crosscoder workdirs with `analysis/`), `diffs/narrow/`,
`report.html` and `demo.json` (what ran, how long each stage took, format stamp); organisms and the
store stay in `$NEURODIFF_HOME`'s shared caches, where the step-by-step commands find them too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.files import atomic_write_json
from neurodiff_jax.utils.paths import neurodiff_home
from neurodiff_jax.utils.results import stamp

STAGES = ("organisms", "harvest", "train", "analyze", "adl", "report")
FORCEABLE = ("analyze", "adl", "report")  # the others only build what is missing (rebuilding = deleting the cache)


def _log(msg: str) -> None:
  print(f"demo: {msg}", flush=True)


def results_root(config: ml_collections.ConfigDict) -> Path:
  """`config.root`, else `$NEURODIFF_HOME/demo/<scale>`."""
  return Path(config.root).expanduser() if config.root else neurodiff_home() / "demo" / str(config.scale)


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the fix for an unknown stage in force_stages."""
  for s in config.force_stages:
    if s not in FORCEABLE:
      raise ConfigError(f"config.force_stages has {s!r}; stages that can be forced: {', '.join(FORCEABLE)} "
                        "(organisms, the store and trained runs are rebuilt by deleting them).")


def _copy(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked deep copy (the library functions may fill in fields)."""
  return ml_collections.ConfigDict(c.to_dict())


def run_demo(config: ml_collections.ConfigDict, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Runs every stage into the results root; returns the manifest written to `<root>/demo.json`."""
  check_config(config)
  root = results_root(config)
  root.mkdir(parents=True, exist_ok=True)
  manifest_path = root / "demo.json"
  manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
  diff_organisms = tuple(config.get("diff_organisms", ("narrow",)))
  manifest.update(scale=str(config.scale), runs={n: f"runs/{n}" for n in config.crosscoders},
                  diffs={n: f"diffs/{n}" for n in diff_organisms})
  manifest.setdefault("stages", {})
  t_all = time.time()

  def stage(i: int, name: str, what: str, fn: Callable[[], Any]) -> Any:
    log(f"[{i}/{len(STAGES)}] {name}: {what}")
    t = time.time()
    out = fn()
    seconds = round(time.time() - t, 1)
    # `seconds` is this run's; `history` keeps every run's, since a rerun that reuses a finished stage
    # records only the time to find it finished (the work's time is in an earlier entry).
    history = list(manifest["stages"].get(name, {}).get("history", [])) + [seconds]
    manifest["stages"][name] = {"seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "history": history}
    atomic_write_json(manifest_path, stamp(manifest))  # progress survives a crash
    log(f"[{i}/{len(STAGES)}] {name}: done in {seconds:.1f} s")
    return out

  from neurodiff_jax.organisms import build

  def organisms() -> dict[str, str]:
    orgs = _copy(config.organisms)
    paths = {"base": build.build_base(orgs)}
    for name in ("chat",) + diff_organisms:
      paths[name] = build.build_organism(orgs, name)
    return {k: str(v) for k, v in paths.items()}

  manifest["organisms"] = stage(1, "organisms", f"base, chat, {', '.join(diff_organisms)} organisms "
                                f"({config.scale} scale)", organisms)

  from neurodiff_jax.activations import harvest

  hcfg = _copy(config.harvest)
  store = stage(2, "harvest", "paired base/chat residuals of general text and conversations",
                lambda: str(harvest.ensure_store(harvest.check_store("", hcfg), hcfg).root))
  manifest["store"] = store

  from neurodiff_jax.crosscoder import train

  def train_all() -> dict[str, dict]:
    metrics = {}
    for name, cc in config.crosscoders.items():
      c = _copy(cc)
      c.store, c.workdir = store, str(root / "runs" / name)
      log(f"train {name}: {c.sparsity}, {c.dict_size} latents, {c.steps} steps -> {c.workdir}")
      m = train.train(c)
      metrics[name] = {k: m.get(k) for k in ("step", "fve/0", "fve/1", "l0", "dead_fraction", "delta_norm_classes")}
    return metrics

  manifest["training"] = stage(3, "train", "a BatchTopK and an L1 crosscoder", train_all)

  from neurodiff_jax.analysis.analyze import analyze

  def analyze_all() -> dict[str, float]:
    seconds = {}
    for name in config.crosscoders:
      a = _copy(config.analyze)
      a.workdir = str(root / "runs" / name)
      a.force = "analyze" in config.force_stages
      log(f"analyze {name}: latent scaling, causal KL, examples, steering -> {a.workdir}/analysis")
      seconds[name] = analyze(a, log=lambda m, n=name: log(f"analyze {n}: {m}"))["seconds"]
    return seconds

  stage(4, "analyze", "both crosscoders: Δnorm classes, latent scaling, causal test, examples", analyze_all)

  from neurodiff_jax.diffing.run import diff

  def adl() -> list[str]:
    out = []
    for name in diff_organisms:
      d = _copy(config.diff)
      d.finetuned_model = f"organism:{name}"
      d.organisms.organism = name
      d.out_dir = str(root / "diffs" / name)
      d.force = "adl" in config.force_stages
      out.append(diff(d, log=lambda m, n=name: log(f"diff {n}: {m}"))["results_dir"])
    return out

  stage(5, "adl", f"Activation Difference Lens and per-token KL of base vs {', '.join(diff_organisms)}", adl)

  from neurodiff_jax.demo import story

  path = stage(6, "report", "the story report", lambda: str(story.write_story(root, manifest)))
  manifest["seconds"] = round(time.time() - t_all, 1)
  atomic_write_json(manifest_path, stamp(manifest))
  log(f"done in {manifest['seconds']:.0f} s; the story: {path}")
  log(f"explore it: python -m launch.dashboard --config.results={root}")
  return manifest


__all__ = ["FORCEABLE", "STAGES", "check_config", "results_root", "run_demo"]
