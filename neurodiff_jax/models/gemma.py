"""Gemma 1: (1 + w) RMSNorm, √d-scaled embeddings, tanh-GELU gated MLP; 2B uses one KV head."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, common_fields


@dataclasses.dataclass(frozen=True)
class GemmaConfig(TransformerConfig):
  """Gemma 1 config (HF `model_type: gemma`)."""

  family: ClassVar[str] = "gemma"

  @classmethod
  def from_hf(cls, hf_config: Any) -> GemmaConfig:
    """Builds the config from a `transformers.GemmaConfig`."""
    where = "gemma config"
    bias = bool(getattr(hf_config, "attention_bias", False))
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_act,
        rope_full=RopeConfig.from_hf(hf_config.rope_parameters, where),
        norm_plus_one=True,
        scale_embeddings=True,
        qkv_bias=bias,
        out_bias=bias,
    )
