"""Crosscoder training-step throughput: our jitted step against `dictionary-learning`'s BatchTopK trainer.

Both engines train a BatchTopK dictionary on the same paired activations (planted sparse features
from `neurodiff_jax.crosscoder.synthetic`, x [B, 2, d]), each in a fresh subprocess pinned to the
same `--threads` cores, and are timed one step at a time after `--warmup` untimed steps:

  * neurodiff-jax        `step.make_train_step` (one jit: loss, grads, Adam, θ EMA, dead-latent
                         counters; state donated) on a 1 × 1 mesh, float32, batch [B, 2, d], in its two
                         implementations (`config.train_step`): `jax` = "pairs" (decode and backward on
                         the k·B selected pairs, crosscoder/pairs.py; the default), `jax-dense` = "dense"
  * dictionary-learning  `BatchTopKTrainer.update(step, x)` (PyPI 0.1.0) on the concatenated
                         [x_base; x_chat], x [B, 2d]: the same dictionary over the same 2d inputs

The defaults are issue 5's CPU size, d = 256 per model, m = 8192, k = 32, B = 2048; `--gemma2b` is
Gemma 2 2B's (d = 2304, m = 73,728, k = 100, B = 2048), meant for `--platform gpu`. Printed: a
Markdown table of ms/step (median), steps/s, tokens/s, the speed-up of ours over
dictionary-learning, the matmul FLOPs of one step, achieved FLOP/s, the fraction of the machine's
measured float32 matmul peak and, with `--peak-tflops`, MFU; then per-run details.

Run from the repository root:

  PYTHONPATH=. .venv/bin/python benchmarks/train_step.py                     # full CPU run, ~10 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --steps 3 --warmup 1 --auxk off   # smoke test
  PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --gemma2b --platform gpu --peak-tflops 67

AuxK scenarios (`--auxk`, default both). Both engines run AuxK only when some latent is dead:
dictionary-learning in a Python branch, ours in a `lax.cond` inside the jitted step
(`objective.aux_loss`), so a step with no dead latent pays only the `any(dead)` test. Each row:

  * off  no latent is dead (a fresh run): both skip AuxK. Ours runs with `aux_coef = 0`, which
         also leaves the cond out; with the default `aux_coef` the cond would take the skip branch.
  * on   every latent counts as dead (`dead_tokens = 0`; theirs `dead_feature_threshold = 0`), so
         both run AuxK every step: what any step of a long run with dead latents costs. k_aux is
         theirs, (2d) / 2 = d, on both (ours defaults to d / 2). Each token's k_aux-th largest is
         found by bisection in our dense step (cost independent of k_aux) and by `lax.top_k` in
         our pairs step, as by their `topk` (costs that grow with k_aux).

FLOPs per step, matmuls only (elementwise work, BatchTopK selection and Adam are O(B·m) or O(m·D)
and are not counted). With D = 2d the input width and U = 2·B·D·m one [B, D] × [D, m] product:

  * encoder forward a = x W_enc                         1 U
  * decoder forward x̂ = f W_dec                         1 U
  * decoder backward dW_dec = fᵀ dx̂, df = dx̂ W_decᵀ      2 U
  * encoder backward dW_enc = xᵀ da                     1 U   ours: x is data, so no dx
  * theirs only: dx = da W_encᵀ                         1 U   their encoder reads (x − b_dec) and
                                                              b_dec is trained, so autograd needs it
  * AuxK (`on` only): decode of the dead top-k, dW_dec and df of it   3 U

so our dense step 5 U (8 U with AuxK) and theirs 6 U (9 U): at the default size U = 17.2 GFLOP, i.e.
85.9 and 103.1 GFLOP per step without AuxK (137.4 and 154.6 with), and ≈ 7.0 / 8.4 TFLOP (11.1 / 12.5)
at Gemma 2 2B size. Our pairs step does 1 U (the pre-activations) plus 4 · 2·k·B·D for the decode,
∂f, ∂W_dec and ∂W_enc on the k·B pairs (+ 0.13 G at the default size); with AuxK add 5 U (AuxK
recomputes the pre-activations to differentiate them, decodes densely, and backpropagates 3 U).
Each engine's FLOP/s uses its own count (the work it actually does); the details line shows XLA's
cost analysis of our step and torch's `FlopCounterMode` over one of their steps as a check. The
matmul peak is the best float32 N × N matmul (`--peak-size`, default 4096 on CPU and 8192 on GPU) of
numpy, torch and jax in the same pinned children; "% of peak" divides by the best of them. MFU
divides by `--peak-tflops` (the datasheet float32 peak: both engines run true float32 matmuls, ours
at `Precision.HIGHEST`, torch with TF32 off, its default).

Other differences in the work done (none is a matmul; all are left as each library does them):
theirs computes the geometric median of the first batch to initialise b_dec at step 0 (excluded
by the warm-up), tracks the inference threshold only after `threshold_start_step` (set to 0 here,
so it does so every step as in a long run; ours always updates θ), renormalises decoder columns
to unit norm and projects the parallel gradient out every step, selects by `topk` over the B·m
flattened activations then scatters, and syncs the host every step through `loss.item()`. Ours
selects in the dense step by bisecting on the float bits and masking, in the pairs step by
`lax.top_k` candidates per token and a bisection over those; it scores latents by
relu(a) · Σ_i‖W_dec[j, i]‖ (theirs by relu(a), decoder columns having unit norm). Batches are on
the device before timing on both.

Installing the reference (benchmark only; not a runtime dependency, like torch). Its metadata
requires `nnsight<0.4`, which requires torch (and accelerate/torchvision/diffusers), so a plain
`pip install dictionary-learning==0.1.0` replaces the CPU torch 2.13.0 with a multi-GB CUDA build.
What imports `dictionary_learning.trainers.BatchTopKTrainer` and keeps torch 2.13.0+cpu:

  .venv/bin/pip install --no-deps dictionary-learning==0.1.0 "nnsight<0.4" "einops>=0.7" accelerate
  .venv/bin/pip install requests python-socketio pillow      # nnsight's import-time needs; no torch
  .venv/bin/python -c "import torch; print(torch.__version__)"   # still 2.13.0+cpu

(`dictionary_learning/__init__.py` imports its activation buffer, hence nnsight, hence those.) For
`--platform gpu` the machine needs jax with CUDA and a CUDA torch; the reference itself is the same.

Threads: each child is pinned to the first `--threads` CPUs before importing XLA or torch, torch
also told N threads (`benchmarks/harness.py`).
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

import numpy as np

import harness

ENGINES = ("jax", "jax-dense", "dl")
ENGINE_NAMES = {"jax": "neurodiff-jax (pairs)", "jax-dense": "neurodiff-jax (dense)", "dl": "dictionary-learning"}
TRAIN_STEP = {"jax": "pairs", "jax-dense": "dense"}
AUXK = ("off", "on")
NUM_MODELS = 2
SIZES = {
    "default": dict(d_model=256, dict_size=8192, k=32, batch=2048),
    "gemma2b": dict(d_model=2304, dict_size=73_728, k=100, batch=2048),
}
# Matmuls of one step in units of one [B, D] × [D, m] product (see the module docstring).
_UNITS = {("jax", "off"): 1, ("jax", "on"): 6, ("jax-dense", "off"): 5, ("jax-dense", "on"): 8, ("dl", "off"): 6,
          ("dl", "on"): 9}


def step_flops(engine: str, auxk: str, batch: int, d_model: int, dict_size: int, k: int) -> float:
  """Matmul FLOPs of one training step of `engine`, counted analytically (the pairs step's sparse products too)."""
  dense = _UNITS[engine, auxk] * 2.0 * batch * NUM_MODELS * d_model * dict_size
  pairs = 4 * 2.0 * k * batch * NUM_MODELS * d_model if engine == "jax" else 0.0
  return dense + pairs


def make_data(path: str, d_model: int, tokens: int, seed: int) -> None:
  """Saves `tokens` planted-feature activations [tokens, 2, d] (float32) to `path`."""
  from neurodiff_jax.crosscoder import synthetic

  # Capped so that Gemma-2B-width data takes ~30 s, not minutes (sample_activations is a plain einsum).
  per_class = min(d_model, 512)
  truth = synthetic.plant_features(d_model, {c: per_class for c in synthetic.CLASSES}, seed=seed)
  np.save(path, synthetic.sample_activations(truth, tokens, l0=32.0, seed=seed + 1))


def _time_steps(step: Callable[[int], Any], spec: dict[str, Any]) -> tuple[list[float], list[float]]:
  """Wall seconds of each timed step (each ends synchronised), and other processes' CPU seconds during each."""
  # Indices past the warm-up (and theirs FlopCounterMode) steps'.
  return harness.time_calls(step, spec["steps"], spec["quiet_wait"], first_index=spec["warmup"] + 1)


def run_jax(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: builds our train state and jitted step and times it."""
  cpus = harness.pin(spec["threads"])  # Before XLA starts: it sizes its thread pool from the affinity.
  import jax
  import jax.numpy as jnp

  from configs._crosscoder import base_config
  from neurodiff_jax.crosscoder import sharding, step as train
  from neurodiff_jax.crosscoder.model import CrosscoderConfig
  from neurodiff_jax.crosscoder.objective import LossConfig

  platform = jax.default_backend()
  if platform != spec["platform"]:
    raise RuntimeError(f"jax runs on {platform!r}, not the requested {spec['platform']!r}.")
  rss_imports = harness.rss_mib()
  compile_s = harness.compile_seconds()

  d, B = spec["d_model"], spec["batch"]
  config = base_config()
  cfg = CrosscoderConfig(num_models=NUM_MODELS, d_model=d, dict_size=spec["dict_size"], sparsity="batchtopk",
                         k=spec["k"])
  if spec["auxk"] == "off":
    lcfg = LossConfig(aux_coef=0.0)
  else:
    lcfg = LossConfig(k_aux=NUM_MODELS * d // 2, dead_tokens=0)  # every latent dead: AuxK every step
  tx = train.make_optimizer(config)
  mesh = sharding.make_mesh(1, 1)
  data = np.load(spec["data"])
  norm, mean = np.ones(NUM_MODELS, np.float32), data.mean(0)
  state = train.sharded_init(jax.random.key(spec["seed"]), cfg, tx, mesh, norm, mean)
  abstract = jax.eval_shape(lambda key: train.init_state(key, cfg, tx, norm, mean), jax.random.key(spec["seed"]))
  step_fn = train.make_train_step(cfg, lcfg, tx, mesh, abstract, float(config.theta_momentum), "float32",
                                  TRAIN_STEP[spec["engine"]])
  batches = [train.global_batch(data[i:i + B], mesh) for i in range(0, len(data), B)]
  lowered = step_fn.lower(state, batches[0])
  # Lowered cost analysis is None on some backends (CUDA in jax 0.11): then ask the compiled step.
  cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = (cost or {}).get("flops", float("nan"))
  compile_s.clear()  # Initialisation compiles small programs of its own; count only the step's.

  losses = []

  def step(i: int) -> None:
    nonlocal state
    state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    losses.append(metrics["loss/total"])

  start = time.perf_counter()
  step(0)
  first_s = time.perf_counter() - start
  for i in range(1, spec["warmup"]):
    step(i)
  dense_before = int(jax.device_get(state["train"]["dense_steps"]))
  times, others = _time_steps(step, spec)
  dense_steps = int(jax.device_get(state["train"]["dense_steps"])) - dense_before

  n = spec["peak_size"]
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda x: jnp.dot(x, x, precision=jax.lax.Precision.HIGHEST))
  peaks = {"jax": harness.best_rate(lambda: mm(a).block_until_ready(), 2.0 * n**3)}
  device_peak = None
  if platform != "cpu":
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  return dict(times=times, others_cpu_s=others, first_s=first_s, compile_s=sum(compile_s), counted_flops=xla_flops,
              counted_by="XLA cost analysis", peaks=peaks, losses=[float(v) for v in jax.device_get(losses)],
              rss_imports=rss_imports, peak_rss=harness.rss_mib(), device_peak_bytes=device_peak, cpus=cpus,
              threads=len(cpus), platform=platform, dense_steps=dense_steps)


def run_dl(spec: dict[str, Any]) -> dict[str, Any]:
  """Child: builds dictionary-learning's BatchTopKTrainer on [x_base; x_chat] and times `update`."""
  cpus = harness.pin(spec["threads"])
  import torch
  from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
  from torch.utils.flop_counter import FlopCounterMode

  torch.set_num_threads(spec["threads"])
  device = "cuda" if spec["platform"] == "gpu" else "cpu"
  if device == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"torch {torch.__version__} sees no CUDA device; install a CUDA build for --platform gpu.")
  rss_imports = harness.rss_mib()
  d, B = spec["d_model"], spec["batch"]
  # threshold_start_step=0: θ is tracked every step, as in a long run (the default waits 1000 steps).
  # steps / warmup_steps only shape the lr schedule, which costs the same whatever it says.
  trainer = BatchTopKTrainer(steps=100_000, activation_dim=NUM_MODELS * d, dict_size=spec["dict_size"], k=spec["k"],
                             layer=0, lm_name="benchmark", warmup_steps=1000, threshold_start_step=0,
                             seed=spec["seed"], device=device)
  if spec["auxk"] == "on":
    trainer.dead_feature_threshold = 0  # every latent dead: AuxK every step
  data = torch.from_numpy(np.load(spec["data"]).reshape(-1, NUM_MODELS * d))  # [x_base; x_chat] per token
  batches = [data[i:i + B].to(device) for i in range(0, len(data), B)]
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  losses = []

  def step(i: int) -> None:
    losses.append(trainer.update(i, batches[i % len(batches)]))
    sync()

  start = time.perf_counter()
  step(0)  # Also initialises b_dec to the batch's geometric median.
  first_s = time.perf_counter() - start
  for i in range(1, spec["warmup"]):
    step(i)
  # One more untimed step under FlopCounterMode (which slows it): a check on the analytic FLOP count.
  with FlopCounterMode(display=False) as counter:
    step(spec["warmup"])
  times, others = _time_steps(step, spec)

  n = spec["peak_size"]
  a = torch.randn(n, n, device=device)
  peaks = {"torch": harness.best_rate(lambda: (a @ a, sync()), 2.0 * n**3)}
  if device == "cpu":
    an = a.numpy()
    peaks["numpy"] = harness.best_rate(lambda: an @ an, 2.0 * n**3)
  device_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return dict(times=times, others_cpu_s=others, first_s=first_s, counted_flops=float(counter.get_total_flops()),
              counted_by="torch FlopCounterMode", peaks=peaks, losses=losses, rss_imports=rss_imports,
              peak_rss=harness.rss_mib(), device_peak_bytes=device_peak, cpus=cpus, threads=torch.get_num_threads(),
              platform=spec["platform"])


def measure(spec: dict[str, Any], result_path: str) -> dict[str, Any]:
  """Runs one (scenario, engine) measurement in a fresh, pinned interpreter."""
  env = harness.child_env(spec["threads"], spec["platform"])
  cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec), "--_result", result_path]
  proc = subprocess.run(cmd, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"{spec['engine']}/auxk={spec['auxk']} child failed with exit code {proc.returncode}.")
  with open(result_path) as f:
    return json.load(f)


def markdown_table(rows: list[dict[str, Any]], batch: int, peak: float, peak_tflops: float | None) -> str:
  """The results as a Markdown table, one row per (AuxK scenario, engine)."""
  head = ["AuxK", "engine", "ms/step (median)", "steps/s", "tokens/s", "speed-up (ours ÷ theirs)", "FLOP/step",
          "FLOP/s", "% of matmul peak"]
  if peak_tflops:
    head.append("MFU")
  head += ["peak RSS (MiB)", "first step s"]
  median = {(r["auxk"], r["engine"]): harness.median(r["times"]) for r in rows}
  table = []
  for r in rows:
    t = median[r["auxk"], r["engine"]]
    other = median.get((r["auxk"], "dl"))
    speedup = f"{other / t:.2f}×" if r["engine"] != "dl" and other else "—"
    achieved = r["flops"] / t
    cells = [r["auxk"], ENGINE_NAMES[r["engine"]], harness.ms(t), f"{1 / t:.3g}", f"{batch / t:,.0f}", speedup,
             harness.flops(r["flops"]), harness.flops(achieved), f"{100 * achieved / peak:.0f}%"]
    if peak_tflops:
      cells.append(f"{100 * achieved / (peak_tflops * 1e12):.1f}%")
    cells += [f"{r['peak_rss']:,.0f}", f"{r['first_s']:.1f}"]
    table.append(cells)
  return harness.markdown_table(head, table)


def details(rows: list[dict[str, Any]]) -> str:
  """Per-run details that do not fit the table: spread, contention, FLOP check, compile, memory, losses."""
  lines = []
  for r in rows:
    t = r["times"]
    extra = f"; compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
    if r["engine"] == "jax":
      extra += f"; {r['dense_steps']} of the timed steps fell back to the dense step"
    if r.get("device_peak_bytes"):
      extra += f"; device peak {r['device_peak_bytes'] / 2**30:.1f} GiB"
    lines.append(
        f"- auxk={r['auxk']} / {ENGINE_NAMES[r['engine']]}: {harness.spread(t, 'steps')}; other processes used "
        f"{sum(r['others_cpu_s']):.1f} CPU-s in {sum(t):.1f} s timed ({harness.contended(t, r['others_cpu_s'])} steps "
        f"above 5% of a core); {r['counted_by']} counts {harness.flops(r['counted_flops'])}FLOP/step (analytic "
        f"matmuls {harness.flops(r['flops'])}){extra}; RSS {r['rss_imports']:,.0f} MiB after imports; loss "
        f"{r['losses'][0]:.4g} → {r['losses'][-1]:.4g}; {r['threads']} threads on CPUs {r['cpus']}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Parses flags, makes the data once and measures every (scenario, engine) in its own subprocess."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gemma2b", action="store_true", help="Gemma 2 2B size: d=2304, m=73,728, k=100, batch 2048")
  parser.add_argument("--d-model", type=int, help="width per model (default 256; 2304 with --gemma2b)")
  parser.add_argument("--dict-size", type=int, help="latents m (default 8192; 73,728 with --gemma2b)")
  parser.add_argument("--k", type=int, help="active latents per token (default 32; 100 with --gemma2b)")
  parser.add_argument("--batch", type=int, help="tokens per step (default 2048)")
  parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: jax, jax-dense, dl")
  parser.add_argument("--auxk", default=",".join(AUXK), help="comma-separated AuxK scenarios: off, on")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per run (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
  parser.add_argument("--threads", type=int, default=2, help="cores for both XLA and torch")
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the accelerator's datasheet float32 peak in TFLOP/s, for MFU")
  parser.add_argument("--peak-size", type=int, default=None, help="N of the N × N peak matmul (4096 CPU, 8192 GPU)")
  parser.add_argument("--batches", type=int, default=2, help="distinct batches cycled through")
  parser.add_argument("--quiet-wait", type=float, default=0.0,
                      help="wait up to this many seconds before each timed step for other processes to go idle")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--_child", help=argparse.SUPPRESS)
  parser.add_argument("--_result", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args._child:
    spec = json.loads(args._child)
    result = run_dl(spec) if spec["engine"] == "dl" else run_jax(spec)
    with open(args._result, "w") as f:
      json.dump(result, f)
    return

  size = dict(SIZES["gemma2b" if args.gemma2b else "default"])
  for name in size:
    if getattr(args, name) is not None:
      size[name] = getattr(args, name)
  engines = [e.strip() for e in args.engines.split(",") if e.strip()]
  scenarios = [s.strip() for s in args.auxk.split(",") if s.strip()]
  if set(engines) - set(ENGINES) or set(scenarios) - set(AUXK):
    parser.error(f"--engines takes {', '.join(ENGINES)}; --auxk takes {', '.join(AUXK)}.")
  if args.warmup < 1:
    parser.error("--warmup must be at least 1 (the first step compiles).")
  peak_size = args.peak_size or (8192 if args.platform == "gpu" else 4096)
  rows = []
  with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
    data = os.path.join(tmp, "x.npy")
    make_data(data, size["d_model"], args.batches * size["batch"], args.seed)
    print(f"d={size['d_model']} per model (input width {NUM_MODELS * size['d_model']}), m={size['dict_size']}, "
          f"k={size['k']}, batch {size['batch']}; {args.platform}, {args.threads} thread(s)", flush=True)
    for auxk in scenarios:
      for engine in engines:
        spec = dict(engine=engine, auxk=auxk, data=data, steps=args.steps, warmup=args.warmup, threads=args.threads,
                    platform=args.platform, peak_size=peak_size, quiet_wait=args.quiet_wait, seed=args.seed, **size)
        result = measure(spec, os.path.join(tmp, f"{engine}_{auxk}.json"))
        result.update(engine=engine, auxk=auxk, flops=step_flops(engine, auxk, size["batch"], size["d_model"],
                                                                 size["dict_size"], size["k"]))
        rows.append(result)
        print(f"auxk={auxk} {ENGINE_NAMES[engine]}: median {harness.ms(harness.median(result['times']))} ms/step",
              flush=True)

  peaks: dict[str, float] = {}
  for r in rows:
    for lib, rate in r["peaks"].items():
      peaks[lib] = max(peaks.get(lib, 0.0), rate)
  peak = max(peaks.values())
  print(f"\nd={size['d_model']} × {NUM_MODELS} models, m={size['dict_size']}, k={size['k']}, batch {size['batch']}, "
        f"float32, {args.platform}, {args.threads} thread(s); {args.steps} timed steps after {args.warmup} warm-up. "
        f"{harness.machine()}")
  print(f"Float32 {peak_size}² matmul peak, same pinning: "
        + ", ".join(f"{lib} {harness.flops(v)}FLOP/s" for lib, v in sorted(peaks.items()))
        + f"; % of peak uses {harness.flops(peak)}FLOP/s.\n")
  print(markdown_table(rows, size["batch"], peak, args.peak_tflops))
  print()
  print(details(rows))


if __name__ == "__main__":
  main()
