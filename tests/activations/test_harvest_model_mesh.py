"""The harvest on a model mesh (`model_mesh`): the store equals the one-device harvest's, row for row.

Stored as float32 so the comparison sees the forward's own rounding (a bfloat16 store would add one
bf16 rounding that a last-bit difference can flip). Tensor parallelism splits the sums over heads and
MLP units into per-device partial sums added by an all-reduce: another order of the same float32 sums,
so residuals after block L agree to `residual_c` (L + 1 stages of sums over at most max(d, d_ff)
terms); token ids, positions, documents and kinds are exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from neurodiff_jax.activations.store import METADATA, ActivationStore, layer_name
from neurodiff_jax.models import model_config
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import assert_close, residual_c

MESHES = [(1, 8), (2, 4), (8, 1)]


def _contents(root) -> tuple[ActivationStore, dict[str, np.ndarray]]:
  store = ActivationStore.open(root)
  names = [layer_name(l) for l in store.layout.layers] + list(METADATA)
  return store, {n: store.array(n).read().result() for n in names}


def assert_same_store(got, ref, cfg, where: str) -> None:
  """`got`'s rows equal `ref`'s: metadata exactly, activations to `residual_c` of their layer."""
  (sg, xg), (sr, xr) = _contents(got), _contents(ref)
  assert sg.manifest["config_key"] == sr.manifest["config_key"]  # the mesh is not part of what the store holds
  assert sg.layout.num_tokens == sr.layout.num_tokens
  for name in METADATA:
    np.testing.assert_array_equal(xg[name], xr[name], err_msg=f"{where}: {name}")
  for layer in sr.layout.layers:
    a, r = xg[layer_name(layer)], xr[layer_name(layer)]
    assert a.dtype == r.dtype == np.float32
    assert_close(a, r, c=residual_c(cfg, layer), what=f"{where}: layer {layer} residuals equal one device's")


def test_harvest_on_model_meshes_equals_one_device(harvest_config, tmp_path):
  c = harvest_config
  c.dtype = "float32"
  c.out_dir = str(tmp_path / "one")
  from neurodiff_jax.activations.harvest import harvest

  harvest(c)
  cfg = model_config(c.base_model)
  for shape in MESHES:
    c.model_mesh = shape
    c.out_dir = str(tmp_path / f"mesh_{shape[0]}x{shape[1]}")
    harvest(c)
    assert_same_store(c.out_dir, tmp_path / "one", cfg, f"model_mesh={shape}")


def test_batch_that_does_not_split_over_data_is_refused_before_loading(harvest_config, tmp_path, monkeypatch):
  from neurodiff_jax.activations import harvest as harvest_lib

  monkeypatch.setattr(harvest_lib, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
  c = harvest_config
  c.model_mesh, c.batch_size = (4, 2), 6
  with pytest.raises(ConfigError, match=r"batch_size=6 does not split over the 4 devices of the data axis.*"
                                        r"--config.batch_size=4"):
    harvest_lib.harvest(c)
  c.model_mesh, c.batch_size = (1, 16), 8
  with pytest.raises(ConfigError, match="needs 16 devices but this process has 8"):
    harvest_lib.harvest(c)


def test_an_adapter_fine_tune_is_merged_when_harvested(harvest_config, tmp_path):
  """BASE+ADAPTER as the fine-tuned model: its column is the adapted model's, not the base's (its CheckpointInfo.path
  names the base directory, which the harvest used to load); on a (2, 4) mesh as on one device."""
  from neurodiff_jax.activations.harvest import harvest
  from tests.models.test_lora import build_adapter

  c = harvest_config
  build_adapter(c.base_model, tmp_path / "adapter", r=4, lora_alpha=8)
  c.finetuned_model = f"{c.base_model}+{tmp_path / 'adapter'}"
  c.dtype, c.layers, c.out_dir = "float32", (1,), str(tmp_path / "one")
  store = harvest(c)
  x = store.read(1, 0, store.layout.num_tokens)
  assert np.abs(x[:, 1] - x[:, 0]).max() > 0.1 * np.abs(x).max()  # the adapter moved the fine-tuned residuals
  c.model_mesh, c.out_dir = (2, 4), str(tmp_path / "mesh")
  harvest(c)
  assert_same_store(c.out_dir, tmp_path / "one", model_config(c.base_model), "an adapter on a (2, 4) mesh")


@pytest.mark.slow
def test_two_processes_each_on_its_own_model_mesh_write_one_store(harvest_config, tmp_path):
  """Two processes joined by `jax.distributed`, 4 CPU devices each, model_mesh (2, 2) on each one's own devices:
  each harvests its units (every other one) into the shared store, which equals the one-process one-device store."""
  import json
  import os
  import subprocess
  import sys

  from tests.activations.test_harvest_crash import JOB, ROOT, _free_port, _wait

  c = harvest_config
  c.dtype = "float32"
  c.out_dir = str(tmp_path / "one")
  from neurodiff_jax.activations.harvest import harvest

  harvest(c)
  c.out_dir = str(tmp_path / "multi")
  c.model_mesh = (2, 2)
  c.distributed, c.coordinator_address, c.process_count = True, f"127.0.0.1:{_free_port()}", 2
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  procs = []
  for p in range(2):
    c.process_index = p
    path = tmp_path / f"p{p}.json"
    path.write_text(json.dumps(c.to_dict()))
    procs.append(subprocess.Popen([sys.executable, str(JOB), str(path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))
  outs = [_wait(p) for p in procs]
  assert all("both models on a 2x2 (data x model) mesh" in o for o in outs)
  assert all(f"for process {p}/2" in o for p, o in enumerate(outs)) and any("store complete" in o for o in outs)
  assert_same_store(c.out_dir, tmp_path / "one", model_config(c.base_model), "two processes on (2, 2) meshes")
