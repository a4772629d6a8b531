"""All activation-difference methods on one model pair (`python -m launch.diff`).

Each method is a module of this package with `run(ctx, cfg, out) -> dict` (`METHODS`); it writes
its tables, plots and an HTML fragment `section.html` into `<results>/diff/<method>/` and returns a
JSON-able summary. A method whose `done.json` records the same inputs is reused (`force` redoes
it); a killed run reruns only the methods that had not finished.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from neurodiff_jax.diffing.context import DiffContext, load_pair, resolve_datasets, resolve_model, results_dir
from neurodiff_jax.models import model_config, model_mesh
from neurodiff_jax.utils.config import ConfigError, did_you_mean
from neurodiff_jax.utils.files import atomic_write_json
from neurodiff_jax.utils.results import stamp

# Method name -> module (run order: cheap and model-free first).
METHODS = {
    "weights": "neurodiff_jax.diffing.weights",
    "adl": "neurodiff_jax.diffing.adl",
    "kl": "neurodiff_jax.diffing.kl",
    "logit_diff": "neurodiff_jax.diffing.logit_diff",
    "amplification": "neurodiff_jax.diffing.amplification",
    "norms": "neurodiff_jax.diffing.norms",
    "pca": "neurodiff_jax.diffing.pca",
    "sae": "neurodiff_jax.diffing.sae",
    "patching": "neurodiff_jax.diffing.patching",
}


def _log(msg: str) -> None:
  print(f"diff: {msg}", flush=True)


def chosen_methods(config: ml_collections.ConfigDict) -> list[str]:
  """`config.methods` (all by default) in run order; an unknown name is a ConfigError naming the known ones."""
  names = list(config.methods) or list(METHODS)
  for n in names:
    if n not in METHODS:
      raise ConfigError(f"unknown method {n!r}{did_you_mean(n, list(METHODS))}; methods: {', '.join(METHODS)}.")
  return [n for n in METHODS if n in names]


def check_config(config: ml_collections.ConfigDict) -> None:
  """ConfigError for settings that cannot work, before any model is loaded."""
  chosen_methods(config)
  for name in config.force_methods:
    if name not in METHODS:
      raise ConfigError(f"config.force_methods names {name!r}; methods: {', '.join(METHODS)}.")
  if not config.base_model or not config.finetuned_model:
    raise ConfigError("config.base_model and config.finetuned_model must both name a model (organism:NAME or a "
                      "checkpoint directory).")
  from neurodiff_jax.organisms.build import check_model_ref

  check_model_ref(config.base_model, "base_model")
  check_model_ref(config.finetuned_model, "finetuned_model")
  if int(config.max_len) < 2:
    raise ConfigError(f"config.max_len={config.max_len} must be at least 2 tokens.")
  from neurodiff_jax.models.sharding import check_mesh_shape

  check_mesh_shape(tuple(config.get("model_mesh", ())))


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff(config: ml_collections.ConfigDict, log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Runs the chosen methods on the configured pair; returns {"results_dir": path, "methods": {method: summary}}."""
  check_config(config)
  organisms = config.get("organisms")
  base = resolve_model(config.base_model, organisms)
  ft = resolve_model(config.finetuned_model, organisms)
  mesh = model_mesh(tuple(config.get("model_mesh", ())), [model_config(base), model_config(ft)],
                    where=[f"the base model {base}", f"the fine-tuned model {ft}"])  # checked before loading
  pair = load_pair(base, ft, dtype=str(config.model_dtype), mesh=mesh)
  root = results_dir(config, pair.key)
  out = root / "diff"
  out.mkdir(parents=True, exist_ok=True)
  datasets = resolve_datasets(list(config.datasets), organisms, int(config.num_documents))
  store = None
  if config.store:
    from neurodiff_jax.activations.store import ActivationStore

    store = ActivationStore.open(config.store)
  from neurodiff_jax.diffing import graders

  ctx = DiffContext(pair=pair, datasets=datasets, max_len=int(config.max_len), max_documents=int(config.max_documents),
                    grader=graders.make_grader(config.grader, pair), store=store, log=log,
                    progress=bool(config.progress), seed=int(config.seed))
  log(f"{Path(base).name} -> {Path(ft).name} ({pair.num_layers} layers, d={pair.base.cfg.hidden_size}); "
      f"results in {root}")
  atomic_write_json(out / "pair.json", stamp({"base": str(base), "finetuned": str(ft), "key": pair.key,
                                              "card": pair.card, "datasets": [str(d) for d in datasets]}))
  summaries: dict[str, Any] = {}
  common = {"pair": pair.key, "datasets": datasets, "max_len": config.max_len, "max_documents": config.max_documents,
            "store": config.store, "seed": config.seed, "grader": config.grader.to_dict()}
  for name in chosen_methods(config):
    cfg = config[name]
    key = _digest({"common": common, "method": cfg.to_dict()})
    mdir = out / name
    done = mdir / "done.json"
    if done.is_file() and not config.force and name not in config.force_methods:
      record = json.loads(done.read_text())
      if record.get("key") == key:
        log(f"{name}: reusing {mdir}")
        summaries[name] = record["summary"]
        continue
    mdir.mkdir(parents=True, exist_ok=True)
    log(f"{name}: running")
    t = time.time()
    summary = importlib.import_module(METHODS[name]).run(ctx, cfg, mdir)
    summary = json.loads(json.dumps(summary, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    atomic_write_json(done, {"key": key, "seconds": round(time.time() - t, 1), "summary": summary})
    summaries[name] = summary
    log(f"{name}: done in {time.time() - t:.1f} s")
  atomic_write_json(out / "summary.json", summaries)
  return {"results_dir": str(root), "methods": summaries}


__all__ = ["METHODS", "check_config", "chosen_methods", "diff"]
