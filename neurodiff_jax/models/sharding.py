"""Where each model parameter and each model input lives on a device mesh.

Parameters carry logical axes (by their leaf name); `ShardingRules` maps logical axes to mesh
axes. An axis whose size the mesh axis does not divide is replicated rather than failing: a single
KV head (multi-query attention) or a vocabulary of odd size on a 4-way `model` axis, say. A model
mesh (`model_mesh`, the `model_mesh` field of the harvest, diff, analysis and dashboard configs) is
("data", "model"): tensor parallel on `model` (heads, KV heads, MLP hidden units, vocabulary),
batch rows on `data`. A mesh whose `model` axis shards neither the heads nor the MLP is refused:
nothing would be split, yet the user asked for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neurodiff_jax.models.config import TransformerConfig
from neurodiff_jax.models.hf_mapping import ParamPath
from neurodiff_jax.utils import mesh as mesh_lib
from neurodiff_jax.utils.config import ConfigError

# The axes of a model mesh, in the order of a `model_mesh` config field's sizes.
MODEL_MESH_AXES = ("data", "model")
# How to try a mesh larger than this machine on CPU (each forced device shares the host's cores).
CPU_DEVICES_FLAG = "XLA_FLAGS=--xla_force_host_platform_device_count=N"

# Logical axes of every parameter, by leaf name.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "w_q": ("embed", "heads", None),
    "w_k": ("embed", "kv_heads", None),
    "w_v": ("embed", "kv_heads", None),
    "w_o": ("heads", None, "embed"),
    "b_q": ("heads", None),
    "b_k": ("kv_heads", None),
    "b_v": ("kv_heads", None),
    "b_o": (None,),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "b_gate": ("mlp",),
    "b_up": ("mlp",),
    "b_down": (None,),
    "scale": (None,),
}


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis → mesh axis (None: replicated). Default: tensor parallel on `model`, batch on `data`."""

  vocab: str | None = "model"
  embed: str | None = None
  heads: str | None = "model"
  kv_heads: str | None = "model"
  mlp: str | None = "model"
  batch: str | None = "data"

  def mesh_axis(self, logical: str | None, mesh: Mesh | Mapping[str, int]) -> str | None:
    """The mesh axis for `logical`, or None when unset or absent from the mesh (a Mesh or {axis: size})."""
    axis = getattr(self, logical) if logical else None
    names = mesh.axis_names if isinstance(mesh, Mesh) else tuple(mesh)
    return axis if axis in names else None


def param_spec(path: ParamPath, shape: tuple[int, ...], axis_sizes: Mapping[str, int],
               rules: ShardingRules = ShardingRules()) -> PartitionSpec:
  """PartitionSpec of the parameter at `path` with global `shape` on a mesh of `axis_sizes` ({axis: size})."""
  axes = PARAM_AXES[str(path[-1])]
  spec = []
  for logical, size in zip(axes, shape):
    axis = rules.mesh_axis(logical, axis_sizes)
    spec.append(axis if axis is not None and size % axis_sizes[axis] == 0 else None)
  return PartitionSpec(*spec)


def param_sharding(path: ParamPath, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> NamedSharding:
  """NamedSharding of the parameter at `path` with global `shape`."""
  return NamedSharding(mesh, param_spec(path, shape, dict(mesh.shape), rules))


def batch_sharding(mesh: Mesh, rules: ShardingRules = ShardingRules()) -> NamedSharding:
  """Sharding of a `[B, T]` batch of token ids: batch on the data axis."""
  return NamedSharding(mesh, PartitionSpec(rules.mesh_axis("batch", mesh), None))


def make_mesh(shape: tuple[int, ...], axis_names: tuple[str, ...] = MODEL_MESH_AXES) -> Mesh:
  """A device mesh of `shape` over the first prod(shape) devices, with compiler-chosen (Auto) axes (`utils.mesh`)."""
  return mesh_lib.make_mesh(shape, axis_names)


# ------------------------------------------------------------------------------------------------ model meshes


def check_mesh_shape(shape: Sequence[int], num_devices: int | None = None, *, field: str = "model_mesh",
                     platform: str | None = None, scope: str = "this process") -> tuple[int, ...]:
  """`shape` as (data, model) sizes, () for one device; `ConfigError` when malformed or larger than the devices."""
  try:
    sizes = tuple(int(s) for s in shape)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={shape!r} must be () (one device) or (data, model) axis sizes, e.g. {field}=(2, 4)."
                      ) from None
  if sizes == ():
    return sizes
  if len(sizes) != len(MODEL_MESH_AXES) or min(sizes) < 1:
    raise ConfigError(f"{field}={sizes} must be () (one device) or two positive sizes of the axes "
                      f"{MODEL_MESH_AXES}, e.g. {field}=(2, 4).")
  if num_devices is None:
    devices = jax.local_devices()
    num_devices, platform = len(devices), devices[0].platform
  n = math.prod(sizes)
  if n > num_devices:
    raise ConfigError(f"{field}={sizes} needs {n} devices but {scope} has {num_devices} ({platform or 'local'}); "
                      f"choose sizes whose product is at most {num_devices}, e.g. {field}=(1, {num_devices}), or on "
                      f"CPU set {CPU_DEVICES_FLAG.replace('=N', f'={n}')} to test it.")
  return sizes


def _divisors(n: int, limit: int) -> list[int]:
  return [k for k in range(2, min(n, limit) + 1) if n % k == 0]


def check_model_axis(model: int, cfg: TransformerConfig, *, where: str = "the model",
                     rules: ShardingRules = ShardingRules(), num_devices: int | None = None) -> None:
  """`ConfigError` when a `model` axis of size `model` would shard nothing of `cfg`: neither its heads nor its MLP.

  A KV-head count the axis does not divide is replicated, not refused (one KV head, multi-query attention, is
  normal: its K and V projections are small); so are a vocabulary and a hidden size it does not divide.
  """
  if model <= 1 or (rules.heads != "model" and rules.mlp != "model"):
    return
  heads, mlp = cfg.num_heads, cfg.intermediate_size
  if heads % model and mlp % model:
    limit = num_devices or len(jax.local_devices())
    heads_ok, mlp_ok = _divisors(heads, limit), _divisors(mlp, limit)
    options = sorted(set(heads_ok) | set(mlp_ok))
    raise ConfigError(
        f"a model axis of {model} shards neither the {heads} attention heads nor the MLP size {mlp} of {where} "
        f"(nothing would be split); use a model axis that divides one of them (up to {limit} devices: heads "
        f"{', '.join(map(str, heads_ok)) or 'none'}; MLP {', '.join(map(str, mlp_ok)) or 'none'}), "
        f"e.g. model_mesh=(1, {options[-1] if options else 1}).")


def model_mesh(shape: Sequence[int], cfgs: Sequence[TransformerConfig] = (), *, where: Sequence[str] = (),
               rules: ShardingRules = ShardingRules(), field: str = "model_mesh",
               across_processes: bool = False) -> Mesh | None:
  """The ("data", "model") mesh a `model_mesh` config field asks for, over this process's devices; None for ().

  Checked before any weight is loaded: against the devices (`check_mesh_shape`) and against each model's
  architecture `cfgs` (`check_model_axis`; `where` names each model in the errors). By default the mesh spans
  the local devices only: in a multi-process run each process holds its own copy of the models. With
  `across_processes` it spans every process's devices (a model larger than one host): each process then
  holds only its devices' shards, and all processes must run each computation together.
  """
  devices = jax.devices() if across_processes else jax.local_devices()
  sizes = check_mesh_shape(shape, len(devices), field=field, platform=devices[0].platform,
                           scope="the job" if across_processes else "this process")
  if not sizes:
    return None
  for i, cfg in enumerate(cfgs):
    check_model_axis(sizes[1], cfg, where=where[i] if i < len(where) else "the model", rules=rules,
                     num_devices=len(devices))
  if across_processes and math.prod(sizes) != len(devices):
    raise ConfigError(f"{field}={sizes} spans {math.prod(sizes)} of the job's {len(devices)} devices; a mesh across "
                      f"processes must use every device of every process (sizes whose product is {len(devices)}).")
  everything = across_processes or jax.process_count() == 1  # all devices: let JAX order them for the topology
  return mesh_lib.make_mesh(sizes, MODEL_MESH_AXES, devices=None if everything else devices)


def mesh_of(model: Any) -> Mesh | None:
  """The mesh a loaded model's parameters live on (`load_model(..., mesh)`), or None for one device."""
  sharding = getattr(model.embed[...], "sharding", None)
  return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def input_sharding(mesh: Mesh, shape: Sequence[int], rules: ShardingRules = ShardingRules()) -> NamedSharding:
  """A model input's sharding: rows (axis 0) on the data axis where its size divides them, else replicated."""
  axis = rules.mesh_axis("batch", mesh)
  split = axis is not None and len(shape) > 0 and shape[0] % mesh.shape[axis] == 0
  return NamedSharding(mesh, PartitionSpec(axis if split else None))


def put_batch(mesh: Mesh | None, *arrays: Any, rules: ShardingRules = ShardingRules()) -> tuple[jax.Array, ...]:
  """Model inputs with a leading batch axis placed on `mesh` (`input_sharding`); jnp arrays as usual without one."""
  if mesh is None:
    return tuple(jax.numpy.asarray(a) for a in arrays)
  if spans_processes(mesh):  # each process places its devices' rows of the same batch
    return tuple(jax.make_array_from_callback(np.shape(a), input_sharding(mesh, np.shape(a), rules),
                                              lambda idx, a=np.asarray(a): a[idx]) for a in arrays)
  return tuple(jax.device_put(a, input_sharding(mesh, jax.numpy.shape(a), rules)) for a in arrays)


def spans_processes(mesh: Mesh | None) -> bool:
  """Whether `mesh` holds devices of other processes (`model_mesh(..., across_processes=True)` in a multi-process job)."""
  return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def to_host(mesh: Mesh | None, *arrays: jax.Array) -> tuple[np.ndarray, ...]:
  """Outputs as numpy arrays on this host: gathered from every process when `mesh` spans several."""
  if spans_processes(mesh):
    from jax.experimental import multihost_utils

    return tuple(np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays)
  return tuple(np.asarray(a) for a in arrays)


def put_replicated(mesh: Mesh | None, tree: Any) -> Any:
  """Every array of `tree` replicated on `mesh` (arrays committed to one device, e.g. a crosscoder's); as is without."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


__all__ = ["CPU_DEVICES_FLAG", "MODEL_MESH_AXES", "PARAM_AXES", "ShardingRules", "batch_sharding", "check_mesh_shape",
           "check_model_axis", "input_sharding", "make_mesh", "mesh_of", "model_mesh", "param_sharding", "param_spec",
           "put_batch", "put_replicated", "spans_processes", "to_host"]
