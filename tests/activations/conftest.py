"""A tiny base / fine-tuned pair built with `transformers`, and small datasets, for harvest tests."""

import json

import numpy as np
import pytest

from tests.numerics import assert_close, rounding


def write_jsonl(path, rows):
  """Writes rows as JSON lines; returns the path as a string."""
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def check_statistics(store, layer, x, norms, where):
  """The store's statistics of `layer` against numpy over its float64 copy `x` [n, M, d] (norms [n, M]).

  The store squares and sums each token's d values in float32 and accumulates everything else in
  float64: the mean is one float32 rounding of a float64 mean (a mean of signed values, so its scale
  is the mean |x|); the norms carry the rounding of a sum of d squares, and the scale 'sqrt(d) / mean
  norm' one more. Norms and their ratio cannot cancel: each model's own value is its scale.
  """
  d = x.shape[-1]
  assert_close(store.mean(layer), x.mean(0), c=rounding(), scale=np.abs(x).mean(0),
               what=f"{where}: store mean equals numpy's")
  ref = norms.mean(0)
  assert_close(store.mean_norm(layer), ref, c=rounding(n=d), scale=ref, what=f"{where}: store mean norm equals numpy's")
  ref = np.sqrt((norms ** 2).mean(0))
  assert_close(store.rms_norm(layer), ref, c=rounding(n=d), scale=ref, what=f"{where}: store RMS norm equals numpy's")
  ref = np.sqrt(d) / norms.mean(0)
  assert_close(store.norm_scale(layer), ref, c=rounding(n=d, depth=2), scale=ref,
               what=f"{where}: norm_scale is √d / mean norm")


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory):
  """(base_dir, finetuned_dir, data_dir): random Gemma 2 (3 layers) and a perturbed copy, one tokenizer."""
  import torch
  import transformers

  from neurodiff_jax.organisms.corpus import generate_documents
  from neurodiff_jax.organisms.finetune_data import chat_conversations
  from neurodiff_jax.organisms.random_model import hf_config_for
  from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer

  root = tmp_path_factory.mktemp("pair")
  docs = generate_documents(160, 3)
  tok = train_bpe_tokenizer(docs, 512)
  config = hf_config_for("gemma2", len(tok), num_hidden_layers=3, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  base.save_pretrained(root / "base")
  with torch.no_grad():  # the "fine-tune": small changes to every weight, as fine-tuning makes
    for p in base.parameters():
      p.add_(0.05 * torch.randn_like(p) * p.std())
  base.save_pretrained(root / "finetuned")
  for d in ("base", "finetuned"):
    tok.save_pretrained(root / d)
  data = root / "data"
  data.mkdir()
  write_jsonl(data / "text.jsonl", [{"text": t} for t in docs[:60]])
  write_jsonl(data / "chat.jsonl", [{"messages": m} for m in chat_conversations(40, 5)])
  return str(root / "base"), str(root / "finetuned"), data


@pytest.fixture
def harvest_config(model_pair, tmp_path):
  """A harvest config over the tiny pair, writing to tmp_path/store."""
  from configs.harvest_tiny import get_config

  base, ft, data = model_pair
  c = get_config("small")
  c.base_model, c.finetuned_model = base, ft
  c.datasets = [str(data / "text.jsonl"), str(data / "chat.jsonl")]
  c.layers = (0, 1)  # HF hidden_states of the last layer are after the final norm: not a reference
  c.out_dir = str(tmp_path / "store")
  c.seq_len = 48
  c.batch_size = 8
  c.shard_tokens = 512
  c.chunk_tokens = 64
  return c
