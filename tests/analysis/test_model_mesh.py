"""The analysis's model parts on a model mesh (`launch.analyze --config.model_mesh`): causal test, steering, lens.

The store's models loaded by `analyze._load_models` onto a (2, 4) mesh of 8 forced CPU devices, the crosscoder
committed to one device as `crosscoder.load` leaves it: the causal KL, steered completions and logit lens
equal the same computations on one device (the tiny Gemma 2 as both base and chat: the patch by random
decoder rows still moves the KL off zero).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.analysis import analyze
from neurodiff_jax.analysis.causal import causal_kl, chat_eval_set
from neurodiff_jax.analysis.steering import steer
from neurodiff_jax.models import checkpoint_info
from neurodiff_jax.models.lens import logit_lens
from neurodiff_jax.models.sharding import mesh_of
from tests.analysis.test_causal import CONVERSATIONS, LAYER, random_crosscoder
from tests.numerics import assert_close, forward_c, kl_c


@pytest.fixture(scope="module")
def store_of(random_gemma2):
  """A store (manifest only, nothing on disk) whose manifest names the tiny Gemma 2 as base and chat."""
  fp = checkpoint_info(random_gemma2).fingerprint
  models = [{"role": r, "path": random_gemma2, "fingerprint": fp} for r in ("base", "chat")]
  return ActivationStore("unused", {"models": models, "num_tokens": 0, "d_model": 64, "layers": [LAYER],
                                    "dtype": "float32", "shard_tokens": 64, "chunk_tokens": 64})


def test_causal_steering_and_lens_on_a_model_mesh_equal_one_device(store_of, random_gemma2_model):
  base, chat, tok = analyze._load_models(store_of, "float32", (2, 4))
  assert dict(mesh_of(chat).shape) == {"data": 2, "model": 4} and mesh_of(base) is mesh_of(chat)
  one = random_gemma2_model
  cc = random_crosscoder(seed=1)
  cc.params = jax.device_put(cc.params, jax.devices()[0])  # committed to one device, as crosscoder.load leaves it
  data = chat_eval_set(tok, CONVERSATIONS, max_len=64)
  groups = {"all_base": np.array([], int), "half": np.arange(0, 32, 2), "template": "template"}
  got = causal_kl(chat, base, cc, LAYER, data, groups, batch_size=2)
  want = causal_kl(one, one, cc, LAYER, data, groups, batch_size=2)
  assert want["half"].max() > 1e-3  # decoder rows patched in change the distribution: a comparison that can fail
  for name in groups:  # (all_base and template patch the chat residual by the base's: one model, so KL ≈ 0)
    # Per-token KL of two forwards, at the scale of the log-probs it sums (≤ 2 log V for these near-uniform models).
    assert_close(got[name], want[name], c=kl_c(one.cfg), scale=2 * np.log(one.cfg.vocab_size),
                 what=f"causal KL of group {name} on a (2, 4) mesh equals one device's")
  direction = cc.decoder()[3, 1]
  kw = dict(chat_template=True, max_new_tokens=6)
  assert ([r["tokens"] for r in steer(chat, tok, direction, LAYER, [0.0, 8.0], ["Who are you?"], **kw)]
          == [r["tokens"] for r in steer(one, tok, direction, LAYER, [0.0, 8.0], ["Who are you?"], **kw)])
  vecs = cc.decoder()[:5, 1]
  ref = logit_lens(one, vecs)
  assert_close(logit_lens(chat, vecs), ref, c=forward_c(one.cfg), what="logit lens on a (2, 4) mesh equals one device's")
