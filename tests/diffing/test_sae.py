"""The SAE on differences: the reader's difference batches equal numpy, and planted sparse directions are recovered."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ml_collections import ConfigDict

from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.diffing import sae
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.models.lens import logit_lens
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import assert_close, rounding

D = 64  # the tiny pair's width


@pytest.fixture
def ctx_of(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair and its dataset (the SAE grades nothing: no grader)."""
  return lambda **kw: DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64,
                                  progress=False, log=lambda s: None, **kw)


def _planted(tmp_path, n=8192, planted=8, seed=0):
  """A store at layer 2 where h_ft = h_base + a sparse non-negative mix of `planted` unit directions."""
  rng = np.random.default_rng(seed)
  dirs = rng.normal(size=(planted, D))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  codes = (rng.random((n, planted)) < 0.08) * rng.uniform(2.0, 4.0, (n, planted))
  base = rng.normal(size=(n, D))
  ft = base + codes @ dirs + 0.02 * rng.normal(size=(n, D))
  x = np.stack([base, ft], 1).astype(np.float32)
  store = write_arrays(tmp_path / "store", {2: x}, shard_tokens=2048, chunk_tokens=64,
                       metadata={"token_id": rng.integers(3, 200, n)})
  return store, x, dirs


def test_store_differences_equal_numpy(tmp_path):
  store, x, _ = _planted(tmp_path, n=2048)
  batch_of, reader = sae.store_differences(store, 2, 128, seed=3)
  try:
    for e in (0, 5, reader.batches_per_epoch + 1):
      got = batch_of(e)
      tokens = reader.tokens(e)
      assert got.shape == (128, 1, D)
      np.testing.assert_array_equal(got[:, 0], x[tokens, 1] - x[tokens, 0])
  finally:
    reader.close()


def test_sae_recovers_planted_directions(ctx_of, tmp_path):
  store, x, dirs = _planted(tmp_path)
  out = tmp_path / "out"
  out.mkdir()
  cfg = ConfigDict({"layer": 0.67, "dict_size": 32, "k": 2, "steps": 800, "batch_size": 256, "lr": 3e-3})
  ctx = ctx_of(store=store)
  summary = sae.run(ctx, cfg, out)
  assert summary["source"] == "store" and summary["tokens"] == len(x)
  latents = pd.read_parquet(out / "sae_latents.parquet")
  # The decoder rows (original units) of the live latents against the planted directions.
  from neurodiff_jax.crosscoder.checkpoint import load

  model = load(out / "checkpoint")
  dec = model.decoder()[:, 0, :]
  unit = dec / np.linalg.norm(dec, axis=1, keepdims=True)
  best = np.abs(unit[latents.live.to_numpy()] @ dirs.T).max(0)
  print("best cosine per planted direction:", np.round(best, 4), "fve", summary["fve"])
  assert (best >= 0.9).sum() >= 6, best
  assert summary["fve"] > 0.8, summary
  # Frequencies: counted against an independent numpy encoding with the checkpoint's θ.
  delta = (x[:, 1] - x[:, 0]).astype(np.float64)[:, None, :]
  f = np.asarray(model.encode(delta))
  # Not a rounding comparison: shares of counts, where up to 2 tokens whose code sits at θ may fire in one float32
  # encoding (the run's batches) and not in the other (this one).
  np.testing.assert_allclose(latents.frequency, (f > 0).mean(0), atol=2 / len(x))
  # Lens: a live latent's promoted tokens are the fine-tuned model's logit lens of its decoder row.
  lens = pd.read_parquet(out / "sae_lens.parquet")
  j = int(latents[latents.live].sort_values("frequency").latent.iloc[-1])
  logits = logit_lens(ctx.pair.ft, dec[j:j + 1])[0]
  got = lens[(lens.latent == j) & (lens.direction == "promoted")]
  np.testing.assert_array_equal(got.token_id, np.argsort(-logits, kind="stable")[:len(got)])
  # Top contexts: the largest activations of the latent, in order.
  top = pd.read_parquet(out / "sae_top_contexts.parquet")
  t = top[top.latent == j]
  # The run's float32 δ, normalised, through the encoder's sum over d, against encode of the float64 δ: the top codes
  # share one magnitude.
  assert_close(t.activation, np.sort(f[:, j])[::-1][:len(t)], c=rounding(n=D, depth=2),
               what="SAE top-context activations equal Crosscoder.encode's largest codes")
  html = (out / "section.html").read_text()
  assert html.startswith("<section><h2>SAE on the activation differences</h2>")
  # Rerunning resumes the finished checkpoint: no training, the same latents.
  again = sae.run(ctx, cfg, out)
  # The same pass again: FVE = 1 − err/tot from float32 sums over a chunk's tokens; its terms are of magnitude 1.
  assert_close(again["fve"], summary["fve"], c=rounding(n=len(x), depth=2), scale=1.0,
               what="a resumed SAE run's FVE equals the first run's")


def test_sae_on_the_fly_trains_and_reads(ctx_of, tmp_path):
  cfg = ConfigDict({"layer": 0.5, "dict_size": 64, "k": 4, "steps": 30, "batch_size": 64, "lr": 1e-3})
  summary = sae.run(ctx_of(), cfg, tmp_path)
  assert summary["source"] == "models" and summary["tokens"] > 0 and summary["train"]["step"] == 30
  assert (tmp_path / "checkpoint").is_dir() and summary["live_fraction"] > 0


def test_sae_bad_k_is_a_clear_error(ctx_of, tmp_path):
  cfg = ConfigDict({"layer": 0.5, "dict_size": 8, "k": 16, "steps": 10, "batch_size": 64, "lr": 1e-3})
  with pytest.raises(ConfigError, match=r"sae.k=16 must be in \[1, sae.dict_size=8\]"):
    sae.run(ctx_of(), cfg, tmp_path)
