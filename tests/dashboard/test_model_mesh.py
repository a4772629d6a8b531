"""The Live page's session on a model mesh (`launch.dashboard --config.model_mesh`) equals the one-device session."""

from __future__ import annotations

import numpy as np

from neurodiff_jax.dashboard import live
from neurodiff_jax.models.sharding import mesh_of, model_mesh
from tests.numerics import assert_close, forward_c, residual_c

PROMPT = "The miller counts his sacks of grain"


def test_live_session_on_a_model_mesh_equals_one_device(random_gemma2):
  sharded = live.LiveSession(random_gemma2, random_gemma2, mesh=model_mesh((2, 4)))
  assert dict(mesh_of(sharded.ft).shape) == {"data": 2, "model": 4}
  one = live.LiveSession(random_gemma2, random_gemma2)
  ids = one.encode(PROMPT)
  v = np.random.default_rng(0).normal(size=one.hidden_size)
  steer = live.Steering(1, v, 4.0)
  for s in (None, steer):
    got, want = sharded.next_token_probs(ids, s), one.next_token_probs(ids, s)
    # float64 softmaxes of logits that differ by the forward's rounding: a probability's relative error is the logits'
    # absolute error, at their magnitude (≤ the final soft-cap, 30).
    cap = one.ft.cfg.final_logit_softcap
    assert_close(got["ft"], want["ft"], c=forward_c(one.ft.cfg), scale=want["ft"] * cap,
                 what=f"next-token probabilities on a (2, 4) mesh equal one device's (steer={s is not None})")
  gen, ref = sharded.generate(PROMPT, 8, steer), one.generate(PROMPT, 8, steer)  # two rows: split over data
  assert gen.ids == ref.ids
  assert_close(sharded.residuals(ids, 2), one.residuals(ids, 2), c=residual_c(one.ft.cfg, 2),
               what="residuals on a (2, 4) mesh equal one device's")


def test_the_launcher_passes_the_mesh_to_the_app():
  from configs.dashboard import get_config
  from launch.dashboard import command
  from neurodiff_jax.dashboard.app import model_mesh_arg

  c = get_config()
  assert "--model-mesh" not in command(c, "/r")  # the default: one device, the command as before
  c.model_mesh = (2, 4)
  cmd = command(c, "/r")
  assert cmd[-2:] == ["--model-mesh", "2,4"]
  assert model_mesh_arg(cmd[cmd.index("--") + 1:]) == (2, 4) and model_mesh_arg(["--results", "/r"]) == ()
