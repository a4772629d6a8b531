"""Qwen 2 / 2.5: Llama-like with biases on the q, k and v projections."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, common_fields


@dataclasses.dataclass(frozen=True)
class Qwen2Config(TransformerConfig):
  """Qwen 2 config (HF `model_type: qwen2`)."""

  family: ClassVar[str] = "qwen2"

  @classmethod
  def from_hf(cls, hf_config: Any) -> Qwen2Config:
    """Builds the config from a `transformers.Qwen2Config`."""
    where = "qwen2 config"
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_act,
        rope_full=RopeConfig.from_hf(hf_config.rope_parameters, where),
        qkv_bias=True,
    )
