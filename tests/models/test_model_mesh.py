"""A model mesh (`model_mesh`): parameters really split, generation token for token, memory exact, errors named.

On 8 forced CPU devices (tests/conftest.py) with meshes (1, 8), (2, 4) and (8, 1) against the same model
on one device. The tiny Gemma 2 has 4 heads, 2 KV heads, an MLP of 128 and a vocabulary of 512: (1, 8)
splits the MLP and vocabulary but replicates attention (4 heads do not split 8 ways), (2, 4) splits
heads, KV heads, MLP and vocabulary 4 ways, (8, 1) only the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from neurodiff_jax.models import load_model, model_config
from neurodiff_jax.models.generate import GreedyGenerator, greedy_generate
from neurodiff_jax.models.memory import (
    activation_bytes_per_device,
    gemma2_config,
    pair_bytes_per_device,
    weight_bytes_per_device,
)
from neurodiff_jax.models.sharding import check_mesh_shape, make_mesh, mesh_of, model_mesh
from neurodiff_jax.utils.config import ConfigError

MESHES = [(1, 8), (2, 4), (8, 1)]
PROMPTS = [[1, 5, 7, 9, 11], [1, 3, 4], [1, 8, 8, 8, 2, 6], [1, 2]]  # 4 rows: split 2 ways on (2, 4), whole on (8, 1)


@pytest.fixture(scope="module")
def sharded(random_gemma2):
  """{mesh shape: the tiny Gemma 2 loaded onto that model mesh}."""
  assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)"
  cfg = model_config(random_gemma2)
  return {shape: load_model(random_gemma2, mesh=model_mesh(shape, [cfg])) for shape in MESHES}


def _params(model) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_parameters_are_split_over_the_model_axis(sharded, random_gemma2_model):
  m = sharded[(2, 4)]
  assert mesh_of(m) is not None and dict(mesh_of(m).shape) == {"data": 2, "model": 4}
  checks = {"w_q": (m.layers[0].attn.w_q[...], P(None, "model", None)),  # 4 heads, one per device of a row
            "w_k": (m.layers[0].attn.w_k[...], P(None, None, None)),  # 2 KV heads on 4: replicated, not refused
            "w_up": (m.layers[0].mlp.w_up[...], P(None, "model")),
            "w_down": (m.layers[0].mlp.w_down[...], P("model", None)),
            "embed": (m.embed[...], P("model", None))}
  for name, (w, spec) in checks.items():
    assert w.sharding.spec == spec, name
    assert len(w.addressable_shards) == 8, name
    split = 4 if "model" in spec else 1
    for shard in w.addressable_shards:
      assert shard.data.nbytes * split == w.nbytes, f"{name}: a device holds 1/{split} of it"
  # The values are the one-device model's, split: gather them back.
  np.testing.assert_array_equal(np.asarray(m.layers[0].mlp.w_up[...]),
                                np.asarray(random_gemma2_model.layers[0].mlp.w_up[...]))
  m8 = sharded[(1, 8)]
  assert m8.layers[0].attn.w_q[...].sharding.spec == P(None, None, None)  # 4 heads do not split 8 ways
  assert m8.layers[0].mlp.w_up[...].sharding.spec == P(None, "model")


def _steer(d: int) -> dict:
  """An addition after block 1 (an intervention closing over a replicated vector)."""
  v = jnp.asarray(np.random.default_rng(0).normal(size=(d,)).astype(np.float32))
  return {1: lambda x: x + v.astype(x.dtype)}


ADD = np.random.default_rng(1).normal(size=(len(PROMPTS), 64)).astype(np.float32)  # [B, d] of the tiny Gemma 2


@pytest.fixture(scope="module")
def generated(random_gemma2_model):
  """One device's tokens: greedy, greedy steered by `_steer`, and GreedyGenerator with ADD after block 2."""
  m = random_gemma2_model
  return (greedy_generate(m, PROMPTS, 6), greedy_generate(m, PROMPTS, 6, interventions=_steer(m.cfg.hidden_size)),
          GreedyGenerator(m, bucket=4)(PROMPTS, 6, add=ADD, layer=2))


@pytest.mark.parametrize("shape", MESHES)
def test_greedy_generation_equals_one_device_token_for_token(shape, sharded, generated):
  m = sharded[shape]
  plain, steered, added = generated
  assert greedy_generate(m, PROMPTS, 6) == plain
  assert greedy_generate(m, PROMPTS, 6, interventions=_steer(m.cfg.hidden_size)) == steered
  assert GreedyGenerator(m, bucket=4)(PROMPTS, 6, add=ADD, layer=2) == added
  assert len({tuple(r) for r in plain}) > 1  # not a degenerate model that says one thing to every prompt


@pytest.mark.parametrize("shape", MESHES)
def test_weight_bytes_per_device_equal_the_shards_each_device_holds(shape, sharded):
  m = sharded[shape]
  held: dict = {}
  for x in _params(m):
    for s in x.addressable_shards:
      held[s.device] = held.get(s.device, 0) + s.data.nbytes
  assert len(held) == 8
  want = weight_bytes_per_device(m.cfg, shape, jnp.float32)
  assert set(held.values()) == {want}, f"{shape}: every device holds exactly the computed bytes"
  one = weight_bytes_per_device(m.cfg, (), jnp.float32)
  assert one == sum(x.nbytes for x in _params(m))  # one device: the whole model
  assert pair_bytes_per_device(m.cfg, shape, jnp.float32).weights == 2 * want


def test_gemma2_presets_have_the_published_sizes():
  # Published parameter counts: 2.61B, 9.24B, 27.2B. One device holds all of both models: 2 × params × 2 B in bf16.
  for size, billions in (("2b", 2.614), ("9b", 9.242), ("27b", 27.227)):
    cfg = gemma2_config(size)
    assert round(cfg.num_params / 1e9, 3) == billions, size
  cfg = gemma2_config("2b")
  assert pair_bytes_per_device(cfg, (1, 1)).weights == 2 * 2 * cfg.num_params
  # (1, 8): everything of the 2B splits 8 ways (8 heads, 4 KV heads replicated, MLP 9216, vocabulary 256000)
  # except the KV projections and the norms.
  kv = cfg.num_layers * 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
  norms = cfg.num_layers * 4 * cfg.hidden_size + cfg.hidden_size
  assert weight_bytes_per_device(cfg, (1, 8), "bfloat16") == 2 * ((cfg.num_params - kv - norms) // 8 + kv + norms)


def test_activation_estimate_splits_with_the_mesh(random_gemma2_model):
  cfg = random_gemma2_model.cfg
  kw = dict(batch=8, seq_len=64, layers=2, store_dtype="bfloat16")
  one = activation_bytes_per_device(cfg, (), "float32", **kw)
  assert activation_bytes_per_device(cfg, (8, 1), "float32", **kw) * 8 == one  # rows split 8 ways: exactly 1/8
  assert activation_bytes_per_device(cfg, (2, 4), "float32", **kw) < one / 2
  assert activation_bytes_per_device(cfg, (3, 1), "float32", **kw) == one  # 8 rows do not split 3 ways


def test_config_errors_name_the_sizes_and_the_fix(random_gemma2):
  cfg = model_config(random_gemma2)  # 4 heads, 2 KV heads, MLP 128
  with pytest.raises(ConfigError, match=r"model_mesh=\(4, 4\) needs 16 devices but this process has 8 .*"
                                        r"xla_force_host_platform_device_count=16"):
    check_mesh_shape((4, 4))
  with pytest.raises(ConfigError, match=r"model_mesh=\(2, 2, 2\) must be \(\) \(one device\) or two positive sizes"):
    model_mesh((2, 2, 2))
  with pytest.raises(ConfigError, match=r"model_mesh=\(0, 4\)"):
    model_mesh((0, 4))
  with pytest.raises(ConfigError, match=r"a model axis of 3 shards neither the 4 attention heads nor the MLP size 128 "
                                        r"of the base.*heads 2, 4; MLP 2, 4, 8\), e.g. model_mesh=\(1, 8\)"):
    model_mesh((1, 3), [cfg], where=["the base"])
  with pytest.raises(ConfigError, match="shards neither the 4 attention heads"):  # a Mesh given directly
    load_model(random_gemma2, mesh=make_mesh((1, 3)))
  assert model_mesh((), [cfg]) is None  # the default: one device, nothing checked
  assert dict(model_mesh((1, 4), [cfg]).shape) == {"data": 1, "model": 4}  # 2 KV heads on 4: allowed (replicated)


def test_launchers_check_the_mesh_before_loading(tmp_path):
  from configs.analyze import get_config as analyze_config
  from configs.diff import get_config as diff_config
  from neurodiff_jax.analysis.analyze import check_config as analyze_check
  from neurodiff_jax.diffing.run import check_config as diff_check

  c = diff_config("narrow,small")
  c.model_mesh = (16, 1)
  with pytest.raises(ConfigError, match="needs 16 devices"):
    diff_check(c)
  a = analyze_config()
  a.workdir = str(tmp_path)
  a.model_mesh = (2, 8)
  with pytest.raises(ConfigError, match="needs 16 devices"):
    analyze_check(a)
