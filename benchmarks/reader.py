"""Reader throughput: shuffled Grain batches from a store against raw sequential reads of its bytes.

Writes a store of random bf16 activations (`--tokens` tokens of M = 2 × `--d`, Gemma 2 2B's
d = 2304 by default) with the same layout the harvest writes, then measures, each from a cold
page cache (`posix_fadvise(DONTNEED)` on every file first) and again warm:

  * raw       the layer's shard files read sequentially with 8 MiB `read`s (the disk's speed)
  * reader    `batch_iterator(batch_dataset(store, layer, B))`: shuffled [B, M, d] float32 batches

and prints batches/s and MB/s (bytes of bf16 activations delivered) and the reader's share of the
raw speed. Then it shows whether a crosscoder step would wait: a BatchTopK crosscoder training
step at `--cc-d` per model (encode, top-k, decode, Adam update; jitted) is timed alone and then
fed by the reader at that width; the table gives the fraction of wall time spent waiting on data.

  PYTHONPATH=. .venv/bin/python benchmarks/reader.py             # ~2 min, ~1.8 GB of disk
  PYTHONPATH=. .venv/bin/python benchmarks/reader.py --tokens 20000 --batches 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neurodiff_jax.activations.reader import batch_dataset, batch_iterator  # noqa: E402
from neurodiff_jax.activations.store import (  # noqa: E402
    FORMAT, METADATA, VERSION, ActivationStore, choose_sizes, config_key, layer_name)


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


def reader_read(store: ActivationStore, batch: int, batches: int, window: int, dtype: str = "float32") -> float:
  """Seconds to draw `batches` shuffled batches through the Grain iterator."""
  it = batch_iterator(batch_dataset(store, 0, batch, seed=0, window_tokens=window, dtype=dtype), prefetch=4,
                      num_threads=2)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return time.perf_counter() - t0


def crosscoder_step(d: int, m: int, k: int, batch: int):
  """A jitted BatchTopK crosscoder training step (2 models) and its state, as issue 5 will train."""
  import jax
  import jax.numpy as jnp
  import optax

  key = jax.random.key(0)
  w_dec = jax.random.normal(key, (m, 2, d)) * 0.01
  params = {"w_enc": jnp.transpose(w_dec, (1, 2, 0)), "b_enc": jnp.zeros(m), "w_dec": w_dec, "b_dec": jnp.zeros((2, d))}
  opt = optax.adam(1e-4)

  def loss(p, x):
    a = jax.nn.relu(jnp.einsum("bmd,mdl->bl", x, p["w_enc"]) + p["b_enc"])
    score = a * jnp.linalg.norm(p["w_dec"], axis=-1).sum(-1)
    cut = jax.lax.top_k(score.reshape(-1), k * x.shape[0])[0][-1]
    f = jnp.where(score >= cut, a, 0.0)
    xh = jnp.einsum("bl,lmd->bmd", f, p["w_dec"]) + p["b_dec"]
    return jnp.mean(jnp.sum((x - xh) ** 2, axis=(1, 2)))

  @jax.jit
  def step(p, s, x):
    l, g = jax.value_and_grad(loss)(p, x)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  return step, params, opt.init(params)


def training_wait(store: ActivationStore, args) -> dict:
  """Steps/s of the crosscoder step alone and fed by the reader, and the fraction of time waiting on data."""
  import jax

  step, p, s = crosscoder_step(store.layout.d_model, args.cc_m, args.cc_k, args.batch)
  x = np.zeros((args.batch, 2, store.layout.d_model), np.float32)
  p, s, l = step(p, s, x)
  jax.block_until_ready(l)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    p, s, l = step(p, s, x)
  jax.block_until_ready(l)
  alone = (time.perf_counter() - t0) / args.steps
  it = batch_iterator(batch_dataset(store, 0, args.batch, seed=1, window_tokens=args.window), prefetch=4, num_threads=2)
  next(it)
  wait = 0.0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    tw = time.perf_counter()
    x = next(it)
    wait += time.perf_counter() - tw
    p, s, l = step(p, s, x)
  jax.block_until_ready(l)
  fed = (time.perf_counter() - t0) / args.steps
  return {"alone_s": alone, "fed_s": fed, "wait_frac": wait / (fed * args.steps)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tokens", type=int, default=100_000)
  ap.add_argument("--d", type=int, default=2304)
  ap.add_argument("--batch", type=int, default=2048)
  ap.add_argument("--batches", type=int, default=40)
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
    rows = []
    for cache in ("cold", "warm"):
      if cache == "cold":
        drop_cache(files)
      raw_s, raw_n = raw_read(files)
      if cache == "cold":
        drop_cache(files)
      rd_s = reader_read(store, args.batch, args.batches, args.window, args.dtype)
      rd_bytes = args.batches * args.batch * store.layout.token_bytes
      rows.append((cache, raw_n / raw_s / 1e6, args.batches / rd_s, rd_bytes / rd_s / 1e6))
    print(f"\nreader: {args.tokens:,} tokens × 2 × {args.d} bf16 ({size / 1e9:.2f} GB on disk, shard "
          f"{store.layout.shard_tokens} / chunk {store.layout.chunk_tokens} tokens), batch {args.batch}, "
          f"window {args.window or 'default (512 MiB)'} tokens, {args.dtype} output\n")
    print("| page cache | raw sequential MB/s | reader batches/s | reader MB/s | reader / raw |")
    print("|---|---|---|---|---|")
    for cache, raw, bps, mbs in rows:
      print(f"| {cache} | {raw:,.0f} | {bps:.2f} | {mbs:,.0f} | {mbs / raw:.0%} |")
    small = write_store(Path(tmp) / "small", max(args.tokens, 8 * args.batch), args.cc_d, seed=1)
    w = training_wait(small, args)
    print(f"\ncrosscoder step (BatchTopK, 2 × d={args.cc_d}, m={args.cc_m}, k={args.cc_k}, batch {args.batch}): "
          f"{w['alone_s'] * 1e3:.0f} ms alone, {w['fed_s'] * 1e3:.0f} ms fed by the reader; "
          f"{w['wait_frac']:.1%} of the fed loop's time waiting for a batch")


if __name__ == "__main__":
  main()
