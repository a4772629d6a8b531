"""Loading: sharded checkpoints, the HF cache, meshes, and clear errors for bad checkpoints."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from neurodiff_jax.models import (
    CheckpointError,
    CorruptCheckpointError,
    UnsupportedConfigError,
    batch_sharding,
    jit_forward,
    load_model,
    load_tokenizer,
    make_mesh,
)
from neurodiff_jax.models.safetensors_io import SafetensorsFile, save_file
from tests.models.test_parity import CONFIGS, random_batch
from tests.numerics import assert_close, rounding
from tests.numerics import forward_c


def _rewrite_tensors(path, edit):
  """Applies `edit(dict name -> array)` to model.safetensors in place."""
  file = os.path.join(path, "model.safetensors")
  f = SafetensorsFile(file)
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  del f
  edit(tensors)
  save_file(tensors, file)


@pytest.fixture
def gemma2(hf_checkpoint):
  return hf_checkpoint(CONFIGS["gemma2_gqa_window"]())


def test_sharded_safetensors_index_loads_identically(gemma2, tmp_path):
  hf_model, path = gemma2
  sharded = tmp_path / "sharded"
  hf_model.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(sharded / "model.safetensors.index.json")
  assert len(list(sharded.glob("*.safetensors"))) > 2
  ids, mask = random_batch(hf_model.config.vocab_size)
  a = load_model(path)(jnp.asarray(ids), jnp.asarray(mask)).logits
  b = load_model(str(sharded))(jnp.asarray(ids), jnp.asarray(mask)).logits
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_repo_id_resolves_from_local_hf_cache_without_download(gemma2, tmp_path, monkeypatch):
  _, path = gemma2
  cache = tmp_path / "hub"
  snapshot = cache / "models--acme--tiny-gemma2" / "snapshots" / "0123abcd"
  shutil.copytree(path, snapshot)
  (cache / "models--acme--tiny-gemma2" / "refs").mkdir()
  (cache / "models--acme--tiny-gemma2" / "refs" / "main").write_text("0123abcd")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import huggingface_hub.constants

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  model = load_model("acme/tiny-gemma2")
  assert model.checkpoint.path == str(snapshot)
  with pytest.raises(FileNotFoundError, match="acme/not-cached.*local HF cache"):
    load_model("acme/not-cached")


def test_missing_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no-such-dir"):
    load_model(str(tmp_path / "no-such-dir"))


def test_missing_tensor_is_named(gemma2):
  _, path = gemma2
  _rewrite_tensors(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.2\.mlp\.up_proj\.weight"):
    load_model(path)


def test_unexpected_tensor_is_named(gemma2):
  _, path = gemma2
  _rewrite_tensors(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
    load_model(path)


def test_misshaped_tensor_is_named(gemma2):
  _, path = gemma2
  _rewrite_tensors(path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape \(16, 64\).*\(32, 64\)"):
    load_model(path)


def test_truncated_file_is_reported(gemma2):
  _, path = gemma2
  file = os.path.join(path, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)
  with pytest.raises(CorruptCheckpointError, match="truncated"):
    load_model(path)


def test_unknown_rope_type_names_the_supported_ones(gemma2):
  _, path = gemma2
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                            "original_max_position_embeddings": 64}
  cfg.pop("rope_scaling", None)
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(UnsupportedConfigError, match=r"rope type 'yarn' is not supported.*default, linear, llama3"):
    load_model(path)


def test_unknown_architecture_names_the_supported_ones(gemma2):
  _, path = gemma2
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["model_type"] = "mamba"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(UnsupportedConfigError, match=r"'mamba'.*supported model types: llama, gemma, gemma2"):
    load_model(path)


def test_tokenizer_comes_from_autotokenizer(gemma2, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  _, path = gemma2
  tok = Tokenizer(models.WordLevel({"<pad>": 0, "hello": 1, "world": 2, "<unk>": 3}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
  assert load_tokenizer(path)("hello world")["input_ids"] == [1, 2]


@pytest.mark.parametrize("name", ["gemma2_gqa_window", "gemma_mqa"])
def test_loading_onto_a_2d_mesh_gives_the_same_logits(name, hf_checkpoint):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)"
  config = CONFIGS[name]()
  _, path = hf_checkpoint(config)
  mesh = make_mesh((2, 4), ("data", "model"))
  sharded = load_model(path, mesh=mesh)
  q = sharded.layers[0].attn.w_q[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)  # heads split 4 ways
  assert len({d for s in q.addressable_shards for d in [s.device]}) == 8
  k = sharded.layers[0].attn.w_k[...]
  expect_kv = "model" if config.num_key_value_heads % 4 == 0 else None  # 1 KV head is replicated
  assert k.sharding.spec[1] == expect_kv
  ids, mask = random_batch(config.vocab_size, batch=4)
  ids_s = jax.device_put(jnp.asarray(ids), batch_sharding(mesh))
  mask_s = jax.device_put(jnp.asarray(mask), batch_sharding(mesh))
  out = jit_forward(sharded)(ids_s, mask_s)
  ref = load_model(path)(jnp.asarray(ids), jnp.asarray(mask))
  assert_close(np.asarray(out.logits), np.asarray(ref.logits), c=forward_c(config),
               what=f"{name} logits on a 2x4 mesh equal one device's")


def test_tied_head_stored_as_a_copy_loads_as_the_embedding(hf_checkpoint):
  config = CONFIGS["llama32_tied"]()
  hf_model, path = hf_checkpoint(config)
  _rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  model = load_model(path)
  embed = hf_model.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(model.embed[...]), embed)
  assert not hasattr(model, "lm_head")  # the embedding is the head
  x = np.random.default_rng(0).normal(size=(1, 3, config.hidden_size)).astype(np.float32)
  normed = np.asarray(model.final_norm(jnp.asarray(x)))
  assert_close(np.asarray(model.unembed(jnp.asarray(x))), normed @ embed.T, c=rounding(n=config.hidden_size),
               what="tied head: unembedding is the normed residual times the embedding")


def test_tied_head_that_differs_from_the_embedding_is_an_error(hf_checkpoint):
  config = CONFIGS["llama32_tied"]()
  _, path = hf_checkpoint(config)
  other = lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0})  # noqa: E731
  _rewrite_tensors(path, other)
  # transformers keeps such a stored head (and unties it), so loading it as tied would not match.
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  assert not np.array_equal(hf.lm_head.weight.detach().numpy(), hf.model.embed_tokens.weight.detach().numpy())
  with pytest.raises(CheckpointError, match="differs from the embedding.*tie_word_embeddings"):
    load_model(path)


def test_untied_head_loads_its_own_weights(hf_checkpoint):
  config = CONFIGS["llama3_scaled_untied"]()
  hf_model, path = hf_checkpoint(config)
  model = load_model(path)
  head = hf_model.lm_head.weight.detach().numpy()  # [V, D]
  np.testing.assert_array_equal(np.asarray(model.lm_head[...]), head.T)
  assert not np.allclose(head, hf_model.model.embed_tokens.weight.detach().numpy())


def test_models_and_crosscoder_raise_one_checkpoint_error(tmp_path):
  from neurodiff_jax.crosscoder import checkpoint
  from neurodiff_jax.utils.errors import CheckpointError as shared

  assert CheckpointError is shared and checkpoint.CheckpointError is shared
  with pytest.raises(shared, match="no checkpoint directory"):
    checkpoint.load(tmp_path / "nothing")
