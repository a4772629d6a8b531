"""Declarative table between HF tensor names and our parameter paths, with their transforms.

HF `nn.Linear` weights are `[out, in]`; ours are einsum-ready (`w_q[D, N, H]`, `w_o[N, H, D]`).
The same table drives loading (HF → ours) and saving model organisms (ours → HF).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from neurodiff_jax.models.config import TransformerConfig

ParamPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class ParamMap:
  """One HF tensor: its name and shape, our path, and the transforms both ways."""

  hf_name: str
  path: ParamPath
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def _linear_in(*out_shape: int) -> tuple[Callable, Callable]:
  """HF [out, in] ↔ ours [in, *out_shape]."""
  return (lambda w: w.T.reshape(w.shape[1], *out_shape)), (lambda w: w.reshape(w.shape[0], -1).T)


def _linear_out(*in_shape: int) -> tuple[Callable, Callable]:
  """HF [out, in] ↔ ours [*in_shape, out]."""
  return (lambda w: w.T.reshape(*in_shape, w.shape[0])), (lambda w: w.reshape(-1, w.shape[-1]).T)


def _reshape(*shape: int) -> tuple[Callable, Callable]:
  return (lambda b: b.reshape(shape)), (lambda b: b.reshape(-1))


def param_table(cfg: TransformerConfig) -> list[ParamMap]:
  """Every tensor an HF checkpoint of this architecture holds (lm_head only when untied)."""
  d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out: list[ParamMap] = []

  def add(hf_name, path, hf_shape, transforms=(_identity, _identity)):
    out.append(ParamMap(hf_name, path, tuple(hf_shape), *transforms))

  add("model.embed_tokens.weight", ("embed",), (cfg.vocab_size, d))
  for i in range(cfg.num_layers):
    p, L = f"model.layers.{i}.", ("layers", i)
    add(p + "self_attn.q_proj.weight", L + ("attn", "w_q"), (n * h, d), _linear_in(n, h))
    add(p + "self_attn.k_proj.weight", L + ("attn", "w_k"), (k * h, d), _linear_in(k, h))
    add(p + "self_attn.v_proj.weight", L + ("attn", "w_v"), (k * h, d), _linear_in(k, h))
    add(p + "self_attn.o_proj.weight", L + ("attn", "w_o"), (d, n * h), _linear_out(n, h))
    if cfg.qkv_bias:
      add(p + "self_attn.q_proj.bias", L + ("attn", "b_q"), (n * h,), _reshape(n, h))
      add(p + "self_attn.k_proj.bias", L + ("attn", "b_k"), (k * h,), _reshape(k, h))
      add(p + "self_attn.v_proj.bias", L + ("attn", "b_v"), (k * h,), _reshape(k, h))
    if cfg.out_bias:
      add(p + "self_attn.o_proj.bias", L + ("attn", "b_o"), (d,))
    if cfg.qk_norm:
      add(p + "self_attn.q_norm.weight", L + ("attn", "q_norm", "scale"), (h,))
      add(p + "self_attn.k_norm.weight", L + ("attn", "k_norm", "scale"), (h,))
    add(p + "mlp.gate_proj.weight", L + ("mlp", "w_gate"), (f, d), _linear_in(f))
    add(p + "mlp.up_proj.weight", L + ("mlp", "w_up"), (f, d), _linear_in(f))
    add(p + "mlp.down_proj.weight", L + ("mlp", "w_down"), (d, f), _linear_in(d))
    if cfg.mlp_bias:
      add(p + "mlp.gate_proj.bias", L + ("mlp", "b_gate"), (f,))
      add(p + "mlp.up_proj.bias", L + ("mlp", "b_up"), (f,))
      add(p + "mlp.down_proj.bias", L + ("mlp", "b_down"), (d,))
    add(p + "input_layernorm.weight", L + ("pre_attn_norm", "scale"), (d,))
    if cfg.post_norms:
      # Gemma 2/3 name the post-attention norm like Llama's pre-MLP norm.
      add(p + "post_attention_layernorm.weight", L + ("post_attn_norm", "scale"), (d,))
      add(p + "pre_feedforward_layernorm.weight", L + ("pre_mlp_norm", "scale"), (d,))
      add(p + "post_feedforward_layernorm.weight", L + ("post_mlp_norm", "scale"), (d,))
    else:
      add(p + "post_attention_layernorm.weight", L + ("pre_mlp_norm", "scale"), (d,))
  add("model.norm.weight", ("final_norm", "scale"), (d,))
  if not cfg.tie_embeddings:
    add("lm_head.weight", ("lm_head",), (cfg.vocab_size, d), (lambda w: w.T, lambda w: w.T))
  return out


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GLOBAL_MODULES = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "final_norm",
                   "lm_head.weight": "lm_head"}


def tensor_group(name: str) -> tuple[int, str]:
  """(layer, module) of an HF tensor name: `model.layers.3.self_attn.q_proj.weight` -> (3, "q_proj")."""
  if name in _GLOBAL_MODULES:
    return -1, _GLOBAL_MODULES[name]
  m = _LAYER.match(name)
  parts = (m.group(2) if m else name).split(".")
  if parts[-1] == "weight":
    parts = parts[:-1]
  module = parts[-1] if parts[-1] != "bias" else f"{parts[-2]}.bias"
  return (int(m.group(1)) if m else -1), module
