"""Harvest: stored activations equal `transformers` hidden states; metadata, manifest and statistics are right."""

import json

import numpy as np
import pytest
import torch
import transformers

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, DatasetSpec, tokenize_corpus
from neurodiff_jax.activations.harvest import harvest, pack_rows, row_buckets
from neurodiff_jax.activations.store import ActivationStore, StoreError
from neurodiff_jax.models import load_tokenizer
from tests.activations.conftest import check_statistics
from tests.numerics import assert_close, rounding


def _hf_hidden(path, ids, layers):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
  with torch.no_grad():
    out = model(torch.tensor(ids)[None], output_hidden_states=True)
  return {l: out.hidden_states[l + 1][0].numpy() for l in layers}


def test_harvest_matches_transformers(harvest_config):
  c = harvest_config
  c.dtype = "float32"  # exact comparison; bf16 storage is checked below
  store = harvest(c)
  m = store.manifest
  assert m["complete"] and m["layers"] == [0, 1] and m["d_model"] == 64 and m["dtype"] == "float32"
  assert [x["role"] for x in m["models"]] == ["base", "finetuned"]
  assert m["models"][0]["fingerprint"] != m["models"][1]["fingerprint"]

  tok = load_tokenizer(c.base_model)
  corpus = tokenize_corpus(tok, [DatasetSpec.from_config(d) for d in c.datasets], max_length=c.seq_len)
  # BOS is dropped: every document contributes len - 1 tokens, in order.
  assert m["num_tokens"] == sum(len(ids) - 1 for ids in corpus.ids) == store.layout.num_tokens
  assert store.layout.num_units > 3  # several units, so the tests below exercise unit boundaries
  token_id, doc_index = store.metadata("token_id"), store.metadata("doc_index")
  position, kind = store.metadata("position"), store.metadata("token_kind")
  np.testing.assert_array_equal(token_id, np.concatenate([ids[1:] for ids in corpus.ids]))
  np.testing.assert_array_equal(doc_index,
                                np.concatenate([np.full(len(ids) - 1, i) for i, ids in enumerate(corpus.ids)]))
  np.testing.assert_array_equal(position, np.concatenate([np.arange(1, len(ids)) for ids in corpus.ids]))
  np.testing.assert_array_equal(kind, np.concatenate([k[1:] for k in corpus.kinds]))
  n_text = corpus.datasets[0]["documents"]
  template = kind == KIND_TEMPLATE
  assert template[doc_index < n_text].sum() == 0 and template[doc_index >= n_text].sum() > 0

  # Activations of documents across the store (including ones that straddle unit boundaries).
  bounds = [store.layout.unit_range(u)[0] for u in range(store.layout.num_units)]
  straddling = sorted({int(doc_index[b]) for b in bounds[1:] if doc_index[b] == doc_index[b - 1]})
  assert straddling
  docs = straddling[:2] + [0, len(corpus.ids) - 1]
  starts = np.searchsorted(doc_index, np.arange(len(corpus.ids)))
  # float32 forwards of two implementations: sums of at most max(d, d_ff) terms, one stage a block.
  hf = transformers.AutoConfig.from_pretrained(c.base_model)
  for i, path in enumerate((c.base_model, c.finetuned_model)):
    for d in docs:
      ref = _hf_hidden(path, corpus.ids[d], c.layers)
      lo = int(starts[d])
      for l in c.layers:
        got = store.read(l, lo, lo + len(corpus.ids[d]) - 1)[:, i]
        assert_close(got, ref[l][1:], c=rounding(n=max(hf.hidden_size, hf.intermediate_size), depth=l + 1),
                     what=f"stored layer {l} activations equal transformers' hidden states",
                     err_msg=f"model {i} doc {d}")

  # The store's statistics (merged from the units) equal numpy over the stored arrays.
  for l in c.layers:
    x = store.read(l, 0, store.layout.num_tokens).astype(np.float64)
    check_statistics(store, l, x, np.linalg.norm(x, axis=-1), f"harvested layer {l}")


def test_bf16_store_and_keep_bos(harvest_config, tmp_path):
  c = harvest_config
  ref = harvest(c)  # default: bfloat16
  assert ref.layer(1).dtype.name == "bfloat16"
  c.dtype, c.out_dir = "float32", str(tmp_path / "f32")
  f32 = harvest(c)
  a = ref.read(1, 0, ref.layout.num_tokens).astype(np.float32)
  b = f32.read(1, 0, f32.layout.num_tokens)
  np.testing.assert_array_equal(a, b.astype(ref.layer(1).dtype.numpy_dtype).astype(np.float32))  # round to nearest
  c.keep_bos, c.out_dir = True, str(tmp_path / "bos")
  bos = harvest(c)
  assert bos.layout.num_tokens == ref.layout.num_tokens + ref.manifest["num_documents"]
  assert (bos.metadata("position") == 0).sum() == ref.manifest["num_documents"]
  assert (bos.metadata("token_kind")[bos.metadata("position") == 0] == KIND_SPECIAL).all()  # BOS is special


def test_rerun_of_a_complete_store_is_a_no_op_and_other_config_is_an_error(harvest_config):
  c = harvest_config
  store = harvest(c)
  before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()}
  harvest(c)
  assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*") if p.is_file()} == before
  c.layers = (1,)
  with pytest.raises(StoreError, match="another config.*layers"):
    harvest(c)
  assert json.loads((store.root / "manifest.json").read_text())["layers"] == [0, 1]
  ActivationStore.open(store.root)  # still intact


def test_packing_places_every_document_once_within_its_row():
  lengths = np.random.default_rng(0).integers(2, 65, 300).tolist()
  rows = pack_rows(lengths, 64)
  assert sorted(i for r in rows for i in r) == list(range(300))
  assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
  assert len(rows) <= -(-sum(lengths) // 64) * 1.1  # near the bound: little padding
  with pytest.raises(ValueError, match="does not fit a row of 64"):
    pack_rows([65], 64)
  assert row_buckets(16) == [1, 2, 4, 8, 16] and row_buckets(12) == [1, 2, 4, 8, 12] and row_buckets(1) == [1]
