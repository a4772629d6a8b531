"""Flax NNX ports of Llama, Gemma 1/2/3 and Qwen 2/3 that load Hugging Face checkpoints."""

from neurodiff_jax.models.config import RopeConfig, TransformerConfig, UnsupportedConfigError
from neurodiff_jax.models.gemma import GemmaConfig
from neurodiff_jax.models.gemma2 import Gemma2Config
from neurodiff_jax.models.gemma3 import Gemma3Config
from neurodiff_jax.models.llama import LlamaConfig
from neurodiff_jax.models.loading import (
    FAMILIES,
    CheckpointError,
    CheckpointInfo,
    checkpoint_info,
    config_from_hf,
    load_model,
    load_tokenizer,
    model_config,
    read_hf_config,
    resolve_checkpoint,
    save_hf_checkpoint,
)
from neurodiff_jax.models.qwen2 import Qwen2Config
from neurodiff_jax.models.qwen3 import Qwen3Config
from neurodiff_jax.models.safetensors_io import CorruptCheckpointError
from neurodiff_jax.models.sharding import ShardingRules, batch_sharding, make_mesh, mesh_of, model_mesh, put_batch
from neurodiff_jax.models.transformer import ForwardOutput, Transformer, jit_forward

__all__ = [
    "FAMILIES", "CheckpointError", "CheckpointInfo", "CorruptCheckpointError", "ForwardOutput",
    "Gemma2Config", "Gemma3Config", "GemmaConfig", "LlamaConfig", "Qwen2Config", "Qwen3Config",
    "RopeConfig", "ShardingRules", "Transformer", "TransformerConfig", "UnsupportedConfigError",
    "batch_sharding", "checkpoint_info", "config_from_hf", "jit_forward", "load_model", "load_tokenizer", "make_mesh",
    "mesh_of", "model_config", "model_mesh", "put_batch", "read_hf_config", "resolve_checkpoint", "save_hf_checkpoint",
]
from neurodiff_jax.models.generate import greedy_generate  # noqa: E402

__all__ += ["greedy_generate"]
