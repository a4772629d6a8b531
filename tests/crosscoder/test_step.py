"""The step's run-relative settings (warm-up, decay, dead-latent window), its dead/never-fired metrics,
live-only Δnorm classes, and the run-config checks made before any work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder import step as step_lib
from neurodiff_jax.crosscoder.metrics import delta_norm_classes, live_delta_norm_classes
from neurodiff_jax.crosscoder.model import CrosscoderConfig
from neurodiff_jax.crosscoder.objective import LossConfig
from neurodiff_jax.crosscoder.train import check_config
from neurodiff_jax.utils.config import ConfigError
from tests.crosscoder.conftest import train_config
from tests.numerics import assert_close, rounding


def _config(**overrides):
  c = train_config("/some/store", "/some/run")
  with c.unlocked():
    c.update(overrides)
  return c


def _reference_lr(t, steps, lr, warm, decay):
  """The schedule written out by hand: 0 → lr over `warm` steps, flat, lr → 0 over the last `decay` steps."""
  if t < warm:
    return lr * t / warm
  if t < steps - decay or decay == 0:
    return lr
  return lr * (steps - t) / decay


@pytest.mark.parametrize("steps,frac,cap,decay_frac,warm", [(1000, 0.01, 1000, 0.2, 10), (6000, 0.01, 1000, 0.2, 60),
                                                           (300_000, 0.01, 1000, 0.2, 1000), (200, 0.0, 1000, 0.3, 0),
                                                           (50, 0.1, 1000, 0.0, 5)])
def test_warm_up_and_decay_are_fractions_of_the_run(steps, frac, cap, decay_frac, warm):
  c = _config(steps=steps, warmup_frac=frac, warmup_max_steps=cap, decay_frac=decay_frac, lr=2e-3)
  assert step_lib.warmup_steps(c) == warm
  sched = step_lib.lr_schedule(c)
  decay = round(decay_frac * steps)
  for t in sorted({0, 1, warm // 2, warm, warm + 1, steps // 2, steps - decay - 1, steps - decay, steps - decay // 2,
                   steps - 1, steps}):
    if 0 <= t <= steps:
      # optax interpolates in float32 (a fraction of the steps, then lr·fraction): a few roundings of
      # numbers of lr's size, also where the decay nears 0, so the scale is lr.
      assert_close(float(sched(t)), _reference_lr(t, steps, 2e-3, warm, decay), c=rounding(depth=2), scale=2e-3,
                   what="learning rate equals the hand-written schedule", err_msg=f"step {t} of {steps}")


def test_dead_window_scales_with_the_run():
  # 5% of a 3M-token run, not the 10M that no short run can reach.
  assert step_lib.dead_tokens(_config(steps=6000, batch_size=512, dead_tokens=0)) == 153_600
  # A 200M-token run reaches the 10M cap of Gao et al.; longer runs keep it.
  assert step_lib.dead_tokens(_config(steps=100_000, batch_size=2048, dead_tokens=0)) == 10_000_000
  # Never shorter than one batch; an explicit window wins.
  assert step_lib.dead_tokens(_config(steps=2, batch_size=256, dead_tokens=0)) == 256
  assert step_lib.dead_tokens(_config(steps=6000, batch_size=512, dead_tokens=1234)) == 1234


def test_dead_and_never_fired_fractions_count_latents_that_cannot_fire():
  mesh = sharding.make_mesh(1, 1)
  m, d, batch = 64, 8, 32
  cfg = CrosscoderConfig(2, d, m, "topk", k=4)
  tx = step_lib.make_optimizer(_config(steps=100, lr=1e-12))  # parameters stay (almost) where they start
  state = step_lib.sharded_init(jax.random.key(0), cfg, tx, mesh, np.ones(2), None)
  blocked = np.zeros(m, bool)
  blocked[::4] = True  # a quarter of the latents get a bias no input can overcome
  params = state["model"]["params"]
  params["b_enc"] = jnp.where(jnp.asarray(blocked), -1e6, 0.0)
  lcfg = LossConfig(dead_tokens=3 * batch)
  fn = step_lib.make_train_step(cfg, lcfg, tx, mesh, state)
  rng = np.random.default_rng(0)
  seen = []
  for _ in range(6):
    x = rng.standard_normal((batch, 2, d)).astype(np.float32)
    state, metrics = fn(state, step_lib.global_batch(x, mesh))
    seen.append((float(metrics["dead_fraction"]), float(metrics["never_fired_fraction"])))
  ever = np.asarray(state["train"]["ever_fired"])
  assert not ever[blocked].any()
  never = float((~ever).mean())
  assert never >= blocked.mean()
  # Never-fired is counted from the first step; dead only once the window (3 batches) has passed.
  # (Not a rounding comparison: after one batch of 32 tokens most latents that will ever fire have, so
  # the never-fired fraction is already within a quarter of its final value.) The fractions are counts
  # over m = 64 latents: exact in float32, so compared exactly.
  assert seen[0][1] == pytest.approx(float((~ever).mean()), abs=0.25) and seen[-1][1] == never
  assert seen[0][0] == 0.0 and seen[1][0] == 0.0
  since = np.asarray(state["train"]["since_fired"])
  assert seen[-1][0] == float((since >= 3 * batch).mean())
  assert seen[-1][0] >= blocked.mean()


def test_delta_norm_classes_count_live_latents_and_report_the_dead():
  dn = np.array([0.0, 0.05, 0.5, 0.5, 0.5, 0.95, 0.7, 0.5])
  live = np.array([True, True, True, False, False, True, True, False])
  assert delta_norm_classes(dn) == {"base_only": 2, "shared": 4, "chat_only": 1, "other": 1}
  assert live_delta_norm_classes(dn, live) == {"base_only": 2, "shared": 1, "chat_only": 1, "other": 1, "dead": 3}


@pytest.mark.parametrize("overrides,message", [
    ({"k": 300}, r"config.k=300 must be in \[1, dict_size=256\]"),
    ({"sparsity": "batchtopkk"}, r"config.sparsity='batchtopkk' is not one of .*did you mean 'batchtopk'"),
    ({"sparsity": "l1", "l1_lambda": 0.0}, r"l1_lambda=0.0 with sparsity='l1' trains without a sparsity penalty"),
    ({"pair_candidates": 4}, r"pair_candidates=4 is below k=8"),
    ({"warmup_frac": 0.5, "decay_frac": 0.6}, r"warmup_frac \+ decay_frac = 0.5 \+ 0.6 exceeds the whole run"),
    ({"batch_size": 100, "mesh": (8, 1)}, r"batch_size=100 does not split over 8 data shards"),
    ({"store": ""}, r"config.store is empty"),
    ({"workdir": "", "name": ""}, r"config.workdir is empty and the config has no name"),
])
def test_impossible_configs_are_one_line_errors_before_any_work(overrides, message):
  with pytest.raises(ConfigError, match=message) as err:
    check_config(_config(**overrides))
  assert "\n" not in str(err.value)


def test_empty_workdir_is_the_named_run_under_neurodiff_home(monkeypatch, tmp_path):
  from neurodiff_jax.crosscoder.train import workdir_of

  monkeypatch.setenv("NEURODIFF_HOME", str(tmp_path))
  assert workdir_of(_config(workdir="", name="tiny_batchtopk-small")) == tmp_path / "runs" / "tiny_batchtopk-small"
  check_config(_config(workdir="", name="x"))
