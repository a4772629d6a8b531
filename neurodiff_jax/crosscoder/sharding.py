"""Where the crosscoder's arrays live on a ('data', 'latent') mesh.

The batch is split over `data`; the dictionary over `latent`: encoder columns `w_enc[:, :, j]`,
`b_enc[j]`, decoder rows `w_dec[j]` and every per-latent counter of latent j sit on the same
`latent` shard, so encoding, the sparsity mask and decoding need no communication except the
reductions XLA inserts (the decoder's sum over latents, BatchTopK's counts, gradient sums over
the batch). Axis letters in the spec names: B batch, M models, d model width, m latents.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neurodiff_jax.utils import mesh as mesh_lib

AXES = ("data", "latent")


@dataclasses.dataclass(frozen=True)
class Specs:
  """Every PartitionSpec of the crosscoder's arrays, named by the array and its axes."""

  w_enc_Mdm: P = P(None, None, "latent")
  b_enc_m: P = P("latent")
  w_dec_mMd: P = P("latent", None, None)
  b_dec_Md: P = P()
  latent_m: P = P("latent")  # per-latent train counters: tokens since each latent fired, whether it ever fired
  batch_BMd: P = P("data")
  replicated: P = P()  # scalars: step, θ, Adam's count, ...

  def by_leaf(self) -> dict[str, P]:
    """The spec of each named state leaf (its dict key), wherever it sits (params, Adam moments, counters)."""
    return {"w_enc": self.w_enc_Mdm, "b_enc": self.b_enc_m, "w_dec": self.w_dec_mMd, "b_dec": self.b_dec_Md,
            "since_fired": self.latent_m, "ever_fired": self.latent_m}


SPECS = Specs()


def make_mesh(data: int, latent: int, devices: Any = None) -> Mesh:
  """A ('data', 'latent') mesh of data × latent devices (`utils.mesh.make_mesh`)."""
  try:
    return mesh_lib.make_mesh((data, latent), AXES, devices)
  except ValueError as e:
    raise ValueError(f"{e} For training, set config.mesh=(data, latent) to fit.") from None


def _spec(path: tuple, leaf: Any, specs: Specs) -> P:
  table = specs.by_leaf()
  ndim = np.ndim(leaf)
  for entry in reversed(path):
    key = getattr(entry, "key", getattr(entry, "name", None))
    if key in table and len(table[key]) == ndim:
      return table[key]
  return specs.replicated


def state_shardings(state: Any, mesh: Mesh, specs: Specs = SPECS) -> Any:
  """NamedShardings of a train state (params, Adam moments, counters) by leaf name (`Specs.by_leaf`)."""
  return jax.tree_util.tree_map_with_path(lambda p, l: NamedSharding(mesh, _spec(p, l, specs)), state)


def batch_sharding(mesh: Mesh, specs: Specs = SPECS) -> NamedSharding:
  """Batches [B, M, d] split over `data`."""
  return NamedSharding(mesh, specs.batch_BMd)


__all__ = ["AXES", "SPECS", "Specs", "batch_sharding", "make_mesh", "state_shardings"]
