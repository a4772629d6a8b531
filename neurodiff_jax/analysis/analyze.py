"""The crosscoder analysis of a training run, end to end (`python -m launch.analyze`).

From a run's workdir: the checkpoint (`crosscoder.load`, no training code), the store it was
trained on and the two models the store's manifest names. Parts, each switchable and each reused
when its inputs have not changed (`force` recomputes):

  pass       one streaming pass over the store: latent scaling (β, ν), firing statistics, template
             share, max-activating examples (`stream.run_pass`; resumes mid-pass after a kill)
  table      latents.parquet (`latent_table.py`), latent_histograms.npz (each latent's activation histogram over
             every analysed token) and examples.parquet (decoded contexts)
  causal     causal.parquet + causal.png (`causal.py`, docs/methods.md §5)
  steering   steering.parquet (`steering.py`)
  logit_lens logit_lens.parquet: the tokens each shown latent's chat decoder row promotes and suppresses
  report     PNG plots and report.html (`report.py`), summary.json

Everything lands in `<workdir>/analysis/` (or `out_dir`). `parts.json` there records what inputs
each finished part was computed from; a part whose record matches is skipped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import pandas as pd

from neurodiff_jax.activations.datasets import DatasetSpec, read_documents
from neurodiff_jax.activations.store import ActivationStore, StoreError
from neurodiff_jax.analysis import examples as examples_lib
from neurodiff_jax.analysis.latent_scaling import LatentScaling
from neurodiff_jax.analysis.latent_table import class_counts, latent_table
from neurodiff_jax.analysis.stream import (
  crosscoder_fingerprint,
  excluded_kinds,
  latent_selection,
  run_pass,
)
from neurodiff_jax.crosscoder import checkpoint, sharding
from neurodiff_jax.crosscoder.model import Crosscoder
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.errors import CheckpointError
from neurodiff_jax.utils.files import atomic_write_json
from neurodiff_jax.utils.paths import neurodiff_home
from neurodiff_jax.utils.results import stamp

PARTS = ("pass", "table", "causal", "steering", "logit_lens", "report")


class AnalysisError(ValueError):
  """An analysis that cannot run on these inputs (the message names the fix)."""


def workdir_of(config: ml_collections.ConfigDict) -> Path:
  """The training run to analyse: `workdir`, else `$NEURODIFF_HOME/runs/<run>`."""
  if config.workdir:
    return Path(config.workdir).expanduser()
  if not config.run:
    raise ConfigError("config.workdir is empty and config.run names no training run; set --config.workdir=RUN "
                      "(a training workdir).")
  return neurodiff_home() / "runs" / str(config.run)


def out_dir_of(config: ml_collections.ConfigDict) -> Path:
  """Where results go: `out_dir`, else `<workdir>/analysis`."""
  return Path(config.out_dir).expanduser() if config.out_dir else workdir_of(config) / "analysis"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for settings that cannot work, before any work."""
  for name in ("batch_size", "fold_every", "save_every"):
    if int(config[name]) < 1:
      raise ConfigError(f"config.{name}={config[name]} must be at least 1.")
  try:
    excluded_kinds(tuple(config.exclude))
  except ValueError as e:
    raise ConfigError(f"config.exclude: {e}") from None
  for name in config.force_parts:
    if name not in PARTS:
      raise ConfigError(f"config.force_parts names {name!r}; parts are {', '.join(PARTS)}.")
  if int(config.examples.top_k) < 1:
    raise ConfigError(f"config.examples.top_k={config.examples.top_k} must be at least 1.")
  if len(tuple(config.mesh)) != 2:
    raise ConfigError(f"config.mesh={tuple(config.mesh)} must be (data, latent) device counts.")
  from neurodiff_jax.models.sharding import check_mesh_shape

  check_mesh_shape(tuple(config.get("model_mesh", ())))
  workdir_of(config)


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Parts:
  """parts.json: the inputs each finished part was computed from."""

  def __init__(self, out: Path, force: bool, force_parts: tuple[str, ...]):
    self.path = out / "parts.json"
    self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
    self.force, self.force_parts = force, set(force_parts)

  def fresh(self, name: str, key: str, files: list[Path]) -> bool:
    """Whether part `name` finished with these inputs and its files are all there."""
    if self.force or name in self.force_parts:
      return False
    return self.done.get(name) == key and all(f.is_file() for f in files)

  def finish(self, name: str, key: str) -> None:
    """Records part `name` as finished with inputs `key`."""
    self.done[name] = key
    atomic_write_json(self.path, self.done)


def open_run(config: ml_collections.ConfigDict) -> tuple[Crosscoder, dict, int, ActivationStore, int]:
  """(crosscoder, run config, checkpoint step, store, layer) of the run to analyse, with clear errors."""
  workdir = workdir_of(config)
  if not workdir.is_dir():
    raise CheckpointError(f"no training run at {workdir}: train one (python -m launch.train --config=...) or set "
                          "--config.workdir to a training workdir.")
  step = None if int(config.step) < 0 else int(config.step)
  step, saved = checkpoint.load_run_config(workdir, step)
  cc = checkpoint.load(workdir, step)
  run = saved["run"]
  root = Path(str(run.get("store", ""))).expanduser()
  if not root.is_absolute():
    root = (workdir / root) if (workdir / root).exists() else root
  if not (root / "manifest.json").is_file():
    raise StoreError(f"the checkpoint in {workdir} was trained on the store {root}, which is missing; restore it "
                     "there (or harvest it again with the same config: python -m launch.harvest), then rerun.")
  store = ActivationStore.open(root)
  layer = int(config.layer) if int(config.layer) >= 0 else int(run.get("layer", 0))
  if layer not in store.layers:
    raise StoreError(f"the store {root} has no layer {layer} (it has {list(store.layers)}); the checkpoint was trained "
                     f"on layer {run.get('layer')}: set --config.layer to a harvested layer or harvest layer {layer}.")
  return cc, run, step, store, layer


def check_models(store: ActivationStore) -> list[dict]:
  """The store's models, each checked against its checkpoint's fingerprint (a changed model is an error)."""
  from neurodiff_jax.models import checkpoint_info

  models = store.manifest.get("models", [])
  for m in models:
    if not m.get("fingerprint"):
      raise AnalysisError(f"the store {store.root} does not record its models' checkpoints (it was written from "
                          "arrays, not harvested): the causal test, steering and logit lens need the models; switch "
                          "them off with --config.causal.enabled=False --config.steering.enabled=False "
                          "--config.logit_lens.enabled=False.")
    try:
      info = checkpoint_info(m["path"], revision=m.get("revision") or None)
    except Exception as e:  # noqa: BLE001 - any failure to find it is the same problem for the user
      raise AnalysisError(f"the {m['role']} model of the store, {m['path']}, cannot be read ({e}); put the checkpoint "
                          "back there or switch the model-based parts off (causal, steering, logit_lens).") from None
    if info.fingerprint != m["fingerprint"]:
      raise AnalysisError(f"the {m['role']} model at {m['path']} is not the one the store was harvested from "
                          f"(fingerprint {info.fingerprint} != {m['fingerprint']}): the checkpoint changed since. "
                          "Analyse with the original checkpoint, or re-harvest the store and retrain.")
  return models


def _log(msg: str) -> None:
  print(f"analyze: {msg}", flush=True)


def _load_models(store: ActivationStore, dtype: str, mesh_shape: tuple[int, ...] = ()) -> tuple[Any, Any, Any]:
  """The store's base and chat models (on a model mesh of `mesh_shape` when given, checked before loading) and
  the chat model's tokenizer."""
  from neurodiff_jax.models import load_model, load_tokenizer, model_config, model_mesh

  models = check_models(store)
  chosen = (models[0], models[-1])
  mesh = model_mesh(mesh_shape, [model_config(m["path"], revision=m.get("revision") or None) for m in chosen],
                    where=[f"the {m['role']} model {m['path']}" for m in chosen])
  base = load_model(models[0]["path"], dtype=dtype, mesh=mesh)
  chat = load_model(models[-1]["path"], dtype=dtype, mesh=mesh)
  return base, chat, load_tokenizer(models[-1]["path"])


def _tokenizer(store: ActivationStore) -> Any:
  """The chat model's tokenizer (decoding contexts), or None when the store names no model checkpoint."""
  from neurodiff_jax.models import load_tokenizer

  path = (store.manifest.get("models") or [{}])[-1].get("path", "")
  try:
    return load_tokenizer(path) if path and Path(path).exists() else None
  except Exception:  # noqa: BLE001 - contexts then show token ids; the causal part checks models properly
    return None


def _conversations(config: ml_collections.ConfigDict, store: ActivationStore) -> list[list[dict]]:
  """Chat conversations for the causal test: `causal.dataset`, else the store's first dataset of conversations."""
  paths = [config.causal.dataset] if config.causal.dataset else [d["path"] for d in store.manifest.get("datasets", [])]
  for path in paths:
    try:
      docs = read_documents(DatasetSpec.from_config(path))
    except (ValueError, OSError) as e:
      if config.causal.dataset:
        raise AnalysisError(f"config.causal.dataset={path!r} cannot be read: {e}") from None
      continue
    convs = [d for d in docs if not isinstance(d, str) and d and d[-1].get("role") == "assistant"]
    if convs:
      return convs[: int(config.causal.num_conversations)]
  raise AnalysisError("no chat conversations for the causal test: none of the store's datasets holds conversations "
                      "ending with an assistant turn. Set --config.causal.dataset=FILE (JSONL with a 'messages' "
                      "field), or switch the test off with --config.causal.enabled=False.")


def _causal_groups(table: pd.DataFrame, m: int) -> dict[str, Any]:
  """The latent sets of the causal test: halves of the live chat-only latents by ν and by Δnorm, and the baselines."""
  chat = table[table["tag"] == "chat_only"]
  groups: dict[str, Any] = {"all_base": np.zeros(0, np.int64), "all_latents": np.arange(m), "template_chat": "template"}
  ranked = chat[np.isfinite(chat["nu_rank"])].sort_values("nu_rank", kind="stable")
  if len(ranked) >= 2:
    half = len(ranked) // 2
    groups["nu_best_half"] = ranked["latent"].to_numpy()[:half]
    groups["nu_worst_half"] = ranked["latent"].to_numpy()[half:]
  by_dn = chat.sort_values("delta_norm", ascending=False, kind="stable")
  if len(by_dn) >= 2:
    half = len(by_dn) // 2
    groups["dnorm_top_half"] = by_dn["latent"].to_numpy()[:half]
    groups["dnorm_bottom_half"] = by_dn["latent"].to_numpy()[half:]
  return groups


def _steering_latents(config: ml_collections.ConfigDict, table: pd.DataFrame) -> list[int]:
  """The chosen latents, else the best-ranked live chat-only latents (by ν), else the live ones of highest Δnorm."""
  if len(config.steering.latents):
    return latent_selection(tuple(config.steering.latents), len(table)).tolist()
  n = int(config.steering.num_latents)
  chat = table[(table["tag"] == "chat_only") & np.isfinite(table["nu_rank"])].sort_values("nu_rank", kind="stable")
  picks = chat["latent"].tolist()[:n]
  if len(picks) < n:
    live = table[(table["tag"] != "dead") & ~table["latent"].isin(picks)]
    picks += live.sort_values("delta_norm", ascending=False, kind="stable")["latent"].tolist()[: n - len(picks)]
  return [int(j) for j in picks]


def context_latents(table: pd.DataFrame, limit: int) -> np.ndarray:
  """Latents whose examples get decoded contexts: chat-only (by ν rank), base-only, then the rest by frequency."""
  live = table[table["tag"] != "dead"]
  order = pd.concat([
      live[live["tag"] == "chat_only"].sort_values(["nu_rank", "delta_norm"], ascending=[True, False]),
      live[live["tag"] == "base_only"].sort_values("delta_norm", kind="stable"),
      live[~live["tag"].isin(["chat_only", "base_only"])].sort_values("freq", ascending=False, kind="stable"),
  ])
  return order["latent"].to_numpy()[:limit]


def analyze(config: ml_collections.ConfigDict, log: Callable[[str], None] = _log) -> dict:
  """Runs every enabled part of the analysis of `config.workdir`'s run; returns the summary."""
  check_config(config)
  t_start = time.time()
  cc, run, step, store, layer = open_run(config)
  out = out_dir_of(config)
  out.mkdir(parents=True, exist_ok=True)
  parts = _Parts(out, bool(config.force), tuple(config.force_parts))
  m = cc.cfg.dict_size
  fp = crosscoder_fingerprint(cc)
  log(f"run {workdir_of(config)} (step {step}, {cc.cfg.sparsity}, m={m}), store {store.root} layer {layer} "
      f"({store.layout.num_tokens:,} tokens) -> {out}")
  try:
    latents = None if not len(config.latents) else latent_selection(tuple(config.latents), m)
    if len(config.steering.latents):
      latent_selection(tuple(config.steering.latents), m)
  except ValueError as e:
    raise ConfigError(f"config.latents / config.steering.latents: {e}") from None

  # ---- the pass ----
  pass_file = out / "pass.npz"
  pass_key = _digest({"cc": fp, "store": store.manifest.get("config_key"), "layer": layer, "latents": config.latents,
                      "exclude": list(config.exclude), "max_tokens": config.max_tokens,
                      "examples": config.examples.to_dict(), "batch": config.batch_size,
                      "histogram": [examples_lib.HIST_BINS, list(examples_lib.HIST_DECADES)]})
  if parts.fresh("pass", pass_key, [pass_file]):
    log("pass: reusing pass.npz")
    with np.load(pass_file, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  else:
    import jax

    data, lat = (int(v) for v in config.mesh)
    mesh = sharding.make_mesh(data, lat)
    accs = [examples_lib.LatentStats(m, lat), LatentScaling(cc, latents, lat), examples_lib.ActivationHistogram(m, lat)]
    if config.examples.enabled:
      accs.append(examples_lib.TopExamples(m, int(config.examples.top_k), int(config.examples.sample_size), lat,
                                             mesh))
    log(f"pass: {', '.join(a.name for a in accs)} over {store.layout.num_tokens:,} tokens on "
        f"{data}x{lat} {jax.devices()[0].platform} devices")
    res = run_pass(cc, store, layer, accs, batch_size=int(config.batch_size), exclude=tuple(config.exclude),
                   mesh=mesh, max_tokens=int(config.max_tokens), fold_every=int(config.fold_every),
                   save_every=int(config.save_every), state_path=out / "pass_state.npz", seed=int(config.seed),
                   progress=bool(config.progress))
    flat = {f"{a}/{k}": np.asarray(v) for a, d in res.items() for k, v in d.items()}
    tmp = out / "pass.tmp.npz"
    np.savez(tmp, **flat)
    tmp.replace(pass_file)
    (out / "pass_state.npz").unlink(missing_ok=True)
    parts.finish("pass", pass_key)
  stats = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("stats/")}
  scaling = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("latent_scaling/")}
  ex = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("examples/")}
  hist = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("histogram/")}

  # ---- tables ----
  table_file, ex_file, hist_file = out / "latents.parquet", out / "examples.parquet", out / "latent_histograms.npz"
  g = config.genuine
  table_key = _digest({"pass": pass_key, "genuine": g.to_dict(), "ctx": config.examples.to_dict()})
  table = latent_table(cc, stats, scaling, float(g.nu_error_max), float(g.nu_recon_max))
  if parts.fresh("table", table_key, [table_file, hist_file] + ([ex_file] if ex else [])):
    log("table: reusing latents.parquet")
  else:
    table.to_parquet(table_file, index=False)
    tmp = out / "latent_histograms.tmp.npz"
    np.savez(tmp, counts=hist["counts"].astype(np.int64), edges=hist["edges"].astype(np.float64))
    tmp.replace(hist_file)
    if ex:
      chosen = context_latents(table, int(config.examples.context_latents))
      rows = examples_lib.example_rows(chosen, ex, int(config.examples.n_quantiles), int(config.examples.per_quantile))
      log(f"table: decoding contexts of {len(rows):,} examples of {len(chosen)} latents")
      rows = examples_lib.contexts(cc, store, layer, rows, _tokenizer(store), int(config.examples.context_before),
                                   int(config.examples.context_after))
      rows.to_parquet(ex_file, index=False)
    parts.finish("table", table_key)
  classes = class_counts(table)
  log(f"table: classes {classes}")

  summary: dict[str, Any] = {
      "workdir": str(workdir_of(config)), "run": run.get("name", ""), "checkpoint_step": step,
      "store": str(store.root), "layer": layer,
      "sparsity": cc.cfg.sparsity, "dict_size": m, "k": cc.cfg.k, "tokens": int(stats.get("tokens", 0)),
      "models": [{k: v for k, v in mm.items() if k in ("role", "path", "model_type")}
                 for mm in store.manifest.get("models", [])],
      "classes": classes, "exclude": list(config.exclude),
  }
  chat = table[table["tag"] == "chat_only"]
  known = chat["genuine"].dropna()
  summary["genuine"] = {"rule": f"nu_error < {g.nu_error_max} and nu_recon < {g.nu_recon_max}",
                        "chat_only_live": len(chat), "with_nu": len(known),
                        "genuine": int(known.sum()) if len(known) else 0}
  summary["template"] = {"template_token_fraction": float(stats.get("template_token_fraction", np.nan)),
                         "chat_only_mostly_template": int((chat["template_share"] > 0.5).sum()),
                         "chat_only_live": len(chat),
                         "median_template_share_chat_only": float(chat["template_share"].median()) if len(chat)
                         else None,
                         "median_template_share_live": float(table.loc[table["tag"] != "dead",
                                                                       "template_share"].median())}

  # ---- causal test and steering (need the models) ----
  models_loaded: tuple | None = None

  def models() -> tuple:
    nonlocal models_loaded
    if models_loaded is None:
      log("loading the store's models (fingerprints checked)")
      models_loaded = _load_models(store, str(config.model_dtype), tuple(config.get("model_mesh", ())))
    return models_loaded

  if config.causal.enabled:
    from neurodiff_jax.analysis import causal

    c = config.causal
    groups = _causal_groups(table, m)
    key = _digest({"table": table_key, "causal": c.to_dict(), "groups": {k: np.asarray(v).tolist()
                                                                          for k, v in groups.items()}})
    files = [out / "causal.parquet", out / "causal.png"]
    if parts.fresh("causal", key, files):
      log("causal: reusing causal.parquet")
    else:
      base, chat_model, tok = models()
      convs = _conversations(config, store)
      data = causal.chat_eval_set(tok, convs, int(c.max_len), int(c.first_n))
      log(f"causal: {len(groups)} groups on {len(convs)} conversations")
      kl = causal.causal_kl(chat_model, base, cc, layer, data, groups, batch_size=int(c.batch_size))
      rows = causal.causal_table(kl, data, n_boot=int(c.n_boot), seed=int(config.seed))
      sizes = {k: (len(v) if not isinstance(v, str) else -1) for k, v in groups.items()}
      frame = pd.DataFrame(rows)
      frame["n_latents"] = frame["group"].map(sizes).astype("int64")
      frame.to_parquet(files[0], index=False)
      causal.causal_plot(rows, files[1])
      parts.finish("causal", key)
    summary["causal"] = pd.read_parquet(files[0]).to_dict(orient="records")

  if config.steering.enabled:
    from neurodiff_jax.analysis import steering

    s = config.steering
    chosen = _steering_latents(config, table)
    key = _digest({"table": table_key, "steering": s.to_dict(), "latents": chosen})
    file = out / "steering.parquet"
    if parts.fresh("steering", key, [file]):
      log("steering: reusing steering.parquet")
    else:
      base, chat_model, tok = models()
      dec = cc.decoder()  # [m, M, d] original units
      rows = []
      for j in chosen:
        scale = float(table.loc[j, "max_act"]) if np.isfinite(table.loc[j, "max_act"]) else 1.0
        strengths = [mult * scale for mult in s.multiples]
        for who, model in (("chat", chat_model), ("base", base)):
          if who not in s.models:
            continue
          res = steering.steer(model, tok, dec[j, -1], layer, strengths, list(s.prompts),
                               chat_template=who == "chat", max_new_tokens=int(s.max_new_tokens))
          for r in res:
            rows.append({"latent": j, "model": who, "prompt": r["prompt"], "strength": float(r["strength"]),
                         "multiple": float(r["strength"]) / scale, "completion": r["completion"]})
      log(f"steering: {len(rows)} samples of {len(chosen)} latents")
      pd.DataFrame(rows, columns=["latent", "model", "prompt", "strength", "multiple", "completion"]).to_parquet(
          file, index=False)
      parts.finish("steering", key)

  if config.logit_lens.enabled:
    from neurodiff_jax.models.lens import logit_lens, top_tokens

    limit = int(config.logit_lens.num_latents) or len(table)  # 0: every latent that fired
    chosen = sorted(set(context_latents(table, limit).tolist()) | set(_steering_latents(config, table)))
    key = _digest({"cc": fp, "lens": config.logit_lens.to_dict(), "latents": chosen})
    file = out / "logit_lens.parquet"
    if parts.fresh("logit_lens", key, [file]):
      log("logit_lens: reusing logit_lens.parquet")
    else:
      _, chat_model, tok = models()
      k = int(config.logit_lens.top)
      rows = []
      dec = cc.decoder()
      chunk = 128  # [chunk, V] logits at a time: all of a 4k-latent dictionary at once would be 4 GB at V = 262k
      for s0 in range(0, len(chosen), chunk):
        part = chosen[s0:s0 + chunk]
        for j, top in zip(part, top_tokens(logit_lens(chat_model, dec[part, -1]), tok, k)):
          for way in ("promoted", "suppressed"):
            rows += [{"latent": j, "direction": way, "rank": r, "token": t, "logit": float(v)}
                     for r, (t, v) in enumerate(zip(top[way], top[f"{way}_logits"]))]
      log(f"logit_lens: top {k} tokens of {len(chosen)} latents' chat decoder directions")
      pd.DataFrame(rows, columns=["latent", "direction", "rank", "token", "logit"]).to_parquet(file, index=False)
      parts.finish("logit_lens", key)

  summary["seconds"] = round(time.time() - t_start, 1)
  atomic_write_json(out / "summary.json", stamp(summary))
  if config.report.enabled:
    from neurodiff_jax.analysis import report

    report.make_plots(out)
    path = report.write_report(out, max_latents=int(config.report.max_latents))
    log(f"report: {path}")
  return summary


__all__ = ["PARTS", "AnalysisError", "analyze", "check_config", "check_models", "context_latents", "open_run",
           "out_dir_of", "workdir_of"]
