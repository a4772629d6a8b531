"""The decoder-only transformer (Flax NNX) with residual capture, interventions and early stop.

Layer L's activation is the residual stream after block L, which is HF's `hidden_states[L + 1]`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from neurodiff_jax.models.config import TransformerConfig
from neurodiff_jax.models.layers import MLP, Attention, RMSNorm, _normal, rope_inv_freq, rope_tables, softcap
from neurodiff_jax.models.sharding import mesh_of, put_batch

Intervention = Callable[[Float[Array, "B T D"]], Float[Array, "B T D"]]


class ForwardOutput(NamedTuple):
  """Logits (None when the forward stopped early) and the captured residuals by layer."""

  logits: Float[Array, "B T V"] | None
  residuals: dict[int, Float[Array, "B T D"]]


class Block(nnx.Module):
  """One pre-norm decoder block; Gemma 2/3 add norms after attention and MLP."""

  def __init__(self, cfg: TransformerConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)
    self.sliding = cfg.layer_types[layer] == "sliding"
    self.post_norms = cfg.post_norms
    self.pre_attn_norm = norm()
    self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.pre_mlp_norm = norm()
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
    if cfg.post_norms:
      self.post_attn_norm = norm()
      self.post_mlp_norm = norm()

  def __call__(self, x, cos, sin, mask, precision) -> Float[Array, "B T D"]:
    return self._mlp(x + self._post_attn(self.attn(self.pre_attn_norm(x), cos, sin, mask, precision)), precision)

  def cached(self, x, cos, sin, mask, cache, start, precision):
    """The block on T new tokens over a KV cache (Attention.cached); returns (x, updated cache)."""
    h, cache = self.attn.cached(self.pre_attn_norm(x), cos, sin, mask, cache, start, precision)
    return self._mlp(x + self._post_attn(h), precision), cache

  def _post_attn(self, h):
    return self.post_attn_norm(h) if self.post_norms else h

  def _mlp(self, x, precision):
    h = self.mlp(self.pre_mlp_norm(x), precision)
    if self.post_norms:
      h = self.post_mlp_norm(h)
    return x + h


def attention_masks(
    attention_mask: Bool[Array, "B S"], sliding_window: int | None, segment_ids: Int[Array, "B S"] | None = None
) -> tuple[Bool[Array, "B T S"], Bool[Array, "B T S"] | None]:
  """Causal ∧ key-padding (or same-segment) mask, and the same restricted to the last `sliding_window` keys."""
  s = attention_mask.shape[1]
  q_idx = jnp.arange(s)[:, None]
  k_idx = jnp.arange(s)[None, :]
  if segment_ids is None:
    full = (k_idx <= q_idx)[None] & attention_mask[:, None, :]  # [B, T, S]
  else:
    # Padding (segment 0) attends to padding, so that no query is fully masked (a NaN softmax).
    full = (k_idx <= q_idx)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if sliding_window is None:
    return full, None
  return full, full & (k_idx > q_idx - sliding_window)[None]


def positions_from_mask(attention_mask: Bool[Array, "B T"]) -> Int[Array, "B T"]:
  """Position ids that count only real tokens, so left padding does not shift RoPE."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: Int[Array, "B T"]) -> Int[Array, "B T"]:
  """Position ids that restart at 0 where each packed segment begins."""
  idx = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Transformer(nnx.Module):
  """A decoder-only LM: embed → blocks → final norm → unembed (tied or separate)."""

  def __init__(self, cfg: TransformerConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))  # [V, D]
    self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype))  # [D, V]

  @property
  def precision(self) -> jax.lax.Precision | None:
    """float32 models use full-precision matmuls (no TF32) so activations match HF's float32."""
    return jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None

  def embed_tokens(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    """Token embeddings, × √d in the activation dtype for Gemma (bf16 rounds √2304 to 48)."""
    x = jnp.take(self.embed[...], input_ids, axis=0)
    if self.cfg.scale_embeddings:
      x = x * jnp.asarray(self.cfg.hidden_size**0.5, jnp.float32).astype(x.dtype)
    return x

  def unembed(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Final norm, unembedding and final soft-cap: the logit lens of a residual."""
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = jnp.einsum("BTD,VD->BTV", x, self.embed[...], precision=self.precision)
    else:
      logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...], precision=self.precision)
    return softcap(logits, self.cfg.final_logit_softcap)

  def __call__(
      self,
      input_ids: Int[Array, "B T"],
      attention_mask: Bool[Array, "B T"] | None = None,
      *,
      positions: Int[Array, "B T"] | None = None,
      segment_ids: Int[Array, "B T"] | None = None,
      capture: Sequence[int] = (),
      interventions: Mapping[int, Intervention] | None = None,
      stop_at_layer: int | None = None,
  ) -> ForwardOutput:
    """Runs the model; returns logits and the residual after each block in `capture`.

    `attention_mask` is 1 for real tokens (left or right padding); positions default to the
    count of real tokens before each one. `segment_ids` (> 0 per packed document, 0 for padding)
    packs several documents into a row: a token attends only to its own document, and positions
    restart at each document. `interventions[L]` maps the residual after block L
    to a new one (steering, patching). With `stop_at_layer=L` blocks after L are skipped and
    logits are None.
    """
    cfg = self.cfg
    n = cfg.num_layers
    last = n - 1 if stop_at_layer is None else _check_layer(stop_at_layer, n, "stop_at_layer")
    capture = tuple(sorted({_check_layer(l, n, "capture") for l in capture}))
    interventions = dict(interventions or {})
    for layer in list(capture) + list(interventions):
      if layer > last:
        raise ValueError(f"layer {layer} is after stop_at_layer={last}; it would never run.")

    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.bool_) if segment_ids is None else segment_ids > 0
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(attention_mask) if segment_ids is None else positions_from_segments(segment_ids)
    full_mask, sliding_mask = attention_masks(attention_mask, cfg.sliding_window, segment_ids)

    tables = {}
    x = self.embed_tokens(input_ids)  # [B, T, D]
    residuals = {}
    for i in range(last + 1):
      rope = cfg.rope_for(i)
      if rope not in tables:
        tables[rope] = rope_tables(positions, rope_inv_freq(rope, cfg.head_dim), x.dtype)
      cos, sin = tables[rope]
      block = self.layers[i]
      x = block(x, cos, sin, sliding_mask if block.sliding else full_mask, self.precision)
      if i in interventions:
        x = interventions[i](x)
      if i in capture:
        residuals[i] = x
    logits = self.unembed(x) if stop_at_layer is None else None
    return ForwardOutput(logits=logits, residuals=residuals)


  def init_cache(self, batch: int, length: int) -> list[tuple[Float[Array, "B K S H"], Float[Array, "B K S H"]]]:
    """An empty KV cache of `length` columns for `step`: (keys, values) [B, K, S, H] per layer, zeros."""
    shape = (batch, self.cfg.num_kv_heads, length, self.cfg.head_dim)
    return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.cfg.num_layers)]

  def step(
      self,
      input_ids: Int[Array, "B T"],
      key_mask: Bool[Array, "B S"],
      positions: Int[Array, "B T"],
      cache: list[tuple[Float[Array, "B K S H"], Float[Array, "B K S H"]]],
      start: Int[Array, ""] | int,
      interventions: Mapping[int, Intervention] | None = None,
      last_only: bool = False,
  ) -> tuple[Float[Array, "B T V"], list[tuple[Float[Array, "B K S H"], Float[Array, "B K S H"]]]]:
    """Logits of T tokens written at cache columns start .. start + T - 1, attending to the cached columns.

    `key_mask` [B, S] marks the cache's real columns (this call's included); a query at column c sees
    real keys at columns ≤ c (and > c − window on sliding layers). A prompt is one call at start 0 (the
    prefill), each generated token one call with T = 1. Interventions see the T new residuals only.
    `last_only` unembeds the last position alone (a prefill needs no more: [B, 1, V]).
    """
    cfg = self.cfg
    t, s = input_ids.shape[1], key_mask.shape[1]
    q_col = start + jnp.arange(t)[:, None]  # [T, 1]
    k_col = jnp.arange(s)[None, :]  # [1, S]
    full = (k_col <= q_col)[None] & key_mask[:, None, :]  # [B, T, S]
    sliding = None if cfg.sliding_window is None else full & (k_col > q_col - cfg.sliding_window)[None]
    interventions = dict(interventions or {})
    x = self.embed_tokens(input_ids)
    tables, new_cache = {}, []
    for i, block in enumerate(self.layers):
      rope = cfg.rope_for(i)
      if rope not in tables:
        tables[rope] = rope_tables(positions, rope_inv_freq(rope, cfg.head_dim), x.dtype)
      x, layer_cache = block.cached(x, *tables[rope], sliding if block.sliding else full, cache[i], start,
                                    self.precision)
      new_cache.append(layer_cache)
      if i in interventions:
        x = interventions[i](x)
    return self.unembed(x[:, -1:] if last_only else x), new_cache


def _check_layer(layer: int, num_layers: int, what: str) -> int:
  if not -num_layers <= layer < num_layers:
    raise ValueError(f"{what} layer {layer} is out of range for a model with {num_layers} layers.")
  return layer % num_layers


def jit_forward(
    model: Transformer,
    *,
    capture: Sequence[int] = (),
    stop_at_layer: int | None = None,
    interventions: Mapping[int, Intervention] | None = None,
) -> Callable[..., ForwardOutput]:
  """A jitted `(input_ids, attention_mask) -> ForwardOutput` over the model's state, split once."""
  graphdef, state = nnx.split(model)
  capture = tuple(capture)
  mesh = mesh_of(model)

  @jax.jit
  def run(state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(
        input_ids, attention_mask, capture=capture, interventions=interventions, stop_at_layer=stop_at_layer
    )

  def forward(input_ids, attention_mask=None) -> ForwardOutput:
    if attention_mask is None:
      attention_mask = jnp.ones(jnp.shape(input_ids), jnp.bool_)
    return run(state, *put_batch(mesh, input_ids, attention_mask))  # rows on the data axis of a model mesh

  return forward
