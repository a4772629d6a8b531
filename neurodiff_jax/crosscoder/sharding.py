"""Where the crosscoder's arrays live on a ('data', 'latent') mesh.

The batch is split over `data`; the dictionary over `latent`: encoder columns `w_enc[:, :, j]`,
`b_enc[j]`, decoder rows `w_dec[j]` and every per-latent counter of latent j sit on the same
`latent` shard, so encoding, the sparsity mask and decoding need no communication except the
reductions XLA inserts (the decoder's sum over latents, BatchTopK's counts, gradient sums over
the batch).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "latent")
# Which dimension of each named leaf is split over `latent` (the key is the leaf's dict key).
_LATENT_DIM = {"w_enc": 2, "b_enc": 0, "w_dec": 0, "since_fired": 0}


def make_mesh(data: int, latent: int, devices: Any = None) -> Mesh:
  """A ('data', 'latent') mesh of data × latent devices (all of them when data·latent = device count)."""
  devices = jax.devices() if devices is None else devices
  if data * latent > len(devices):
    raise ValueError(f"mesh {data} × {latent} needs {data * latent} devices; {len(devices)} are available "
                     f"({jax.devices()[0].platform}). Set config.mesh to fit, e.g. ({len(devices)}, 1).")
  return Mesh(np.asarray(devices[:data * latent]).reshape(data, latent), AXES)


def _spec(path: tuple, leaf: Any) -> P:
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  ndim = np.ndim(leaf)
  for key in reversed(keys):
    if key in _LATENT_DIM and ndim > _LATENT_DIM[key]:
      dims = [None] * ndim
      dims[_LATENT_DIM[key]] = "latent"
      return P(*dims)
  return P()


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for a train state (params, Adam moments, counters): latent-split by leaf name, else replicated."""
  return jax.tree_util.tree_map_with_path(lambda p, l: NamedSharding(mesh, _spec(p, l)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, M, d] split over `data`."""
  return NamedSharding(mesh, P("data"))


def check_divisible(mesh: Mesh, batch_size: int, dict_size: int) -> None:
  """A clear error when the batch or the dictionary does not split evenly over the mesh."""
  d, l = mesh.shape["data"], mesh.shape["latent"]
  if batch_size % d:
    raise ValueError(f"batch_size={batch_size} does not split over {d} data shards; use a multiple of {d}.")
  if dict_size % l:
    raise ValueError(f"dict_size={dict_size} does not split over {l} latent shards; use a multiple of {l}.")


__all__ = ["AXES", "batch_sharding", "check_divisible", "make_mesh", "state_shardings"]
