"""Train several overrides of one config: `python -m launch.sweep --config=NAME --sweep=k=32,64 --sweep=lr=1e-4,3e-4`.

Every combination of the `--sweep=FIELD=V1,V2,...` values (a grid) is trained in turn, each in
`<workdir>/<field><value>-...` (`workdir=""`: `$NEURODIFF_HOME/runs/<config name>/...`); a finished
run is skipped (resumed runs continue), so the same command can be rerun after a crash. Values are
parsed as the field's type (tuples as Python literals, separated by `;`). Every combination is
checked before the first one trains.
"""

from __future__ import annotations

import ast
import itertools
from typing import Any

from absl import flags as absl_flags

from launch import flags
from launch import train as train_launcher
from neurodiff_jax.activations import harvest
from neurodiff_jax.crosscoder import train
from neurodiff_jax.utils.config import ConfigError, did_you_mean, kind_of

_SWEEP = absl_flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeatable; the grid of all combinations)")


def _parser(kind: type):
  if kind in (tuple, list, bool):
    return ast.literal_eval
  return kind


def parse_sweep(config: Any, specs: list[str]) -> list[dict]:
  """The grid of overrides from `FIELD=V1,V2` specs, each value of its field's type; `ConfigError` otherwise."""
  axes = []
  for spec in specs:
    field, sep, values = spec.partition("=")
    if not sep or not values:
      raise ConfigError(f"--sweep={spec}: expected FIELD=V1,V2,... (e.g. --sweep=k=8,16).")
    if field not in config:
      raise ConfigError(f"--sweep={spec}: the config has no field {field!r}{did_you_mean(field, config.keys())}; "
                        "--config.show lists every field.")
    kind = type(config[field])
    axis = []
    for v in values.split(";" if kind in (tuple, list) else ","):
      try:
        value = _parser(kind)(v.strip())
      except (ValueError, SyntaxError):
        raise ConfigError(f"--sweep={spec}: {v.strip()!r} is not {kind_of(config[field])}, which config.{field} "
                          f"takes (it is {config[field]!r}).") from None
      axis.append((field, kind(value) if kind in (tuple, list) else value))
    axes.append(axis)
  return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def runs(config: Any) -> list[tuple[dict, Any]]:
  """(overrides, run config) for every combination, each with its own workdir under the sweep's."""
  root = train.workdir_of(config)
  out = []
  for overrides in parse_sweep(config, _SWEEP.value):
    run = config.copy_and_resolve_references()
    with run.unlocked():
      for k, v in overrides.items():
        run[k] = v
      run.workdir = str(root / ("-".join(f"{k}{v}" for k, v in overrides.items()) or "base"))
    out.append((overrides, run))
  return out


def check(config: Any) -> None:
  """Before any work: the store as for `launch.train`, and every combination of the grid."""
  train_launcher.check(config)
  for overrides, run in runs(config):
    try:
      train.check_config(run)
    except ConfigError as e:
      raise ConfigError(f"sweep run {overrides}: {e}") from None


def main(config: Any) -> None:
  """Trains every combination of the sweep."""
  harvest.ensure_store(config.store, train_launcher.harvest_config(config))
  for overrides, run in runs(config):
    print(f"sweep: {overrides} -> {run.workdir}")
    metrics = train.train(run)
    print(f"sweep: {overrides}: loss {metrics.get('loss/total', float('nan')):.4g}, L0 {metrics.get('l0', 0):.1f}, "
          f"FVE {[round(metrics[k], 3) for k in sorted(metrics) if k.startswith('fve/')]}")


__all__ = ["check", "main", "parse_sweep", "runs"]


if __name__ == "__main__":
  flags.run(main, default_config="tiny_batchtopk", check=check)
