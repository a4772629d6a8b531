"""Ground truth: crosscoders trained on planted sparse features (issue 5, item 7; METHODS.md §2–§3).

Paired activations are built from planted features of four classes (shared, chat-only, base-only,
shared with a weak base copy; `synthetic.py`). A BatchTopK crosscoder must recover the planted
decoder directions and read the exclusive classes from Δnorm; an L1 crosscoder trained on the same
store must show the shrinkage artifact: the weak base copies are driven toward zero, so those
shared features look chat-only. Each crosscoder is trained once (module fixtures) and checked
several ways. Run with `-s` to print the measured numbers (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.crosscoder import load, synthetic
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.metrics import delta_norm
from tests.crosscoder.conftest import train_config

# Seeds the planted features, the token sample and the training. 0 is the tested one; 1–3 were also
# checked (docs/results.md) and can be rerun through the environment variable.
SEED = int(os.environ.get("NEURODIFF_GT_SEED", "0"))
COUNTS = {"shared": 48, "chat_only": 16, "base_only": 16, "weak_base": 16}
D = 64  # at d = 32 the 96 features are packed so tightly that a few stay unrecovered within the time budget
# The weak base copy must be visibly shared by Δnorm's own thresholds: at the synthetic default 0.15 its
# planted Δnorm is already ≈ 0.92 (chat-only), so shrinkage could not change its class. At 0.35 it is
# 0.825: Δnorm = 1 − r/2 with r = ‖d_base‖/‖d_chat‖ = 0.35 (Δnorm reads the decoder in original units).
WEAK = 0.35
N_TOKENS = 65_536
N_HELD_OUT = 8_192
CHAT_ONLY, BASE_ONLY = 0.9, 0.1  # Δnorm class thresholds (METHODS.md §3)
SHARED = (0.4, 0.6)

COMMON = {"dict_size": 256, "k": 8, "batch_size": 256, "lr": 3e-3, "warmup_frac": 20 / 1200, "log_every": 200}
BATCHTOPK = {"sparsity": "batchtopk", "steps": 1200, "checkpoint_every": 1200}
# The shrinkage grows with λ (median weak-base ratio at seed 0: 0.30 at λ = 0.5, 0.23 at 1, 0.13 at 2,
# 0.07 at 2.5; planted 0.35, docs/results.md); 2.5 puts it well past half the planted ratio while the
# strong copies keep their directions.
L1 = {"sparsity": "l1", "steps": 800, "checkpoint_every": 800, "l1_lambda": 2.5}


@dataclasses.dataclass(frozen=True)
class Recovery:
  """What one trained crosscoder recovered of the planted features."""

  name: str
  best: np.ndarray  # [F] the latent whose decoder best matches each planted feature
  cos: np.ndarray  # [F] that cosine, over the concatenated [M·d] decoder in original units
  ratio: np.ndarray  # [F] ‖d_base‖ / ‖d_chat‖ of that latent, in original units
  dn: np.ndarray  # [m] Δnorm of every latent (original units, as analysis reads it)
  live: np.ndarray  # [m] fires on at least one held-out token
  nearest: np.ndarray  # [m] class of the planted feature each latent's decoder is closest to
  fve: tuple[float, float]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine of every row of `a` with every row of `b`, rows flattened, [len(a), len(b)]."""
  a = a.reshape(len(a), -1).astype(np.float64)
  b = b.reshape(len(b), -1).astype(np.float64)
  a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def _fit(truth: synthetic.PlantedFeatures, store: ActivationStore, held_out: np.ndarray, workdir: Path,
         overrides: dict) -> Recovery:
  """Trains one crosscoder on the store and measures what it recovered."""
  metrics = train_lib.train(train_config(store, workdir, seed=SEED, **COMMON, **overrides))
  cc = load(workdir)
  # The crosscoder works on inputs scaled by one scalar per model; dividing the decoder by it gives the
  # decoder in the planted features' own units, where the planted ratio (WEAK) is comparable.
  w = np.asarray(cc.params["w_dec"], np.float64) / np.asarray(cc.norm_scale, np.float64)[None, :, None]
  best, cos = synthetic.match_features(truth, w)
  norms = np.linalg.norm(w, axis=-1)
  ratio = norms[best, 0] / np.maximum(norms[best, 1], 1e-12)
  live = np.asarray(cc.encode(held_out) > 0).any(0)
  nearest = truth.classes[_cosines(w, truth.decoder).argmax(1)]
  return Recovery(overrides["sparsity"], best, cos, ratio, delta_norm(cc.decoder_norms()), live, nearest,
                  (metrics["fve/0"], metrics["fve/1"]))


def _precision_recall(rec: Recovery, truth: synthetic.PlantedFeatures, cls: str) -> tuple[float, float]:
  """Δnorm classification of one exclusive class: (precision, recall).

  Recall: the planted features of `cls` whose best-matching latent falls in the class's Δnorm range.
  Precision: among *live* latents (firing on held-out tokens) in that Δnorm range, those whose
  decoder is closest to a planted feature of `cls`. Live rather than matched latents, so a duplicate
  or junk latent that looks exclusive counts against precision; dead latents never fire, so no
  analysis would report them.
  """
  predicted = rec.dn >= CHAT_ONLY if cls == "chat_only" else rec.dn <= BASE_ONLY
  recall = float(predicted[rec.best[truth.classes == cls]].mean())
  flagged = predicted & rec.live
  precision = float((rec.nearest[flagged] == cls).mean()) if flagged.any() else 0.0
  return precision, recall


def _summary(rec: Recovery, truth: synthetic.PlantedFeatures) -> str:
  """The measured numbers of one crosscoder, printed under `-s` (docs/results.md)."""
  head = (f"[seed {SEED}] {rec.name}: fve base {rec.fve[0]:.3f} chat {rec.fve[1]:.3f}, "
          f"live latents {int(rec.live.sum())}/{len(rec.live)}, mean best cos {rec.cos.mean():.3f}")
  lines = [head]
  for cls in synthetic.CLASSES:
    sel = truth.classes == cls
    dn = rec.dn[rec.best[sel]]
    lines.append(f"  {cls:9s} mean best cos {rec.cos[sel].mean():.3f} (min {rec.cos[sel].min():.3f}), "
                 f"Δnorm median {np.median(dn):.3f}, base/chat norm ratio median {np.median(rec.ratio[sel]):.3f}")
  for cls in ("chat_only", "base_only"):
    p, r = _precision_recall(rec, truth, cls)
    lines.append(f"  {cls} by Δnorm: precision {p:.3f} recall {r:.3f}")
  weak = truth.classes == "weak_base"
  lines.append(f"  weak_base classified chat-only: {np.mean(rec.dn[rec.best[weak]] >= CHAT_ONLY):.3f}")
  return "\n".join(lines)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(truth, store, held-out tokens) of the planted features."""
  truth = synthetic.plant_features(D, COUNTS, weak=WEAK, seed=SEED)
  store = synthetic.write_planted_store(tmp_path_factory.mktemp("gt") / "store", truth, N_TOKENS, seed=SEED + 1)
  held_out = synthetic.sample_activations(truth, N_HELD_OUT, seed=SEED + 2)
  return truth, store, held_out


@pytest.fixture(scope="module")
def batchtopk(data, tmp_path_factory):
  """The BatchTopK crosscoder's recovery."""
  truth, store, held_out = data
  rec = _fit(truth, store, held_out, tmp_path_factory.mktemp("batchtopk"), BATCHTOPK)
  print("\n" + _summary(rec, truth))
  return rec


@pytest.fixture(scope="module")
def l1(data, tmp_path_factory):
  """The L1 crosscoder's recovery, on the same store."""
  truth, store, held_out = data
  rec = _fit(truth, store, held_out, tmp_path_factory.mktemp("l1"), L1)
  print("\n" + _summary(rec, truth))
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
  precision, recall = _precision_recall(batchtopk, data[0], cls)
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
  precision_l1, _ = _precision_recall(l1, truth, "chat_only")
  precision_btk, _ = _precision_recall(batchtopk, truth, "chat_only")
  assert precision_l1 <= precision_btk - 0.2, (precision_l1, precision_btk)


def test_l1_shrinkage_is_in_the_norm_not_the_direction(data, l1):
  truth = data[0]
  # The chat directions are still found (a fully shrunk weak feature has cosine 1/√(1 + WEAK²) ≈ 0.94).
  for cls in synthetic.CLASSES:
    assert l1.cos[truth.classes == cls].mean() >= 0.9, cls
  # Strong copies are not shrunk away: shared features keep a balanced ratio.
  assert 0.8 <= np.median(l1.ratio[truth.classes == "shared"]) <= 1.25
