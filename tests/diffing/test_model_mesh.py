"""The diff methods on a model mesh (`load_pair(..., mesh=)`, `launch.diff --config.model_mesh`) equal one device.

The tiny pair (two random Gemma 2 of 4 heads, 2 KV heads, MLP 128, vocabulary 512) on 8 forced CPU devices:
ADL's δ_p and the per-token KL of every document, on meshes (1, 8), (2, 4) and (8, 1), against the same
computations on one device; then `launch.diff` with methods adl and kl end to end on (2, 4). Tensor
parallelism adds the heads' and MLP units' partial sums in another order: float32 rounding of the same
forward, so the tolerances are those of two forwards of one model (`residual_c`, `kl_c`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.diffing import adl
from neurodiff_jax.diffing import kl as kl_method
from neurodiff_jax.diffing.context import DiffContext, load_pair
from neurodiff_jax.models import jit_forward, model_config, model_mesh
from tests.numerics import assert_close, kl_c, kl_magnitude, residual_c

MESHES = [(1, 8), (2, 4), (8, 1)]
LAYERS, N, DOCS, BATCH = [1, 2], 4, 12, 4  # 12 documents in batches of 4: split 2 ways on (2, 4), whole on (8, 1)


def _ctx(pair, data) -> DiffContext:
  return DiffContext(pair=pair, datasets=[data], max_len=32, max_documents=64, grader=None, progress=False,
                     log=lambda m: None)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _per_token_kl(ctx: DiffContext) -> list[np.ndarray]:
  """The KL method's step (`kl.make_kl_step`) on every batch: [B, T] per batch, filler rows dropped."""
  step = kl_method.make_kl_step(ctx.pair)
  pad = ctx.pair.tokenizer.pad_token_id or 0
  out = []
  for batch in ctx.batches(BATCH):
    ids, mask = kl_method.padded(batch, ctx.max_len, pad)
    out.append(np.where(batch.mask, step(ids, mask)[0][:, :batch.ids.shape[1]], 0.0)[batch.docs >= 0])
  return out


@pytest.fixture(scope="module")
def one_device(tiny_pair, tiny_pair_dirs):
  """δ_p (and the residual magnitude it is a difference of), per-token KL and its log-prob magnitude, one device."""
  ctx = _ctx(tiny_pair, tiny_pair_dirs[2])
  means = adl.mean_difference(ctx, LAYERS, N, num_documents=DOCS, batch_size=BATCH)
  fb, ff = jit_forward(tiny_pair.base), jit_forward(tiny_pair.ft)
  mags = []
  for batch in ctx.batches(BATCH):
    lpb, lpf = (_log_softmax(np.asarray(f(batch.ids, batch.mask).logits)) for f in (fb, ff))
    mags.append(kl_magnitude(lpf, lpb)[batch.docs >= 0])
  return means, _per_token_kl(ctx), np.concatenate([m.ravel() for m in mags])


@pytest.mark.parametrize("shape", MESHES)
def test_delta_and_per_token_kl_equal_one_device(shape, tiny_pair_dirs, one_device):
  base, ft, data = tiny_pair_dirs
  mesh = model_mesh(shape, [model_config(base), model_config(ft)])
  pair = load_pair(base, ft, mesh=mesh)
  assert dict(pair.mesh.shape) == dict(zip(("data", "model"), shape))
  ctx = _ctx(pair, data)
  ref_means, ref_kl, mag = one_device
  got = adl.mean_difference(ctx, LAYERS, N, num_documents=DOCS, batch_size=BATCH)
  assert int(got["documents"]) == int(ref_means["documents"]) == DOCS
  np.testing.assert_array_equal(got["count"], ref_means["count"])
  cfg = pair.ft.cfg
  for i, layer in enumerate(LAYERS):
    # δ is a difference of signed residuals: its rounding is theirs (scale: their largest mean magnitude).
    scale = max(np.abs(ref_means["mean_ft"][i]).max(), np.abs(ref_means["mean_base"][i]).max())
    assert_close(got["delta"][i], ref_means["delta"][i], c=residual_c(cfg, layer, after=1), scale=scale,
                 what=f"{shape}: δ_p at layer {layer} equals one device's")
  assert np.linalg.norm(ref_means["delta"]) > 0.1  # the two random models differ
  got_kl = _per_token_kl(ctx)
  assert [k.shape for k in got_kl] == [k.shape for k in ref_kl]
  got_kl, want = np.concatenate([k.ravel() for k in got_kl]), np.concatenate([k.ravel() for k in ref_kl])
  assert want.mean() > 1e-3
  assert_close(got_kl, want, c=kl_c(cfg), scale=mag, what=f"{shape}: per-token KL equals one device's")


def test_launch_diff_adl_and_kl_on_a_model_mesh(tiny_pair_dirs, tmp_path):
  from configs.diff import get_config

  from neurodiff_jax.diffing import run

  base, ft, data = tiny_pair_dirs
  results = {}
  for shape in ((), (2, 4)):
    c = get_config("narrow,small")
    c.base_model, c.finetuned_model, c.datasets = base, ft, (data,)
    c.out_dir, c.max_len, c.progress, c.methods = str(tmp_path / f"res{len(shape)}"), 32, False, ("adl", "kl")
    c.model_mesh = shape
    c.adl.update({"layers": (0.5,), "positions": 3, "num_documents": 12, "batch_size": 4, "patchscope_scales": (1.0,),
                  "steering_prompts": ("The mill",), "steering_alphas": (1.0,), "steering_tokens": 4})
    c.kl.batch_size = 4
    out = run.diff(c, log=lambda m: None)
    results[shape] = out
  a, b = (tmp_path / "res0" / "diff", tmp_path / "res2" / "diff")
  cfg = model_config(base)
  ma, mb = np.load(a / "adl" / "means.npz"), np.load(b / "adl" / "means.npz")
  layer = int(ma["layers"][0])
  scale = max(np.abs(ma["mean_ft"]).max(), np.abs(ma["mean_base"]).max())
  assert_close(mb["delta"], ma["delta"], c=residual_c(cfg, layer, after=1), scale=scale,
               what="launch.diff adl on (2, 4): δ_p equals one device's")
  pa, pb = (pd.read_parquet(d / "kl" / "kl_by_position.parquet") for d in (a, b))
  np.testing.assert_array_equal(pb["n_tokens"], pa["n_tokens"])
  # A mean over documents of per-token KLs, each rounded at the scale of its log-probs (≤ 2 log V here).
  assert_close(pb["mean_kl"], pa["mean_kl"], c=kl_c(cfg), scale=2 * np.log(cfg.vocab_size),
               what="launch.diff kl on (2, 4): mean KL by position equals one device's")
  sa, sb = (pd.read_parquet(d / "adl" / "steering.parquet") for d in (a, b))
  assert sb.text.tolist() == sa.text.tolist()  # greedy steered samples, token for token
