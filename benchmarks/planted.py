"""Planted-feature benchmark: which training settings recover the planted features, over several data seeds.

Each variant is a set of run-config overrides on `configs/_crosscoder.py::base_config()` (the
task's budget, `PlantedTask.train_overrides`, always applied first; `train_step="dense"`, the same
maths as the default pairs step and faster at this size on CPU). Every variant is trained on the
same stores, one per data seed, through the library's `neurodiff_jax.crosscoder.train.train`, one
run at a time in this process, and scored against the planted truth on fresh held-out tokens
(`synthetic.score`). The table gives, per variant, the mean over seeds and [min, max] of:

  * mean best cos     for each planted feature the best decoder cosine ([M·d] concatenated, planted
                      units), averaged over features; then the same per class
  * chat/base P / R   Δnorm precision and recall of the exclusive classes (precision over live latents)
  * weak ratio        median ‖d_base‖ / ‖d_chat‖ of the weak-base features' best latents (planted: the
                      task's `weak`); "weak→chat": the fraction of them Δnorm reads as chat-only
  * alive             latents firing on at least one held-out token; dead% / never%: metrics.json's
                      dead_fraction and never_fired_fraction at the end of the run
  * FVE               fraction of variance explained on the held-out tokens, base / chat
  * wall              seconds of `train(config)` (compilation included), per run

Variants (`--variants`, comma-separated) are names from VARIANTS or ad-hoc overrides joined by `+`,
e.g. `sparsity=l1+l1_lambda=0.3`; `warmup_steps=N` sets a fixed N-step warm-up (warmup_frac = N / steps,
warmup_max_steps = N). The default list is the issue-15 sweep: the defaults, the
pre-issue-15 settings ("old": a fixed 1,000-step warm-up and a 10M-token dead window), one-at-a-time
changes of warm-up, decay, AuxK and decoder init norm, and L1 at the default λ.

Run from the repository root (one training process; 2 CPU cores):

  PYTHONPATH=. .venv/bin/python benchmarks/planted.py --task hard --seeds 0,1,2 --out planted.json
  PYTHONPATH=. .venv/bin/python benchmarks/planted.py --task hard --seeds 0 --variants defaults --steps 300  # smoke
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # What the issue was filed against: a 1,000-step warm-up (a sixth of a 6,000-step run) and a 10M-token
    # dead window longer than the run, so AuxK never saw a dead latent.
    "old": {"warmup_steps": 1000, "dead_tokens": 10_000_000},
    "warmup=0": {"warmup_frac": 0.0},
    "warmup=1000": {"warmup_steps": 1000},
    "decay=0": {"decay_frac": 0.0},
    "aux=off": {"aux_coef": 0.0},
    "dec_init=0.05": {"dec_init_norm": 0.05},
    "dec_init=0.3": {"dec_init_norm": 0.3},
    "l1": {"sparsity": "l1"},
}
DEFAULT_VARIANTS = ("defaults", "old", "warmup=0", "warmup=1000", "decay=0", "aux=off", "dec_init=0.05",
                    "dec_init=0.3", "l1")
# Summary keys of the table, in order: (key, header, format).
COLUMNS = (("mean_cos", "mean best cos", ".3f"), ("cos/shared", "shared", ".3f"), ("cos/chat_only", "chat", ".3f"),
           ("cos/base_only", "base", ".3f"), ("cos/weak_base", "weak", ".3f"), ("precision/chat_only", "chat P", ".2f"),
           ("recall/chat_only", "chat R", ".2f"), ("precision/base_only", "base P", ".2f"),
           ("recall/base_only", "base R", ".2f"), ("weak_ratio", "weak ratio", ".3f"),
           ("weak_as_chat_only", "weak→chat", ".2f"), ("alive", "alive", ".0f"), ("dead_fraction", "dead%", ".0%"),
           ("never_fired_fraction", "never%", ".0%"), ("fve/0", "FVE base", ".3f"), ("fve/1", "FVE chat", ".3f"),
           ("wall_s", "wall s", ".0f"))


def parse_variant(spec: str) -> dict[str, Any]:
  """A variant's overrides: a name in VARIANTS, or `field=value+field=value` (values as Python literals)."""
  if spec in VARIANTS:
    return dict(VARIANTS[spec])
  if "=" not in spec:
    raise SystemExit(f"unknown variant {spec!r}: use one of {', '.join(VARIANTS)} or field=value+field=value.")
  out = {}
  for part in spec.split("+"):
    field, _, value = part.partition("=")
    try:
      out[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[field.strip()] = value.strip()
  return out


def run_config(store: Any, workdir: Path, task: Any, seed: int, overrides: dict[str, Any]) -> Any:
  """The run config: base_config(), the task's budget, then the variant's overrides; locked."""
  from configs._crosscoder import base_config

  c = base_config()
  c.name, c.store, c.layer, c.workdir, c.seed = "planted", str(store.root), 0, str(workdir), seed
  for field, value in task.train_overrides().items():
    setattr(c, field, value)
  # The same codes, loss and gradients as "auto" (pairs) up to float summation order (hard task, seed 0,
  # defaults: mean best cos 0.910 dense, 0.912 pairs), and ~1.5x faster at m = 256 on CPU, where the pairs
  # step's candidate selection costs more than the dense products it saves.
  c.train_step = "dense"
  overrides = dict(overrides)
  warmup = overrides.pop("warmup_steps", None)
  for field, value in overrides.items():
    if field not in c:
      raise SystemExit(f"variant field {field!r} is not a run-config field (configs/_crosscoder.py).")
    is_float = isinstance(c[field], float) and isinstance(value, int) and not isinstance(value, bool)
    setattr(c, field, float(value) if is_float else value)
  if warmup is not None:  # a fixed warm-up, as before issue 15 (at most what the decay leaves of the run)
    c.warmup_frac, c.warmup_max_steps = min(int(warmup) / c.steps, 1.0 - c.decay_frac), int(warmup)
  c.checkpoint_every = c.steps  # one checkpoint, at the end: the benchmark scores the final crosscoder
  c.lock()
  return c


def train_and_score(task: Any, truth: Any, store: Any, held_out: Any, seed: int, overrides: dict[str, Any],
                    scratch: Path) -> dict[str, Any]:
  """Trains one variant on one seed's store and returns its summary numbers (and metrics.json's)."""
  from neurodiff_jax.crosscoder import load, synthetic
  from neurodiff_jax.crosscoder.train import train

  workdir = Path(tempfile.mkdtemp(dir=scratch))
  try:
    config = run_config(store, workdir, task, seed, overrides)
    t0 = time.perf_counter()
    metrics = train(config)
    wall = time.perf_counter() - t0
    result = synthetic.score(truth, load(workdir), held_out).summary()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  result |= {"wall_s": wall, "train_fve/0": metrics.get("fve/0"), "train_fve/1": metrics.get("fve/1")}
  result |= {k: metrics.get(k) for k in ("dead_fraction", "never_fired_fraction", "l0", "dense_steps")}
  return result


def _stats(values: list[float]) -> tuple[float, float, float]:
  return statistics.fmean(values), min(values), max(values)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
  """A Markdown table: per variant, the mean over seeds of each column, and [min, max] of mean best cos."""
  head = ["variant", "seeds"] + [h for _, h, _ in COLUMNS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, runs in results.items():
    cells = [f"`{name}`", str(len(runs))]
    for key, _, fmt in COLUMNS:
      values = [r[key] for r in runs if r.get(key) is not None]
      if not values:
        cells.append("–")
        continue
      mean, lo, hi = _stats([float(v) for v in values])
      cell = format(mean, fmt)
      if key == "mean_cos" and len(values) > 1:
        cell += f" [{lo:.3f}, {hi:.3f}]"
      cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_seed(results: dict[str, list[dict[str, Any]]]) -> str:
  """Mean best cos of every run, a variant per row, a seed per column."""
  seeds = sorted({r["seed"] for runs in results.values() for r in runs})
  lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
  for name, runs in results.items():
    by_seed = {r["seed"]: r["mean_cos"] for r in runs}
    lines.append(f"| `{name}` | " + " | ".join(f"{by_seed[s]:.3f}" if s in by_seed else "–" for s in seeds) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Parses flags, trains every variant on every seed, prints the tables and writes --out."""
  from neurodiff_jax.crosscoder import synthetic

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--task", choices=("uniform", "hard"), default="hard")
  ap.add_argument("--seeds", default="0,1,2", help="data seeds, comma-separated (each also seeds its training)")
  ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                  help=f"comma-separated; names: {', '.join(VARIANTS)}; or field=value+field=value")
  ap.add_argument("--steps", type=int, default=0, help="override the task's training steps (0 = the task's)")
  ap.add_argument("--out", default="", help="write every per-seed number (and the settings) here as JSON")
  ap.add_argument("--scratch", default="", help="directory for the stores and run directories (default: a temp dir)")
  args = ap.parse_args(argv)

  task = synthetic.PlantedTask.hard() if args.task == "hard" else synthetic.PlantedTask()
  if args.steps:
    task = dataclasses.replace(task, steps=args.steps)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  variants = {v.strip(): parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()}
  scratch = Path(tempfile.mkdtemp(prefix="planted-", dir=args.scratch or None))
  print(f"task {args.task}: {task}\nseeds {seeds}; variants {list(variants)}", flush=True)
  results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
  t_all = time.perf_counter()
  try:
    for seed in seeds:
      t0 = time.perf_counter()
      truth, store, held_out = task.data(scratch / f"store-{seed}", seed)
      print(f"seed {seed}: store of {task.n_tokens} tokens in {time.perf_counter() - t0:.1f} s, "
            f"{synthetic.expected_l0(truth, task.l0):.2f} features per token", flush=True)
      for name, overrides in variants.items():
        r = train_and_score(task, truth, store, held_out, seed, overrides, scratch)
        results[name].append({"seed": seed, **r})
        print(f"  {name:24s} mean best cos {r['mean_cos']:.3f}, weak ratio {r.get('weak_ratio', float('nan')):.3f}, "
              f"alive {r['alive']}, dead {r['dead_fraction']:.2f}, never {r['never_fired_fraction']:.2f}, "
              f"fve {r['fve/0']:.3f}/{r['fve/1']:.3f}, {r['wall_s']:.0f} s", flush=True)
      shutil.rmtree(scratch / f"store-{seed}", ignore_errors=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  total = time.perf_counter() - t_all
  print(f"\n{args.task} task, seeds {seeds}, {task.steps} steps, {total / 60:.1f} min in all\n")
  print(table(results))
  print("\nMean best cosine per seed:\n")
  print(per_seed(results))
  if args.out:
    record = {"task": args.task, "spec": dataclasses.asdict(task), "seeds": seeds, "variants": variants,
              "machine": platform.processor() or platform.machine(), "total_s": total, "results": results}
    Path(args.out).write_text(json.dumps(record, indent=1, default=float))
    print(f"\nwrote {args.out}")


__all__ = ["COLUMNS", "DEFAULT_VARIANTS", "VARIANTS", "main", "parse_variant", "per_seed", "run_config", "table",
           "train_and_score"]

if __name__ == "__main__":
  main()
