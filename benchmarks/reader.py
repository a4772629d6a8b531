"""Reader throughput: shuffled Grain batches from a store against raw sequential reads of its bytes.

Writes a store of random bf16 activations (`--tokens` tokens of M = 2 × `--d`, Gemma 2 2B's
d = 2304 by default) with the same layout the harvest writes, then measures, each from a cold
page cache (`posix_fadvise(DONTNEED)` on every file first) and again warm:

  * raw       the layer's shard files read sequentially with 8 MiB `read`s (the disk's speed)
  * reader    `batch_iterator(batch_dataset(store, layer, B))`: shuffled [B, M, d] float32 batches
              (windows read straight from the shard files, `activations/chunks.py`)
  * reader via TensorStore   the same with `direct=False` (windows read with TensorStore)

each over three consecutive epochs of one iterator (the first from a cold cache, including the
buffers and the first window; a steady epoch after dropping the cache again; a steady epoch
warm), interleaved `--reps` times (this VM's disk speed drifts); it prints the medians of MB/s
(bytes of bf16 activations delivered), batches/s and the share of the raw speed. Then it shows
whether a crosscoder step would wait: the library's BatchTopK training step
(`crosscoder.step.make_train_step`, default train step and loss, Adam) at `--cc-d` per model is
timed alone and then fed by the reader at that width: the fraction of wall time spent waiting on data.

  PYTHONPATH=. .venv/bin/python benchmarks/reader.py             # ~4 min, ~3 GB of disk
  PYTHONPATH=. .venv/bin/python benchmarks/reader.py --tokens 20000 --reps 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import harness
from neurodiff_jax.activations.reader import batch_dataset, batch_iterator
from neurodiff_jax.activations.store import (FORMAT, METADATA, VERSION, ActivationStore, choose_sizes, config_key,
                                             layer_name)


def write_store(root: Path, tokens: int, d: int, seed: int = 0) -> ActivationStore:
  """A complete store of random bf16 activations at layer 0 (and zero metadata)."""
  shard, chunk = choose_sizes(2, d, "bfloat16")
  shard = min(shard, 1 << 14)
  manifest = {"format": FORMAT, "version": VERSION, "models": [{"role": "base"}, {"role": "finetuned"}], "layers": [0],
              "d_model": d, "dtype": "bfloat16", "num_tokens": tokens, "shard_tokens": shard, "chunk_tokens": chunk,
              "complete": False}
  manifest["config_key"] = config_key(manifest)
  store = ActivationStore.create_or_open(root, manifest)
  rng = np.random.default_rng(seed)
  bf16 = store.layer(0).dtype.numpy_dtype
  for u in range(store.layout.num_units):
    lo, hi = store.layout.unit_range(u)
    x = rng.standard_normal((hi - lo, 2, d), np.float32).astype(bf16)
    meta = {n: np.zeros(hi - lo, dt) for n, dt in METADATA.items()}
    for f in store.write_unit(u, {0: x}, meta):
      f.result()
    store.commit_unit(u, {"0": {r: {"count": hi - lo, "sum_norm": float(hi - lo) * np.sqrt(d), "sum_sq_norm": 0.0,
                                   "sum": [0.0] * d} for r in ("base", "finetuned")}})
  store.try_finalize()
  return store


def drop_cache(paths: list[Path]) -> None:
  """Evicts the files' pages from the page cache, so the next read comes from disk."""
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def raw_read(paths: list[Path]) -> tuple[float, int]:
  """Seconds and bytes to read the files sequentially."""
  t0, n = time.perf_counter(), 0
  for p in paths:
    with open(p, "rb", buffering=0) as f:
      while chunk := f.read(8 << 20):
        n += len(chunk)
  return time.perf_counter() - t0, n


def reader_epochs(store: ActivationStore, batch: int, window: int | None, files: list[Path], dtype: str = "float32",
                  direct: bool = True, seed: int = 0) -> dict[str, float]:
  """Bytes/s of three consecutive epochs of one Grain iterator: first (cold), steady cold, steady warm.

  The first epoch includes allocating the window buffers and reading the first window before any
  batch. The page cache is dropped again at its end, so the second epoch reads from disk like a
  long run over a store larger than memory; the third reads the same bytes from the page cache.
  Each epoch's time includes prefetching the next epoch's first windows, so the epochs compare.
  """
  ds = batch_dataset(store, 0, batch, seed=seed, window_tokens=window, dtype=dtype, direct=direct)
  per_epoch = len(batch_dataset(store, 0, batch, seed=seed, window_tokens=window, num_epochs=1))
  nbytes = per_epoch * batch * store.layout.token_bytes
  drop_cache(files)
  out = {}
  t0 = time.perf_counter()
  it = batch_iterator(ds, prefetch=4, num_threads=2)
  for name in ("first", "cold", "warm"):
    for i in range(per_epoch):
      next(it)
      if name == "first" and i == 0:
        out["first_batch_s"] = time.perf_counter() - t0
    out[name] = nbytes / (time.perf_counter() - t0)
    if name == "first":
      drop_cache(files)
    t0 = time.perf_counter()
  return out


def crosscoder_step(d: int, m: int, k: int):
  """The library's jitted BatchTopK training step (2 models, default train step and loss) and its state."""
  import jax
  import optax

  from neurodiff_jax.crosscoder import sharding
  from neurodiff_jax.crosscoder import step as step_lib
  from neurodiff_jax.crosscoder.model import CrosscoderConfig
  from neurodiff_jax.crosscoder.objective import LossConfig

  cfg, tx = CrosscoderConfig(num_models=2, d_model=d, dict_size=m, k=k), optax.adam(1e-4)
  mesh = sharding.make_mesh(1, 1)
  norm, key = np.ones(2, np.float32), jax.random.key(0)
  state = step_lib.sharded_init(key, cfg, tx, mesh, norm, None)
  abstract = jax.eval_shape(lambda key: step_lib.init_state(key, cfg, tx, norm, None), key)
  step = step_lib.make_train_step(cfg, LossConfig(), tx, mesh, abstract)

  def run(state, x):
    return step(state, step_lib.global_batch(x, mesh))

  return run, state


def training_wait(store: ActivationStore, args) -> dict:
  """Steps/s of the crosscoder step alone and fed by the reader, and the fraction of time waiting on data."""
  import jax

  step, state = crosscoder_step(store.layout.d_model, args.cc_m, args.cc_k)
  x = np.random.default_rng(0).standard_normal((args.batch, 2, store.layout.d_model), np.float32)
  state, metrics = step(state, x)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = step(state, x)
  jax.block_until_ready(metrics)
  alone = (time.perf_counter() - t0) / args.steps
  it = batch_iterator(batch_dataset(store, 0, args.batch, seed=1, window_tokens=args.window), prefetch=4, num_threads=2)
  next(it)
  wait = 0.0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    tw = time.perf_counter()
    x = next(it)
    wait += time.perf_counter() - tw
    state, metrics = step(state, x)
  jax.block_until_ready(metrics)
  fed = (time.perf_counter() - t0) / args.steps
  return {"alone_s": alone, "fed_s": fed, "wait_frac": wait / (fed * args.steps)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=300_000)
  ap.add_argument("--d", type=int, default=2304)
  ap.add_argument("--batch", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are reported")
  ap.add_argument("--window", type=int, default=None, help="shuffle window in tokens (default: 512 MiB worth)")
  ap.add_argument("--dtype", default="float32", help="batch dtype: float32 or bfloat16 (no widening)")
  ap.add_argument("--dir", default="", help="where to write the store (default: a temp dir)")
  ap.add_argument("--cc-d", type=int, default=256, help="crosscoder width per model for the waiting test")
  ap.add_argument("--cc-m", type=int, default=8192)
  ap.add_argument("--cc-k", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory(prefix="reader-bench-", dir=args.dir or None) as tmp:
    store = write_store(Path(tmp) / "store", args.tokens, args.d)
    files = sorted(p for p in (store.root / layer_name(0)).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    # This VM's disk varies by 2x from minute to minute: interleave the measurements and take medians.
    runs: dict[str, list[float]] = {}
    for rep in range(args.reps):
      for cache in ("cold", "warm"):
        if cache == "cold":
          drop_cache(files)
        s, n = raw_read(files)
        runs.setdefault(f"raw {cache}", []).append(n / s)
      for direct in (True, False):
        r = reader_epochs(store, args.batch, args.window, files, args.dtype, direct=direct, seed=rep)
        name = "reader" if direct else "reader via TensorStore"
        for k, v in r.items():
          runs.setdefault(f"{name} {k}", []).append(v)
    med = {k: harness.median(v) for k, v in runs.items()}
    batch_bytes = args.batch * store.layout.token_bytes
    print(f"\nreader: {args.tokens:,} tokens × 2 × {args.d} bf16 ({size / 1e9:.2f} GB on disk, shard "
          f"{store.layout.shard_tokens} / chunk {store.layout.chunk_tokens} tokens), batch {args.batch}, "
          f"window {args.window or 'default (512 MiB)'} tokens, {args.dtype} output, epochs of "
          f"{len(batch_dataset(store, 0, args.batch, window_tokens=args.window, num_epochs=1))} batches, "
          f"median of {args.reps}; {harness.machine()}\n")
    rows = [("cold", "raw sequential read", "raw cold"),
            ("cold", "reader, first epoch (incl. buffers and first window)", "reader first"),
            ("cold", "reader, steady epoch", "reader cold"),
            ("cold", "reader via TensorStore, steady epoch", "reader via TensorStore cold"),
            ("warm", "raw sequential read", "raw warm"),
            ("warm", "reader, steady epoch", "reader warm"),
            ("warm", "reader via TensorStore, steady epoch", "reader via TensorStore warm")]
    table = [[cache, label, f"{med[key] / 1e6:,.0f}", "" if key.startswith("raw") else f"{med[key] / batch_bytes:.1f}",
              f"{med[key] / med['raw ' + cache]:.0%}"] for cache, label, key in rows]
    print(harness.markdown_table(["page cache", "method", "MB/s", "batches/s", "share of raw"], table))
    print(f"\nfirst batch after {med['reader first_batch_s']:.2f} s (TensorStore: "
          f"{med['reader via TensorStore first_batch_s']:.2f} s)")
    small = write_store(Path(tmp) / "small", max(args.tokens, 8 * args.batch), args.cc_d, seed=1)
    w = training_wait(small, args)
    print(f"\ncrosscoder step (BatchTopK, 2 × d={args.cc_d}, m={args.cc_m}, k={args.cc_k}, batch {args.batch}): "
          f"{w['alone_s'] * 1e3:.0f} ms alone, {w['fed_s'] * 1e3:.0f} ms fed by the reader; "
          f"{w['wait_frac']:.1%} of the fed loop's time waiting for a batch")


if __name__ == "__main__":
  main()
