"""The library defaults on the hard planted task (issue 15, item 2), at a size that fits CI.

`synthetic.PlantedTask.hard()` (Zipf frequencies, correlated pairs, noise 0.05, ~1 feature per
token, weak base copies at 0.5, 45° rotations), trained shorter than the benchmark: BatchTopK with
nothing set but the task's budget must recover the planted features, and its dead-latent metrics
must agree with what fires on held-out tokens. L1 at the default λ must show the shrinkage artifact
on the uniform task: on the hard task's ~1 feature per token the L1 penalty is small next to each
feature's magnitude, so no usable λ shrinks the weak copies much there (docs/results.md, "Hard
planted task"). The full comparison over seeds and settings is `benchmarks/planted.py`; the
thresholds below come from its measurements at this size, recorded in docs/results.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from neurodiff_jax.crosscoder import load, synthetic
from neurodiff_jax.crosscoder import train as train_lib
from neurodiff_jax.crosscoder.step import dead_tokens

SEED = 0
# The hard task at a third of its steps and a higher lr (the benchmark: 6,000 steps at 1e-3), on half the
# store; the budget is all that is set: every other setting is configs/_crosscoder.py's default.
HARD = dataclasses.replace(synthetic.PlantedTask.hard(), steps=2000, lr=3e-3, n_tokens=131_072)
# The uniform task of test_ground_truth.py, where ~8 features share each token.
UNIFORM = synthetic.PlantedTask()

# Thresholds from benchmarks/planted.py-style runs of exactly these sizes over seeds 0–2 (docs/results.md,
# "Hard planted task", CI size), with dec_init_norm = 0.3: mean best cos 0.943 / 0.963 / 0.975 (seed 0 the
# lowest), per class ≥ 0.929, chat-/base-only recall ≥ 0.75 and precision 1.0. At dec_init_norm = 0.1 the
# same runs gave 0.915 / 0.918 / 0.838 (chat-only 0.82–0.90, recall 0.55–0.75): these thresholds fail there.
MEAN_COS, CLASS_COS, RECALL = 0.92, 0.90, 0.65
# |dead_fraction − latents outside every batch's selection over a window of fresh tokens| was 0.05–0.09
# (0.00–0.05 at dec_init_norm 0.1): latents at the edge of the window fire a few times in it, so two
# samples of the window's size differ by up to 0.05 on their own. With the old 10M-token window (the
# benchmark's `old` variant) dead_fraction read 0.00 while 86–94 % of the latents were silent on held-out tokens.
DEAD_TOLERANCE = 0.12
# L1 at the default λ = 1 on the uniform task, 1,200 steps: median weak-base ratio 0.16–0.25 against the
# planted 0.35, 38–69 % of the weak-base features read as chat-only, chat-only precision 0.67–0.79.
SHRUNK, WEAK_AS_CHAT, CHAT_PRECISION = 0.8, 0.25, 0.85


def _config(task: synthetic.PlantedTask, store, workdir: Path, **overrides):
  """base_config() with the task's budget, one checkpoint at the end, and `overrides`; locked."""
  from configs._crosscoder import base_config

  c = base_config()
  c.name, c.store, c.layer, c.workdir, c.seed = "planted", str(store.root), 0, str(workdir), SEED
  for field, value in (task.train_overrides() | overrides).items():
    setattr(c, field, value)
  c.checkpoint_every = c.steps
  # The same maths as the default "auto" (pairs) step, ~1.5x faster at m = 256 on CPU (benchmarks/planted.py).
  c.train_step = "dense"
  c.lock()
  return c


def _train(task: synthetic.PlantedTask, data, workdir: Path, **overrides) -> tuple[synthetic.Score, dict, dict]:
  """Trains on the task's store; (score against the truth, metrics.json, what else the tests read)."""
  truth, store, held_out = data
  config = _config(task, store, workdir, **overrides)
  train_lib.train(config)
  cc = load(workdir)
  extra = {"dead_tokens": dead_tokens(config), "batch_size": int(config.batch_size), "k": int(config.k)}
  return synthetic.score(truth, cc, held_out), json.loads((workdir / "metrics.json").read_text()), extra | {"cc": cc}


def batch_topk_silent(cc, x: np.ndarray, batch_size: int, k: int) -> np.ndarray:
  """[m] whether each latent is outside every batch's BatchTopK selection over `x` (numpy, not sparsity.py).

  Each batch of `batch_size` tokens keeps its k · batch_size highest positive scores
  relu(a_j) · Σ_i ‖W_dec[j, i]‖ (docs/methods.md), as training selects them.
  """
  w_enc = np.asarray(cc.params["w_enc"], np.float64)  # [M, d, m]
  b_enc = np.asarray(cc.params["b_enc"], np.float64)
  weight = np.linalg.norm(np.asarray(cc.params["w_dec"], np.float64), axis=-1).sum(-1)  # [m]
  xn = np.asarray(x, np.float64) * np.asarray(cc.scale, np.float64)[None, :, None]  # normalised, [n, M, d]
  fired = np.zeros(len(b_enc), bool)
  for lo in range(0, len(xn) - batch_size + 1, batch_size):
    s = np.maximum(np.einsum("bmd,mdj->bj", xn[lo:lo + batch_size], w_enc) + b_enc, 0.0) * weight  # [B, m]
    cut = np.partition(s.ravel(), -k * batch_size)[-k * batch_size]
    fired |= ((s >= cut) & (s > 0)).any(0)
  return ~fired


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
  """BatchTopK with the defaults on the hard task: (score, metrics.json, extra), and the task's data."""
  root = tmp_path_factory.mktemp("hard")
  data = HARD.data(root / "store", SEED)
  score, metrics, extra = _train(HARD, data, root / "run")
  print("\n" + score.report(f"[seed {SEED}] hard task, batchtopk defaults"))
  return score, metrics, extra, data


@pytest.fixture(scope="module")
def uniform_l1(tmp_path_factory):
  """L1 with the default λ on the uniform task: the score."""
  root = tmp_path_factory.mktemp("uniform")
  score, _, _ = _train(UNIFORM, UNIFORM.data(root / "store", SEED), root / "run", sparsity="l1")
  print("\n" + score.report(f"[seed {SEED}] uniform task, l1 default λ"))
  return score


@pytest.mark.slow
def test_batchtopk_defaults_recover_the_hard_planted_features(hard):
  score = hard[0]
  assert float(score.cos.mean()) >= MEAN_COS, score.summary()
  for cls in synthetic.CLASSES:
    assert score.class_cos(cls) >= CLASS_COS, (cls, score.summary())
  # The exclusive features are found and named: what the analysis reads.
  for cls in ("chat_only", "base_only"):
    precision, recall = score.precision_recall(cls)
    assert precision >= 0.9 and recall >= RECALL, (cls, precision, recall)


@pytest.mark.slow
def test_dead_metrics_agree_with_latents_that_never_fire_on_held_out_tokens(hard):
  score, metrics, extra, (truth, _, _) = hard
  m = len(score.live)
  # Fresh tokens, as many as the dead window: a latent outside every batch's selection over them is dead.
  x = HARD.sample(truth, extra["dead_tokens"], SEED + 3)
  silent = batch_topk_silent(extra["cc"], x, extra["batch_size"], extra["k"]).mean()
  assert abs(metrics["dead_fraction"] - silent) <= DEAD_TOLERANCE, (metrics["dead_fraction"], silent)
  # Inference thresholds each token by θ alone, which silences more of the rarely selected latents than
  # the batch selection does (docs/results.md): analysis sees at most the live count of metrics.json.
  assert score.live.sum() <= (1 - metrics["dead_fraction"]) * m + DEAD_TOLERANCE * m, (score.live.sum(), metrics)
  # A latent that never fired in a run longer than the dead window is dead.
  assert metrics["never_fired_fraction"] <= metrics["dead_fraction"], metrics
  # Δnorm classes in metrics.json count live latents only, with the dead beside them.
  classes = metrics["delta_norm_classes"]
  assert classes["dead"] == round(metrics["dead_fraction"] * m)
  assert sum(v for k, v in classes.items() if k != "dead") == m - classes["dead"]


@pytest.mark.slow
def test_l1_default_lambda_shrinks_the_weak_base_copies(uniform_l1):
  assert uniform_l1.weak_ratio <= SHRUNK * UNIFORM.weak, uniform_l1.summary()
  # So Δnorm reads some of these shared features as chat-only, and chat-only latents are no longer all
  # chat-only features (BatchTopK: precision 1.0 on this task, test_ground_truth.py).
  assert uniform_l1.weak_as_chat_only >= WEAK_AS_CHAT, uniform_l1.summary()
  assert uniform_l1.precision_recall("chat_only")[0] <= CHAT_PRECISION, uniform_l1.summary()
  assert uniform_l1.cos.mean() >= 0.98  # the directions are still found: the shrinkage is in the norms
