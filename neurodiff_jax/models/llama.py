"""Llama 2, 3, 3.1 and 3.2: GQA, SiLU-gated MLP, optional `llama3` RoPE frequency scaling."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, common_fields, reject_features


@dataclasses.dataclass(frozen=True)
class LlamaConfig(TransformerConfig):
  """Llama family config (HF `model_type: llama`)."""

  family: ClassVar[str] = "llama"

  @classmethod
  def from_hf(cls, hf_config: Any) -> LlamaConfig:
    """Builds the config from a `transformers.LlamaConfig`."""
    where = "llama config"
    reject_features(hf_config, where, pretraining_tp=1)
    bias = bool(getattr(hf_config, "attention_bias", False))
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_act,
        rope_full=RopeConfig.from_hf(hf_config.rope_parameters, where),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
    )
