"""The paired activation store: TensorStore zarr3 arrays of residual-stream activations.

Layout of a store directory:

  manifest.json          models, layers, dtype, token count, datasets, statistics, `complete`
  layer_LL/              zarr3 [n_tokens, M, d] (M = 2: base, fine-tuned), one per harvested layer
  token_id/ doc_index/ position/ token_kind/   zarr3 [n_tokens] per-token metadata
  progress/unit_NNNNNN.json                    one marker per finished unit (see below)

Tokens are split into *units* of `shard_tokens` consecutive tokens; unit u is exactly shard u of
every array, so a unit is written as whole shard files and no two writers ever touch the same
file. A unit's marker is written (atomically, after the data is on disk) only once all its
shards are, and the manifest claims the tokens only once every marker exists: a store never
claims tokens it has not written.

Each shard holds small inner chunks of `chunk_tokens` tokens (the unit of a read); see
docs/activations.md for how the sizes are chosen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import tensorstore as ts

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, KIND_TEXT
from neurodiff_jax.utils.files import atomic_write_json

FORMAT = "neurodiff-activations"
VERSION = 1
METADATA = {"token_id": "int32", "doc_index": "int32", "position": "int32", "token_kind": "uint8"}
# The names of the `token_kind` codes (the codes are defined where tokens are labelled, `datasets.py`).
TOKEN_KINDS = {KIND_TEXT: "text", KIND_SPECIAL: "special", KIND_TEMPLATE: "chat_template"}


@runtime_checkable
class Pending(Protocol):
  """A read whose `.result()` gives its array or raises: a TensorStore future, or a read that already failed."""

  def result(self) -> Any: ...


class StoreError(ValueError):
  """A store that is missing, incomplete, corrupt, or was made with another config."""


@dataclasses.dataclass(frozen=True)
class StoreLayout:
  """Shapes and sizes of a store: what must agree between every writer and reader."""

  num_tokens: int
  num_models: int
  d_model: int
  layers: tuple[int, ...]
  dtype: str
  shard_tokens: int
  chunk_tokens: int

  @property
  def num_units(self) -> int:
    """Units (= shards along the token axis)."""
    return -(-self.num_tokens // self.shard_tokens)

  def unit_range(self, unit: int) -> tuple[int, int]:
    """The token range [lo, hi) of one unit."""
    lo = unit * self.shard_tokens
    return lo, min(lo + self.shard_tokens, self.num_tokens)

  @property
  def token_bytes(self) -> int:
    """Bytes of one token's activations at one layer (all models)."""
    return self.num_models * self.d_model * np.dtype(_np_dtype(self.dtype)).itemsize


def choose_sizes(num_models: int, d_model: int, dtype: str, shard_bytes: int = 256 << 20,
                 chunk_bytes: int = 512 << 10) -> tuple[int, int]:
  """(shard_tokens, chunk_tokens): powers of two with shards ≈ `shard_bytes` and chunks ≈ `chunk_bytes`."""
  per_token = num_models * d_model * np.dtype(_np_dtype(dtype)).itemsize
  chunk = 1 << max(0, int(np.floor(np.log2(max(chunk_bytes // per_token, 1)))))
  shard = 1 << max(0, int(np.floor(np.log2(max(shard_bytes // per_token, 1)))))
  return max(shard, chunk), chunk


def _np_dtype(name: str) -> Any:
  if name == "bfloat16":
    return ts.bfloat16.numpy_dtype
  return np.dtype(name)


def _zarr3_spec(path: Path, shape: Sequence[int], dtype: str, shard: Sequence[int], chunk: Sequence[int]) -> dict:
  return {
      "driver": "zarr3",
      "kvstore": {"driver": "file", "path": str(path)},
      "metadata": {
          "shape": list(shape), "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
          # Uncompressed inner chunks (activations do not compress; raw bytes are the fastest to read),
          # each with a CRC32C so that a corrupt shard is an error, never silently wrong numbers.
          "codecs": [{"name": "sharding_indexed", "configuration": {
              "chunk_shape": list(chunk),
              "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
              "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
          }}],
      },
  }


# A shared context: no chunk cache (readers cache whole windows themselves) and enough file
# concurrency to keep a disk busy.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_concurrency": {"limit": 32}})


def layer_name(layer: int) -> str:
  """The array name of one layer's activations."""
  return f"layer_{layer:02d}"


class ActivationStore:
  """A store directory: its manifest, layout and TensorStore arrays."""

  def __init__(self, root: str | os.PathLike, manifest: dict):
    self.root = Path(root)
    self.manifest = manifest
    m = manifest
    self.layout = StoreLayout(num_tokens=m["num_tokens"], num_models=len(m["models"]), d_model=m["d_model"],
                              layers=tuple(m["layers"]), dtype=m["dtype"], shard_tokens=m["shard_tokens"],
                              chunk_tokens=m["chunk_tokens"])
    self._arrays: dict[str, ts.TensorStore] = {}

  # ---- creation and opening ----

  @classmethod
  def create_or_open(cls, root: str | os.PathLike, manifest: dict) -> "ActivationStore":
    """Creates the store (arrays + manifest) or opens it when it exists with the same `config_key`."""
    root = Path(root)
    existing = root / "manifest.json"
    if existing.is_file():
      old = json.loads(existing.read_text())
      if old.get("config_key") != manifest["config_key"]:
        diffs = [k for k in sorted(set(old) | set(manifest)) if k in _KEY_FIELDS and old.get(k) != manifest.get(k)]
        raise StoreError(
            f"{root} holds a store made with another config (differs in: {', '.join(diffs) or 'config_key'}); "
            "harvest into a new directory, or delete this one to start over.")
      store = cls(root, old)
    else:
      store = cls(root, manifest)
    root.mkdir(parents=True, exist_ok=True)
    lay = store.layout
    specs = {layer_name(l): ([lay.num_tokens, lay.num_models, lay.d_model], lay.dtype,
                             [lay.shard_tokens, lay.num_models, lay.d_model],
                             [lay.chunk_tokens, lay.num_models, lay.d_model])
             for l in lay.layers}
    meta_chunk = min(lay.shard_tokens, 1 << 16)
    specs.update({n: ([lay.num_tokens], dt, [lay.shard_tokens], [meta_chunk]) for n, dt in METADATA.items()})
    futures = {n: ts.open(_zarr3_spec(root / n, *s), create=True, open=True, context=_CONTEXT)
               for n, s in specs.items()}
    for n, f in futures.items():
      try:
        store._arrays[n] = f.result()
      except ValueError as e:
        raise StoreError(f"cannot create or open array {root / n}: {e}") from e
    if not existing.is_file():
      atomic_write_json(existing, manifest)
    return store

  @classmethod
  def open(cls, root: str | os.PathLike, *, require_complete: bool = True) -> "ActivationStore":
    """Opens an existing store for reading."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
      raise StoreError(f"no activation store at {root} (manifest.json missing); create one with "
                       "`python -m launch.harvest --config=...`.")
    try:
      manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise StoreError(f"{path} is corrupt ({e}); re-run the harvest into a fresh directory.") from e
    if manifest.get("format") != FORMAT:
      raise StoreError(f"{root} is not a neurodiff activation store (format {manifest.get('format')!r}).")
    store = cls(root, manifest)
    if require_complete and not manifest.get("complete"):
      done = len(store.finished_units())
      raise StoreError(f"store {root} is incomplete: {done}/{store.layout.num_units} units written. Run the same "
                       "harvest command again to finish it (it resumes where it stopped).")
    return store

  def array(self, name: str) -> ts.TensorStore:
    """The TensorStore array `name` (`layer_name(L)` or a metadata name), opened on first use."""
    if name not in self._arrays:
      path = self.root / name
      if not (path / "zarr.json").is_file():
        known = [layer_name(l) for l in self.layout.layers] + list(METADATA)
        raise StoreError(f"store {self.root} has no array {name!r}; it has {', '.join(known)}.")
      self._arrays[name] = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
                                   read=True, context=_CONTEXT).result()
    return self._arrays[name]

  def layer(self, layer: int) -> ts.TensorStore:
    """The [n_tokens, M, d] array of one harvested layer."""
    self._check_layer(layer)
    return self.array(layer_name(layer))

  def _check_layer(self, layer: int) -> None:
    if layer not in self.layout.layers:
      raise StoreError(f"layer {layer} was not harvested into {self.root}; harvested layers: "
                       f"{list(self.layout.layers)}. Choose one of them, or harvest that layer into a new store.")

  def metadata(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Per-token metadata (`token_id`, `doc_index`, `position`, `token_kind`) for tokens [lo, hi)."""
    if name not in METADATA:
      raise StoreError(f"unknown metadata {name!r}; known: {', '.join(METADATA)}.")
    hi = self.layout.num_tokens if hi is None else hi
    return self.array(name)[lo:hi].read().result()

  # ---- units ----

  def unit_marker(self, unit: int) -> Path:
    """The file whose presence says unit `unit` is durably written."""
    return self.root / "progress" / f"unit_{unit:06d}.json"

  def finished_units(self) -> set[int]:
    """Units whose marker exists."""
    d = self.root / "progress"
    if not d.is_dir():
      return set()
    return {int(p.stem.split("_")[1]) for p in d.glob("unit_*.json")}

  def write_unit(self, unit: int, layers: dict[int, np.ndarray], meta: dict[str, np.ndarray]) -> list[ts.WriteFutures]:
    """Starts writing one unit's shards (every layer and metadata array); returns the writes' futures."""
    lo, hi = self.layout.unit_range(unit)
    futures = [self.array(layer_name(l))[lo:hi].write(x) for l, x in layers.items()]
    futures += [self.array(n)[lo:hi].write(meta[n]) for n in METADATA]
    return futures

  def commit_unit(self, unit: int, stats: dict) -> None:
    """Records a unit as written; call only after its writes have completed."""
    marker = {"unit": unit, "range": list(self.layout.unit_range(unit)), "stats": stats}
    atomic_write_json(self.unit_marker(unit), marker)

  def try_finalize(self) -> bool:
    """When every unit is written, merges the unit statistics into the manifest (idempotent)."""
    if self.manifest.get("complete"):
      return True
    done = self.finished_units()
    if len(done) < self.layout.num_units:
      return False
    per_unit = [json.loads(self.unit_marker(u).read_text())["stats"] for u in range(self.layout.num_units)]
    manifest = dict(self.manifest, complete=True, stats=merge_stats(per_unit, self.manifest["models"]))
    atomic_write_json(self.root / "manifest.json", manifest)
    self.manifest = manifest
    return True

  # ---- reading ----

  def read(self, layer: int, lo: int, hi: int) -> np.ndarray:
    """Activations [hi - lo, M, d] of tokens [lo, hi) at `layer`, in the store dtype."""
    return self.check_read(self.layer(layer)[lo:hi].read(), layer_name(layer), lo, hi)

  def check_read(self, future: Pending, name: str, lo: int, hi: int) -> np.ndarray:
    """The result of a read of tokens [lo, hi) of array `name`; a failed read is an error naming the units to redo."""
    try:
      return future.result()
    except ValueError as e:
      s = self.layout.shard_tokens
      units = list(range(lo // s, -(-hi // s)))
      raise StoreError(
          f"reading {name} tokens [{lo}, {hi}) of {self.root} failed ({e}). The shard is corrupt or missing: delete "
          f"{', '.join(str(self.unit_marker(u).relative_to(self.root)) for u in units[:4])}"
          f"{' ...' if len(units) > 4 else ''} and the 'complete' flag in manifest.json, and run the harvest command "
          "again to rewrite it.") from e

  # ---- statistics (dataset-wide, merged from the units when the store completes) ----

  @property
  def layers(self) -> tuple[int, ...]:
    """The harvested layers."""
    return self.layout.layers

  @property
  def roles(self) -> tuple[str, ...]:
    """The models' roles, in the order of the M axis (e.g. base, finetuned)."""
    return tuple(m["role"] for m in self.manifest["models"])

  def _stats(self, layer: int) -> list[dict]:
    """Each model's statistics of one layer, in the order of the M axis."""
    self._check_layer(layer)
    stats = self.manifest.get("stats")
    if stats is None:
      raise StoreError(f"store {self.root} has no statistics yet: it is incomplete. Run the same harvest command "
                       "again to finish it.")
    return [stats[str(layer)][role] for role in self.roles]

  def mean(self, layer: int) -> np.ndarray:
    """The mean activation of each model at `layer`, [M, d] float32, in the store's (original) units."""
    return np.stack([np.asarray(s["mean"], np.float32) for s in self._stats(layer)])

  def mean_norm(self, layer: int) -> np.ndarray:
    """E‖x_i‖ of each model at `layer`, [M] float64."""
    return np.array([s["mean_norm"] for s in self._stats(layer)], np.float64)

  def rms_norm(self, layer: int) -> np.ndarray:
    """√E‖x_i‖² of each model at `layer`, [M] float64."""
    return np.array([s["rms_norm"] for s in self._stats(layer)], np.float64)

  def norm_scale(self, layer: int) -> np.ndarray:
    """Per model, the scalar that brings the mean activation norm to √d (docs/methods.md §2), [M] float32."""
    return (np.sqrt(self.layout.d_model) / self.mean_norm(layer)).astype(np.float32)


# Manifest fields that define a store's contents: a store reopened with any of them changed is an error.
_KEY_FIELDS = ("models", "layers", "d_model", "dtype", "num_tokens", "shard_tokens", "chunk_tokens", "keep_bos",
               "seq_len", "datasets", "corpus_fingerprint")


def config_key(manifest: dict) -> str:
  """A hash of the manifest fields that define the store's contents."""
  return hashlib.sha256(json.dumps({k: manifest.get(k) for k in _KEY_FIELDS}, sort_keys=True).encode()).hexdigest()[:16]


def unit_stats(layers: dict[int, np.ndarray], roles: Sequence[str]) -> dict:
  """Sufficient statistics of one unit's activations: token count, Σ‖x‖, Σ‖x‖², Σx per layer and model."""
  out = {}
  for l, x in layers.items():
    x = x.astype(np.float32)
    sq = np.einsum("nmd,nmd->nm", x, x).astype(np.float64)  # [n, M]
    out[str(l)] = {r: {"count": int(x.shape[0]), "sum_norm": float(np.sqrt(sq[:, i]).sum()),
                       "sum_sq_norm": float(sq[:, i].sum()), "sum": x[:, i].sum(0, dtype=np.float64).tolist()}
                   for i, r in enumerate(roles)}
  return out


def merge_stats(per_unit: list[dict], models: list[dict]) -> dict:
  """Dataset-wide mean norm, RMS norm and mean vector per layer and model, from unit statistics."""
  out: dict = {}
  for stats in per_unit:
    for l, by_role in stats.items():
      for r, s in by_role.items():
        acc = out.setdefault(l, {}).setdefault(r, {"count": 0, "sum_norm": 0.0, "sum_sq_norm": 0.0, "sum": 0.0})
        acc["count"] += s["count"]
        acc["sum_norm"] += s["sum_norm"]
        acc["sum_sq_norm"] += s["sum_sq_norm"]
        acc["sum"] = np.asarray(s["sum"]) + acc["sum"]
  final = {}
  for l, by_role in out.items():
    final[l] = {}
    for r, a in by_role.items():
      n = max(a["count"], 1)
      final[l][r] = {"count": a["count"], "mean_norm": a["sum_norm"] / n,
                     "rms_norm": float(np.sqrt(a["sum_sq_norm"] / n)),
                     "mean": (np.asarray(a["sum"]) / n).tolist()}
  return final


def write_arrays(root: str | os.PathLike, layers: dict[int, np.ndarray], *, dtype: str = "float32",
                 roles: Sequence[str] = ("base", "finetuned"), shard_tokens: int | None = None,
                 chunk_tokens: int | None = None, metadata: dict[str, np.ndarray] | None = None,
                 source: str = "arrays") -> ActivationStore:
  """A complete store holding given activations `{layer: [n, M, d]}` (synthetic data, tests, benchmarks).

  Metadata default to zeros (token id, position, kind) and one document per token.
  """
  arrays = {int(l): np.asarray(x) for l, x in layers.items()}
  n, num_models, d = next(iter(arrays.values())).shape
  if any(x.shape != (n, num_models, d) for x in arrays.values()) or len(roles) != num_models:
    raise ValueError(f"every layer must be [n, M={len(roles)}, d] with the same shape; got "
                     f"{ {l: x.shape for l, x in arrays.items()} }.")
  shard, chunk = choose_sizes(num_models, d, dtype)
  shard = shard_tokens or shard
  chunk = chunk_tokens or min(chunk, shard)  # the shard chosen, not the default one
  manifest = {"format": FORMAT, "version": VERSION, "models": [{"role": r, "path": source} for r in roles],
              "layers": sorted(arrays), "d_model": d, "dtype": dtype, "num_tokens": n, "shard_tokens": shard,
              "chunk_tokens": chunk, "complete": False, "datasets": [{"path": source}]}
  manifest["config_key"] = config_key(manifest)
  store = ActivationStore.create_or_open(root, manifest)
  meta = {k: np.zeros(n, v) for k, v in METADATA.items()} | {"doc_index": np.arange(n, dtype=np.int32)}
  meta |= {k: np.asarray(v, METADATA[k]) for k, v in (metadata or {}).items()}
  np_dtype = _np_dtype(dtype)
  for u in range(store.layout.num_units):
    lo, hi = store.layout.unit_range(u)
    part = {l: x[lo:hi].astype(np_dtype) for l, x in arrays.items()}
    for f in store.write_unit(u, part, {k: v[lo:hi] for k, v in meta.items()}):
      f.result()
    store.commit_unit(u, unit_stats(part, roles))
  store.try_finalize()
  return store


__all__ = ["FORMAT", "METADATA", "TOKEN_KINDS", "VERSION", "ActivationStore", "Pending", "StoreError", "StoreLayout",
           "atomic_write_json", "choose_sizes", "config_key", "layer_name", "merge_stats", "unit_stats", "write_arrays"]
