"""The harvest on a model mesh (`--config.model_mesh`) against the one-device harvest, on forced CPU devices.

Two random Gemma 2 checkpoints ("base" and "fine-tuned", another seed; d 512, 6 layers, 8 heads, 4 KV
heads, MLP 2048, vocabulary 2048: ~23M parameters each) share one BPE tokenizer; the dataset is the
organisms' generated corpus. Each run is a fresh subprocess pinned to the same `--threads` cores that
harvests every token of both models at `--layer` (bf16 store) with `neurodiff_jax.activations.harvest`:

  * 1 device          XLA_FLAGS=--xla_force_host_platform_device_count=1, model_mesh ()
  * 8 devices, ()     8 forced devices, model_mesh () (the models on one of them)
  * (1,8) (2,4) (8,1) 8 forced devices, the models on that (data, model) mesh

and prints a Markdown table: harvest seconds (after loading; compile included, reported apart), tokens/s
with and without compile time, the overhead against the one-device run, peak RSS; then, per mesh, the
weight bytes each device holds (summed `addressable_shards`) against `models.memory.pair_bytes_per_device`,
and XLA's temporary-buffer size of one harvest step per device (`memory_analysis`) against the activation
estimate. Forced CPU devices are not hardware: the 8 share the same `--threads` cores and one memory, so
the overhead measured here is the price of partitioning (collectives become copies, more and smaller
kernels), not a speed-up; on real accelerators each device brings its own compute and memory.

  PYTHONPATH=. .venv/bin/python benchmarks/sharded_harvest.py             # ~5 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/sharded_harvest.py --small     # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

RUNS = (("1 device", 1, ()), ("8 devices, ()", 8, ()), ("(1,8)", 8, (1, 8)), ("(2,4)", 8, (2, 4)),
        ("(8,1)", 8, (8, 1)))


def prepare(work: Path, small: bool, n_docs: int) -> dict:
  """Checkpoints, tokenizer and dataset in `work`; returns their paths."""
  import transformers

  size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
               head_dim=16) if small else
          dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64))
  return harness.write_model_pair(work, n_docs, lambda tok: transformers.Gemma2Config(
      vocab_size=len(tok), tie_word_embeddings=True, sliding_window=128, query_pre_attn_scalar=size["head_dim"],
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **size))


def memory(spec: dict) -> dict:
  """Weight bytes per device (held vs computed) and one step's temporary bytes per device (XLA vs the estimate)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from neurodiff_jax.models import load_model, model_config, model_mesh
  from neurodiff_jax.models.memory import pair_bytes_per_device

  shape = tuple(spec["mesh"])
  cfg = model_config(spec["base"])
  mesh = model_mesh(shape, [cfg])
  models = [load_model(spec[r], jnp.float32, mesh) for r in ("base", "finetuned")]
  held: dict = {}
  for m in models:
    for x in jax.tree.leaves(nnx.state(m, nnx.Param)):
      for s in x.addressable_shards:
        held[s.device] = held.get(s.device, 0) + s.data.nbytes
  want = pair_bytes_per_device(cfg, shape, "float32", batch=spec["batch_size"], seq_len=spec["seq_len"], layers=1)
  layers, last = (spec["layer"],), spec["layer"]
  splits = [nnx.split(m) for m in models]

  @jax.jit
  def step(states, ids, segments):  # the harvest's step (activations/harvest.py `make_step`)
    acts = []
    for (g, _), s in zip(splits, states):
      res = nnx.merge(g, s)(ids, segment_ids=segments, capture=layers, stop_at_layer=last).residuals
      acts.append(jnp.stack([res[l] for l in layers], axis=2))
    return jnp.stack(acts, axis=3).astype(jnp.bfloat16)

  from neurodiff_jax.models.sharding import put_batch

  ids = jnp.ones((spec["batch_size"], spec["seq_len"]), jnp.int32)
  args = put_batch(mesh, ids, ids)
  analysis = step.lower(tuple(s for _, s in splits), *args).compile().memory_analysis()
  return {"weights_held": sorted(set(held.values())), "weights_computed": want.weights,
          "temp_xla": int(analysis.temp_size_in_bytes) if analysis is not None else None,
          "activations_estimate": want.activations}


def child(spec: dict) -> None:
  """Harvests in this (fresh) process and prints a JSON result."""
  cpus = harness.pin(spec["threads"])
  import jax

  from configs.harvest_tiny import get_config
  from neurodiff_jax.activations.harvest import harvest

  compile_s = harness.compile_seconds()
  c = get_config()
  c.base_model, c.finetuned_model, c.datasets = spec["base"], spec["finetuned"], [spec["data"]]
  c.layers, c.seq_len, c.batch_size = (spec["layer"],), spec["seq_len"], spec["batch_size"]
  c.out_dir, c.shard_tokens, c.model_mesh = spec["out"], 0, tuple(spec["mesh"])
  store = harvest(c)
  res = {"tokens": store.layout.num_tokens, "compile_s": sum(compile_s), **store.timing, "devices": jax.device_count(),
         "cpus": cpus, "peak_rss_mib": harness.rss_mib()}
  if spec["mesh"]:
    res.update(memory(spec))
  print("RESULT " + json.dumps(res), flush=True)


def compare(a: str, b: str) -> float:
  """Largest |a − b| / max |a| over both stores' activations (bf16: one rounding is up to 2^-8 of a value)."""
  import numpy as np

  from neurodiff_jax.activations.store import ActivationStore

  sa, sb = ActivationStore.open(a), ActivationStore.open(b)
  layer = sa.layout.layers[0]
  x = sa.read(layer, 0, sa.layout.num_tokens).astype(np.float32)
  y = sb.read(layer, 0, sb.layout.num_tokens).astype(np.float32)
  return float(np.abs(x - y).max() / np.abs(x).max())


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny models, a smoke test")
  ap.add_argument("--docs", type=int, default=400)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layer", type=int, default=3)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(json.loads(args.child))
    return
  layer = min(args.layer, 1) if args.small else args.layer
  with tempfile.TemporaryDirectory(prefix="sharded-harvest-bench-") as tmp:
    work = Path(tmp)
    paths = prepare(work, args.small, args.docs)
    results = []
    for name, devices, mesh in RUNS:
      spec = dict(paths, threads=args.threads, layer=layer, seq_len=args.seq_len, batch_size=args.batch_size,
                  mesh=list(mesh), out=str(work / f"out-{len(results)}"))
      env = harness.child_env(args.threads, "cpu")
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
      proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                            text=True)
      line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not line:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
      results.append((name, spec, json.loads(line[-1][7:])))
    base = results[0][2]
    base_rate = base["tokens"] / base["harvest_s"]
    base_steady = base["tokens"] / (base["harvest_s"] - base["compile_s"])
    print(f"\nsharded harvest: 2 × Gemma 2 ({'tiny' if args.small else '~23M'}), layer {layer}, {args.docs} documents, "
          f"seq_len {args.seq_len}, batch {args.batch_size}, bf16 store, {args.threads} threads shared by every forced "
          f"device; {harness.machine()}\n")
    head = ["run", "devices", "tokens", "harvest s", "of which compile s", "tokens/s", "tokens/s w/o compile",
            "time vs 1 device (w/o compile)", "peak RSS MiB", "max |Δ| / max |x| vs 1 device"]
    rows = []
    for i, (name, spec, r) in enumerate(results):
      rate, steady = r["tokens"] / r["harvest_s"], r["tokens"] / (r["harvest_s"] - r["compile_s"])
      diff = "—" if i == 0 else f"{compare(results[0][1]['out'], spec['out']):.1e}"
      rows.append([name, r["devices"], f"{r['tokens']:,}", f"{r['harvest_s']:.1f}", f"{r['compile_s']:.1f}",
                   f"{rate:,.0f}", f"{steady:,.0f}", f"{base_rate / rate:.2f}× ({base_steady / steady:.2f}×)",
                   f"{r['peak_rss_mib']:.0f}", diff])
    print(harness.markdown_table(head, rows))
    print("\nmemory per device (float32 models):\n")
    head = ["mesh", "weights held (addressable shards)", "pair_bytes_per_device weights", "step temp (XLA)",
            "activation estimate"]
    rows = []
    for name, spec, r in results:
      if not spec["mesh"]:
        continue
      temp = "n/a" if r["temp_xla"] is None else f"{r['temp_xla'] / 2**20:.2f} MiB"
      rows.append([name, " / ".join(f"{v / 2**20:.2f} MiB" for v in r["weights_held"]),
                   f"{r['weights_computed'] / 2**20:.2f} MiB", temp, f"{r['activations_estimate'] / 2**20:.2f} MiB"])
    print(harness.markdown_table(head, rows))


if __name__ == "__main__":
  main()
