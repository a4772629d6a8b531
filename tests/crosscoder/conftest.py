"""Planted-feature stores and small training configs for the crosscoder tests."""

import pytest

from neurodiff_jax.crosscoder import synthetic
from tests.numerics import rounding

COUNTS = {"shared": 48, "chat_only": 16, "base_only": 16, "weak_base": 16}


def train_config(store, workdir, **overrides):
  """A small run config on a store (the same fields as configs/*.py), unlocked overrides applied."""
  from configs._crosscoder import base_config

  c = base_config()
  c.store, c.layer, c.workdir = str(store.root if hasattr(store, "root") else store), 0, str(workdir)
  c.dict_size, c.k, c.batch_size, c.steps, c.lr = 256, 8, 256, 40, 3e-3
  c.warmup_frac, c.warmup_max_steps = 0.5, 5  # 5 warm-up steps for runs of 10 steps or more
  c.dead_tokens, c.theta_momentum, c.window_mib, c.log_every, c.checkpoint_every = 5_000, 0.9, 4, 10, 20
  c.dec_init_norm = 0.1  # what these tests were calibrated with (the library default is 0.3)
  for k, v in overrides.items():
    setattr(c, k, v)
  c.lock()
  return c


def run_tolerances(batch, num_models, d, steps):
  """c for two training runs that differ only in the order of their float32 sums: (loss, parameters, θ).

  A step's loss: the encoder, the decoder, and the loss's sum over B·M·d squared errors (all ≥ 0, so
  the loss is its terms' magnitude). Parameters: each step's gradient is a sum over the B tokens (what
  a data split reorders), and the steps chain: one stage a step, scale the parameter's largest value.
  θ: an average of cut scores, each from the encoder's sum of M·d terms, over the run's steps.
  """
  return (rounding(n=batch * num_models * d, depth=3), rounding(n=batch, depth=steps),
          rounding(n=num_models * d, depth=steps))


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
  """(truth, store) of 65,536 planted tokens at d = 32."""
  truth = synthetic.plant_features(32, COUNTS, seed=0)
  store = synthetic.write_planted_store(tmp_path_factory.mktemp("planted") / "store", truth, 65_536)
  return truth, store
