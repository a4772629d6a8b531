"""Paired activations built from planted sparse features: a ground truth for crosscoders.

Each feature f has a direction per model `u[f, i]` (unit norm; a shared feature's chat direction is
its base direction rotated) and a strength per model: shared (1, 1), chat-only (0, 1), base-only
(1, 0), and shared with a weak base copy (`weak`, 1). A token activates feature f with probability
`l0 · r_f` (r_f = 1 / F by default: every feature equally often; Zipf-distributed on request), a
fraction of the features come in correlated pairs (when one fires, its partner also fires with
probability `correlation`), and each active feature gets a magnitude drawn from |N(0, 1)| + 0.5;
then x_i = Σ_f a_f · strength[f, i] · u[f, i] + noise. A crosscoder should find one latent per
feature whose decoder rows point along the planted ones, and Δnorm should read the planted classes;
an L1 crosscoder shrinks the weak base copies toward zero (Minder et al. 2025).

`PlantedTask` names a task and the training budget it is meant for: `PlantedTask()` is the uniform
task of `tests/crosscoder/test_ground_truth.py`, `PlantedTask.hard()` the harder one of issue 15
(`benchmarks/planted.py`). `score` measures what a trained crosscoder recovered of the truth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("shared", "chat_only", "base_only", "weak_base")
CHAT_ONLY, BASE_ONLY = 0.9, 0.1  # Δnorm class thresholds (docs/methods.md; as metrics.delta_norm_classes)


@dataclasses.dataclass(frozen=True)
class PlantedFeatures:
  """The planted truth: directions [F, M, d], strengths [F, M], each feature's class name, and how they fire.

  `rates` [F] (summing to 1): the share of the firings each feature gets, None = uniform.
  `partner` [F]: the feature each one is paired with, −1 for none; `correlation`: the probability that
  a paired feature fires because its partner did.
  """

  directions: np.ndarray
  strengths: np.ndarray
  classes: np.ndarray
  rates: np.ndarray | None = None
  partner: np.ndarray | None = None
  correlation: float = 0.0

  @property
  def decoder(self) -> np.ndarray:
    """The planted decoder rows strength · direction, [F, M, d]."""
    return self.directions * self.strengths[:, :, None]


def plant_features(d: int, counts: dict[str, int], weak: float = 0.15, rotate: float = 0.3, seed: int = 0, *,
                   angle: float | None = None, zipf: float = 0.0, paired: float = 0.0,
                   correlation: float = 0.0) -> PlantedFeatures:
  """Random feature directions and strengths per class (`counts`: features of each class in CLASSES).

  The chat direction is the base direction plus `rotate` times a random Gaussian vector, normalised
  (an angle of about atan(rotate) between the two in high dimension: 0.29 rad at 0.3); or, with
  `angle` (radians), exactly that angle from the base direction, towards the same random vector.
  `zipf` > 0: feature frequencies ∝ rank^−zipf, ranks shuffled over the features (0 = uniform).
  `paired`: the fraction of the features grouped in random pairs that fire together with probability
  `correlation` (see `sample_activations`). With the defaults the result is the same as before these
  options existed, for the same arguments.
  """
  if angle is not None and not 0.0 <= angle <= np.pi:
    raise ValueError(f"angle={angle} is not in [0, π] radians; pass radians (np.deg2rad(degrees)).")
  if not 0.0 <= paired <= 1.0 or not 0.0 <= correlation <= 1.0:
    raise ValueError(f"paired={paired} and correlation={correlation} must both be in [0, 1].")
  if zipf < 0:
    raise ValueError(f"zipf={zipf} must be ≥ 0 (0 = every feature equally frequent).")
  rng = np.random.default_rng(seed)
  names = np.array([c for c in CLASSES for _ in range(counts.get(c, 0))])
  f = len(names)
  base = rng.standard_normal((f, d))
  step = rng.standard_normal((f, d))
  if angle is None:
    chat = base + rotate * step
  else:
    b = base / np.linalg.norm(base, axis=-1, keepdims=True)
    o = step - np.sum(step * b, axis=-1, keepdims=True) * b  # the random vector's part orthogonal to b
    chat = np.cos(angle) * b + np.sin(angle) * o / np.linalg.norm(o, axis=-1, keepdims=True)
  dirs = np.stack([base, chat], axis=1)
  dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
  strength = {"shared": (1.0, 1.0), "chat_only": (0.0, 1.0), "base_only": (1.0, 0.0), "weak_base": (weak, 1.0)}
  s = np.array([strength[c] for c in names], np.float64)
  # Drawn after the directions, so that the uniform task's features do not depend on these options.
  rates = partner = None
  if zipf > 0:
    ranks = rng.permutation(f) + 1.0
    rates = ranks ** -float(zipf)
    rates /= rates.sum()
  if paired > 0 and correlation > 0:
    order = rng.permutation(f)
    n_pairs = int(round(paired * f / 2))
    partner = np.full(f, -1, np.int64)
    a, b = order[0:2 * n_pairs:2], order[1:2 * n_pairs:2]
    partner[a], partner[b] = b, a
  return PlantedFeatures(dirs.astype(np.float32), s.astype(np.float32), names, rates, partner, float(correlation))


def firing_probabilities(truth: PlantedFeatures, l0: float) -> np.ndarray:
  """Each feature's probability of firing on a token on its own (before its partner's pull), [F]."""
  f = len(truth.classes)
  if truth.rates is None:
    return np.full(f, l0 / f)
  return np.minimum(l0 * truth.rates, 1.0)


def expected_l0(truth: PlantedFeatures, l0: float) -> float:
  """The mean number of active features per token, partners' pulls included (`sample_activations`)."""
  p = firing_probabilities(truth, l0)
  if truth.partner is None:
    return float(p.sum())
  pull = np.zeros_like(p)
  paired = truth.partner >= 0
  pull[paired] = truth.correlation * p[truth.partner[paired]]  # P(pulled by the partner)
  return float((1.0 - (1.0 - p) * (1.0 - pull)).sum())


def sample_activations(truth: PlantedFeatures, n: int, l0: float = 8.0, noise: float = 0.01,
                       seed: int = 1) -> np.ndarray:
  """n tokens of paired activations [n, M, d] from the planted features.

  `l0`: the mean number of features a token activates on their own; a paired feature also fires
  when its partner does with probability `truth.correlation`, which adds up to l0 · paired ·
  correlation more (docs/results.md reports the measured mean). `noise`: the standard deviation of
  the Gaussian noise added to every coordinate.
  """
  rng = np.random.default_rng(seed)
  f = len(truth.classes)
  # The uniform case compares with l0 / f itself, bit for bit the draws of the original sampler.
  on = rng.random((n, f)) < (l0 / f if truth.rates is None else firing_probabilities(truth, l0))
  mag = np.abs(rng.standard_normal((n, f))) + 0.5
  if truth.partner is not None:
    paired = np.nonzero(truth.partner >= 0)[0]
    pulled = on[:, paired] & (rng.random((n, len(paired))) < truth.correlation)  # feature p pulls its partner
    on[:, truth.partner[paired]] |= pulled
  codes = (on * mag).astype(np.float32)  # [n, F]
  x = np.einsum("nf,fmd->nmd", codes, truth.decoder)
  x += noise * rng.standard_normal(x.shape).astype(np.float32)
  return x.astype(np.float32)


def write_planted_store(root: str | Path, truth: PlantedFeatures, n: int, l0: float = 8.0, seed: int = 1,
                        noise: float = 0.01):
  """A complete float32 store (layer 0) of `n` planted tokens; returns the ActivationStore."""
  from neurodiff_jax.activations.store import write_arrays

  return write_arrays(root, {0: sample_activations(truth, n, l0, noise, seed=seed)}, dtype="float32",
                      shard_tokens=8192, source="synthetic:planted")


@dataclasses.dataclass(frozen=True)
class PlantedTask:
  """A planted-feature task (`plant_features`, `sample_activations` options) and the training budget it is meant for.

  `PlantedTask()` is the uniform task of tests/crosscoder/test_ground_truth.py; `PlantedTask.hard()`
  issue 15's harder one. `counts` are the features of each class in CLASSES order; `angle` is in
  radians (None: the additive `rotate`). The budget (`train_overrides`) is what the benchmark and
  tests train with; every other training setting comes from the run config.
  """

  d: int = 64
  counts: tuple[int, ...] = (48, 16, 16, 16)
  weak: float = 0.35
  rotate: float = 0.3
  angle: float | None = None
  zipf: float = 0.0
  paired: float = 0.0
  correlation: float = 0.0
  l0: float = 8.0
  noise: float = 0.01
  n_tokens: int = 65_536  # the training store (runs longer than it repeat it)
  n_held_out: int = 8_192  # fresh tokens for `score`
  dict_size: int = 256
  k: int = 8
  batch_size: int = 256
  steps: int = 1200
  lr: float = 3e-3

  @classmethod
  def hard(cls) -> PlantedTask:
    """Issue 15's task: Zipf frequencies, correlated pairs, 5× the noise, ~1 feature per token, 45° rotations.

    128 features in d = 64 (64 shared, 20 chat-only, 20 base-only, 24 weak-base); frequencies ∝
    rank⁻¹ (the commonest fires on 18 % of tokens, the rarest on 0.14 %); a quarter of the features
    in pairs that fire together half the time (1.06 features per token in all); weak base copies
    at 0.5 (planted Δnorm 0.75); noise 0.05. Budget: m = 256, k = 2, batch 512, 6,000 steps (3.1M
    tokens, 12 passes over a 262,144-token store), lr 1e-3.
    """
    return cls(d=64, counts=(64, 20, 20, 24), weak=0.5, angle=float(np.pi / 4), zipf=1.0, paired=0.25,
               correlation=0.5, l0=1.0, noise=0.05, n_tokens=262_144, n_held_out=16_384, dict_size=256, k=2,
               batch_size=512, steps=6000, lr=1e-3)

  @property
  def count_of(self) -> dict[str, int]:
    """`counts` by class name."""
    return dict(zip(CLASSES, self.counts))

  def plant(self, seed: int) -> PlantedFeatures:
    """The planted features of data seed `seed`."""
    return plant_features(self.d, self.count_of, self.weak, self.rotate, seed, angle=self.angle, zipf=self.zipf,
                          paired=self.paired, correlation=self.correlation)

  def sample(self, truth: PlantedFeatures, n: int, seed: int) -> np.ndarray:
    """n tokens [n, M, d] of this task's distribution."""
    return sample_activations(truth, n, self.l0, self.noise, seed)

  def data(self, root: str | Path, seed: int) -> tuple[PlantedFeatures, Any, np.ndarray]:
    """(truth, training store at `root`, held-out tokens) of data seed `seed` (seeds seed, seed + 1, seed + 2)."""
    truth = self.plant(seed)
    store = write_planted_store(root, truth, self.n_tokens, self.l0, seed + 1, self.noise)
    return truth, store, self.sample(truth, self.n_held_out, seed + 2)

  def train_overrides(self) -> dict[str, Any]:
    """The run-config fields of this task's budget (dict_size, k, batch_size, steps, lr)."""
    return {"dict_size": self.dict_size, "k": self.k, "batch_size": self.batch_size, "steps": self.steps,
            "lr": self.lr}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine of every row of `a` with every row of `b`, rows flattened, [len(a), len(b)]."""
  a = a.reshape(len(a), -1).astype(np.float64)
  b = b.reshape(len(b), -1).astype(np.float64)
  a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
  return a @ b.T


def match_features(truth: PlantedFeatures, w_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each planted feature, the learned latent whose decoder [M·d] is most cosine-similar, and that cosine."""
  cos = _cosines(truth.decoder, np.asarray(w_dec))
  best = cos.argmax(1)
  return best, cos[np.arange(len(best)), best]


@dataclasses.dataclass(frozen=True)
class Score:
  """What a trained crosscoder recovered of the planted features (`score`)."""

  classes: np.ndarray  # [F] each planted feature's class
  weak: float  # the planted weak-base ratio
  best: np.ndarray  # [F] the latent whose decoder best matches each planted feature
  cos: np.ndarray  # [F] that cosine, over the concatenated [M·d] decoder in the planted features' units
  ratio: np.ndarray  # [F] ‖d_base‖ / ‖d_chat‖ of that latent, in the same units
  dn: np.ndarray  # [m] Δnorm of every latent (original units, as analysis reads it)
  live: np.ndarray  # [m] fires on at least one held-out token
  nearest: np.ndarray  # [m] class of the planted feature each latent's decoder is closest to
  fve: tuple[float, ...]  # per model, on the held-out tokens

  def class_cos(self, cls: str) -> float:
    """Mean best cosine of the planted features of one class."""
    return float(self.cos[self.classes == cls].mean())

  def precision_recall(self, cls: str) -> tuple[float, float]:
    """Δnorm classification of an exclusive class (chat_only: Δnorm ≥ 0.9, base_only: ≤ 0.1): (precision, recall).

    Recall: the planted features of `cls` whose best-matching latent falls in the class's Δnorm range.
    Precision: among *live* latents (firing on held-out tokens) in that Δnorm range, those whose
    decoder is closest to a planted feature of `cls`. Live rather than matched latents, so a duplicate
    or junk latent that looks exclusive counts against precision; dead latents never fire, so no
    analysis would report them.
    """
    if cls not in ("chat_only", "base_only"):
      raise ValueError(f"precision_recall is for the exclusive classes chat_only and base_only, not {cls!r}.")
    predicted = self.dn >= CHAT_ONLY if cls == "chat_only" else self.dn <= BASE_ONLY
    recall = float(predicted[self.best[self.classes == cls]].mean())
    flagged = predicted & self.live
    precision = float((self.nearest[flagged] == cls).mean()) if flagged.any() else 0.0
    return precision, recall

  @property
  def weak_ratio(self) -> float:
    """Median ‖d_base‖ / ‖d_chat‖ of the latents best matching the weak-base features (planted: `weak`)."""
    return float(np.median(self.ratio[self.classes == "weak_base"]))

  @property
  def weak_as_chat_only(self) -> float:
    """Fraction of the weak-base features whose best latent reads as chat-only by Δnorm (the L1 artifact)."""
    return float(np.mean(self.dn[self.best[self.classes == "weak_base"]] >= CHAT_ONLY))

  def summary(self) -> dict[str, float]:
    """The headline numbers as a flat dict (benchmarks/planted.py's table and JSON)."""
    out = {"mean_cos": float(self.cos.mean()), "min_cos": float(self.cos.min())}
    out |= {f"cos/{c}": self.class_cos(c) for c in CLASSES if (self.classes == c).any()}
    for cls in ("chat_only", "base_only"):
      if (self.classes == cls).any():
        out[f"precision/{cls}"], out[f"recall/{cls}"] = self.precision_recall(cls)
    if (self.classes == "weak_base").any():
      out |= {"weak_ratio": self.weak_ratio, "weak_as_chat_only": self.weak_as_chat_only}
    out |= {"alive": int(self.live.sum()), "dict_size": len(self.live),
            "unique_best": len(np.unique(self.best))}
    out |= {f"fve/{i}": v for i, v in enumerate(self.fve)}
    return out

  def report(self, name: str) -> str:
    """Several lines of the measured numbers (what the ground-truth test prints under `-s`)."""
    fve = " ".join(f"{v:.3f}" for v in self.fve)
    lines = [f"{name}: held-out fve {fve}, live latents {int(self.live.sum())}/{len(self.live)}, "
             f"mean best cos {self.cos.mean():.3f}"]
    for cls in CLASSES:
      sel = self.classes == cls
      if sel.any():
        lines.append(f"  {cls:9s} mean best cos {self.cos[sel].mean():.3f} (min {self.cos[sel].min():.3f}), "
                     f"Δnorm median {np.median(self.dn[self.best[sel]]):.3f}, base/chat norm ratio median "
                     f"{np.median(self.ratio[sel]):.3f}")
    for cls in ("chat_only", "base_only"):
      if (self.classes == cls).any():
        p, r = self.precision_recall(cls)
        lines.append(f"  {cls} by Δnorm: precision {p:.3f} recall {r:.3f}")
    if (self.classes == "weak_base").any():
      lines.append(f"  weak_base classified chat-only: {self.weak_as_chat_only:.3f}")
    return "\n".join(lines)


def score(truth: PlantedFeatures, crosscoder: Any, held_out: np.ndarray) -> Score:
  """Scores a trained `Crosscoder` against the planted truth, with `held_out` tokens [n, M, d] for liveness and FVE."""
  from neurodiff_jax.crosscoder.metrics import delta_norm

  scale = np.ones(crosscoder.cfg.num_models) if crosscoder.norm_scale is None else crosscoder.norm_scale
  # The crosscoder works on inputs scaled by one scalar per model; dividing the decoder by it gives the
  # decoder in the planted features' own units, where the planted ratio (`weak`) is comparable.
  w = np.asarray(crosscoder.params["w_dec"], np.float64) / np.asarray(scale, np.float64)[None, :, None]
  best, cos = match_features(truth, w)
  norms = np.linalg.norm(w, axis=-1)
  ratio = norms[best, 0] / np.maximum(norms[best, 1], 1e-12)
  codes = np.asarray(crosscoder.encode(held_out))
  live = (codes > 0).any(0)
  x_hat = np.asarray(crosscoder.decode(codes), np.float64)
  x = np.asarray(held_out, np.float64)
  fve = 1.0 - ((x - x_hat) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))
  nearest = truth.classes[_cosines(w, truth.decoder).argmax(1)]
  weak = truth.strengths[truth.classes == "weak_base", 0]
  return Score(truth.classes, float(weak[0]) if len(weak) else float("nan"), best, cos, ratio,
               delta_norm(crosscoder.decoder_norms()), live, nearest, tuple(float(v) for v in fve))


__all__ = ["BASE_ONLY", "CHAT_ONLY", "CLASSES", "PlantedFeatures", "PlantedTask", "Score", "expected_l0",
           "firing_probabilities", "match_features", "plant_features", "sample_activations", "score",
           "write_planted_store"]
