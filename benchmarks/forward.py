"""Forward throughput and peak memory: our jitted JAX forward against `transformers` (PyTorch).

For each model (a random ~100M-parameter Gemma 2 and Llama built from `transformers` configs) the
script saves one random-weight HF checkpoint, then measures, each in a fresh subprocess pinned to
the same `--threads` cores:

  * jax jit      `neurodiff_jax.models.jit_forward(load_model(path, dtype=float32))`
  * torch eager  `AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")`
  * torch sdpa   the same with `attn_implementation="sdpa"` (n/a where transformers refuses it)

on the same random token ids (float32, an all-ones attention mask passed explicitly), and prints
a Markdown table: median tokens/s and ms per forward, the speed-up of jax over each torch engine,
the child's peak RSS, jax's trace + compile time, and max |logits_jax - logits_torch| on the first
forward; then per-run details (spread, first call, RSS after imports and after loading, threads,
CPU time other processes used while timing).

Run from the repository root:

  PYTHONPATH=. .venv/bin/python benchmarks/forward.py                       # full run, ~7 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/forward.py --small --reps 2      # smoke test, ~1 min
  PYTHONPATH=. .venv/bin/python benchmarks/forward.py --models llama --engines jax,eager --threads 1

Threads: every child is pinned to the first `--threads` CPUs, torch also told N threads
(`benchmarks/harness.py` says why pinning is what bounds XLA:CPU). `XLA_FLAGS` from the
environment is passed through untouched. On a shared machine, `--quiet-wait S` waits up to S
seconds before each timed forward for other processes to go idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import harness
from harness import hf_config

ENGINES = ("jax", "eager", "sdpa")
ENGINE_NAMES = {"jax": "jax jit", "eager": "torch eager", "sdpa": "torch sdpa"}
def build_checkpoint(family: str, small: bool, directory: str, seed: int) -> tuple[int, int]:
  """Saves a random-weight HF model to `directory`; returns (parameter count, vocab size)."""
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()  # Keeps the printed report readable.
  torch.manual_seed(seed)
  config = hf_config(family, small)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  num_params = sum(p.numel() for p in model.parameters())  # The tied embedding counts once.
  model.save_pretrained(directory)
  return num_params, config.vocab_size


def _time_reps(forward: Callable[[], Any], spec: dict[str, Any]) -> tuple[list[float], list[float]]:
  """Wall seconds of each timed forward, and the CPU seconds other processes used during each."""
  for _ in range(spec["warmup"]):
    forward()

  def call(_: int) -> None:
    out = forward()
    del out  # One logits array alive at a time, on both engines.

  return harness.time_calls(call, spec["reps"], spec["quiet_wait"])


def run_jax(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: loads our model, times `jit_forward` and reports compile time and peak RSS."""
  cpus = harness.pin(spec["threads"])  # Before XLA starts: it sizes its thread pool from the affinity.
  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers  # noqa: F401  load_model imports it anyway; count it in the baseline RSS.

  from neurodiff_jax.models import jit_forward, load_model

  rss_imports = harness.rss_mib()
  compile_s = harness.compile_seconds()
  model = load_model(spec["checkpoint"], dtype=jnp.float32)
  rss_loaded = harness.rss_mib("VmRSS")
  fwd = jit_forward(model)
  ids = jnp.asarray(np.load(spec["ids"]))
  mask = jnp.ones(ids.shape, jnp.bool_)
  compile_s.clear()  # Loading traces and compiles small ops of its own; count only the forward's.

  start = time.perf_counter()
  logits = jax.block_until_ready(fwd(ids, mask).logits)
  first_s = time.perf_counter() - start
  np.save(spec["logits"], np.asarray(logits))
  del logits
  times, others = _time_reps(lambda: jax.block_until_ready(fwd(ids, mask).logits), spec)
  return dict(times=times, others_cpu_s=others, first_s=first_s, compile_s=sum(compile_s),
              rss_imports=rss_imports, rss_loaded=rss_loaded, peak_rss=harness.rss_mib(), cpus=cpus, threads=len(cpus))


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: loads the HF model with one attention implementation and times its forward."""
  cpus = harness.pin(spec["threads"])
  import numpy as np
  import torch
  import transformers

  torch.set_num_threads(spec["threads"])
  transformers.utils.logging.disable_progress_bar()
  rss_imports = harness.rss_mib()
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"], attn_implementation=spec["engine"], dtype=torch.float32
    ).eval()
  except ValueError as e:  # transformers refuses e.g. sdpa for Gemma 2 (it cannot soft-cap).
    return dict(unsupported=str(e).split(". ")[0] + ".")
  rss_loaded = harness.rss_mib("VmRSS")
  ids = torch.from_numpy(np.load(spec["ids"]))
  mask = torch.ones_like(ids)

  # use_cache=False: our forward builds no KV cache, so neither should the reference.
  def forward():
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

  with torch.inference_mode():
    start = time.perf_counter()
    logits = forward()
    first_s = time.perf_counter() - start
    np.save(spec["logits"], logits.numpy())
    del logits
    times, others = _time_reps(forward, spec)
  return dict(times=times, others_cpu_s=others, first_s=first_s, rss_imports=rss_imports, rss_loaded=rss_loaded,
              peak_rss=harness.rss_mib(), cpus=cpus, threads=torch.get_num_threads())


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one (model, engine) measurement in a fresh interpreter so its peak RSS is its own."""
  env = harness.child_env(spec["threads"])
  result_path = spec["logits"] + ".json"
  cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec), "--_result", result_path]
  proc = subprocess.run(cmd, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{spec['model']}/{spec['engine']} child failed with exit code {proc.returncode}.")
  with open(result_path) as f:
    return json.load(f)


def max_abs_diff(path_a: str, path_b: str) -> float:
  """max |a - b| over two saved logits arrays, a sequence at a time to keep the parent small."""
  import numpy as np

  a, b = np.load(path_a, mmap_mode="r"), np.load(path_b, mmap_mode="r")
  if a.shape != b.shape:
    raise ValueError(f"logits shapes differ: {a.shape} vs {b.shape}.")
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b))


def markdown_table(rows: list[dict[str, Any]], tokens: int) -> str:
  """The results as a Markdown table, one row per (model, engine)."""
  head = ["model", "params (M)", "engine", "tokens/s (median)", "ms/forward (median)", "jax speed-up",
          "peak RSS (MiB)", "compile s", "max abs Δlogits vs jax"]
  jax_rate = {r["model"]: tokens / harness.median(r["times"]) for r in rows if r["engine"] == "jax" and "times" in r}
  table = []
  for r in rows:
    cells = [r["model"], f"{r['params'] / 1e6:.1f}", ENGINE_NAMES[r["engine"]]]
    if "unsupported" in r:
      cells += ["n/a (unsupported)"] + ["—"] * 5
    else:
      median = harness.median(r["times"])
      rate = tokens / median
      speedup = "—" if r["engine"] == "jax" or r["model"] not in jax_rate else f"{jax_rate[r['model']] / rate:.2f}×"
      compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "—"
      max_diff = f"{r['max_diff']:.2e}" if "max_diff" in r else "—"
      cells += [f"{rate:,.0f}", harness.ms(median), speedup, f"{r['peak_rss']:,.0f}", compile_s, max_diff]
    table.append(cells)
  return harness.markdown_table(head, table)


def details(rows: list[dict[str, Any]]) -> str:
  """Per-run details that do not fit the table: spread, first call, contention, RSS, threads."""
  lines = []
  for r in rows:
    name = f"- {r['model']} / {ENGINE_NAMES[r['engine']]}"
    if "unsupported" in r:
      lines.append(f"{name}: {r['unsupported']}")
      continue
    t = r["times"]
    lines.append(
        f"{name}: {harness.spread(t)}; first call {r['first_s']:.1f} s; other processes used "
        f"{sum(r['others_cpu_s']):.1f} CPU-s in {sum(t):.1f} s timed ({harness.contended(t, r['others_cpu_s'])} reps "
        f"above 5% of a core); RSS {r['rss_imports']:,.0f} MiB after imports, {r['rss_loaded']:,.0f} MiB after "
        f"loading; {r['threads']} threads on CPUs {r['cpus']}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Parses flags, builds each model once and measures every engine in its own subprocess."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="gemma2,llama", help="comma-separated: gemma2, llama")
  parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: jax, eager, sdpa")
  parser.add_argument("--batch", type=int, default=None, help="sequences per forward (default 8; 2 with --small)")
  parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; 64 with --small)")
  parser.add_argument("--reps", type=int, default=5, help="timed forwards per engine (the median is reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed forwards after the first call")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for both XLA and torch")
  parser.add_argument("--quiet-wait", type=float, default=0.0,
                      help="wait up to this many seconds before each timed forward for other processes to go idle")
  parser.add_argument("--small", action="store_true", help="tiny configs and batch, for a smoke test")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._child:
    spec = json.loads(args._child)
    result = run_jax(spec) if spec["engine"] == "jax" else run_torch(spec)
    with open(args._result, "w") as f:
      json.dump(result, f)
    return

  import numpy as np

  batch = args.batch or (2 if args.small else 8)
  seq = args.seq or (64 if args.small else 256)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  engines = [e.strip() for e in args.engines.split(",") if e.strip()]
  unknown = sorted(set(engines) - set(ENGINES))
  if unknown:
    parser.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}.")
  rows = []
  for family in models:
    with tempfile.TemporaryDirectory(prefix=f"bench_{family}_") as tmp:
      checkpoint = os.path.join(tmp, "checkpoint")
      num_params, vocab = build_checkpoint(family, args.small, checkpoint, args.seed)
      print(f"[{family}] {num_params / 1e6:.1f}M parameters; batch {batch} × seq {seq}", flush=True)
      ids_path = os.path.join(tmp, "ids.npy")
      np.save(ids_path, np.random.default_rng(args.seed).integers(0, vocab, (batch, seq), dtype=np.int32))
      logits = {}
      for engine in engines:
        spec = dict(model=family, engine=engine, checkpoint=checkpoint, ids=ids_path, reps=args.reps,
                    warmup=args.warmup, threads=args.threads, quiet_wait=args.quiet_wait,
                    logits=os.path.join(tmp, f"logits_{engine}.npy"))
        result = measure(spec)
        result.update(model=family, engine=engine, params=num_params)
        rows.append(result)
        if "unsupported" in result:
          print(f"[{family}] {ENGINE_NAMES[engine]}: unsupported ({result['unsupported']})", flush=True)
          continue
        logits[engine] = spec["logits"]
        print(f"[{family}] {ENGINE_NAMES[engine]}: median {harness.ms(harness.median(result['times']))} ms, "
              f"peak RSS {result['peak_rss']:,.0f} MiB", flush=True)
      for r in rows:
        if r["model"] == family and r["engine"] != "jax" and "jax" in logits and r["engine"] in logits:
          r["max_diff"] = max_abs_diff(logits["jax"], logits[r["engine"]])

  print(f"\nBatch {batch} × {seq} tokens, float32, {args.threads} thread(s), {args.reps} timed reps after "
        f"{args.warmup} warm-up forward(s). {harness.machine()}\n")
  print(markdown_table(rows, batch * seq))
  print()
  print(details(rows))


if __name__ == "__main__":
  main()
