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
  c = harvest_config
  c.dtype = "float32"
  c.out_dir = str(tmp_path / "one")
  from neurodiff_jax.activations.harvest import harvest

  harvest(c)
  c.out_dir = str(tmp_path / "multi")
  c.model_mesh = (2, 2)
  outs = _run_two(c, tmp_path, devices_each=4)
  assert all("both models on a 2x2 (data x model) mesh" in o for o in outs)
  assert all(f"for process {p}/2" in o for p, o in enumerate(outs)) and any("store complete" in o for o in outs)
  assert_same_store(c.out_dir, tmp_path / "one", model_config(c.base_model), "two processes on (2, 2) meshes")


def _run_two(c, tmp_path, devices_each: int) -> list[str]:
  """Runs the harvest of config `c` as processes 0 and 1 of one job, `devices_each` CPU devices each; their outputs."""
  import json
  import os
  import subprocess
  import sys

  from tests.activations.test_harvest_crash import JOB, ROOT, _free_port, _wait

  c.distributed, c.coordinator_address, c.process_count = True, f"127.0.0.1:{_free_port()}", 2
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  procs = []
  for p in range(2):
    c.process_index = p
    path = tmp_path / f"p{p}.json"
    path.write_text(json.dumps(c.to_dict()))
    procs.append(subprocess.Popen([sys.executable, str(JOB), str(path)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE))
  return [_wait(p) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 4), (2, 2)])
def test_one_model_mesh_across_two_processes_writes_the_one_device_store(harvest_config, tmp_path, shape):
  """`model_mesh_across_processes`: both processes' 2 CPU devices form one mesh, so each process holds only its
  devices' shards of the weights (half of the (1, 4) mesh's model axis; on (2, 2) the data axis spans the
  processes and each holds a whole copy split two ways); they run every unit together and each writes the
  units it owns: the store equals the one-process one-device store."""
  import re

  from neurodiff_jax.activations.harvest import harvest
  from neurodiff_jax.models.memory import held_bytes
  from neurodiff_jax.models import load_model

  c = harvest_config
  c.dtype = "float32"
  c.out_dir = str(tmp_path / "one")
  harvest(c)
  whole = 2 * held_bytes(load_model(c.base_model))[1]
  c.out_dir = str(tmp_path / "multi")
  c.model_mesh, c.model_mesh_across_processes = shape, True
  outs = _run_two(c, tmp_path, devices_each=2)
  mesh = f"{shape[0]}x{shape[1]}"
  for p, out in enumerate(outs):
    assert f"both models on a {mesh} (data x model) mesh of cpu devices across 2 processes" in out, out[-2000:]
    held = float(re.search(r"this process holds ([\d.]+) MiB of the pair's ([\d.]+) MiB", out).group(1)) * 2**20
    # (1, 4): each device holds a quarter of the split weights, so a process (2 devices) about half of the pair;
    # replicated pieces (norms, a KV head the axis does not divide) are the rest.
    assert held < (0.75 if shape == (1, 4) else 1.1) * whole, (p, held, whole)
  assert any("store complete" in o for o in outs)
  assert_same_store(c.out_dir, tmp_path / "one", model_config(c.base_model), f"one {mesh} mesh across two processes")


def test_a_mesh_across_processes_needs_distributed_and_every_device(harvest_config, monkeypatch):
  from neurodiff_jax.activations import harvest as harvest_lib

  monkeypatch.setattr(harvest_lib, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
  c = harvest_config
  c.model_mesh, c.model_mesh_across_processes = (1, 4), True
  c.process_index, c.process_count = 0, 2
  with pytest.raises(ConfigError, match=r"model_mesh_across_processes=True .* add --config.distributed=True"):
    harvest_lib.harvest(c)
  c.process_count = 1
  with pytest.raises(ConfigError, match=r"spans 4 of the job's 8 devices; a mesh across processes must use every"):
    harvest_lib.harvest(c)
