"""Gemma 3 (text): qk-norm, 5 local : 1 global layers, local RoPE base 10k and global 1M.

Multimodal checkpoints (`model_type: gemma3`) are read through their `text_config`; the vision
tower's tensors are skipped by the loader.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from neurodiff_jax.models.config import (
    RopeConfig,
    TransformerConfig,
    UnsupportedConfigError,
    common_fields,
    reject_features,
)


@dataclasses.dataclass(frozen=True)
class Gemma3Config(TransformerConfig):
  """Gemma 3 text config (HF `model_type: gemma3_text`, or the text part of `gemma3`)."""

  family: ClassVar[str] = "gemma3"

  @classmethod
  def from_hf(cls, hf_config: Any) -> Gemma3Config:
    """Builds the config from a `transformers.Gemma3TextConfig`."""
    where = "gemma3 config"
    reject_features(hf_config, where, use_bidirectional_attention=False)
    rope = hf_config.rope_parameters
    if "full_attention" not in rope:
      raise UnsupportedConfigError(f"{where}: rope_parameters must be keyed by layer type, got {rope}.")
    bias = bool(getattr(hf_config, "attention_bias", False))
    return cls(
        **common_fields(hf_config, where),
        activation=hf_config.hidden_activation,
        rope_full=RopeConfig.from_hf(rope["full_attention"], where + " (global layers)"),
        rope_sliding=RopeConfig.from_hf(rope["sliding_attention"], where + " (local layers)"),
        query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
        norm_plus_one=True,
        scale_embeddings=True,
        post_norms=True,
        qk_norm=True,
        qkv_bias=bias,
        out_bias=bias,
        attn_logit_softcap=hf_config.attn_logit_softcapping,
        final_logit_softcap=hf_config.final_logit_softcapping,
    )
