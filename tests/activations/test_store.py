"""The store's statistics, layer look-ups and token kinds, on a store written from arrays (no models needed)."""

import json

import numpy as np
import pytest

from neurodiff_jax.activations import datasets, store as store_lib
from neurodiff_jax.activations.reader import ActivationSource, windowed_batches
from neurodiff_jax.activations.store import ActivationStore, StoreError, write_arrays
from neurodiff_jax.utils import files
from tests.activations.conftest import check_statistics
from tests.numerics import assert_close, rounding


@pytest.fixture
def arrays():
  rng = np.random.default_rng(0)
  # Two layers, models of different scale and offset, so that every statistic differs per model.
  x3 = (rng.normal(size=(3000, 2, 16)) * np.array([0.5, 4.0])[None, :, None] + np.array([1.0, -2.0])[None, :, None])
  x7 = rng.standard_exponential((3000, 2, 16))
  return {3: x3.astype(np.float32), 7: x7.astype(np.float32)}


def test_statistics_equal_numpy_over_the_arrays(arrays, tmp_path):
  store = write_arrays(tmp_path / "s", arrays, roles=("base", "chat"), shard_tokens=512, chunk_tokens=64)
  assert store.layers == (3, 7) and store.roles == ("base", "chat")
  assert store.layout.num_units == 6  # statistics merged over several units
  for layer, x in arrays.items():
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=-1)  # [n, M]
    check_statistics(store, layer, x, norms, f"layer {layer}")
    scale = store.norm_scale(layer)
    assert scale.dtype == np.float32 and scale.shape == (2,)
    # What the scale is for: after it, each model's mean norm is √d (the float32 scale's rounding and the norms').
    assert_close(np.linalg.norm(x * scale[None, :, None], axis=-1).mean(0), 4.0, c=rounding(n=x.shape[-1], depth=2),
                 what=f"layer {layer}: after norm_scale each model's mean norm is √d")
  assert store.mean(3).shape == (2, 16) and store.mean(3).dtype == np.float32
  # Reopened from disk, the same numbers.
  again = ActivationStore.open(store.root)
  np.testing.assert_array_equal(again.norm_scale(7), store.norm_scale(7))


def test_a_layer_missing_from_the_store_is_an_error_listing_its_layers(arrays, tmp_path):
  store = write_arrays(tmp_path / "s", arrays, shard_tokens=512, chunk_tokens=64)
  expect = r"layer 13 was not harvested into .*; harvested layers: \[3, 7\]"
  for call in (store.mean, store.norm_scale, store.mean_norm, store.rms_norm, store.layer,
               lambda l: store.read(l, 0, 4), lambda l: ActivationSource(store, l),
               lambda l: windowed_batches(store, l, 64, process_index=0, process_count=1)):
    with pytest.raises(StoreError, match=expect):
      call(13)


def test_an_incomplete_store_has_no_statistics_and_says_how_to_finish_it(arrays, tmp_path):
  store = write_arrays(tmp_path / "s", arrays, shard_tokens=512, chunk_tokens=64)
  path = store.root / "manifest.json"
  manifest = json.loads(path.read_text())
  manifest.pop("stats")
  manifest["complete"] = False
  path.write_text(json.dumps(manifest))
  partial = ActivationStore.open(store.root, require_complete=False)
  with pytest.raises(StoreError, match="no statistics yet: it is incomplete.*harvest command again"):
    partial.norm_scale(3)


def test_token_kinds_have_one_definition():
  assert store_lib.TOKEN_KINDS == {datasets.KIND_TEXT: "text", datasets.KIND_SPECIAL: "special",
                                   datasets.KIND_TEMPLATE: "chat_template"}
  assert sorted(store_lib.TOKEN_KINDS) == [0, 1, 2]  # the codes stored in token_kind (uint8)
  assert store_lib.atomic_write_json is files.atomic_write_json
