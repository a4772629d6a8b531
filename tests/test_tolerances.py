"""The scaled tolerances of tests/numerics.py still catch the errors real bugs make.

Each test plants one bug of the kind a port or an analysis really gets wrong and runs the same
comparison, with the same c, that the suite's test uses: it must fail. The factor by which the
planted error exceeds the tolerance is printed (`pytest -s`), so a later loosening that lets a bug
through shows up here first.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax.numpy as jnp
from neurodiff_jax.analysis.latent_scaling import latent_scaling
from neurodiff_jax.analysis.stream import token_mask
from neurodiff_jax.activations.datasets import KIND_TEMPLATE
from neurodiff_jax.models import load_model
from tests.analysis.test_latent_scaling import C_BETA, M_LAT, _crosscoder, _reference, _store
from tests.models.hf_reference import hf_forward
from tests.models.test_parity import CONFIGS, random_batch
from tests.numerics import assert_close, forward_c, rounding


REAL = random_batch(131)[1].astype(bool)  # the parity batch's unpadded positions (vocab does not change the mask)


def _fails(actual, reference, *, c, what, scale=None) -> float:
  """Runs the comparison, asserts that it fails, returns by how many c it missed (err/scale / c)."""
  with pytest.raises(AssertionError) as err:
    assert_close(actual, reference, c=c, what=what, scale=scale)
  missed = float(str(err.value).split(" c) at ")[0].rsplit("= ", 1)[1])
  print(f"\n{what}: caught, {missed:.3g} c over the tolerance")
  return missed


def _edit_config(path: str, **fields) -> None:
  """Rewrites fields of a saved checkpoint's config.json: the bug is what our loader then reads."""
  cfg_path = f"{path}/config.json"
  cfg = json.loads(open(cfg_path).read())
  cfg.update(fields)
  open(cfg_path, "w").write(json.dumps(cfg))


def _parity(name, hf_checkpoint, **bug):
  """(ours, HF's, c): logits and residuals on the parity test's batch, with `bug` planted in the config our port loads."""
  config = CONFIGS[name]()
  hf_model, path = hf_checkpoint(config)
  _edit_config(path, **bug)
  ids, mask = random_batch(config.vocab_size)
  ref, ref_residuals = hf_forward(hf_model, ids, mask)
  layers = range(config.num_hidden_layers)
  out = load_model(path)(jnp.asarray(ids), jnp.asarray(mask), capture=layers)
  ours = {"logits": np.asarray(out.logits), **{l: np.asarray(out.residuals[l]) for l in layers}}
  theirs = {"logits": ref.logits.numpy(), **{l: ref_residuals[l].numpy() for l in layers}}
  return ours, theirs, forward_c(config)


def test_a_wrong_norm_epsilon_fails_the_parity_tolerance(hf_checkpoint):
  ours, ref, c = _parity("gemma3_text", hf_checkpoint, rms_norm_eps=1e-5)  # HF's is 1e-6
  assert _fails(ours["logits"][REAL], ref["logits"][REAL], c=c, what="gemma3 logits, RMSNorm ε 1e-5 for 1e-6") > 2


def test_a_missing_attention_soft_cap_fails_the_parity_tolerance(hf_checkpoint):
  ours, ref, c = _parity("gemma2_gqa_window", hf_checkpoint, attn_logit_softcapping=None)
  assert _fails(ours["logits"][REAL], ref["logits"][REAL], c=c, what="gemma2 logits without the attention soft-cap") > 2


def test_a_missing_final_soft_cap_fails_the_parity_tolerance(hf_checkpoint):
  ours, ref, c = _parity("gemma2_gqa_window", hf_checkpoint, final_logit_softcapping=None)
  assert _fails(ours["logits"][REAL], ref["logits"][REAL], c=c, what="gemma2 logits without the final soft-cap") > 2


def test_a_residual_read_one_position_late_fails_the_parity_tolerance(hf_checkpoint):
  ours, ref, c = _parity("llama3_scaled_untied", hf_checkpoint)
  # Row 0 is unpadded: the harvest's bug would store token t+1's residual as token t's.
  assert _fails(ours[2][0, 1:], ref[2][0, :-1], c=c, what="llama3 residual after block 2, one position late") > 2


def test_beta_without_its_error_term_fails_the_lstsq_tolerance(tmp_path):
  store, x, kind, position = _store(tmp_path)
  cc = _crosscoder("batchtopk")
  res = latent_scaling(cc, store, 0, batch_size=512, exclude=("bos", "chat_template"), progress=False)
  keep = token_mask(kind, position, (-1, KIND_TEMPLATE))
  buggy, f = _reference(cc, x, keep, 1, np.arange(M_LAT), own_term=False)  # y^ε = x − x̂, f_j d_j left out
  live = (f > 0).any(0)
  assert _fails(res["beta_error"][0][:, live], buggy["error"][:, live], c=C_BETA,
                what="β^ε against a reference without latent j's own part") > 2


def test_assert_close_scales_with_the_reference_and_matches_non_finite_values():
  big = np.array([1000.0, -0.001, np.nan, np.inf])
  # A rounding-sized error on an element that cancelled to near zero passes: the scale is the array's.
  assert_close(big + np.array([1e-4, 1e-4, 0, 0]), big, c=rounding(n=1e4), what="cancelling element")
  with pytest.raises(AssertionError, match="non-finite values differ"):
    assert_close(np.array([1000.0, -0.001, 0.0, np.inf]), big, c=0.5, what="a NaN lost")
  with pytest.raises(AssertionError, match="non-finite values differ"):
    assert_close(np.array([1000.0, -0.001, np.nan, -np.inf]), big, c=0.5, what="an infinity's sign")
  with pytest.raises(AssertionError, match=r"shapes differ"):
    assert_close(np.zeros(3), np.zeros(4), c=0.1, what="shapes")
  with pytest.raises(ValueError, match="c=2"):
    assert_close(1.0, 1.0, c=2, what="c must be relative")
  # Elementwise scales: a relative tolerance, for values that cannot cancel.
  assert_close([1e-8, 1.0], [1.0000001e-8, 1.0], c=1e-6, scale=np.abs([1e-8, 1.0]), what="ratios")
  with pytest.raises(AssertionError, match=r"at \(0,\)"):
    assert_close([1.1e-8, 1.0], [1e-8, 1.0], c=1e-6, scale=np.abs([1e-8, 1.0]), what="ratios")
  # A zero reference with no scale given compares exactly.
  with pytest.raises(AssertionError):
    assert_close([1e-30], [0.0], c=0.5, what="exact zero")
