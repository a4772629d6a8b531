"""Reader: the Grain source returns the stored tokens; shuffled batches are exact permutations and resume exactly."""

import collections

import numpy as np
import pytest

from neurodiff_jax.activations.harvest import harvest
from neurodiff_jax.activations.reader import ActivationSource, batch_dataset, batch_iterator
from neurodiff_jax.activations.store import StoreError
from tests.numerics import assert_close, rounding


@pytest.fixture(scope="module")
def store(model_pair, tmp_path_factory):
  from configs.harvest_tiny import get_config

  base, ft, data = model_pair
  c = get_config("small")
  c.base_model, c.finetuned_model = base, ft
  c.datasets = [str(data / "text.jsonl"), str(data / "chat.jsonl")]
  c.layers, c.seq_len, c.batch_size = (1,), 48, 8
  c.shard_tokens, c.chunk_tokens = 512, 32
  c.dtype = "float32"  # rows are unique floats: a batch row identifies its token
  c.out_dir = str(tmp_path_factory.mktemp("reader") / "store")
  return harvest(c)


def _token_of(rows, all_rows):
  """Index in the store of each row (-1 for rows that occur several times: equal prefixes give equal activations)."""
  counts = collections.Counter(r.tobytes() for r in all_rows)
  lookup = {r.tobytes(): i for i, r in enumerate(all_rows)}
  return np.array([lookup[r.tobytes()] if counts[r.tobytes()] == 1 else -1 for r in rows])


def _within(rows, all_rows):
  """Whether every row occurs at most as often as it does in the store (a sample without replacement)."""
  have = collections.Counter(r.tobytes() for r in all_rows)
  want = collections.Counter(r.tobytes() for r in rows)
  return all(have[k] >= v for k, v in want.items())


def test_source_reads_what_is_stored(store):
  src = ActivationSource(store, 1)
  everything = store.read(1, 0, len(src))
  assert len(src) == store.layout.num_tokens
  np.testing.assert_array_equal(src[5], everything[5])
  np.testing.assert_array_equal(src[-1], everything[-1])
  idx = [len(src) - 1, 3, 700, 3, 41]
  np.testing.assert_array_equal(src.__getitems__(idx), everything[idx])
  np.testing.assert_array_equal(src.read_range(100, 130), everything[100:130])
  with pytest.raises(IndexError):
    src[len(src)]
  with pytest.raises(StoreError, match="harvested layers: \\[1\\]"):
    ActivationSource(store, 0)


def test_each_epoch_is_a_permutation_and_epochs_differ(store):
  everything = store.read(1, 0, store.layout.num_tokens)
  ds = batch_dataset(store, 1, 64, seed=3, window_tokens=1024, num_epochs=2)
  n = len(ds) // 2
  rows = [np.concatenate([ds[e * n + j] for j in range(n)]) for e in range(2)]
  epochs = [_token_of(r, everything) for r in rows]
  for r, tokens in zip(rows, epochs):
    assert _within(r, everything)  # no token twice in an epoch
    unique = tokens[tokens >= 0]
    assert len(set(unique)) == len(unique) and len(unique) > 0.5 * len(tokens)
    assert len(tokens) >= 0.85 * store.layout.num_tokens  # only window remainders are dropped
  assert not np.array_equal(epochs[0][:64], epochs[1][:64])
  # Shuffled across the store: consecutive rows of a batch are not neighbours in the store.
  first = epochs[0][:64][epochs[0][:64] >= 0]
  assert np.mean(np.abs(np.diff(first)) == 1) < 0.1 and np.ptp(first) > store.layout.num_tokens // 4
  # Deterministic: the same seed gives the same stream; another seed another.
  again = batch_dataset(store, 1, 64, seed=3, window_tokens=1024, num_epochs=2)
  np.testing.assert_array_equal(again[7], ds[7])
  assert not np.array_equal(batch_dataset(store, 1, 64, seed=4, window_tokens=1024)[7], ds[7])


def test_iterator_state_restores_exactly(store):
  ds = batch_dataset(store, 1, 256, seed=0, window_tokens=1024)
  it = batch_iterator(ds, prefetch=3, num_threads=2)
  for _ in range(11):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(30)]  # crosses window and epoch boundaries
  resumed = batch_iterator(batch_dataset(store, 1, 256, seed=0, window_tokens=1024), prefetch=3)
  resumed.set_state(state)
  for a in expected:
    np.testing.assert_array_equal(next(resumed), a)
  assert 41 > len(batch_dataset(store, 1, 256, seed=0, window_tokens=1024, num_epochs=1))  # ran into epoch 2


def test_processes_read_disjoint_tokens_and_normalisation(store):
  everything = store.read(1, 0, store.layout.num_tokens)
  seen = []
  for p in range(2):
    ds = batch_dataset(store, 1, 32, seed=1, window_tokens=512, num_epochs=1, process_index=p, process_count=2)
    seen.append(np.concatenate([ds[j] for j in range(len(ds))]))
  assert len(seen[0]) == len(seen[1]) > 0  # lock-step: every process gets the same number of batches
  assert _within(np.concatenate(seen), everything)  # together, still no token twice
  assert len(seen[0]) + len(seen[1]) > 0.8 * len(everything)
  norm = batch_dataset(store, 1, 32, seed=1, window_tokens=512, normalize=True)[0]
  raw = batch_dataset(store, 1, 32, seed=1, window_tokens=512)[0]
  want = raw * store.norm_scale(1)[None, :, None]  # one float32 product each: elementwise
  assert_close(norm, want, c=rounding(), scale=np.abs(want), what="normalised batch is the raw batch · norm_scale")
  bf16 = batch_dataset(store, 1, 32, seed=1, window_tokens=512, dtype="bfloat16")[0]
  assert bf16.dtype.name == "bfloat16"
  with pytest.raises(ValueError, match="smaller than batch_size"):
    batch_dataset(store, 1, 4096, window_tokens=512)


def test_fast_bf16_widening_is_bit_exact():
  import ml_dtypes

  from neurodiff_jax.activations.reader import to_dtype

  x = np.random.default_rng(0).standard_normal((64, 2, 16)).astype(ml_dtypes.bfloat16)
  x[0, 0, :4] = [np.inf, -np.inf, np.nan, -0.0]
  x[1, 0, 0] = np.float32(1e-40)  # subnormal
  np.testing.assert_array_equal(to_dtype(x, np.float32).view(np.uint32), x.astype(np.float32).view(np.uint32))
  assert to_dtype(x, ml_dtypes.bfloat16) is not x and to_dtype(x, ml_dtypes.bfloat16).dtype == x.dtype


def test_direct_shard_reads_equal_tensorstore_reads(store):
  from neurodiff_jax.activations.chunks import ChunkFiles

  files = ChunkFiles.open(store.root / "layer_01")
  assert files is not None  # the store's own layout takes the direct path
  lay = store.layout
  out = np.empty((3 * lay.chunk_tokens, lay.num_models, lay.d_model), np.float32)
  first = lay.shard_tokens // lay.chunk_tokens + 2  # inside the second shard
  files.read_run(first, 3, out)
  np.testing.assert_array_equal(out, store.read(1, first * lay.chunk_tokens, (first + 3) * lay.chunk_tokens))
  with pytest.raises(ValueError, match="cross a shard boundary"):
    files.read_run(lay.shard_tokens // lay.chunk_tokens - 1, 2, np.empty_like(out[:2 * lay.chunk_tokens]))
  # The batch stream is the same whichever way the windows are read.
  for i in (0, 5, 13):
    np.testing.assert_array_equal(batch_dataset(store, 1, 64, seed=2, window_tokens=1024)[i],
                                  batch_dataset(store, 1, 64, seed=2, window_tokens=1024, direct=False)[i])
  assert ChunkFiles.open(store.root / "token_id") is not None and ChunkFiles.open(store.root / "nope") is None


def test_corrupt_chunk_in_a_window_is_an_error_naming_the_unit(store, tmp_path):
  import shutil

  from neurodiff_jax.activations.store import ActivationStore

  root = tmp_path / "store"
  shutil.copytree(store.root, root)
  shard = root / "layer_01" / "c" / "1" / "0" / "0"
  data = bytearray(shard.read_bytes())
  data[5000] ^= 0x01  # one bit of one activation in chunk 0 of unit 1
  shard.write_bytes(bytes(data))
  copy = ActivationStore.open(root)
  for direct in (True, False):
    ds = batch_dataset(copy, 1, 32, seed=0, window_tokens=256, num_epochs=1, direct=direct)
    with pytest.raises(StoreError, match=r"corrupt or missing: delete progress/unit_000001.json"):
      for i in range(len(ds)):
        ds[i]
  shard.write_bytes(bytes(data[:-10]))  # a truncated shard index
  with pytest.raises(StoreError, match="unit_000001"):
    ds = batch_dataset(ActivationStore.open(root), 1, 32, seed=0, window_tokens=256, num_epochs=1)
    for i in range(len(ds)):
      ds[i]


def test_batch_tokens_name_the_store_rows_of_a_batch(store):
  from neurodiff_jax.activations.reader import windowed_batches

  batches = windowed_batches(store, 1, 64, seed=5, window_tokens=1024)
  everything = store.read(1, 0, store.layout.num_tokens)
  for e in (0, 3, batches.batches_per_epoch + 2):  # a later epoch too
    np.testing.assert_array_equal(batches(e), everything[batches.tokens(e)])
