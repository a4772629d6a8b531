"""PEFT LoRA adapters merged on load: logits equal peft's own merge_and_unload, one base serves several adapters."""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from neurodiff_jax.models import (
    CheckpointError,
    UnsupportedConfigError,
    checkpoint_info,
    config_from_hf,
    jit_forward,
    load_model,
    load_tokenizer,
    make_mesh,
)
from neurodiff_jax.models.hf_mapping import param_table
from neurodiff_jax.models.lora import adapter_delta, apply_adapter, read_adapter
from neurodiff_jax.models.safetensors_io import SafetensorsFile
from tests.models.hf_reference import hf_forward, tiny_multimodal_gemma3_config
from tests.models.test_parity import CONFIGS, SMALL, random_batch
from tests.numerics import assert_close, forward_c, rounding

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name: (base config in test_parity.CONFIGS, LoraConfig arguments). Every case adapts q/k/v/o and gate/up/down.
CASES = {
    "llama_rslora": ("llama3_scaled_untied", dict(r=8, lora_alpha=8, use_rslora=True)),
    # Patterns as peft matches them: a key matches the end of the module path at a dot, the first key wins.
    "gemma2_patterns": ("gemma2_gqa_window", dict(
        r=4, lora_alpha=8, rank_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={r"layers\.[23]\.self_attn\.q_proj": 3, "up_proj": 20})),
    "gemma3_layers": ("gemma3_text", dict(r=2, lora_alpha=4, layers_to_transform=[0, 5])),
    # bias="all": peft saves every bias of the model (q/k/v here), trained or not, and merging keeps them.
    "qwen2_bias_all": ("qwen2", dict(r=4, lora_alpha=8, bias="all")),
    "qwen3": ("qwen3", dict(r=4, lora_alpha=16)),
}


def build_adapter(base, out, seed=1, targets=ATTN + MLP, train_biases=False, **lora):
  """A random-weight peft LoRA adapter on the checkpoint at `base`, saved to `out`; returns (peft's s by HF weight name,
  peft's merge_and_unload model).

  init_lora_weights=False draws B at random (peft's default zeroes it), as training would leave it;
  `train_biases` moves the biases that bias='all' trains, so merging must carry them.
  """
  torch.manual_seed(seed)
  hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
  model = peft.get_peft_model(hf, peft.LoraConfig(target_modules=targets, init_lora_weights=False, **lora))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_B." in name:
        p.mul_(0.2)  # ΔW about as large as W, as after fine-tuning (peft's random B makes it ~4x W)
      elif train_biases and name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  scales = {name.removeprefix("base_model.model.") + ".weight": m.scaling["default"]
            for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
  return scales, model.merge_and_unload().eval()


def read_json(path):
  with open(path) as f:
    return json.load(f)


def write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f)


def _leaf(model, path):
  node = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node[...]


def logits(model, ids, mask):
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_logits_equal_peft_merge_and_unload(name, hf_checkpoint, tmp_path):
  key, lora = CASES[name]
  config = CONFIGS[key]()
  hf_base, base = hf_checkpoint(config)
  adapter = str(tmp_path / "adapter")
  peft_scales, merged = build_adapter(base, adapter, train_biases=lora.get("bias", "none") != "none", **lora)
  read = read_adapter(adapter)
  assert {n: f.scale for n, f in read.factors.items()} == pytest.approx(peft_scales)  # peft's own s per module
  if "layers_to_transform" in lora:
    assert {int(n.split(".")[2]) for n in read.factors} == set(lora["layers_to_transform"])
  if lora.get("bias") == "all":
    assert sorted(read.biases) == sorted(n for n, _ in merged.named_parameters() if n.endswith(".bias"))

  model = load_model(f"{base}+{adapter}")
  # The merged weights themselves: W + s·B·A rounds once after a sum of r products, as peft's does.
  ours_by_name = {spec.hf_name: spec.to_hf(np.asarray(_leaf(model, spec.path))) for spec in param_table(model.cfg)}
  for hf_name, ref_w in merged.state_dict().items():
    if hf_name in read.factors:
      r = max([lora["r"], *lora.get("rank_pattern", {}).values()])
      assert_close(ours_by_name[hf_name], ref_w.numpy(), c=rounding(n=r), what=f"{name}: merged {hf_name}")
    elif hf_name in ours_by_name:
      np.testing.assert_array_equal(ours_by_name[hf_name], ref_w.numpy(), err_msg=hf_name)

  ids, mask = random_batch(config.vocab_size)
  real = mask.astype(bool)
  ref = hf_forward(merged, ids, mask)[0].logits.numpy()[real]
  ours = logits(model, ids, mask)[real]
  c = forward_c(config)
  assert_close(ours, ref, c=c, what=f"{name}: adapted logits equal peft's merge_and_unload")
  base_ref = hf_forward(hf_base, ids, mask)[0].logits.numpy()[real]
  assert np.abs(ref - base_ref).max() > 1000 * c * np.abs(ref).max()  # the adapter changes the model

  if lora.get("use_rslora"):
    # Planted bug: s = α/r instead of rsLoRA's α/√r. The tolerance must catch it by a wide margin.
    r = lora["r"]
    wrong = dataclasses.replace(read, factors={n: dataclasses.replace(f, scale=f.scale / math.sqrt(r))
                                               for n, f in read.factors.items()})
    bad = logits(apply_adapter(load_model(base), wrong), ids, mask)[real]
    assert np.abs(bad - ref).max() > 100 * c * np.abs(ref).max()
    with pytest.raises(AssertionError, match="adapted logits"):
      assert_close(bad, ref, c=c, what="α/r adapted logits")


@pytest.mark.parametrize("key", sorted({k for k, _ in CASES.values()}))
def test_weight_transforms_are_linear(key):
  """ΔW goes through the weight's own to_ours, which is exact only because every transform is linear."""
  rng = np.random.default_rng(0)
  for spec in param_table(config_from_hf(CONFIGS[key]())):
    x, y = rng.normal(size=spec.hf_shape), rng.normal(size=spec.hf_shape)
    # Transposes and reshapes move values without arithmetic, so the two sides are equal bit for bit.
    np.testing.assert_array_equal(spec.to_ours(x + 2.5 * y), spec.to_ours(x) + 2.5 * spec.to_ours(y),
                                  err_msg=spec.hf_name)


def test_multimodal_gemma3_adapter_merges_into_the_language_model(tmp_path):
  """peft names a Gemma3ForConditionalGeneration's modules model.language_model.*; vision tower adapters are skipped."""
  config = tiny_multimodal_gemma3_config(2)
  torch.manual_seed(0)
  transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
  hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
  lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + MLP, init_lora_weights=False)
  model = peft.get_peft_model(hf, lora)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_B." in name:
        p.mul_(0.2)  # as build_adapter
  model.save_pretrained(tmp_path / "adapter")
  merged = model.merge_and_unload().eval()
  saved = SafetensorsFile(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
  assert any(".vision_tower." in k and ".lora_A." in k for k in saved)  # peft adapted SigLIP's q/k/v too
  adapter = read_adapter(str(tmp_path / "adapter"))
  assert "model.layers.1.self_attn.q_proj.weight" in adapter.factors and len(adapter.factors) == 2 * 7
  ids = torch.randint(0, 290, (2, 9))
  with torch.no_grad():
    ref = merged(input_ids=ids).logits.numpy()
  ours = load_model(f"{tmp_path / 'base'}+{tmp_path / 'adapter'}")(jnp.asarray(ids.numpy())).logits
  assert_close(np.asarray(ours), ref, c=forward_c(config.text_config),
               what="multimodal Gemma 3 adapter: text logits equal peft's merge")


@pytest.fixture(scope="module")
def qwen3_adapter(tmp_path_factory):
  """A tiny Qwen 3 config, base and one adapter on it (paths), shared by the tests that only read them."""
  tmp = tmp_path_factory.mktemp("qwen3_lora")
  config = CONFIGS["qwen3"]()
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "base")
  build_adapter(str(tmp / "base"), str(tmp / "adapter"), r=4, lora_alpha=8)
  return config, str(tmp / "base"), str(tmp / "adapter")


def test_adapter_directory_alone_resolves_its_base(qwen3_adapter, tmp_path):
  config, base, adapter = qwen3_adapter
  assert read_json(os.path.join(adapter, "adapter_config.json"))["base_model_name_or_path"] == base
  alone, joined = load_model(adapter), load_model(f"{base}+{adapter}")
  ids, mask = random_batch(config.vocab_size, seed=3)
  np.testing.assert_array_equal(logits(alone, ids, mask), logits(joined, ids, mask))
  assert alone.checkpoint == joined.checkpoint == checkpoint_info(adapter) == checkpoint_info(f"{base}+{adapter}")
  assert (alone.checkpoint.path, alone.checkpoint.adapter) == (base, adapter)
  assert alone.checkpoint.fingerprint != checkpoint_info(base).fingerprint

  # The tokenizer: the base's while the adapter saved none, then the adapter's own.
  shutil.copytree(base, tmp_path / "base")
  save_tokenizer(tmp_path / "base", {"<unk>": 0, "hello": 1})
  with_tokenizer = edited_adapter(adapter, tmp_path, base_model_name_or_path=str(tmp_path / "base"))
  assert load_tokenizer(with_tokenizer)("hello")["input_ids"] == [1]
  save_tokenizer(with_tokenizer, {"<unk>": 0, "world": 1, "hello": 2})
  assert load_tokenizer(with_tokenizer)("hello")["input_ids"] == [2]


def save_tokenizer(directory, vocab):
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def test_two_adapters_share_one_loaded_base(hf_checkpoint, tmp_path):
  config = CONFIGS["llama3_scaled_untied"]()
  _, base = hf_checkpoint(config)
  _, merged_attn = build_adapter(base, str(tmp_path / "attn"), seed=1, targets=ATTN, r=4, lora_alpha=8)
  _, merged_mlp = build_adapter(base, str(tmp_path / "mlp"), seed=2, targets=MLP, r=2, lora_alpha=4)
  model = load_model(base)
  before = {path: np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model))}
  ids, mask = random_batch(config.vocab_size, seed=5)
  real = mask.astype(bool)
  base_logits = logits(model, ids, mask)

  attn = apply_adapter(model, read_adapter(str(tmp_path / "attn")))
  mlp = apply_adapter(model, read_adapter(str(tmp_path / "mlp")))
  c = forward_c(config)
  for adapted, merged, what in ((attn, merged_attn, "attention"), (mlp, merged_mlp, "MLP")):
    ref = hf_forward(merged, ids, mask)[0].logits.numpy()[real]
    assert_close(logits(adapted, ids, mask)[real], ref, c=c,
                 what=f"{what} adapter on a shared base equals peft's merge")

  np.testing.assert_array_equal(logits(model, ids, mask), base_logits)  # the base is untouched
  for path, v in nnx.to_flat_state(nnx.state(model)):
    np.testing.assert_array_equal(np.asarray(v[...]), before[path], err_msg=str(path))
  # Unchanged arrays are the base's own (no copy, no reload); adapted ones are new; Variables are never shared.
  assert attn.embed[...] is model.embed[...] and attn.lm_head[...] is model.lm_head[...]
  assert attn.layers[2].mlp.w_up[...] is model.layers[2].mlp.w_up[...]
  assert mlp.layers[2].attn.w_q[...] is model.layers[2].attn.w_q[...]
  assert attn.layers[2].attn.w_q[...] is not model.layers[2].attn.w_q[...]
  assert attn.embed is not model.embed
  fingerprints = {model.checkpoint.fingerprint, attn.checkpoint.fingerprint, mlp.checkpoint.fingerprint}
  assert len(fingerprints) == 3 and attn.checkpoint.adapter == str(tmp_path / "attn")


def test_adapter_on_a_sharded_base_keeps_its_sharding(hf_checkpoint, tmp_path):
  assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
  config = CONFIGS["gemma2_gqa_window"]()
  _, base = hf_checkpoint(config)
  adapter = str(tmp_path / "adapter")
  build_adapter(base, adapter, r=4, lora_alpha=8)
  mesh = make_mesh((2, 4), ("data", "model"))
  sharded = load_model(base, mesh=mesh)
  applied = apply_adapter(sharded, read_adapter(adapter))
  loaded = load_model(f"{base}+{adapter}", mesh=mesh)
  leaves = {m: dict(nnx.to_flat_state(nnx.state(m))) for m in (applied, loaded)}
  for path, v in nnx.to_flat_state(nnx.state(sharded)):
    for other in (applied, loaded):
      assert leaves[other][path][...].sharding == v[...].sharding, path
  assert applied.layers[0].attn.w_q[...].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  ids, mask = random_batch(config.vocab_size)
  plain = logits(load_model(f"{base}+{adapter}"), ids, mask)
  for model, what in ((applied, "apply_adapter"), (loaded, "load_model")):
    out = np.asarray(jit_forward(model)(jnp.asarray(ids), jnp.asarray(mask)).logits)
    assert_close(out, plain, c=forward_c(config), what=f"adapter merged on a 2x4 mesh by {what} equals one device's")


def test_adapter_delta_is_peft_delta_weight(qwen3_adapter):
  _, base, adapter = qwen3_adapter
  hf = transformers.AutoModelForCausalLM.from_pretrained(base)
  model = peft.PeftModel.from_pretrained(hf, adapter)
  layer = model.base_model.model.model.layers[1].mlp.down_proj
  ref = layer.get_delta_weight("default").detach().numpy()
  read = read_adapter(adapter)
  assert_close(adapter_delta(read, "model.layers.1.mlp.down_proj.weight"), ref, c=rounding(n=4),
               what="adapter_delta equals peft's get_delta_weight")
  assert adapter_delta(read, "model.layers.1.input_layernorm.weight") is None


def one_line(excinfo):
  assert "\n" not in str(excinfo.value), str(excinfo.value)
  return str(excinfo.value)


def test_base_of_another_width_is_a_shape_error(qwen3_adapter, hf_checkpoint):
  _, _, adapter = qwen3_adapter
  _, wide = hf_checkpoint(transformers.Qwen3Config(**{**SMALL, "hidden_size": 48}, num_key_value_heads=2, head_dim=32),
                          name="base")  # the adapter's base's basename: only the shapes tell them apart
  with pytest.raises(CheckpointError) as e:
    load_model(f"{wide}+{adapter}")
  msg = one_line(e)
  assert "model.layers.0.mlp.down_proj.weight (48, 112)" in msg and "(64, 4)" in msg
  assert "trained on another base" in msg


def test_base_that_the_adapter_does_not_name_is_refused(qwen3_adapter, tmp_path):
  _, base, adapter = qwen3_adapter
  other = str(tmp_path / "other-model")
  shutil.copytree(base, other)  # same shapes, another name
  with pytest.raises(CheckpointError) as e:
    load_model(f"{other}+{adapter}")
  msg = one_line(e)
  assert f"trained on {base!r}" in msg and f"given is {other!r}" in msg and f"'{base}+{adapter}'" in msg
  # A repo id and a local directory of the same model agree by their basenames.
  config_path = os.path.join(tmp_path, "renamed", "adapter_config.json")
  shutil.copytree(adapter, tmp_path / "renamed")
  write_json(config_path, {**read_json(config_path), "base_model_name_or_path": "acme/other-model"})
  assert load_model(f"{other}+{tmp_path / 'renamed'}").checkpoint.path == other


def edited_adapter(adapter, tmp_path, **changes):
  out = tmp_path / "edited"
  shutil.copytree(adapter, out)
  path = out / "adapter_config.json"
  write_json(path, {**read_json(path), **changes})
  return str(out)


@pytest.mark.parametrize("changes, error, pattern", [
    (dict(use_dora=True), UnsupportedConfigError, r"DoRA .*\(use_dora=True\) is not supported; supported: plain LoRA"),
    (dict(fan_in_fan_out=True), UnsupportedConfigError, r"\(fan_in_fan_out=True\) is not supported"),
    (dict(modules_to_save=["lm_head"]), UnsupportedConfigError, r"modules_to_save=\['lm_head'\]"),
    (dict(lora_bias=True), UnsupportedConfigError, r"lora_bias=True"),
    (dict(use_qalora=True), UnsupportedConfigError, r"QA-LoRA .*use_qalora=True"),
    (dict(init_lora_weights="pissa"), UnsupportedConfigError, r"init_lora_weights='pissa' rewrote the base"),
    (dict(use_future_variant=True), UnsupportedConfigError, r"use_future_variant=True is a peft setting"),
    (dict(bias="some"), UnsupportedConfigError, r"bias='some' is not supported; supported: none, all, lora_only"),
    (dict(peft_type="PROMPT_TUNING"), UnsupportedConfigError, r"peft_type 'PROMPT_TUNING' is not supported"),
    (dict(r=2), CheckpointError, r"rank 2 .*the tensors and the config disagree"),
])
def test_unsupported_adapter_configs_are_refused(qwen3_adapter, tmp_path, changes, error, pattern):
  _, base, adapter = qwen3_adapter
  with pytest.raises(error, match=pattern) as e:
    load_model(f"{base}+{edited_adapter(adapter, tmp_path, **changes)}")
  one_line(e)


def test_adapters_peft_writes_but_cannot_merge_are_refused(qwen3_adapter, tmp_path):
  _, base, _ = qwen3_adapter
  hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(base)
  peft.get_peft_model(hf(), peft.LoraConfig(target_modules=ATTN, use_dora=True)).save_pretrained(tmp_path / "dora")
  with pytest.raises(UnsupportedConfigError, match=r"DoRA") as e:
    load_model(f"{base}+{tmp_path / 'dora'}")
  one_line(e)
  embedding = peft.LoraConfig(target_modules=["embed_tokens", "q_proj"])
  peft.get_peft_model(hf(), embedding).save_pretrained(tmp_path / "emb")
  with pytest.raises(UnsupportedConfigError, match=r"LoRA on 'model.embed_tokens' .*lora_embedding_A.*not the embed"):
    load_model(f"{base}+{tmp_path / 'emb'}")
  prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
  peft.get_peft_model(hf(), prompt).save_pretrained(tmp_path / "prompt")
  with pytest.raises(UnsupportedConfigError, match=r"peft_type 'PROMPT_TUNING' is not supported.*plain LoRA"):
    load_model(str(tmp_path / "prompt"))


def test_missing_adapter_files_and_paths_are_named(qwen3_adapter, tmp_path):
  _, base, adapter = qwen3_adapter
  shutil.copytree(adapter, tmp_path / "no_weights")
  os.remove(tmp_path / "no_weights" / "adapter_model.safetensors")
  with pytest.raises(CheckpointError, match=r"no_weights has no adapter_model\.safetensors") as e:
    load_model(f"{base}+{tmp_path / 'no_weights'}")
  one_line(e)
  (tmp_path / "no_weights" / "adapter_model.bin").write_bytes(b"pickle")
  with pytest.raises(CheckpointError, match=r"adapter_model\.bin .*re-save the adapter .*safe_serialization=True"):
    load_model(f"{base}+{tmp_path / 'no_weights'}")
  with pytest.raises(FileNotFoundError, match=r"'.*/nope' after its last '\+' is not a PEFT adapter directory") as e:
    load_model(f"{base}+{tmp_path / 'nope'}")
  one_line(e)
  config_path = os.path.join(edited_adapter(adapter, tmp_path, base_model_name_or_path="acme/not-cached"),
                             "adapter_config.json")
  with pytest.raises(FileNotFoundError, match=r"names its base 'acme/not-cached'.*'BASE\+ADAPTER'") as e:
    load_model(os.path.dirname(config_path))
  one_line(e)
