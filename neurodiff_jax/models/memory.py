"""Device memory of a base + fine-tuned model pair on a model mesh: the weights exactly, the activations estimated.

Weights: every parameter's shape (`Transformer` built abstractly, `nnx.eval_shape`) and its PartitionSpec
on the mesh (`sharding.param_spec`, the rule `load_model` places tensors by): a device holds one shard
of each, the global size divided by the mesh sizes of the axes the spec splits (replicated axes hold it
whole). This is what `x.addressable_shards[i].data.nbytes` sums to on device i
(`tests/models/test_model_mesh.py` checks it).

Activations (an estimate, not a measurement): the largest buffers live while one block of one model
runs on a batch of `batch` rows of `seq_len` tokens, rows split over `data` where they divide it, heads
and MLP units over `model` where they divide:

  residual stream and its normed copies   4 · b · T · d · e
  queries, keys, values                   b · T · (N' + 2 K') · h · e
  attention logits, float32 softmax, probs b · N' · T · T · (2 e + 4)
  MLP gate, up and their product          3 · b · T · F' · e
  captured residuals of both models       2 · 2 · L · b · T · d · s   (the stacked output and its cast copy)
  logits (diff methods; not a harvest)    2 · 2 · b · T · V' · 4      (both models' float32 logits, log-softmax)

with b the rows per device, N', K', F', V' the heads, KV heads, MLP units and vocabulary per device, e
the model dtype's bytes, s the store dtype's, L the captured layers. XLA fuses some of these away and
keeps a few more (rope tables, masks): read it as the size to leave free, not a promise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from neurodiff_jax.models.config import RopeConfig, TransformerConfig
from neurodiff_jax.models.gemma2 import Gemma2Config
from neurodiff_jax.models.sharding import MODEL_MESH_AXES, ShardingRules, param_spec
from neurodiff_jax.models.transformer import Transformer

# Gemma 2's sizes (the HF configs of google/gemma-2-{2b,9b,27b}): d, layers, heads, KV heads, head_dim, MLP, vocab,
# query_pre_attn_scalar. For memory tables without the checkpoints.
GEMMA2_SIZES: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "2b": (2304, 26, 8, 4, 256, 9216, 256000, 256),
    "9b": (3584, 42, 16, 8, 256, 14336, 256000, 256),
    "27b": (4608, 46, 32, 16, 128, 36864, 256000, 144),
}


def gemma2_config(size: str) -> TransformerConfig:
  """The architecture of Gemma 2 `size` (2b, 9b, 27b) as our config: alternating sliding (4096) and full layers."""
  if size not in GEMMA2_SIZES:
    raise ValueError(f"unknown Gemma 2 size {size!r}; known: {', '.join(GEMMA2_SIZES)}.")
  d, n, heads, kv, h, f, vocab, scalar = GEMMA2_SIZES[size]
  return Gemma2Config(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_layers=n, num_heads=heads,
                      num_kv_heads=kv, head_dim=h, rms_norm_eps=1e-6, activation="gelu_pytorch_tanh",
                      layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(n)),
                      rope_full=RopeConfig(theta=10000.0), sliding_window=4096, query_scale=scalar ** -0.5,
                      norm_plus_one=True, scale_embeddings=True, post_norms=True, attn_logit_softcap=50.0,
                      final_logit_softcap=30.0)


@dataclasses.dataclass(frozen=True)
class PairMemory:
  """Bytes per device of a model pair on a mesh: both models' weights (exact) and one batch's activations (estimate)."""

  weights: int
  activations: int

  @property
  def total(self) -> int:
    """Weights plus the activation estimate."""
    return self.weights + self.activations


@functools.lru_cache(maxsize=8)
def param_shapes(cfg: TransformerConfig) -> dict[tuple[str | int, ...], tuple[int, ...]]:
  """{parameter path: global shape} of a model of `cfg`, from an abstract build (no memory is allocated; cached)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
    keys = tuple(k for k in keys if k != "value")
    out[keys] = tuple(leaf.shape)
  return out


def _axis_sizes(mesh_shape: Sequence[int]) -> dict[str, int]:
  sizes = tuple(int(s) for s in mesh_shape) or (1, 1)
  if len(sizes) != len(MODEL_MESH_AXES):
    raise ValueError(f"mesh_shape={tuple(mesh_shape)} must be (data, model) sizes.")
  return dict(zip(MODEL_MESH_AXES, sizes))


def shard_size(shape: Sequence[int], spec: jax.sharding.PartitionSpec, axis_sizes: dict[str, int]) -> int:
  """Elements of one device's shard of an array of `shape` split by `spec`."""
  n = math.prod(shape)
  for axis in spec:
    for name in (axis if isinstance(axis, tuple) else (axis,)):
      if name is not None:
        n //= axis_sizes[name]
  return n


def weight_bytes_per_device(cfg: TransformerConfig, mesh_shape: Sequence[int], dtype: str | jnp.dtype,
                            rules: ShardingRules = ShardingRules()) -> int:
  """Bytes of ONE model's weights on each device of a (data, model) mesh (every device holds the same amount)."""
  sizes = _axis_sizes(mesh_shape)
  itemsize = jnp.dtype(dtype).itemsize
  return sum(shard_size(shape, param_spec(path, shape, sizes, rules), sizes) * itemsize
             for path, shape in param_shapes(cfg).items())


def activation_bytes_per_device(cfg: TransformerConfig, mesh_shape: Sequence[int], dtype: str | jnp.dtype, *,
                                batch: int, seq_len: int, layers: int = 1, store_dtype: str | jnp.dtype = "bfloat16",
                                logits: bool = False) -> int:
  """The estimate (module docstring) of a pair's activation bytes per device for one batch of `batch` × `seq_len`."""
  sizes = _axis_sizes(mesh_shape)
  data, model = sizes["data"], sizes["model"]
  per = lambda n: n // model if n % model == 0 else n  # noqa: E731  (split where the model axis divides it)
  b = batch // data if batch % data == 0 else batch
  t, d, h = int(seq_len), cfg.hidden_size, cfg.head_dim
  e, s = jnp.dtype(dtype).itemsize, jnp.dtype(store_dtype).itemsize
  heads, kv, mlp, vocab = per(cfg.num_heads), per(cfg.num_kv_heads), per(cfg.intermediate_size), per(cfg.vocab_size)
  total = (4 * b * t * d * e + b * t * (heads + 2 * kv) * h * e + b * heads * t * t * (2 * e + 4)
           + 3 * b * t * mlp * e + 2 * 2 * int(layers) * b * t * d * s)
  if logits:
    total += 2 * 2 * b * t * vocab * 4
  return int(total)


def forward_flops_per_token(cfg: TransformerConfig, blocks: int, seq_len: int) -> float:
  """FLOPs of one model's forward per token through its first `blocks` blocks, no unembedding (a harvest's).

  2 × the blocks' parameters (one multiply-add per weight) plus causal attention: 4 × (T / 2 average context)
  × heads × head_dim per block (q·k and p·v), the context capped by the sliding window on sliding layers.
  """
  d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_block = d * h * (2 * n + 2 * k) + 3 * d * f
  flops = 0.0
  for layer in range(int(blocks)):
    context = seq_len / 2
    if cfg.layer_types[layer] == "sliding" and cfg.sliding_window:
      context = min(context, cfg.sliding_window)
    flops += 2 * per_block + 4 * context * n * h
  return flops


def pair_bytes_per_device(cfg: TransformerConfig, mesh_shape: Sequence[int], dtype: str | jnp.dtype = "bfloat16", *,
                          batch: int = 32, seq_len: int = 1024, layers: int = 1,
                          store_dtype: str | jnp.dtype = "bfloat16", logits: bool = False,
                          rules: ShardingRules = ShardingRules()) -> PairMemory:
  """Per-device bytes of a base + fine-tuned pair of `cfg` on a (data, model) mesh: weights, activation estimate.

  `mesh_shape` () or (1, 1) is one device. The activation estimate is for one harvest batch of `batch` rows of
  `seq_len` tokens capturing `layers` layers (`logits=True`: a forward to the logits, as the diff methods run).
  """
  return PairMemory(weights=2 * weight_bytes_per_device(cfg, mesh_shape, dtype, rules),
                    activations=activation_bytes_per_device(cfg, mesh_shape, dtype, batch=batch, seq_len=seq_len,
                                                            layers=layers, store_dtype=store_dtype, logits=logits))


def held_bytes(model: Any) -> tuple[int, int]:
  """(bytes of `model`'s parameters on this process's devices, bytes of one whole copy): measured, not computed."""
  held = total = 0
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    total += leaf.nbytes
    held += sum(s.data.nbytes for s in leaf.addressable_shards)
  return held, total


__all__ = ["GEMMA2_SIZES", "PairMemory", "activation_bytes_per_device", "forward_flops_per_token", "gemma2_config",
           "held_bytes", "pair_bytes_per_device", "param_shapes", "shard_size", "weight_bytes_per_device"]

