"""Where each model parameter lives on a device mesh.

Parameters carry logical axes (by their leaf name); `ShardingRules` maps logical axes to mesh
axes. An axis whose size the mesh axis does not divide (a single KV head on a 4-way `model`
axis, say) is replicated rather than failing.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neurodiff_jax.models.hf_mapping import ParamPath
from neurodiff_jax.utils import mesh as mesh_lib

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
  """Logical axis → mesh axis (None: replicated). Default: tensor parallel on `model`."""

  vocab: str | None = "model"
  embed: str | None = None
  heads: str | None = "model"
  kv_heads: str | None = "model"
  mlp: str | None = "model"
  batch: str | None = "data"

  def mesh_axis(self, logical: str | None, mesh: Mesh) -> str | None:
    """The mesh axis for `logical`, or None when unset or absent from the mesh."""
    axis = getattr(self, logical) if logical else None
    return axis if axis in mesh.axis_names else None


def param_sharding(path: ParamPath, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> NamedSharding:
  """NamedSharding of the parameter at `path` with global `shape`."""
  axes = PARAM_AXES[str(path[-1])]
  spec = []
  for logical, size in zip(axes, shape):
    axis = rules.mesh_axis(logical, mesh)
    spec.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, rules: ShardingRules = ShardingRules()) -> NamedSharding:
  """Sharding of a `[B, T]` batch of token ids: batch on the data axis."""
  return NamedSharding(mesh, PartitionSpec(rules.mesh_axis("batch", mesh), None))


def make_mesh(shape: tuple[int, ...], axis_names: tuple[str, ...] = ("data", "model")) -> Mesh:
  """A device mesh of `shape` over the first prod(shape) devices, with compiler-chosen (Auto) axes (`utils.mesh`)."""
  return mesh_lib.make_mesh(shape, axis_names)


__all__ = ["PARAM_AXES", "ShardingRules", "batch_sharding", "make_mesh", "param_sharding"]
