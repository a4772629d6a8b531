"""Paired activations built from planted sparse features: a ground truth for crosscoders.

Each feature f has a direction per model `u[f, i]` (unit norm; a shared feature's chat direction is
its base direction slightly rotated) and a strength per model: shared (1, 1), chat-only (0, 1),
base-only (1, 0), and shared with a weak base copy (`weak`, 1). A token activates each feature
independently with probability `l0 / F`, with a magnitude drawn from |N(0, 1)| + 0.5; then
x_i = Σ_f a_f · strength[f, i] · u[f, i] + noise. A crosscoder should find one latent per feature
whose decoder rows point along the planted ones, and Δnorm should read the planted classes; an L1
crosscoder shrinks the weak base copies toward zero (Minder et al. 2025).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

CLASSES = ("shared", "chat_only", "base_only", "weak_base")


@dataclasses.dataclass(frozen=True)
class PlantedFeatures:
  """The planted truth: directions [F, M, d], strengths [F, M] and each feature's class name."""

  directions: np.ndarray
  strengths: np.ndarray
  classes: np.ndarray

  @property
  def decoder(self) -> np.ndarray:
    """The planted decoder rows strength · direction, [F, M, d]."""
    return self.directions * self.strengths[:, :, None]


def plant_features(d: int, counts: dict[str, int], weak: float = 0.15, rotate: float = 0.3,
                   seed: int = 0) -> PlantedFeatures:
  """Random feature directions and strengths per class (`counts`: features of each class in CLASSES)."""
  rng = np.random.default_rng(seed)
  names = np.array([c for c in CLASSES for _ in range(counts.get(c, 0))])
  f = len(names)
  base = rng.standard_normal((f, d))
  chat = base + rotate * rng.standard_normal((f, d))
  dirs = np.stack([base, chat], axis=1)
  dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
  strength = {"shared": (1.0, 1.0), "chat_only": (0.0, 1.0), "base_only": (1.0, 0.0), "weak_base": (weak, 1.0)}
  s = np.array([strength[c] for c in names], np.float64)
  return PlantedFeatures(dirs.astype(np.float32), s.astype(np.float32), names)


def sample_activations(truth: PlantedFeatures, n: int, l0: float = 8.0, noise: float = 0.01,
                       seed: int = 1) -> np.ndarray:
  """n tokens of paired activations [n, M, d] from the planted features."""
  rng = np.random.default_rng(seed)
  f = len(truth.classes)
  on = rng.random((n, f)) < l0 / f
  mag = np.abs(rng.standard_normal((n, f))) + 0.5
  codes = (on * mag).astype(np.float32)  # [n, F]
  x = np.einsum("nf,fmd->nmd", codes, truth.decoder)
  x += noise * rng.standard_normal(x.shape).astype(np.float32)
  return x.astype(np.float32)


def write_planted_store(root: str | Path, truth: PlantedFeatures, n: int, l0: float = 8.0, seed: int = 1):
  """A complete float32 store (layer 0) of `n` planted tokens; returns the ActivationStore."""
  from neurodiff_jax.activations.store import write_arrays

  return write_arrays(root, {0: sample_activations(truth, n, l0, seed=seed)}, dtype="float32",
                      shard_tokens=8192, source="synthetic:planted")


def match_features(truth: PlantedFeatures, w_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each planted feature, the learned latent whose decoder [M·d] is most cosine-similar, and that cosine."""
  planted = truth.decoder.reshape(len(truth.classes), -1)
  learned = np.asarray(w_dec, np.float64).reshape(w_dec.shape[0], -1)
  cos = (planted / np.linalg.norm(planted, axis=1, keepdims=True)) @ (
      learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)).T
  best = cos.argmax(1)
  return best, cos[np.arange(len(best)), best]


__all__ = ["CLASSES", "PlantedFeatures", "match_features", "plant_features", "sample_activations",
           "write_planted_store"]
