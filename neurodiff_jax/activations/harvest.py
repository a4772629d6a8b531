"""Harvest paired residual-stream activations of a base and a fine-tuned model into a store.

Both models read the same tokens in jitted fixed-shape batches `[batch_size, seq_len]` (whole
documents packed end to end into each row, attending only within themselves) that stop at the
deepest requested layer. Work is split into
units of `shard_tokens` consecutive stored tokens (one shard of every array, see `store.py`);
process p of P takes units p, p + P, ...; a unit's marker is committed only after its shards
are durable, so a killed harvest rerun with the same command redoes only the missing units and
ends with exactly the contents of an uninterrupted run.

With `model_mesh=(data, model)` each process holds both models on a mesh of its own devices: weights
split over `model` (tensor parallel, placed shard by shard as they are read), batch rows over `data`;
the activations come back to the host as before, so the store does not depend on the mesh. With
`model_mesh_across_processes` (and `distributed`) the mesh spans every process's devices, for a pair too
large for one host: each process holds only its devices' shards of the weights, all processes run every
unit together, and each writes the units it owns (p, p + P, ...) as above.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from neurodiff_jax.activations.datasets import DatasetSpec, TokenizedCorpus, check_same_tokenizer, tokenize_corpus
from neurodiff_jax.activations.store import (
    FORMAT,
    METADATA,
    VERSION,
    ActivationStore,
    StoreError,
    TOKEN_KINDS,
    StoreLayout,
    choose_sizes,
    config_key,
    unit_stats,
)
from neurodiff_jax.models import Transformer, checkpoint_info, config_from_hf, load_model, load_tokenizer, read_hf_config
from neurodiff_jax.models.memory import held_bytes
from neurodiff_jax.models.sharding import mesh_of, model_mesh, put_batch, spans_processes, to_host
from neurodiff_jax.organisms import build
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.distributed import initialize_from_config
from neurodiff_jax.utils.paths import neurodiff_home

ROLES = ("base", "finetuned")


class NonFiniteActivationError(FloatingPointError):
  """A model produced NaN or Inf activations."""


class DiskFullError(OSError):
  """Not enough disk space for the next unit."""


@dataclasses.dataclass(frozen=True)
class TokenPlan:
  """Where every stored token of every document goes in the store."""

  corpus: TokenizedCorpus
  first_stored: np.ndarray  # [n_docs] first stored position of each document (1 when its BOS is dropped)
  doc_start: np.ndarray  # [n_docs + 1] store offset of each document's first stored token

  @property
  def num_tokens(self) -> int:
    """Tokens the store holds."""
    return int(self.doc_start[-1])

  def docs_in(self, lo: int, hi: int) -> range:
    """Documents with at least one stored token in [lo, hi)."""
    first = int(np.searchsorted(self.doc_start, lo, side="right")) - 1
    last = int(np.searchsorted(self.doc_start, hi, side="left"))
    return range(max(first, 0), last)


def plan_tokens(corpus: TokenizedCorpus, bos_id: int | None, keep_bos: bool) -> TokenPlan:
  """Stored tokens per document: all but a leading BOS (unless `keep_bos`); padding is never stored."""
  first = np.array([0 if keep_bos or bos_id is None or ids[0] != bos_id else 1 for ids in corpus.ids], np.int64)
  counts = np.array([len(ids) for ids in corpus.ids], np.int64) - first
  return TokenPlan(corpus, first, np.concatenate([[0], np.cumsum(counts)]))


def _processes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(index, count) of this process: from JAX (after `jax.distributed.initialize` when asked) or the config."""
  count = int(config.get("process_count") or 0)
  if config.get("distributed"):
    initialize_from_config(config)
    return jax.process_index(), jax.process_count()
  if count:
    return int(config.process_index), count
  return jax.process_index(), jax.process_count()


def make_step(base: Transformer, finetuned: Transformer, layers: Sequence[int], store_dtype: Any) -> Callable:
  """A jitted `(ids, segments) -> (acts [B, T, L, M, d] in store dtype, bad [B, T, L, M])` over both models.

  On a model mesh (both models loaded onto it) the rows go on its data axis where they divide it.
  """
  layers = tuple(layers)
  mesh = mesh_of(base)
  last = max(layers)
  splits = [nnx.split(m) for m in (base, finetuned)]
  graphdefs = [g for g, _ in splits]

  @jax.jit
  def step(states, ids, segments):
    acts = []
    for g, s in zip(graphdefs, states):
      res = nnx.merge(g, s)(ids, segment_ids=segments, capture=layers, stop_at_layer=last).residuals
      acts.append(jnp.stack([res[l] for l in layers], axis=2))
    x = jnp.stack(acts, axis=3)  # [B, T, L, M, d]
    bad = (~jnp.isfinite(x).all(-1)) & (segments > 0)[:, :, None, None]
    return x.astype(store_dtype), bad

  states = tuple(s for _, s in splits)
  if spans_processes(mesh):
    # A mesh across processes: every process runs every batch, and each gets the whole result back.
    return lambda ids, segments: to_host(mesh, *step(states, *put_batch(mesh, ids, segments)))
  return lambda ids, segments: step(states, *put_batch(mesh, ids, segments))


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
  """Indices of `lengths` packed into rows of `width` (first-fit decreasing); each row's lengths sum to ≤ width."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = lengths[i]
    if n > width:
      raise ValueError(f"a document of {n} tokens does not fit a row of {width}")
    r = next((r for r, f in enumerate(free) if f >= n), None)
    if r is None:
      rows.append([i])
      free.append(width - n)
    else:
      rows[r].append(i)
      free[r] -= n
  return rows


def row_buckets(batch_size: int) -> list[int]:
  """The row counts batches use: powers of two below `batch_size`, and `batch_size` (a unit's last batch is short)."""
  out = [1]
  while out[-1] * 2 < batch_size:
    out.append(out[-1] * 2)
  return out + [batch_size] if batch_size > 1 else out


def _batches(plan: TokenPlan, docs: range, batch_size: int, seq_len: int, pad_id: int):
  """Batches of `batch_size` rows of `seq_len` tokens, each row several whole documents packed end to end.

  Packing wastes almost no compute on padding and needs one compiled shape (plus a few row counts
  for a unit's last batch); tokens attend only within their document (`segment_ids`), so every
  activation equals the document's own forward pass. Yields (placements, ids, segments) with
  placements [(row, column, document)].
  """
  docs = list(docs)
  rows = pack_rows([len(plan.corpus.ids[d]) for d in docs], seq_len)
  buckets = row_buckets(batch_size)
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    height = next(b for b in buckets if b >= len(chunk))
    ids = np.full((height, seq_len), pad_id, np.int32)
    segments = np.zeros((height, seq_len), np.int32)
    placements = []
    for r, row in enumerate(chunk):
      col = 0
      for seg, j in enumerate(row, start=1):
        ids_d = plan.corpus.ids[docs[j]]
        ids[r, col:col + len(ids_d)] = ids_d
        segments[r, col:col + len(ids_d)] = seg
        placements.append((r, col, docs[j]))
        col += len(ids_d)
    yield placements, ids, segments


def _check_disk(root: Path, need: int) -> None:
  free = shutil.disk_usage(root).free
  if free < need:
    raise DiskFullError(errno.ENOSPC,
                        f"{root}: {free / 2**30:.2f} GiB free but the next unit needs {need / 2**30:.2f} GiB. Free space "
                        "and run the same command again: the units already written are kept and the harvest resumes.")


def harvest_unit(plan: TokenPlan, layout: StoreLayout, unit: int, step: Callable, batch_size: int, seq_len: int,
                 pad_id: int, describe_doc: Callable[[int], str]) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
  """Runs both models over the documents of one unit; returns its layer buffers and metadata."""
  lo, hi = layout.unit_range(unit)
  n = hi - lo
  dtype = np.dtype(jnp.dtype(layout.dtype))
  acts = {l: np.empty((n, layout.num_models, layout.d_model), dtype) for l in layout.layers}
  meta = {k: np.empty((n,), v) for k, v in METADATA.items()}
  written = 0
  pending = None  # dispatch batch k + 1 before copying batch k back, so device and host overlap

  def drain(item):
    nonlocal written
    placements, (x, bad) = item
    x, bad = np.asarray(x), np.asarray(bad)
    if bad.any():
      r, t, li, mi = (int(v[0]) for v in np.nonzero(bad))
      doc = next(d for row, col, d in placements if row == r and col <= t < col + len(plan.corpus.ids[d]))
      raise NonFiniteActivationError(
          f"NaN/Inf activations in {describe_doc(doc)} at layer {layout.layers[li]} of the {ROLES[mi]} model; "
          "nothing of this unit was written. Check that checkpoint (or use model_dtype=float32); the units "
          "already written are kept.")
    for r, col, d in placements:
      first, start = int(plan.first_stored[d]), int(plan.doc_start[d])
      length = len(plan.corpus.ids[d])
      # Stored positions [first, length) of document d sit at store offsets start + (p - first).
      p0 = first + max(lo - start, 0)
      p1 = first + min(hi - start, length - first)
      if p1 <= p0:
        continue
      o0 = start + (p0 - first) - lo
      sl = slice(o0, o0 + p1 - p0)
      for li, l in enumerate(layout.layers):
        acts[l][sl] = x[r, col + p0:col + p1, li]
      meta["token_id"][sl] = plan.corpus.ids[d][p0:p1]
      meta["token_kind"][sl] = plan.corpus.kinds[d][p0:p1]
      meta["position"][sl] = np.arange(p0, p1)
      meta["doc_index"][sl] = d
      written += p1 - p0

  for placements, ids, segments in _batches(plan, plan.docs_in(lo, hi), batch_size, seq_len, pad_id):
    out = step(jnp.asarray(ids), jnp.asarray(segments))
    if pending is not None:
      drain(pending)
    pending = (placements, out)
  if pending is not None:
    drain(pending)
  if written != n:
    raise AssertionError(f"unit {unit}: placed {written} of {n} tokens")  # a planning bug, never bad input
  return acts, meta


def out_dir_of(config: ml_collections.ConfigDict) -> Path:
  """Where a harvest config's store goes: `out_dir`, else `$NEURODIFF_HOME/activations/<name>`."""
  if config.get("out_dir"):
    return Path(config.out_dir).expanduser()
  if not config.get("name"):
    raise ConfigError("config.out_dir is empty and the harvest config has no name to derive it from; set "
                      "--config.out_dir=DIR.")
  return neurodiff_home() / "activations" / str(config.name)


def check_out_dir(path: str | os.PathLike) -> Path:
  """`ConfigError` when no store can be written at `path`: it is a file, lies under a file, or is not writable."""
  path = Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"out_dir {path} is an existing file, but a store is a directory (arrays and manifest.json); "
                      f"choose another out_dir, e.g. --config.out_dir={path}_store, or move the file away.")
  parent = path
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ConfigError(f"out_dir {path} cannot be created: {parent} is a file, not a directory; choose an out_dir "
                      "outside it.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"out_dir {path} cannot be written: {parent} is not writable by this user; choose a writable "
                      "out_dir (e.g. under $NEURODIFF_HOME).")
  return path


def check_store(store_dir: str | os.PathLike, harvest_config: ml_collections.ConfigDict | None = None) -> Path:
  """Where `ensure_store` will find or make the store; `ConfigError` (before any work) when it could do neither.

  `store_dir` "" means the harvest config's own out_dir. A missing or half-written store needs
  `harvest_config` (how to make it); without one the error names the path and the fix.
  """
  if not str(store_dir):
    if harvest_config is None:
      raise ConfigError("config.store is empty and no harvest config says how to make a store; name one with "
                        "--config.store=DIR (python -m launch.harvest makes stores).")
    store_dir = out_dir_of(harvest_config)
  path = Path(store_dir).expanduser()
  if (path / "manifest.json").is_file():
    store = ActivationStore.open(path, require_complete=False)
    if not store.manifest.get("complete") and harvest_config is None:
      raise ConfigError(f"store {path} is half-written ({len(store.finished_units())}/{store.layout.num_units} units): "
                        "run the harvest command that made it again to finish it (it resumes), or set "
                        "--config.harvest=NAME to finish it here.")
    return path
  if harvest_config is None:
    hint = " (it is a file)" if path.is_file() else ""
    raise ConfigError(f"no activation store at {path}{hint} (no manifest.json): fix config.store, or make the store "
                      f"there with `python -m launch.harvest --config=NAME --config.out_dir={path}`, or set "
                      "--config.harvest=NAME to harvest it there on first use.")
  return check_out_dir(path)


def ensure_store(store_dir: str | os.PathLike, harvest_config: ml_collections.ConfigDict | None = None
                 ) -> ActivationStore:
  """The store at `store_dir` ("" = the harvest config's out_dir): opened when complete, else harvested THERE.

  A half-written store (a killed harvest) is finished by resuming `harvest_config` into it; a missing
  one is harvested into it. The directory is never swapped for another: without `harvest_config`, a
  missing or half-written store is a `ConfigError` naming the path and the fix. A complete store named
  by its own directory is opened as it is; one at the harvest config's own out_dir must be that config's
  store (the same models, layers and text; else `StoreError` naming what differs), since the config is
  what says what the directory holds: another organism seed's store there is never used silently.
  """
  path = check_store(store_dir, harvest_config)
  own = False
  if harvest_config is not None and (harvest_config.get("out_dir") or harvest_config.get("name")):
    own = path.resolve() == out_dir_of(harvest_config).resolve()
  if (path / "manifest.json").is_file():
    store = ActivationStore.open(path, require_complete=False)
    if store.manifest.get("complete") and not own:
      return store
    if store.manifest.get("complete"):
      # The harvest compares the config's models, layers and text with the store's (its config_key) and, with
      # every unit written, computes nothing.
      print(f"harvest: checking that the store at {path} is this config's.", flush=True)
    else:
      print(f"harvest: store {path} is half-written ({len(store.finished_units())}/{store.layout.num_units} "
            "units); finishing it.", flush=True)
  else:
    print(f"harvest: no store at {path}; harvesting it there.", flush=True)
  config = ml_collections.ConfigDict(harvest_config.to_dict())
  config.out_dir = str(path)
  return harvest(config)


def harvest(config: ml_collections.ConfigDict) -> ActivationStore:
  """Harvests (or finishes harvesting) the store described by `config`; returns it.

  `organism:NAME` models and datasets are built first (`organisms.build.resolve_organism_refs`,
  with the config's `organisms` build config); the store goes to `out_dir_of(config)`.
  """
  t_start = time.time()
  out_dir = check_out_dir(out_dir_of(config))  # before any work: building organisms takes minutes
  config = build.resolve_organism_refs(config)
  proc, nproc = _processes(config)
  if not 0 <= proc < nproc:
    raise ValueError(f"process_index {proc} is outside [0, process_count={nproc}).")
  layers = tuple(sorted(set(int(l) for l in config.layers)))
  if not layers:
    raise ValueError("config.layers is empty; name at least one layer to harvest.")

  paths = (config.base_model, config.finetuned_model)
  revisions = (config.get("base_revision") or None, config.get("finetuned_revision") or None)
  # Fingerprints and configs without the weights: a finished or foreign store is known before loading.
  infos = [checkpoint_info(p, revision=r) for p, r in zip(paths, revisions)]
  cfgs = [config_from_hf(read_hf_config(i.path)) for i in infos]
  if cfgs[0].hidden_size != cfgs[1].hidden_size:
    raise ValueError(f"hidden sizes differ: base {paths[0]} has d={cfgs[0].hidden_size}, fine-tuned {paths[1]} has "
                     f"d={cfgs[1].hidden_size}; paired activations need two models of one architecture.")
  for role, c in zip(ROLES, cfgs):
    if max(layers) >= c.num_layers or min(layers) < 0:
      raise ValueError(f"layers {list(layers)} out of range for the {role} model ({c.num_layers} layers: 0..{c.num_layers - 1}).")
  across = bool(config.get("model_mesh_across_processes", False))
  if across and nproc > 1 and not config.get("distributed"):
    raise ConfigError("model_mesh_across_processes=True runs every batch on the devices of all processes together: "
                      "add --config.distributed=True (and the coordinator fields off TPU pods and SLURM).")
  mesh = model_mesh(config.get("model_mesh", ()), cfgs, where=[f"the {r} model {p}" for r, p in zip(ROLES, paths)],
                    across_processes=across)
  spans = spans_processes(mesh)
  if mesh is not None and int(config.batch_size) % (data := mesh.shape["data"]):
    raise ConfigError(f"batch_size={config.batch_size} does not split over the {data} devices of the data axis of "
                      f"model_mesh={tuple(config.model_mesh)} (each would run every row); use a multiple of {data}, "
                      f"e.g. --config.batch_size={data * max(1, int(config.batch_size) // data)}.")
  tokenizers = [load_tokenizer(i.path) for i in infos]
  check_same_tokenizer(*tokenizers)
  tok = tokenizers[0]

  specs = [DatasetSpec.from_config(s) for s in config.datasets]
  if not specs:
    raise ValueError("config.datasets is empty; name at least one dataset (text, JSONL, Parquet or a saved datasets dir).")
  corpus = tokenize_corpus(tok, specs, max_length=config.seq_len, min_tokens=config.get("min_tokens", 2),
                           skip_short=config.get("skip_short", False))
  top = max((int(doc.max()) for doc in corpus.ids if len(doc)), default=-1)
  for role, path, c in zip(ROLES, paths, cfgs):
    if top >= c.vocab_size:
      # Out-of-range ids would be gathered as NaN embeddings, not an error, deep in the forward pass.
      raise ValueError(f"the tokenizer of {paths[0]} produced token id {top}, but the {role} model {path} has "
                       f"vocab_size={c.vocab_size}: the tokenizer does not belong to the model; harvest with "
                       "the checkpoint's own tokenizer (or a model whose embedding covers it).")
  plan = plan_tokens(corpus, tok.bos_token_id, config.keep_bos)
  if plan.num_tokens == 0:
    raise ValueError("the datasets hold no tokens to store (every document is only a BOS token).")

  d = cfgs[0].hidden_size
  shard, chunk = choose_sizes(2, d, config.dtype)
  shard = config.get("shard_tokens") or shard
  chunk = min(config.get("chunk_tokens") or chunk, shard)
  if shard % chunk:
    raise ValueError(f"shard_tokens={shard} must be a multiple of chunk_tokens={chunk}.")
  model_dtype = jnp.dtype(config.get("model_dtype", "float32"))
  manifest = {
      "format": FORMAT, "version": VERSION,
      "models": [{"role": r, "path": str(p), "revision": rev, "model_type": i.model_type,
                  "fingerprint": i.fingerprint, "num_layers": c.num_layers}
                 for r, p, rev, i, c in zip(ROLES, paths, revisions, infos, cfgs)],
      "layers": list(layers), "d_model": d, "dtype": config.dtype, "model_dtype": model_dtype.name,
      "num_tokens": plan.num_tokens, "num_documents": len(corpus.ids), "shard_tokens": shard, "chunk_tokens": chunk,
      "keep_bos": bool(config.keep_bos), "seq_len": int(config.seq_len), "datasets": corpus.datasets,
      "corpus_fingerprint": corpus.fingerprint(), "truncated_documents": corpus.truncated,
      "skipped_short_documents": corpus.skipped_short, "token_kinds": {str(k): v for k, v in TOKEN_KINDS.items()},
      "complete": False,
  }
  manifest["config_key"] = config_key(manifest)
  store = ActivationStore.create_or_open(out_dir, manifest)
  lay = store.layout
  mine = [u for u in range(lay.num_units) if u % nproc == proc]
  finished = store.finished_units()
  todo = [u for u in mine if u not in finished]
  if spans:
    # Every process computes every unit (in the same order, so the collectives pair up) and writes the
    # units it owns; process 0's view of what is finished decides, so all run the same list.
    from jax.experimental import multihost_utils

    done = multihost_utils.broadcast_one_to_all(np.array([u in finished for u in range(lay.num_units)]))
    todo = [u for u in range(lay.num_units) if not done[u]]
  todo_tokens = sum(hi - lo for lo, hi in map(lay.unit_range, todo))
  print(f"harvest: {lay.num_tokens:,} tokens in {lay.num_units} units ({len(mine)} for process {proc}/{nproc}, "
        f"{sum(u in finished for u in mine)} already written) -> {store.root}", flush=True)
  t_ready = time.time()
  if todo:
    # By the paths as given: an adapter's CheckpointInfo.path is its base's directory (the adapter merges on load).
    models = [load_model(p, model_dtype, mesh, revision=r) for p, r in zip(paths, revisions)]
    if mesh is not None:
      held, whole = map(sum, zip(*(held_bytes(m) for m in models)))
      where = f" across {nproc} processes" if spans else ""
      print(f"harvest: both models on a {mesh.shape['data']}x{mesh.shape['model']} (data x model) mesh of "
            f"{mesh.devices.flat[0].platform} devices{where}; this process holds {held / 2**20:.1f} MiB of the "
            f"pair's {whole / 2**20:.1f} MiB", flush=True)
    step = make_step(models[0], models[1], layers, jnp.dtype(config.dtype))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def describe(doc: int) -> str:
      ds = int(plan.corpus.dataset_of_doc[doc])
      first = int(np.searchsorted(plan.corpus.dataset_of_doc, ds, side="left"))
      # Counted among the documents kept (skip_short drops some), in file order.
      return f"document {doc} (document {doc - first} of {plan.corpus.datasets[ds]['path']})"

    meta_bytes = sum(np.dtype(v).itemsize for v in METADATA.values())
    inflight = None  # (unit, futures, stats): the previous unit's writes, committed after the next unit computes
    with tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"harvest p{proc}", smoothing=0.1) as bar:
      try:
        for u in todo:
          lo, hi = lay.unit_range(u)
          owned = u % nproc == proc
          if owned:
            _check_disk(store.root, (hi - lo) * (lay.token_bytes * len(lay.layers) + meta_bytes) * 2)
          acts, meta = harvest_unit(plan, lay, u, step, config.batch_size, config.seq_len, pad_id, describe)
          if not owned:  # computed with the other processes; its owner writes it
            bar.update(hi - lo)
            continue
          if inflight is not None:
            _commit(store, *inflight)
          inflight = (u, store.write_unit(u, acts, meta), unit_stats(acts, ROLES))
          bar.update(hi - lo)
      finally:
        # Whatever stopped the loop, the unit already computed and being written is kept (not lost work).
        if inflight is not None:
          _commit(store, *inflight)
  # Seconds to get ready (tokenize, load, open) and to harvest (compile included), for benchmarks.
  store.timing = {"load_s": t_ready - t_start, "harvest_s": time.time() - t_ready}
  if store.try_finalize():
    print(f"harvest: store complete ({lay.num_tokens:,} tokens, {time.time() - t_start:.1f} s in this process).",
          flush=True)
  else:
    print(f"harvest: process {proc} done; {len(store.finished_units())}/{lay.num_units} units written so far "
          "(the last process to finish completes the manifest).", flush=True)
  return store


def _commit(store: ActivationStore, unit: int, futures: list, stats: dict) -> None:
  """Waits for a unit's writes to be durable, then records it."""
  try:
    for f in futures:
      f.commit.result()  # durable, not merely copied out of our buffers
  except (ValueError, OSError) as e:
    if "space" in str(e).lower() or getattr(e, "errno", None) == errno.ENOSPC:
      raise DiskFullError(errno.ENOSPC, f"disk full while writing unit {unit} to {store.root}: {e}. Free space and run "
                          "the same command again; the units already written are kept.") from e
    raise StoreError(f"writing unit {unit} to {store.root} failed: {e}. Run the same command again to redo it.") from e
  store.commit_unit(unit, stats)


__all__ = ["DiskFullError", "NonFiniteActivationError", "ROLES", "TokenPlan", "check_out_dir", "check_store",
           "ensure_store", "harvest", "harvest_unit", "make_step", "out_dir_of", "pack_rows", "plan_tokens",
           "row_buckets"]
