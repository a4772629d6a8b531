"""`python -m launch.train` and `launch.sweep` end to end: a named store harvested in place, a planted store, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.crosscoder import load, synthetic
from neurodiff_jax.crosscoder.metrics import delta_norm
from tests.launch import run_launcher
from tests.numerics import assert_close, rounding


def _run(module, *args, home):
  return run_launcher(module, *args, home=home, timeout=600)


@pytest.mark.slow
def test_train_launcher_harvests_the_named_store_there_and_trains_on_it(organisms, tmp_path):
  config, paths = organisms
  store = tmp_path / "named" / "store"  # missing: the config's harvest (harvest_tiny:small) makes it HERE
  work = tmp_path / "run"
  args = ["--config=tiny_batchtopk:small", f"--config.store={store}", "--config.steps=60",
          "--config.checkpoint_every=30", f"--config.workdir={work}"]
  proc = _run("launch.train", *args, home=config.home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"harvest: no store at {store}; harvesting it there." in proc.stdout
  assert "using the small-scale chat organism" in proc.stdout and "fine-tuning" not in proc.stdout  # reused
  assert not (Path(config.home) / "activations" / "harvest_tiny-small").exists()  # the default store is not made
  m = ActivationStore.open(store).manifest
  assert [x["path"] for x in m["models"]] == [str(paths["base"]), str(paths["chat"])] and m["layers"] == [1]
  assert "train: done; step 60" in proc.stdout and "step/s" in proc.stderr  # progress bar with a rate
  metrics = json.loads((work / "metrics.json").read_text())
  assert metrics["step"] == 60 and metrics["fve/0"] > 0.2 and metrics["fve/1"] > 0.2
  assert_close(metrics["l0"], 16, c=rounding(n=256), what="BatchTopK L0: exactly k a token over the batch")
  cc = load(work)
  assert cc.cfg.d_model == 64 and cc.cfg.dict_size == 512
  # Δnorm from the loaded crosscoder equals docs/methods.md §3 computed here from its decoder (original units).
  norms = np.linalg.norm(cc.decoder(), axis=-1)  # [m, M]
  expected = 0.5 * ((norms[:, 1] - norms[:, 0]) / norms.max(axis=1) + 1)
  assert_close(delta_norm(cc.decoder_norms()), expected, c=rounding(n=cc.cfg.d_model), scale=1.0,
               what="Δnorm from the loaded crosscoder equals methods.md §3 on its decoder (values in [0, 1])")
  assert sum(metrics["delta_norm_classes"].values()) == 512  # every latent counted once, dead ones apart
  assert sorted(json.loads(l)["step"] for l in (work / "tensorboard" / "metrics.jsonl").open())[-1] == 60
  # Rerun: the store is complete, so it is used as is (not harvested again), and the finished run is kept.
  again = _run("launch.train", *args, home=config.home)
  assert again.returncode == 0 and "harvest:" not in again.stdout and "train: done; step 60" in again.stdout


def test_sweep_trains_every_combination(tmp_path):
  truth = synthetic.plant_features(32, {"shared": 32, "chat_only": 8, "base_only": 8}, seed=0)
  store = synthetic.write_planted_store(tmp_path / "store", truth, 16_384)
  home = tmp_path / "home"
  proc = _run("launch.sweep", "--config=tiny_batchtopk", f"--config.store={store.root}", "--config.harvest=",
              "--config.layer=0", "--config.steps=10", "--config.batch_size=128", "--config.log_every=5",
              "--sweep=k=4,8", "--sweep=dict_size=128,256", home=home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  work = home / "runs" / "tiny_batchtopk-default"  # workdir "" = $NEURODIFF_HOME/runs/<config name>/<overrides>
  runs = sorted(p.name for p in work.iterdir())
  assert runs == ["k4-dict_size128", "k4-dict_size256", "k8-dict_size128", "k8-dict_size256"]
  for name in runs:
    m = json.loads((work / name / "metrics.json").read_text())
    assert m["step"] == 10 and m["l0"] == float(name[1])
    assert load(work / name).params["w_dec"].shape[0] == int(name.split("size")[1])
  assert sorted(p.name for p in home.iterdir()) == ["runs"]


def test_unknown_train_config_lists_the_known_ones(tmp_path):
  proc = _run("launch.train", "--config=gemma2b_batchtop", home=tmp_path)
  assert proc.returncode == 2
  assert "unknown config 'gemma2b_batchtop' (did you mean gemma2b_batchtopk" in proc.stderr and "tiny_l1" in proc.stderr
  # Every config the error lists loads, with the fields the trainer reads.
  from configs._crosscoder import base_config
  from launch.flags import known_configs, load_config

  fields = set(base_config().keys())
  for name in ("gemma2b_batchtopk", "gemma2b_l1", "llama8b_batchtopk", "tiny_topk", "tiny_l1", "tiny_batchtopk"):
    assert name in known_configs() and set(load_config(name).keys()) == fields, name
