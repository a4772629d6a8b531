"""Building blocks shared by every family: RMSNorm, rotary embeddings, attention, gated MLP.

Numerics follow `transformers` in eager mode exactly (docs/methods.md §1): norms in float32, RoPE
tables in float32 cast to the activation dtype, softmax in float32, scaling after q·k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from neurodiff_jax.models.config import RopeConfig, TransformerConfig

_INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  return (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """RMSNorm in float32; Gemma applies (1 + w) before the cast back, Llama w after it."""

  def __init__(self, dim: int, *, eps: float, plus_one: bool, dtype: jnp.dtype):
    self.eps = eps
    self.plus_one = plus_one
    self.scale = nnx.Param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype))

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...]
    if self.plus_one:
      return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale * normed.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> Float[Array, "H2"]:
  """Inverse frequencies θ^(-2i/H), with linear or llama3 scaling, in float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim
  inv_freq = 1.0 / (rope.theta**exponents)  # [H/2]
  if rope.kind == "linear":
    return inv_freq / rope.factor
  if rope.kind == "llama3":
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv_freq


def rope_tables(
    positions: Int[Array, "B T"], inv_freq: Float[Array, "H2"], dtype: jnp.dtype
) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
  """cos and sin tables [B, T, head_dim], computed in float32 and cast like HF."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(
    x: Float[Array, "B T N H"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
) -> Float[Array, "B T N H"]:
  """Rotates pairs (i, i + H/2) of each head, as HF's rotate_half does."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """cap · tanh(x / cap), the Gemma 2 soft-cap; identity when cap is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
  """Multi-head attention with grouped KV heads (MQA when num_kv_heads == 1)."""

  def __init__(self, cfg: TransformerConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.w_q = nnx.Param(_normal(rngs, (d, n, h), dtype))  # [D, N, H]
    self.w_k = nnx.Param(_normal(rngs, (d, k, h), dtype))  # [D, K, H]
    self.w_v = nnx.Param(_normal(rngs, (d, k, h), dtype))  # [D, K, H]
    self.w_o = nnx.Param(_normal(rngs, (n, h, d), dtype))  # [N, H, D]
    if cfg.qkv_bias:
      self.b_q = nnx.Param(jnp.zeros((n, h), dtype))
      self.b_k = nnx.Param(jnp.zeros((k, h), dtype))
      self.b_v = nnx.Param(jnp.zeros((k, h), dtype))
    if cfg.out_bias:
      self.b_o = nnx.Param(jnp.zeros((d,), dtype))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)
      self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)

  def __call__(
      self,
      x: Float[Array, "B T D"],
      cos: Float[Array, "B T H"],
      sin: Float[Array, "B T H"],
      mask: Bool[Array, "B T S"],
      precision: jax.lax.Precision | None,
  ) -> Float[Array, "B T D"]:
    q, k, v = self._qkv(x, cos, sin, precision)
    return self._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, precision)

  def cached(
      self,
      x: Float[Array, "B T D"],
      cos: Float[Array, "B T H"],
      sin: Float[Array, "B T H"],
      mask: Bool[Array, "B T S"],
      cache: tuple[Float[Array, "B K S H"], Float[Array, "B K S H"]],
      start: Int[Array, ""],
      precision: jax.lax.Precision | None,
  ) -> tuple[Float[Array, "B T D"], tuple[Float[Array, "B K S H"], Float[Array, "B K S H"]]]:
    """Attention of T new tokens at columns start .. start + T - 1 over a KV cache of S columns; the cache updated.

    The new keys and values are written into the cache first, so the queries attend to the prompt,
    earlier steps and themselves through one [S]-wide mask (causality and the sliding window are in
    `mask`, by column).
    """
    q, k, v = self._qkv(x, cos, sin, precision)
    k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.transpose(0, 2, 1, 3).astype(cache[0].dtype), start, 2)
    v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.transpose(0, 2, 1, 3).astype(cache[1].dtype), start, 2)
    return self._attend(q, k_cache, v_cache, mask, precision), (k_cache, v_cache)

  def _qkv(self, x, cos, sin, precision):
    """Queries, keys and values [B, T, heads, H] of x, biased, qk-normed and rotated."""
    cfg = self.cfg
    b, t, d = x.shape
    # Projections on [B*T, D]: XLA:CPU runs the weight gradients of 2-D products (one contracting
    # dimension) about twice as fast as those of "BTD,..." einsums, and the forward no slower.
    x2 = x.reshape(b * t, d)
    q = jnp.einsum("TD,DNH->TNH", x2, self.w_q[...], precision=precision).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = jnp.einsum("TD,DKH->TKH", x2, self.w_k[...], precision=precision).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = jnp.einsum("TD,DKH->TKH", x2, self.w_v[...], precision=precision).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qkv_bias:
      q, k, v = q + self.b_q[...], k + self.b_k[...], v + self.b_v[...]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def _attend(self, q, k, v, mask, precision):
    """softmax(q·k) v over keys k, v [B, K, S, H] (heads-major) for queries q [B, T, N, H]; projected to [B, T, D]."""
    cfg = self.cfg
    b, t, n, h = q.shape
    d = cfg.hidden_size
    kv = cfg.num_kv_heads
    # Query head n reads KV head n // G, the order HF's repeat_kv produces. Heads go in front of
    # time before the two attention einsums so each is a batched matmul over leading (B, K) dims:
    # XLA:CPU runs "BTKGH,BSKH->BKGTS" about 2.4x slower than the same product laid out heads-major.
    q = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, precision=precision) * cfg.query_scale
    logits = softcap(logits, cfg.attn_logit_softcap)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs, v, precision=precision)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b * t, n, h)  # [B*T, N, H]
    out = jnp.einsum("TNH,NHD->TD", out, self.w_o[...], precision=precision)
    if cfg.out_bias:
      out = out + self.b_o[...]
    return out.reshape(b, t, d)


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) · up(x))."""

  def __init__(self, cfg: TransformerConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.cfg = cfg
    self.w_gate = nnx.Param(_normal(rngs, (d, f), dtype))  # [D, F]
    self.w_up = nnx.Param(_normal(rngs, (d, f), dtype))  # [D, F]
    self.w_down = nnx.Param(_normal(rngs, (f, d), dtype))  # [F, D]
    if cfg.mlp_bias:
      self.b_gate = nnx.Param(jnp.zeros((f,), dtype))
      self.b_up = nnx.Param(jnp.zeros((f,), dtype))
      self.b_down = nnx.Param(jnp.zeros((d,), dtype))

  def __call__(self, x: Float[Array, "B T D"], precision: jax.lax.Precision | None) -> Float[Array, "B T D"]:
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [B*T, D]: see Attention for why products are 2-D
    gate = jnp.einsum("TD,DF->TF", x, self.w_gate[...], precision=precision)
    up = jnp.einsum("TD,DF->TF", x, self.w_up[...], precision=precision)
    if self.cfg.mlp_bias:
      gate, up = gate + self.b_gate[...], up + self.b_up[...]
    act = self.cfg.activation
    if act == "silu":
      gate = jax.nn.silu(gate)
    else:
      gate = jax.nn.gelu(gate, approximate=(act == "gelu_pytorch_tanh"))
    out = jnp.einsum("TF,FD->TD", gate * up, self.w_down[...], precision=precision)
    if self.cfg.mlp_bias:
      out = out + self.b_down[...]
    return out.reshape(shape)
