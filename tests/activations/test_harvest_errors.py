"""Bad input to the harvest and the reader: clear errors, and the store stays resumable."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from neurodiff_jax.activations import harvest as harvest_module
from neurodiff_jax.activations.harvest import DiskFullError, NonFiniteActivationError, harvest
from neurodiff_jax.activations.reader import ActivationSource
from neurodiff_jax.activations.store import ActivationStore, StoreError
from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer
from tests.activations.conftest import write_jsonl


def _variant(src, dst, **overrides):
  """A copy of checkpoint `src` with config overrides (random weights) and the same tokenizer."""
  tok = transformers.AutoTokenizer.from_pretrained(src)
  config = transformers.AutoConfig.from_pretrained(src)
  for k, v in overrides.items():
    setattr(config, k, v)
  torch.manual_seed(1)
  transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(dst)
  tok.save_pretrained(dst)
  return str(dst)


def test_mismatched_tokenizers_name_the_first_differing_token(harvest_config, tmp_path):
  c = harvest_config
  other = train_bpe_tokenizer(["completely different words about zebras and quartz"] * 50, 300)
  shutil.copytree(c.finetuned_model, tmp_path / "ft")
  for f in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / "ft" / f).unlink()
  other.save_pretrained(tmp_path / "ft")
  c.finetuned_model = str(tmp_path / "ft")
  with pytest.raises(ValueError, match=r"differ at id \d+: base '.*' vs fine-tuned '.*'"):
    harvest(c)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_named(harvest_config, tmp_path):
  c = harvest_config
  vocab = transformers.AutoConfig.from_pretrained(c.base_model).vocab_size
  small = vocab // 4  # both checkpoints keep the (same) tokenizer, whose ids reach past this
  c.base_model = _variant(c.base_model, tmp_path / "b", vocab_size=small)
  c.finetuned_model = _variant(c.finetuned_model, tmp_path / "f", vocab_size=small)
  with pytest.raises(ValueError, match=rf"produced token id \d+, but the base model .* has vocab_size={small}: the "
                                       "tokenizer does not belong to the model"):
    harvest(c)


def test_mismatched_hidden_sizes(harvest_config, tmp_path):
  c = harvest_config
  c.finetuned_model = _variant(c.base_model, tmp_path / "wide", hidden_size=96, head_dim=16)
  with pytest.raises(ValueError, match="hidden sizes differ.*d=64.*d=96"):
    harvest(c)


def test_layer_out_of_range(harvest_config):
  harvest_config.layers = (0, 3)
  with pytest.raises(ValueError, match=r"layers \[0, 3\] out of range for the base model \(3 layers"):
    harvest(harvest_config)


def test_nan_activations_stop_naming_document_and_layer_and_the_store_resumes(harvest_config, tmp_path):
  c = harvest_config
  bad = tmp_path / "nan"
  shutil.copytree(c.finetuned_model, bad)
  from neurodiff_jax.models.safetensors_io import SafetensorsFile, save_file

  f = SafetensorsFile(str(bad / "model.safetensors"))
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  del f
  tensors["model.layers.1.mlp.down_proj.weight"][:] = np.nan
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  c.finetuned_model = str(bad)
  with pytest.raises(NonFiniteActivationError, match=r"document 0 \(document 0 of .*text.jsonl\) at layer 1 of the "
                                                     r"finetuned model"):
    harvest(c)
  manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
  assert not manifest["complete"]
  with pytest.raises(StoreError, match="incomplete: 0/"):
    ActivationStore.open(tmp_path / "store")


def test_full_disk_stops_cleanly_and_the_rerun_finishes(harvest_config, monkeypatch, tmp_path):
  c = harvest_config
  real = shutil.disk_usage
  calls = []

  def fake(path):
    calls.append(path)
    usage = real(path)
    return usage._replace(free=0) if len(calls) > 3 else usage

  monkeypatch.setattr(harvest_module.shutil, "disk_usage", fake)
  with pytest.raises(DiskFullError, match="GiB free but the next unit needs .* run the same command again"):
    harvest(c)
  done = len(list((tmp_path / "store" / "progress").glob("unit_*.json")))
  assert done == 3  # the units before the full disk are kept
  monkeypatch.setattr(harvest_module.shutil, "disk_usage", real)
  store = harvest(c)
  assert store.manifest["complete"]


def test_empty_dataset_and_short_document(harvest_config, tmp_path):
  c = harvest_config
  c.datasets = [write_jsonl(tmp_path / "empty.jsonl", [])]
  with pytest.raises(ValueError, match="empty"):
    harvest(c)
  c.datasets = [write_jsonl(tmp_path / "short.jsonl", [{"text": "The river runs."}, {"text": ""}])]
  with pytest.raises(ValueError, match=r"short.jsonl.*row 1.*skip_short"):
    harvest(c)
  c.skip_short = True
  store = harvest(c)
  assert store.manifest["num_documents"] == 1 and store.manifest["skipped_short_documents"] == 1


def test_corrupt_shard_is_an_error_naming_the_unit(harvest_config):
  store = harvest(harvest_config)
  shard = next((store.root / "layer_01").rglob("c/1/*/*"))
  data = bytearray(shard.read_bytes())
  data[100] ^= 0xFF
  shard.write_bytes(bytes(data))
  src = ActivationSource(ActivationStore.open(store.root), 1)
  with pytest.raises(StoreError, match=r"corrupt or missing: delete progress/unit_000001.json"):
    src.read_range(store.layout.shard_tokens, store.layout.shard_tokens + 10)
  np.testing.assert_array_equal(src.read_range(0, 10), store.read(1, 0, 10).astype(np.float32))  # others still read
