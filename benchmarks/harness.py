"""What every benchmark shares: pinning, timing with medians and contention, the machine, Markdown tables.

Benchmarks run as scripts from the repository root (`PYTHONPATH=. .venv/bin/python benchmarks/NAME.py`),
so this module sits beside them on `sys.path` and is imported as `import harness`.

Threads: each measured child is pinned with `sched_setaffinity` to the first N CPUs (`pin`)
before XLA or torch starts. XLA:CPU has no intra-op thread-count flag (`intra_op_parallelism_threads`
is a TensorFlow option; XLA_FLAGS ignores it); it sizes its Eigen pool from the CPUs in the
process's affinity mask, so pinning is what bounds it. Torch also gets `torch.set_num_threads(N)`
and OMP/MKL/OPENBLAS_NUM_THREADS = N (`child_env`). On a shared machine other processes are the
main source of noise: `time_calls` reports the CPU seconds they used during each timed call, and
`wait_quiet` waits for them to go idle first.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Trace, lower and compile durations JAX reports through jax.monitoring; their sum is "compile s".
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def compile_seconds() -> list[float]:
  """A list that collects JAX's trace/lower/compile durations from now on (sum it; `clear()` to restart)."""
  import jax

  seconds: list[float] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: seconds.append(duration) if event in COMPILE_EVENTS else None)
  return seconds


def pin(threads: int) -> list[int]:
  """Pins this process to the first `threads` CPUs it may use; returns them (call before importing XLA)."""
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)
  return cpus


def child_env(threads: int, platform_name: str | None = None) -> dict[str, str]:
  """The environment of a measured child: the repo on PYTHONPATH, BLAS/OpenMP threads, offline HF, JAX platform."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[var] = str(threads)
  env.setdefault("HF_HUB_OFFLINE", "1")
  env.setdefault("TOKENIZERS_PARALLELISM", "false")
  if platform_name == "cpu":
    env["JAX_PLATFORMS"] = "cpu"  # A GPU jax install would otherwise take the GPU.
  return env


def rss_mib(field: str = "VmHWM") -> float:
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


def busy_cpu_s() -> float:
  """CPU seconds all processes on the machine have used (busy and stolen), from /proc/stat."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return float("nan")
  idle, iowait = fields[3], fields[4]
  return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def others_cpu_s(busy_before: float, own_before: float) -> float:
  """CPU seconds other processes used since the two readings (`busy_cpu_s()`, `own_cpu_s()`)."""
  return max((busy_cpu_s() - busy_before) - (own_cpu_s() - own_before), 0.0)


def own_cpu_s() -> float:
  """CPU seconds (user + system) this process has used."""
  return sum(os.times()[:2])


def wait_quiet(max_wait_s: float) -> None:
  """Waits (up to `max_wait_s`) for a 2 s window in which other processes use < 0.1 CPU-s."""
  deadline = time.monotonic() + max_wait_s
  while time.monotonic() < deadline:
    busy, own = busy_cpu_s(), own_cpu_s()
    time.sleep(2.0)
    if others_cpu_s(busy, own) < 0.1:
      return


def time_calls(call: Callable[[int], Any], reps: int, quiet_wait: float = 0.0,
               first_index: int = 0) -> tuple[list[float], list[float]]:
  """Wall seconds of `reps` calls `call(first_index + i)` (each ends synchronised), and others' CPU-s during each."""
  times, others = [], []
  for i in range(reps):
    if quiet_wait > 0:
      wait_quiet(quiet_wait)
    busy, own = busy_cpu_s(), own_cpu_s()
    start = time.perf_counter()
    call(first_index + i)
    times.append(time.perf_counter() - start)
    others.append(others_cpu_s(busy, own))
  return times, others


def best_rate(fn: Callable[[], Any], work: float, reps: int = 3) -> float:
  """`work` per second of the fastest of `reps` synchronised calls of `fn`, after one untimed call."""
  fn()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return work / best


def median(values: Sequence[float]) -> float:
  """The median (benchmarks report medians: robust to the odd slow repetition on a shared machine)."""
  return float(statistics.median(values))


def contended(times: Sequence[float], others: Sequence[float]) -> int:
  """How many timed calls other processes used more than 5% of a core in (/proc/stat's 10 ms ticks allowed for)."""
  return sum(o > max(0.05 * t, 0.02) for o, t in zip(others, times))


def spread(times: Sequence[float], unit: str = "reps") -> str:
  """"min/median/max A/B/C ms over N reps"."""
  t = sorted(times)
  return f"min/median/max {ms(t[0])}/{ms(median(t))}/{ms(t[-1])} ms over {len(t)} {unit}"


def first_and_fastest(call: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
  """(first call s, fastest of `reps` later calls s, the last call's result): compile cost and steady cost."""
  t = time.perf_counter()
  out = call()
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    out = call()
    best = min(best, time.perf_counter() - t)
  return first, best, out


def ms(seconds: float) -> str:
  """Seconds as milliseconds: whole above 100 ms, two decimals below."""
  return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.2f}"


def flops(rate: float) -> str:
  """FLOP (or FLOP/s) with a G or T prefix."""
  return f"{rate / 1e12:,.2f} T" if rate >= 1e12 else f"{rate / 1e9:,.1f} G"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table of `rows` (cells formatted with str) under `head`."""
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  """One line describing the machine and the library versions a result depends on."""
  parts = [f"{_cpu_model()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable"]
  try:
    with open("/proc/meminfo") as f:
      total_kib = int(f.readline().split()[1])
    parts.append(f"{total_kib / 2**20:.0f} GiB RAM")
  except (OSError, ValueError, IndexError):
    pass
  parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
  versions = []
  for name in ("jax", "jaxlib", "torch", "transformers", "tensorstore"):
    try:
      from importlib.metadata import version

      versions.append(f"{name} {version(name)}")
    except Exception:  # not installed
      continue
  return "; ".join(parts + [", ".join(versions)])


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


__all__ = ["COMPILE_EVENTS", "REPO_ROOT", "best_rate", "busy_cpu_s", "child_env", "compile_seconds", "contended",
           "flops", "hf_config", "machine", "markdown_table", "median", "ms", "others_cpu_s", "own_cpu_s", "pin",
           "rss_mib", "spread", "time_calls", "wait_quiet"]


def write_model_pair(work: Any, n_docs: int, config: Callable[[Any], Any]) -> dict[str, str]:
  """Two random checkpoints ("base", seed 0; "finetuned", seed 1) of `config(tokenizer)`, sharing a BPE tokenizer
  trained on the organisms' corpus, and that corpus as docs.jsonl, in `work`; returns their paths."""
  import json

  import torch
  import transformers

  from neurodiff_jax.organisms.corpus import generate_documents
  from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer

  docs = generate_documents(n_docs, 7)
  tok = train_bpe_tokenizer(docs, 2048)
  paths = {}
  for role, seed in (("base", 0), ("finetuned", 1)):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(tok), dtype=torch.float32)
    model.save_pretrained(work / role)
    tok.save_pretrained(work / role)
    paths[role] = str(work / role)
  data = work / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  paths["data"] = str(data)
  return paths
