"""Device meshes: one helper for every package that shards arrays (models, crosscoder)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh of `shape` with named Auto axes over the first prod(shape) of `devices` (default: all devices).

  `jax.make_mesh` orders the devices for the hardware's topology. The axes are Auto: XLA
  propagates the shardings we place on arrays; Explicit axes would make every gather ambiguous.
  """
  shape, axis_names = tuple(int(s) for s in shape), tuple(axis_names)
  if len(shape) != len(axis_names) or min(shape, default=1) < 1:
    raise ValueError(f"mesh shape {shape} must give a positive size to each of the axes {axis_names}.")
  everything = devices is None
  devices = list(jax.devices() if everything else devices)
  n = math.prod(shape)
  if n > len(devices):
    sizes = ", ".join(f"{a}={s}" for a, s in zip(axis_names, shape))
    raise ValueError(f"mesh ({sizes}) needs {n} devices; {len(devices)} are available ({devices[0].platform}). Choose "
                     f"axis sizes whose product is at most {len(devices)}, e.g. "
                     f"{(len(devices),) + (1,) * (len(shape) - 1)}.")
  # All devices: let JAX choose their order; a subset: the first n, in order.
  return jax.make_mesh(shape, axis_names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=None if everything and n == len(devices) else devices[:n])


__all__ = ["make_mesh"]
