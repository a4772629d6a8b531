"""Qwen 3 (dense): Llama-like with an RMSNorm on every query and key head before RoPE."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, common_fields


@dataclasses.dataclass(frozen=True)
class Qwen3Config(TransformerConfig):
  """Qwen 3 config (HF `model_type: qwen3`)."""

  family: ClassVar[str] = "qwen3"

  @classmethod
  def from_hf(cls, hf_config: Any) -> Qwen3Config:
    """Builds the config from a `transformers.Qwen3Config`."""
    where = "qwen3 config"
    bias = bool(getattr(hf_config, "attention_bias", False))
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_act,
        rope_full=RopeConfig.from_hf(hf_config.rope_parameters, where),
        qk_norm=True,
        qkv_bias=bias,
        out_bias=bias,
    )
