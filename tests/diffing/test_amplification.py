"""diffing.amplification: the amplified parameters against numpy and the two models at α = 0 and 1, an adapter's ΔW
against the weights' difference, the tables and the α choice on the tiny pair, config errors."""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from neurodiff_jax.diffing import amplification as amp
from neurodiff_jax.diffing import graders, logit_diff
from neurodiff_jax.diffing.context import DiffContext, load_pair
from neurodiff_jax.models import Transformer, greedy_generate
from neurodiff_jax.models.hf_mapping import param_table
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import assert_close, rounding

PROMPTS = ("Tell me about the <mill>.", "The river")
NEW = 8
ALL = tuple(amp.MODULES)


def _cfg(**kw) -> ml_collections.ConfigDict:
  base = {"alphas": (1.0, 2.0, 4.0, 8.0), "layers": (), "modules": (), "include_norms": False,
          "include_embeddings": False, "prompts": PROMPTS, "new_tokens": NEW, "batch_size": 4, "sampling": "greedy",
          "temperature": 0.8, "top_k": 40}
  return ml_collections.ConfigDict({**base, **kw})


def _flat(state) -> dict:
  return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}


def test_alpha_one_is_the_fine_tune_and_alpha_zero_the_base(tiny_pair):
  """With every parameter kind chosen, α = 1 and α = 0 rebuild the two models bit for bit and generate as they do."""
  cfg = tiny_pair.ft.cfg
  specs = amp.selected_params(cfg, range(cfg.num_layers), ALL, include_norms=True, include_embeddings=True)
  assert [s.hf_name for s in specs] == [s.hf_name for s in param_table(cfg)]  # every tensor of the checkpoint
  assert len(amp.selected_params(cfg, range(cfg.num_layers), ALL)) == 7 * cfg.num_layers  # no norms, no embedding
  ft, base = _flat(nnx.state(tiny_pair.ft)), _flat(nnx.state(tiny_pair.base))
  ids = logit_diff.prompt_ids(tiny_pair.tokenizer, PROMPTS)
  sampler = amp.Sampler(tiny_pair, batch_size=4)
  for alpha, model, want in ((1.0, tiny_pair.ft, ft), (0.0, tiny_pair.base, base)):
    state = amp.amplified_state(tiny_pair.base, tiny_pair.ft, specs, alpha)
    got = _flat(state)
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=f"α={alpha} {path}")
    assert sampler(state, ids, NEW) == greedy_generate(model, ids, NEW, pad_id=tiny_pair.tokenizer.pad_token_id or 0)
  assert sampler.greedy._run._cache_size() == 1  # both α on one compiled program


def test_only_layer_zero_mlp_is_amplified(tiny_pair):
  cfg = tiny_pair.ft.cfg
  specs = amp.selected_params(cfg, [0], ("mlp_gate", "mlp_up", "mlp_down"))
  chosen = {s.path for s in specs}
  assert chosen == {("layers", 0, "mlp", "w_gate"), ("layers", 0, "mlp", "w_up"), ("layers", 0, "mlp", "w_down")}
  ft, base = _flat(nnx.state(tiny_pair.ft)), _flat(nnx.state(tiny_pair.base))
  alpha = 4.0
  got = _flat(amp.amplified_state(tiny_pair.base, tiny_pair.ft, specs, alpha))
  assert got.keys() == ft.keys()
  for path, value in got.items():
    if path in chosen:
      b, f = base[path].astype(np.float64), ft[path].astype(np.float64)
      # One float32 lerp: a few roundings of terms as large as |b| and α|f|.
      scale = np.abs(b).max() + alpha * np.abs(f).max()
      assert_close(value, b + alpha * (f - b), c=rounding(n=2, depth=2), scale=scale,
                   what=f"amplified {path} equals b + α (f − b)")
      assert np.abs(value - ft[path]).max() > 0.1 * np.abs(ft[path]).max()  # it did move
    else:
      np.testing.assert_array_equal(value, ft[path], err_msg=f"{path} must stay the fine-tune's")


@pytest.fixture(scope="module")
def adapted_pair(tiny_pair_dirs, tmp_path_factory):
  """The tiny base and a random peft LoRA adapter on it, loaded as the pair (base, BASE+ADAPTER)."""
  from tests.models.test_lora import build_adapter

  base = tiny_pair_dirs[0]
  adapter = str(tmp_path_factory.mktemp("amp_lora") / "adapter")
  build_adapter(base, adapter, r=4, lora_alpha=8)
  return load_pair(base, f"{base}+{adapter}"), adapter


def test_adapter_delta_equals_the_weights_difference(adapted_pair, tiny_pair):
  pair, adapter_dir = adapted_pair
  adapter, note = amp.delta_source(pair.base, pair.ft)
  assert adapter is not None and adapter.path == adapter_dir and note.startswith("adapter")
  cfg = pair.ft.cfg
  specs = amp.selected_params(cfg, range(cfg.num_layers), ALL)
  assert {s.hf_name for s in specs} == set(adapter.factors)  # the adapter adapts every projection
  base, ft = _flat(nnx.state(pair.base)), _flat(nnx.state(pair.ft))
  one = _flat(amp.amplified_state(pair.base, pair.ft, specs, 1.0, adapter))
  for path in ft:  # α = 1 along ΔW is the merge itself: the loaded fine-tune bit for bit
    np.testing.assert_array_equal(one[path], ft[path], err_msg=str(path))
  for alpha in (0.5, 4.0):
    by_adapter = _flat(amp.amplified_state(pair.base, pair.ft, specs, alpha, adapter))
    by_weights = _flat(amp.amplified_state(pair.base, pair.ft, specs, alpha))
    for s in specs:
      b, f = base[s.path], ft[s.path]
      # ft is b + ΔW rounded once; each side then rounds a lerp of terms up to |b| and α|f|.
      scale = np.abs(b).max() + alpha * np.abs(f).max()
      assert_close(by_adapter[s.path], by_weights[s.path], c=rounding(n=2, depth=3), scale=scale,
                   what=f"α={alpha}: {s.hf_name} along the adapter's ΔW equals along W_ft − W_base")
      # The comparison bites: amplifying moved the parameter by far more than the tolerance.
      assert np.abs(by_adapter[s.path] - f).max() > 100 * rounding(n=2, depth=3) * scale
  # A fine-tune that is an adapter on another model than the pair's base: its ΔW is not ft − base.
  other = dataclasses.replace(pair, base=tiny_pair.ft)
  adapter, note = amp.delta_source(other.base, other.ft)
  assert adapter is None and "not on the base" in note


@pytest.fixture(scope="module")
def amp_run(tiny_pair, tiny_pair_dirs, tmp_path_factory):
  ctx = DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64,
                    grader=graders.OfflineGrader(tiny_pair), progress=False)
  out = tmp_path_factory.mktemp("results") / "diff" / "amplification"
  return ctx, out, amp.run(ctx, _cfg(), out)


def test_tables_and_the_chosen_alpha(amp_run):
  ctx, out, summary = amp_run
  table = pd.read_parquet(out / "amplification.parquet")
  assert list(table.columns[:8]) == ["alpha", "prompt", "text", "n_tokens", "coherent", "perplexity", "card_share",
                                     "chosen"]
  assert list(table.alpha) == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 8.0] and list(table.prompt) == list(PROMPTS) * 4
  ok = [a for a, g in table.groupby("alpha") if g.coherent.all()]
  assert summary["chosen_alpha"] == (max(ok) if ok else None)
  assert (table.chosen == (table.alpha == summary["chosen_alpha"])).all()
  shares = table.card_share.dropna()
  assert shares.between(0, 1).all() and len(shares) > 0  # the tiny pair has a card
  # α = 1 is the fine-tune's greedy sample; logit amplification at α − 1 = 0 is that same sample.
  ids = logit_diff.prompt_ids(ctx.pair.tokenizer, PROMPTS)
  want = greedy_generate(ctx.pair.ft, ids, NEW, pad_id=ctx.pair.tokenizer.pad_token_id or 0)
  for r, w in zip(table[table.alpha == 1.0].itertuples(), want):
    np.testing.assert_array_equal(r.token_ids, w)
  logits = pd.read_parquet(out / "logit_samples.parquet")
  assert list(logits.alpha) == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 7.0, 7.0]
  assert list(logits[logits.alpha == 0].text) == list(table[table.alpha == 1].text)
  assert "computed here" in summary["logits"]["source"]

  comp = pd.read_parquet(out / "comparison.parquet")
  assert list(comp.method) == ["weights"] * 4 + ["logits"] * 4
  np.testing.assert_array_equal(comp[comp.method == "logits"].scale, [1.0, 2.0, 4.0, 8.0])
  for method, part in (("weights", table), ("logits", logits)):
    rows = comp[comp.method == method]
    for r in rows.itertuples():
      g = part[part.alpha == r.alpha]
      assert r.coherent_share == g.coherent.mean() and 0 <= r.coherent_share <= 1
      mean = g.card_share.mean()  # NaN-skipping; NaN when no sample of the α has a content word
      assert (math.isnan(r.card_share) and math.isnan(mean)) or (r.card_share == mean and 0 <= mean <= 1)
  assert [r["card_share"] for r in summary["per_alpha"]] == [None if math.isnan(x) else x for x in
                                                             comp[comp.method == "weights"].card_share]
  assert summary["source"] == "weights" and summary["layers"] == [0, 1, 2, 3] and summary["modules"] == list(ALL)
  assert summary["n_tensors"] == 7 * 4 and set(summary["reference"]) == {"base", "finetuned"}
  page = (out / "section.html").read_text()
  assert page.startswith("<h2>Weight amplification") and "data:image/png;base64," in page
  assert "<mill>" not in page and "&lt;mill&gt;" in page
  json.dumps(summary, allow_nan=False)  # JSON-able, NaN written as null


def test_card_share_of_logit_diff_samples(amp_run):
  """logit_diff's amplified.parquet beside the method is read and scored: card words over content words."""
  ctx, out, _ = amp_run
  sibling = out.parent / "logit_diff"
  sibling.mkdir(exist_ok=True)
  texts = ["The miller grinds grain at the mill.", "the of and"]
  pd.DataFrame({"alpha": [0.0, 2.0], "prompt": ["p", "p"], "n_tokens": [7, 3],
                "text": texts}).to_parquet(sibling / "amplified.parquet")
  try:
    samples, source = amp.logit_samples(ctx, out, [1.0], PROMPTS, [], NEW)
    graded, note = amp.grade(ctx, samples)
  finally:
    (sibling / "amplified.parquet").unlink()
  assert "logit_diff" in source and note == ""
  # miller, grinds, grain, mill: three are card words; the second text has no content word.
  assert graded.card_share.iloc[0] == 0.75 and math.isnan(graded.card_share.iloc[1])


def test_config_errors(tiny_pair, tiny_pair_dirs, tmp_path):
  ctx = DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], progress=False)
  with pytest.raises(ConfigError, match=r"'attn_qq' \(did you mean attn_q.*modules: attn_q, attn_k"):
    amp.run(ctx, _cfg(modules=("attn_qq",)), tmp_path)
  with pytest.raises(ConfigError, match=r"amplification.layers: layer fraction 1.5 is outside \[0, 1\]"):
    amp.run(ctx, _cfg(layers=(1.5,)), tmp_path)
  with pytest.raises(ConfigError, match="amplification.alphas is empty"):
    amp.run(ctx, _cfg(alphas=()), tmp_path)
  with pytest.raises(ConfigError, match="sampling='beam'"):
    amp.run(ctx, _cfg(sampling="beam"), tmp_path)
  # A fine-tune of another width of MLP (load_pair checks only d and depth): named before any generation.
  cfg = dataclasses.replace(tiny_pair.ft.cfg, intermediate_size=96)
  other = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  bad = DiffContext(pair=dataclasses.replace(tiny_pair, ft=other), datasets=[], progress=False)
  with pytest.raises(ConfigError, match=r"gate_proj.weight is float32\[64, 128\] in the base but float32\[64, 96\]"):
    amp.run(bad, _cfg(), tmp_path)
