"""Train several overrides of one config in one go: `python -m launch.sweep --config=NAME --sweep=k=32,64 --sweep=lr=1e-4,3e-4`.

Every combination of the `--sweep=FIELD=V1,V2,...` values (a grid) is trained in turn, each in
`<workdir>/<field><value>-...`; a finished run is skipped (resumed runs continue), so the same
command can be rerun after a crash. Values are parsed as the field's type (tuples as Python literals).
"""

import ast
import itertools
from pathlib import Path

from absl import flags as absl_flags

from launch import flags
from neurodiff_jax.crosscoder import train

_SWEEP = absl_flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeatable; the grid of all combinations)")


def parse_sweep(config, specs: list[str]) -> list[dict]:
  """The grid of overrides from `FIELD=V1,V2` specs, each value of its field's type."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    if not sep or field not in config:
      raise SystemExit(f"error: --sweep={spec!r}: expected FIELD=V1,V2 with FIELD one of the config's fields "
                       f"({', '.join(sorted(config))}).")
    kind = type(config[field])
    parse = (lambda v: ast.literal_eval(v)) if kind in (tuple, list, bool) else kind
    axes.append([(field, parse(v)) for v in values.split(";" if kind in (tuple, list) else ",")])
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def main(config) -> None:
  """Trains every combination of the sweep."""
  grid = parse_sweep(config, _SWEEP.value)
  root = Path(config.workdir)
  for overrides in grid:
    run = config.copy_and_resolve_references()
    with run.unlocked():
      for k, v in overrides.items():
        run[k] = v
      run.workdir = str(root / ("-".join(f"{k}{v}" for k, v in overrides.items()) or "base"))
    print(f"sweep: {overrides} -> {run.workdir}")
    metrics = train.train(run)
    print(f"sweep: {overrides}: loss {metrics.get('loss/total', float('nan')):.4g}, L0 {metrics.get('l0', 0):.1f}, "
          f"FVE {[round(metrics[k], 3) for k in sorted(metrics) if k.startswith('fve/')]}")


if __name__ == "__main__":
  flags.run(main, default_config="tiny_batchtopk")
