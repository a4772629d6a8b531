"""sparsity.py against numpy: exact k-th largest (ties, zeros, sharded), BatchTopK/TopK masks, θ."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from neurodiff_jax.crosscoder import sharding, sparsity


def _scores(shape, seed, ties=False, zeros=0.0):
  """Non-negative float32 scores; `ties`: few distinct values; `zeros`: that fraction set to 0."""
  rng = np.random.default_rng(seed)
  s = rng.integers(0, 6, shape).astype(np.float32) * 0.25 if ties else rng.exponential(1.0, shape).astype(np.float32)
  s[rng.random(shape) < zeros] = 0.0
  return s


def _kth(s, k, axis=None):
  """numpy reference: the k-th largest along `axis` (None: all)."""
  if axis is None:
    return np.sort(s.ravel())[::-1][k - 1]
  return np.take(-np.sort(-s, axis=axis), k - 1, axis=axis)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 7, 96, 640])
def test_kth_largest_of_all_equals_a_sort(k, ties):
  s = _scores((64, 10), seed=k, ties=ties, zeros=0.3)
  assert float(sparsity.kth_largest(jnp.asarray(s), k)) == _kth(s, k)


def test_kth_largest_is_exact_for_tiny_huge_and_neighbouring_floats():
  base = np.float32(1.5)
  # (Subnormal scores are left out: XLA:CPU flushes them to zero.)
  s = np.array([np.nextafter(base, np.float32(2)), base, np.nextafter(base, np.float32(0)), 2e-38, 3e38, 0.0],
               np.float32)
  for k in range(1, len(s) + 1):
    assert float(sparsity.kth_largest(jnp.asarray(s), k)) == _kth(s, k), k


def test_kth_largest_clamps_negative_scores_to_zero():
  s = np.array([3.0, -1.0, -2.0, 0.5], np.float32)
  assert float(sparsity.kth_largest(jnp.asarray(s), 2)) == 0.5
  assert float(sparsity.kth_largest(jnp.asarray(s), 3)) == 0.0  # a negative score counts as 0


@pytest.mark.parametrize("k", [1, 3, 10])
def test_kth_largest_per_row_equals_a_sort(k):
  s = _scores((33, 10), seed=3, ties=True, zeros=0.2)
  np.testing.assert_array_equal(np.asarray(sparsity.kth_largest(jnp.asarray(s), k, axis=-1)).ravel(),
                                _kth(s, k, axis=-1))


def test_kth_largest_of_a_sharded_array_equals_the_unsharded_one():
  s = _scores((64, 96), seed=5, ties=True, zeros=0.5)
  mesh = sharding.make_mesh(2, 4)
  sharded = jax.device_put(jnp.asarray(s), NamedSharding(mesh, P("data", "latent")))
  k = 4 * 64
  whole = jax.jit(lambda x: sparsity.kth_largest(x, k))(sharded)
  rows = jax.jit(lambda x: sparsity.kth_largest(x, 5, axis=-1))(sharded)
  assert float(whole) == _kth(s, k)
  np.testing.assert_array_equal(np.asarray(rows).ravel(), _kth(s, 5, axis=-1))


def test_kth_largest_inside_shard_map_sums_counts_over_the_named_axis():
  s = _scores((64, 96), seed=6, zeros=0.4)
  mesh = sharding.make_mesh(8, 1)
  k = 3 * 64
  fn = jax.shard_map(functools.partial(sparsity.kth_largest, k=k, axis_name="data"), mesh=mesh,
                     in_specs=P("data"), out_specs=P())
  assert float(jax.jit(fn)(jnp.asarray(s))) == _kth(s, k)
  # Without the axis name each shard would find its own 192nd largest of 8 × 96 scores: a different value.
  local = _kth(s[:8], k)
  assert local != _kth(s, k)


def _batch_topk_reference(s, k):
  cut = _kth(s, k * s.shape[0])
  return (s >= cut) & (s > 0), cut


@pytest.mark.parametrize("ties", [False, True])
def test_batch_topk_mask_keeps_the_kB_largest_and_every_tie(ties):
  s = _scores((32, 50), seed=7, ties=ties, zeros=0.2)
  k = 4
  mask, cut = sparsity.batch_topk_mask(jnp.asarray(s), k)
  ref, ref_cut = _batch_topk_reference(s, k)
  np.testing.assert_array_equal(np.asarray(mask), ref)
  assert float(cut) == ref_cut
  if ties:
    assert ref.sum() > k * 32  # ties at the cut-off are all kept
  else:
    assert ref.sum() == k * 32


def test_batch_topk_mask_with_fewer_positive_scores_than_kB_keeps_them_all():
  s = _scores((16, 40), seed=8, zeros=0.97)
  k = 8
  assert (s > 0).sum() < k * 16
  mask, cut = sparsity.batch_topk_mask(jnp.asarray(s), k)
  assert float(cut) == 0.0
  np.testing.assert_array_equal(np.asarray(mask), s > 0)


def _topk_reference(s, k):
  cut = _kth(s, k, axis=-1)[:, None]
  return (s >= cut) & (s > 0)


@pytest.mark.parametrize("method", ["bisect", "top_k"])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_mask_keeps_each_tokens_k_largest(method, ties):
  s = _scores((40, 30), seed=9, ties=ties, zeros=0.5)
  s[:4, 3:] = 0.0  # rows with at most 3 positive scores
  k = 5
  mask = np.asarray(sparsity.topk_mask(jnp.asarray(s), k, method))
  ref = _topk_reference(s, k)
  np.testing.assert_array_equal(mask, ref)
  counts = ref.sum(1)
  assert (counts <= k).all() if not ties else (counts > k).any()  # ties at the k-th score are all kept
  assert (counts < k).any()  # rows with fewer than k positive scores keep just those


def test_topk_mask_rejects_an_unknown_method():
  with pytest.raises(ValueError, match="unknown TopK method 'sort'.*'bisect' or 'top_k'"):
    sparsity.topk_mask(jnp.ones((2, 4)), 2, "sort")


def test_threshold_mask_is_strictly_above_theta():
  s = np.array([[0.0, 0.5, 1.0, 1.5]], np.float32)
  np.testing.assert_array_equal(np.asarray(sparsity.threshold_mask(jnp.asarray(s), jnp.float32(1.0))),
                                [[False, False, False, True]])


def test_update_threshold_is_a_running_average_of_positive_cuts_from_the_first_one():
  cuts = [0.0, 0.0, 2.0, 4.0, 0.0, -1.0, 1.0, 3.0]
  momentum = 0.75
  theta, ref = jnp.float32(0.0), 0.0
  fn = jax.jit(sparsity.update_threshold, static_argnums=2)
  # Every value here (cuts, 0.75, 0.25 and each average) is a short binary fraction: float32 holds it
  # and computes it exactly, so θ equals the reference exactly.
  for c in cuts:
    theta = fn(theta, jnp.float32(c), momentum)
    if c > 0:
      ref = c if ref <= 0 else momentum * ref + (1 - momentum) * c
    assert float(theta) == ref, (c, float(theta), ref)
  # 0, 0 (nothing yet), 2 (the first cut), 2.5, 2.5, 2.5 (skipped), 2.125, 2.34375
  assert float(theta) == 2.34375
