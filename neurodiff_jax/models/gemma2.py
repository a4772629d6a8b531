"""Gemma 2: pre- and post-norms, attention and final logit soft-caps, local/global alternation.

Attention logits are scaled by `query_pre_attn_scalar**-0.5` (27B uses 144, not head_dim) and
soft-capped before the mask; even layers (0, 2, ...) use the sliding window.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, common_fields


@dataclasses.dataclass(frozen=True)
class Gemma2Config(TransformerConfig):
  """Gemma 2 config (HF `model_type: gemma2`)."""

  family: ClassVar[str] = "gemma2"

  @classmethod
  def from_hf(cls, hf_config: Any) -> Gemma2Config:
    """Builds the config from a `transformers.Gemma2Config`."""
    where = "gemma2 config"
    bias = bool(getattr(hf_config, "attention_bias", False))
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_activation,
        rope_full=RopeConfig.from_hf(hf_config.rope_parameters, where),
        query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
        norm_plus_one=True,
        scale_embeddings=True,
        post_norms=True,
        qkv_bias=bias,
        out_bias=bias,
        attn_logit_softcap=hf_config.attn_logit_softcapping,
        final_logit_softcap=hf_config.final_logit_softcapping,
    )
