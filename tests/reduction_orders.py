"""Runs the numerical tests under other reduction orders and reports how close each comparison came to its tolerance.

    python -m tests.reduction_orders                       # every variant below, slow tests included
    python -m tests.reduction_orders -m "not slow" --variants xla1-torch2

A float32 sum's rounding depends on its order, and the order depends on the machine: XLA:CPU splits
reductions over the threads of its pool (sized from the CPUs in the process's affinity mask; it has
no thread-count flag) and torch over `torch.set_num_threads`. Each variant pins a pytest process to
1 or 2 CPUs and sets torch's threads (tests/conftest.py reads NEURODIFF_TEST_TORCH_THREADS); all run
with 8 forced host devices (tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8).
The numerical tests are the files that compare through tests/numerics.py. Every comparison appends
its err/scale to a log (NEURODIFF_TOL_LOG); the table at the end gives, per comparison, the largest
share of its tolerance c used in any variant. Exit status 1 if any variant failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (CPUs XLA may use, torch threads)
VARIANTS = {"xla1-torch1": (1, 1), "xla1-torch2": (1, 2), "xla2-torch1": (2, 1), "xla2-torch2": (2, 2)}


def numerical_test_files() -> list[str]:
  """Test files (relative to the repository root) that compare through tests/numerics.py."""
  files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "tests.numerics import" in p.read_text())
  return [str(p.relative_to(ROOT)) for p in files]


def run_variant(name: str, files: list[str], marker: str | None, log: Path) -> tuple[int, float, str]:
  """Runs pytest on `files` pinned to the variant's CPUs; returns (exit status, seconds, pytest's summary line)."""
  cpus, torch_threads = VARIANTS[name]
  if cpus > len(os.sched_getaffinity(0)):
    raise SystemExit(f"variant {name} needs {cpus} CPUs; this process may use {len(os.sched_getaffinity(0))}")
  env = {**os.environ, "NEURODIFF_TOL_LOG": str(log), "NEURODIFF_TEST_TORCH_THREADS": str(torch_threads),
         "OMP_NUM_THREADS": str(torch_threads)}
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files] + (["-m", marker] if marker else [])
  start = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        preexec_fn=lambda: os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus])))
  lines = [l for l in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", l)]
  if proc.returncode:
    sys.stdout.write(proc.stdout[-6000:])
  return proc.returncode, time.time() - start, lines[-1] if lines else proc.stdout[-300:]


# Its comparisons plant bugs and must fail: they measure how far a bug lands outside c, not headroom.
PLANTED = "tests/test_tolerances.py"


def headroom(logs: dict[str, Path]) -> list[tuple[str, float, str]]:
  """(comparison, largest err/scale ÷ c over the variants, the variants reaching it) per site, worst first."""
  worst: dict[str, tuple[float, set[str]]] = collections.defaultdict(lambda: (0.0, set()))
  for variant, log in logs.items():
    if not log.exists():
      continue
    for line in log.read_text().splitlines():
      r = json.loads(line)
      if r["test"].startswith(PLANTED):
        continue
      key = f"{r['test'].split('::')[0]}: {re.sub(r'[0-9]+', '#', r['what'])}"  # one row per comparison site
      share = r["err_over_scale"] / r["c"]
      best, where = worst[key]
      if share > best:
        worst[key] = (share, {variant})
      elif share == best:
        where.add(variant)
  rows = [(k, s, "all" if len(v) == len(logs) else ",".join(sorted(v))) for k, (s, v) in worst.items()]
  return sorted(rows, key=lambda t: -t[1])


def main(argv: list[str] | None = None) -> int:
  """Parses the flags, runs each variant, prints the results and the headroom table."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("-m", dest="marker", default=None, help='pytest marker expression, e.g. "not slow"')
  parser.add_argument("--files", nargs="*", default=None, help="test files (default: every numerical test file)")
  parser.add_argument("--top", type=int, default=25, help="rows of the headroom table")
  args = parser.parse_args(argv)
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
  files = args.files or numerical_test_files()
  print(f"{len(files)} numerical test files; variants {', '.join(names)}", flush=True)
  tmp = Path(tempfile.mkdtemp(prefix="reduction-orders-"))
  logs, failed = {}, []
  print("| variant | XLA CPUs | torch threads | result | s |\n|---|---|---|---|---|", flush=True)
  for name in names:
    logs[name] = tmp / f"{name}.jsonl"
    code, seconds, summary = run_variant(name, files, args.marker, logs[name])
    failed += [name] if code else []
    print(f"| {name} | {VARIANTS[name][0]} | {VARIANTS[name][1]} | {summary} | {seconds:.0f} |", flush=True)
  rows = headroom(logs)
  print(f"\n{len(rows)} comparison sites ({PLANTED}'s planted bugs left out); the {min(args.top, len(rows))} closest "
        "to their tolerance (share of c used, the variants reaching it):\n| comparison | err/scale ÷ c | variant |\n"
        "|---|---|---|")
  for key, share, variant in rows[:args.top]:
    print(f"| {key} | {share:.3f} | {variant} |")
  print(f"\nlogs: {tmp}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
