"""Ground truth: crosscoders trained on planted sparse features (issue 5, item 7; docs/methods.md).

Paired activations are built from planted features of four classes (shared, chat-only, base-only,
shared with a weak base copy; `synthetic.py`). A BatchTopK crosscoder must recover the planted
decoder directions and read the exclusive classes from Δnorm; an L1 crosscoder trained on the same
store must show the shrinkage artifact: the weak base copies are driven toward zero, so those
shared features look chat-only. Each crosscoder is trained once (module fixtures) and checked
several ways by `synthetic.score` (shared with benchmarks/planted.py). Run with `-s` to print the
measured numbers (docs/results.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.crosscoder import load, synthetic
from neurodiff_jax.crosscoder import train as train_lib
from tests.crosscoder.conftest import train_config

# Seeds the planted features, the token sample and the training. 0 is the tested one; 1–3 were also
# checked (docs/results.md) and can be rerun through the environment variable.
SEED = int(os.environ.get("NEURODIFF_GT_SEED", "0"))
# The uniform task (synthetic.PlantedTask()): d = 64, 48 shared, 16 chat-only, 16 base-only and 16 weak-base
# features, 8 on per token, noise 0.01; 65,536 training tokens and 8,192 held out. At d = 32 the 96 features
# are packed so tightly that a few stay unrecovered within the time budget. The weak base copy must be
# visibly shared by Δnorm's own thresholds: at plant_features' default 0.15 its planted Δnorm is already
# ≈ 0.92 (chat-only), so shrinkage could not change its class. At 0.35 it is 0.825: Δnorm = 1 − r/2 with
# r = ‖d_base‖/‖d_chat‖ = 0.35 (Δnorm reads the decoder in original units).
TASK = synthetic.PlantedTask()
WEAK = TASK.weak
CHAT_ONLY = synthetic.CHAT_ONLY
SHARED = (0.4, 0.6)  # Δnorm's shared class (docs/methods.md)

# The task's budget (m = 256, k = 8, batch 256, lr 3e-3), with a 20-step warm-up.
COMMON = TASK.train_overrides() | {"warmup_frac": 20 / TASK.steps, "warmup_max_steps": 20, "log_every": 200}
BATCHTOPK = {"sparsity": "batchtopk", "steps": TASK.steps, "checkpoint_every": TASK.steps}
# The shrinkage grows with λ (median weak-base ratio at seed 0: 0.30 at λ = 0.5, 0.23 at 1, 0.13 at 2,
# 0.07 at 2.5; planted 0.35, docs/results.md); 2.5 puts it well past half the planted ratio while the
# strong copies keep their directions.
L1 = {"sparsity": "l1", "steps": 800, "checkpoint_every": 800, "l1_lambda": 2.5}


def _fit(truth: synthetic.PlantedFeatures, store: ActivationStore, held_out: np.ndarray, workdir: Path,
         overrides: dict) -> synthetic.Score:
  """Trains one crosscoder on the store and scores what it recovered (`synthetic.score`)."""
  train_lib.train(train_config(store, workdir, seed=SEED, **(COMMON | overrides)))
  return synthetic.score(truth, load(workdir), held_out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(truth, store, held-out tokens) of the planted features."""
  return TASK.data(tmp_path_factory.mktemp("gt") / "store", SEED)


@pytest.fixture(scope="module")
def batchtopk(data, tmp_path_factory):
  """The BatchTopK crosscoder's score."""
  truth, store, held_out = data
  rec = _fit(truth, store, held_out, tmp_path_factory.mktemp("batchtopk"), BATCHTOPK)
  print("\n" + rec.report(f"[seed {SEED}] batchtopk"))
  return rec


@pytest.fixture(scope="module")
def l1(data, tmp_path_factory):
  """The L1 crosscoder's score, on the same store."""
  truth, store, held_out = data
  rec = _fit(truth, store, held_out, tmp_path_factory.mktemp("l1"), L1)
  print("\n" + rec.report(f"[seed {SEED}] l1"))
  return rec


def test_batchtopk_recovers_the_planted_decoder_directions(data, batchtopk):
  truth = data[0]
  assert batchtopk.cos.mean() >= 0.9
  for cls in synthetic.CLASSES:
    assert batchtopk.cos[truth.classes == cls].mean() >= 0.9, cls
  # One latent per feature, not one latent blurring several of them.
  assert len(np.unique(batchtopk.best)) >= 0.95 * len(truth.classes)


@pytest.mark.parametrize("cls", ["chat_only", "base_only"])
def test_batchtopk_classifies_exclusive_features_by_delta_norm(data, batchtopk, cls):
  precision, recall = batchtopk.precision_recall(cls)
  assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def test_batchtopk_keeps_shared_and_weak_base_features_out_of_the_exclusive_classes(data, batchtopk):
  truth = data[0]
  shared = batchtopk.dn[batchtopk.best[truth.classes == "shared"]]
  assert np.mean((shared >= SHARED[0]) & (shared <= SHARED[1])) >= 0.9
  weak = truth.classes == "weak_base"
  assert np.mean(batchtopk.dn[batchtopk.best[weak]] >= CHAT_ONLY) <= 0.1
  # The weak copy keeps its planted size.
  assert 0.75 * WEAK <= np.median(batchtopk.ratio[weak]) <= 1.25 * WEAK


def test_l1_shrinks_the_weak_base_copies_toward_zero(data, batchtopk, l1):
  truth = data[0]
  weak = truth.classes == "weak_base"
  assert np.median(l1.ratio[weak]) <= 0.5 * WEAK
  assert np.median(l1.ratio[weak]) <= 0.5 * np.median(batchtopk.ratio[weak])
  # So Δnorm reads most of these shared features as chat-only: the artifact of Minder et al. 2025.
  assert np.mean(l1.dn[l1.best[weak]] >= CHAT_ONLY) >= 0.5
  precision_l1, _ = l1.precision_recall("chat_only")
  precision_btk, _ = batchtopk.precision_recall("chat_only")
  assert precision_l1 <= precision_btk - 0.2, (precision_l1, precision_btk)


def test_l1_shrinkage_is_in_the_norm_not_the_direction(data, l1):
  truth = data[0]
  # The chat directions are still found (a fully shrunk weak feature has cosine 1/√(1 + WEAK²) ≈ 0.94).
  for cls in synthetic.CLASSES:
    assert l1.cos[truth.classes == cls].mean() >= 0.9, cls
  # Strong copies are not shrunk away: shared features keep a balanced ratio.
  assert 0.8 <= np.median(l1.ratio[truth.classes == "shared"]) <= 1.25
