"""The frozen configuration shared by every decoder-only family the project ports.

Each family module (`llama.py`, `gemma2.py`, ...) subclasses `TransformerConfig` and builds it
from a Hugging Face config. The fields are switches for the places where the families differ;
everything else (embedding, attention, MLP, norms) is one implementation in `transformer.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

LayerType = Literal["full", "sliding"]
RopeKind = Literal["default", "linear", "llama3"]
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


class UnsupportedConfigError(ValueError):
  """A checkpoint's config asks for a feature the port does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one layer type: base θ and an optional frequency scaling."""

  theta: float
  kind: RopeKind = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @classmethod
  def from_hf(cls, params: dict[str, Any] | None, where: str) -> RopeConfig:
    """Builds the RoPE spec from a (standardised) HF `rope_parameters` dict."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedConfigError(
          f"{where}: rope type {kind!r} is not supported; supported rope types are "
          f"{', '.join(SUPPORTED_ROPE_TYPES)}."
      )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
      raise UnsupportedConfigError(f"{where}: partial_rotary_factor != 1 is not supported.")
    if "rope_theta" not in params:
      raise UnsupportedConfigError(f"{where}: rope_parameters has no rope_theta.")
    kw: dict[str, Any] = {"theta": float(params["rope_theta"]), "kind": kind}
    if kind in ("linear", "llama3"):
      kw["factor"] = float(params["factor"])
    if kind == "llama3":
      kw["low_freq_factor"] = float(params["low_freq_factor"])
      kw["high_freq_factor"] = float(params["high_freq_factor"])
      kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of a decoder-only transformer; one subclass per model family."""

  family: ClassVar[str] = "generic"

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  activation: str
  # Per layer: 'full' or 'sliding' attention.
  layer_types: tuple[str, ...]
  rope_full: RopeConfig
  rope_sliding: RopeConfig | None = None
  sliding_window: int | None = None
  # Multiplier on q·k; head_dim**-0.5 unless the family says otherwise (Gemma 2: query_pre_attn_scalar).
  query_scale: float = 0.0
  tie_embeddings: bool = True
  # Gemma: RMSNorm weight is (1 + w) applied in float32; Llama: w applied after casting back.
  norm_plus_one: bool = False
  # Gemma: embeddings are multiplied by sqrt(hidden_size) in the activation dtype.
  scale_embeddings: bool = False
  # Gemma 2/3: extra norms after attention and after the MLP.
  post_norms: bool = False
  # Gemma 3, Qwen 3: RMSNorm on each query and key head before RoPE.
  qk_norm: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None

  def __post_init__(self):
    if len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers.")
    bad = sorted(set(self.layer_types) - {"full", "sliding"})
    if bad:
      raise UnsupportedConfigError(f"layer types {bad} not supported; supported: full, sliding.")
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ValueError("sliding layers need a sliding_window.")
    if self.activation not in SUPPORTED_ACTIVATIONS:
      raise UnsupportedConfigError(
          f"activation {self.activation!r} not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}."
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
    if self.query_scale == 0.0:
      object.__setattr__(self, "query_scale", self.head_dim**-0.5)

  def rope_for(self, layer: int) -> RopeConfig:
    """The RoPE spec used by `layer`."""
    if self.layer_types[layer] == "sliding" and self.rope_sliding is not None:
      return self.rope_sliding
    return self.rope_full

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    norms = d * (4 if self.post_norms else 2) + (2 * h if self.qk_norm else 0)
    per_layer = attn + 3 * d * f + norms
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + emb + d


def hf_layer_types(hf_config: Any, where: str) -> tuple[str, ...]:
  """Reads HF `layer_types` ('full_attention' / 'sliding_attention') into ('full' / 'sliding')."""
  n = hf_config.num_hidden_layers
  types = getattr(hf_config, "layer_types", None) or ["full_attention"] * n
  names = {"full_attention": "full", "sliding_attention": "sliding"}
  out = []
  for t in types:
    if t not in names:
      raise UnsupportedConfigError(
          f"{where}: layer type {t!r} is not supported; supported: {', '.join(names)}."
      )
    out.append(names[t])
  return tuple(out)


def hf_head_dim(hf_config: Any) -> int:
  """head_dim as HF computes it: the explicit field, else hidden_size // heads."""
  return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def reject_features(hf_config: Any, where: str, **forbidden: Any) -> None:
  """Raises when an HF config sets a feature (to a value other than the allowed one) we do not port."""
  for name, allowed in forbidden.items():
    value = getattr(hf_config, name, allowed)
    if value not in (allowed, None) and value != allowed:
      raise UnsupportedConfigError(f"{where}: {name}={value!r} is not supported (only {allowed!r}).")


def common_fields(hf_config: Any, where: str) -> dict[str, Any]:
  """The fields every family reads the same way from an HF config."""
  c = hf_config
  return dict(
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_layers=c.num_hidden_layers,
      num_heads=c.num_attention_heads,
      num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
      head_dim=hf_head_dim(c),
      rms_norm_eps=float(c.rms_norm_eps),
      layer_types=hf_layer_types(c, where),
      sliding_window=getattr(c, "sliding_window", None),
      tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
  )
