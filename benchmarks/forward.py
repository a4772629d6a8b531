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

Threads: every child is pinned with `sched_setaffinity` to the first `--threads` CPUs. Torch also
gets `torch.set_num_threads(N)` (and OMP/MKL_NUM_THREADS=N). XLA:CPU has no intra-op thread-count
flag (`intra_op_parallelism_threads` is a TensorFlow option; XLA_FLAGS ignores it); it sizes its
Eigen pool from the CPUs in the process's affinity mask, so pinning is what bounds it. `XLA_FLAGS`
from the environment is passed through untouched. On a shared machine, `--quiet-wait S` waits up
to S seconds before each timed forward for other processes to go idle.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINES = ("jax", "eager", "sdpa")
ENGINE_NAMES = {"jax": "jax jit", "eager": "torch eager", "sdpa": "torch sdpa"}
# Trace, lower and compile durations JAX reports through jax.monitoring; their sum is "compile s".
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def hf_config(family: str, small: bool) -> Any:
  """The `transformers` config of the benchmarked model (~100M parameters, or tiny with `small`)."""
  import transformers

  if small:
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  else:
    # GQA 12:4 and tied embeddings (Llama 3.2 / Gemma 2 style) put both models at ~100M.
    common = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, head_dim=64)
  common["tie_word_embeddings"] = True
  if family == "gemma2":
    # A window shorter than the sequence, so the sliding layers' mask is exercised.
    return transformers.Gemma2Config(**common, query_pre_attn_scalar=common["head_dim"],
                                     sliding_window=16 if small else 128)
  if family == "llama":
    return transformers.LlamaConfig(**common)
  raise ValueError(f"unknown model {family!r}; choose from gemma2, llama.")


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


def _rss_mib(field: str = "VmHWM") -> float:
  """Peak (`VmHWM`) or current (`VmRSS`) resident set size of this process, in MiB.

  On Linux a child started by fork/vfork + exec inherits the parent's peak in `ru_maxrss` (the
  kernel folds the pre-exec address space's high-water mark into it), so a parent that built a
  100M model would add ~1 GiB to every child's number. `VmHWM` is the high-water mark of the
  current address space only; `ru_maxrss` is the fallback where /proc is missing.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def _pin(threads: int) -> list[int]:
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)
  return cpus


def _busy_cpu_s() -> float:
  """CPU seconds all processes on the machine have used (busy and stolen), from /proc/stat."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return float("nan")
  idle, iowait = fields[3], fields[4]
  return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def _others_cpu_s(busy_before: float, own_before: float) -> float:
  """CPU seconds other processes used since the two readings."""
  return max((_busy_cpu_s() - busy_before) - (sum(os.times()[:2]) - own_before), 0.0)


def _wait_quiet(max_wait_s: float) -> None:
  """Waits (up to `max_wait_s`) for a 2 s window in which other processes use < 0.1 CPU-s."""
  deadline = time.monotonic() + max_wait_s
  while time.monotonic() < deadline:
    busy, own = _busy_cpu_s(), sum(os.times()[:2])
    time.sleep(2.0)
    if _others_cpu_s(busy, own) < 0.1:
      return


def _time_reps(forward: Callable[[], Any], spec: dict[str, Any]) -> tuple[list[float], list[float]]:
  """Wall seconds of each timed forward, and the CPU seconds other processes used during each."""
  for _ in range(spec["warmup"]):
    forward()
  times, others = [], []
  for _ in range(spec["reps"]):
    if spec["quiet_wait"] > 0:
      _wait_quiet(spec["quiet_wait"])
    busy, own = _busy_cpu_s(), sum(os.times()[:2])
    start = time.perf_counter()
    out = forward()
    times.append(time.perf_counter() - start)
    # On a small shared machine other processes are the main source of noise; report it.
    others.append(_others_cpu_s(busy, own))
    del out  # One logits array alive at a time, on both engines.
  return times, others


def run_jax(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: loads our model, times `jit_forward` and reports compile time and peak RSS."""
  cpus = _pin(spec["threads"])  # Before XLA starts: it sizes its thread pool from the affinity.
  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers  # noqa: F401  load_model imports it anyway; count it in the baseline RSS.

  from neurodiff_jax.models import jit_forward, load_model

  rss_imports = _rss_mib()
  compile_s = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: compile_s.append(duration) if event in _COMPILE_EVENTS else None
  )
  model = load_model(spec["checkpoint"], dtype=jnp.float32)
  rss_loaded = _rss_mib("VmRSS")
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
              rss_imports=rss_imports, rss_loaded=rss_loaded, peak_rss=_rss_mib(), cpus=cpus, threads=len(cpus))


def run_torch(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: loads the HF model with one attention implementation and times its forward."""
  cpus = _pin(spec["threads"])
  import numpy as np
  import torch
  import transformers

  torch.set_num_threads(spec["threads"])
  transformers.utils.logging.disable_progress_bar()
  rss_imports = _rss_mib()
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec["checkpoint"], attn_implementation=spec["engine"], dtype=torch.float32
    ).eval()
  except ValueError as e:  # transformers refuses e.g. sdpa for Gemma 2 (it cannot soft-cap).
    return dict(unsupported=str(e).split(". ")[0] + ".")
  rss_loaded = _rss_mib("VmRSS")
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
              peak_rss=_rss_mib(), cpus=cpus, threads=torch.get_num_threads())


def measure(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one (model, engine) measurement in a fresh interpreter so its peak RSS is its own."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    env[var] = str(spec["threads"])
  env.setdefault("HF_HUB_OFFLINE", "1")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
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


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.2f}"


def markdown_table(rows: list[dict[str, Any]], tokens: int) -> str:
  """The results as a Markdown table, one row per (model, engine)."""
  head = ["model", "params (M)", "engine", "tokens/s (median)", "ms/forward (median)", "jax speed-up",
          "peak RSS (MiB)", "compile s", "max abs Δlogits vs jax"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  jax_rate = {r["model"]: tokens / statistics.median(r["times"]) for r in rows if r["engine"] == "jax" and "times" in r}
  for r in rows:
    cells = [r["model"], f"{r['params'] / 1e6:.1f}", ENGINE_NAMES[r["engine"]]]
    if "unsupported" in r:
      cells += ["n/a (unsupported)"] + ["—"] * 5
    else:
      median = statistics.median(r["times"])
      rate = tokens / median
      speedup = "—" if r["engine"] == "jax" or r["model"] not in jax_rate else f"{jax_rate[r['model']] / rate:.2f}×"
      compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "—"
      max_diff = f"{r['max_diff']:.2e}" if "max_diff" in r else "—"
      cells += [f"{rate:,.0f}", _ms(median), speedup, f"{r['peak_rss']:,.0f}", compile_s, max_diff]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def details(rows: list[dict[str, Any]]) -> str:
  """Per-run details that do not fit the table: spread, first call, contention, RSS, threads."""
  lines = []
  for r in rows:
    name = f"- {r['model']} / {ENGINE_NAMES[r['engine']]}"
    if "unsupported" in r:
      lines.append(f"{name}: {r['unsupported']}")
      continue
    t = sorted(r["times"])
    # /proc/stat counts 10 ms ticks, so under ~2 ticks "contention" is rounding.
    contended = sum(o > max(0.05 * w, 0.02) for o, w in zip(r["others_cpu_s"], r["times"]))
    lines.append(
        f"{name}: min/median/max {_ms(t[0])}/{_ms(statistics.median(t))}/{_ms(t[-1])} ms over {len(t)} reps; "
        f"first call {r['first_s']:.1f} s; other processes used {sum(r['others_cpu_s']):.1f} CPU-s in "
        f"{sum(t):.1f} s timed ({contended} reps above 5% of a core); RSS {r['rss_imports']:,.0f} MiB after "
        f"imports, {r['rss_loaded']:,.0f} MiB after loading; {r['threads']} threads on CPUs {r['cpus']}"
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
        print(f"[{family}] {ENGINE_NAMES[engine]}: median {_ms(statistics.median(result['times']))} ms, "
              f"peak RSS {result['peak_rss']:,.0f} MiB", flush=True)
      for r in rows:
        if r["model"] == family and r["engine"] != "jax" and "jax" in logits and r["engine"] in logits:
          r["max_diff"] = max_abs_diff(logits["jax"], logits[r["engine"]])

  print(f"\nBatch {batch} × {seq} tokens, float32, {args.threads} thread(s), {args.reps} timed reps after "
        f"{args.warmup} warm-up forward(s).\n")
  print(markdown_table(rows, batch * seq))
  print()
  print(details(rows))


if __name__ == "__main__":
  main()
