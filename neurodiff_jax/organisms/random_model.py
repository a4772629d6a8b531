"""Random-weight checkpoints of any ported family, written as real HF directories.

The embedded default of `launch.demo`: a tiny Gemma 2 with a BPE tokenizer, built offline with
the project's own port and saved like any downloaded checkpoint (config.json, model.safetensors,
tokenizer files), so every consumer exercises the real loading path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from neurodiff_jax.models import Transformer, config_from_hf, save_hf_checkpoint
from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer

# Presets are data: one frozen dict per family, never derived from each other.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
}

_TOKENIZER_TEXT = """\
The river runs past the old mill, and the miller counts his sacks of grain at dawn.
A chemist measures the acid with care; the solution turns blue at seven degrees.
In the market, Anna sells apples, pears and bread to travellers from the north.
The committee met on Tuesday to discuss the budget for the new library.
Stars appear one by one as the sky darkens over the quiet harbour.
User: can you help me plan a trip? Assistant: of course, where would you like to go?
The engine needs oil every three thousand miles, or it will wear out quickly.
Children learn numbers by counting: one, two, three, four, five, six, seven.
"""


def hf_config_for(family: str, vocab_size: int, **overrides: Any):
  """A `transformers` config of a tiny preset of `family` (HF model_type name)."""
  import transformers

  if family not in TINY_PRESETS:
    raise ValueError(f"no tiny preset for family {family!r}; known: {', '.join(TINY_PRESETS)}.")
  classes = {"gemma2": transformers.Gemma2Config, "gemma": transformers.GemmaConfig,
             "gemma3_text": transformers.Gemma3TextConfig, "llama": transformers.LlamaConfig,
             "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
  return classes[family](vocab_size=vocab_size, **{**TINY_PRESETS[family], **overrides})


def build_random_checkpoint(directory: str | os.PathLike, *, family: str = "gemma2", vocab_size: int = 512,
                            seed: int = 0, texts: list[str] | None = None) -> str:
  """Writes a random-weight checkpoint with a trained BPE tokenizer to `directory` (reused if present)."""
  directory = Path(directory)
  if (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file():
    return str(directory)
  tokenizer = train_bpe_tokenizer(texts or _TOKENIZER_TEXT.splitlines(), vocab_size, min_frequency=1)
  hf_config = hf_config_for(family, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  model = Transformer(config_from_hf(hf_config), dtype=jnp.float32, rngs=nnx.Rngs(seed))
  # Written beside the target and renamed, so a crash never leaves a half checkpoint behind.
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
  try:
    save_hf_checkpoint(model, hf_config, str(tmp))
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return str(directory)
