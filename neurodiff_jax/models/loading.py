"""Load Hugging Face checkpoints (local directory or HF cache) into the NNX ports, and save them.

Tensors are read one at a time from memory-mapped safetensors files, transformed to our layout,
cast, and placed straight onto their target sharding when a mesh is given; a whole model never
sits twice in host memory.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from neurodiff_jax.models.config import TransformerConfig, UnsupportedConfigError
from neurodiff_jax.models.gemma import GemmaConfig
from neurodiff_jax.models.gemma2 import Gemma2Config
from neurodiff_jax.models.gemma3 import Gemma3Config
from neurodiff_jax.models.hf_mapping import ParamMap, ParamPath, param_table
from neurodiff_jax.models.llama import LlamaConfig
from neurodiff_jax.models.qwen2 import Qwen2Config
from neurodiff_jax.models.qwen3 import Qwen3Config
from neurodiff_jax.models.safetensors_io import SafetensorsFile, save_file
from neurodiff_jax.models.sharding import ShardingRules, check_model_axis, param_sharding
from neurodiff_jax.models.transformer import Transformer
from neurodiff_jax.utils.errors import CheckpointError

# HF model_type → our family config. `gemma3` (multimodal) is read through its text_config.
FAMILIES: dict[str, type[TransformerConfig]] = {
    "llama": LlamaConfig,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3Config,
    "gemma3": Gemma3Config,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
# Checkpoint name prefixes of multimodal wrappers, rewritten to the text model's names.
_PREFIX_REWRITES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
IGNORED_TENSORS = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.|rotary_emb\.inv_freq$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """Where a model came from: directory, model_type, a fingerprint of config and tensors, and a merged adapter."""

  path: str
  model_type: str
  fingerprint: str
  adapter: str | None = None  # a PEFT LoRA adapter directory merged into the weights (models/lora.py)


def resolve_checkpoint(path_or_repo_id: str, *, revision: str | None = None, allow_download: bool = False) -> str:
  """A local directory as is, a GGUF file or packaged model converted once (models/gguf.py), or a repo id's
  snapshot in the local HF cache (no download by default)."""
  path = os.path.expanduser(str(path_or_repo_id))
  if os.path.isdir(path):
    return path
  from neurodiff_jax.models import gguf  # Deferred: reads GGUF files only when given one.

  if gguf.is_gguf(str(path_or_repo_id)):
    return gguf.resolve_gguf(str(path_or_repo_id))
  if not _REPO_ID.match(str(path_or_repo_id)) or path.startswith((".", "/", "~")):
    raise FileNotFoundError(f"No checkpoint directory at {path!r}: the path does not exist.")
  import huggingface_hub  # Deferred: only repo ids need it.

  offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  try:
    return huggingface_hub.snapshot_download(
        path_or_repo_id, revision=revision, local_files_only=offline or not allow_download
    )
  except Exception as e:  # huggingface_hub raises several types for "not cached".
    raise FileNotFoundError(
        f"{path_or_repo_id!r} is neither a local directory nor a repo id in the local HF cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}). Download it on a machine with internet "
        f"(`huggingface-cli download {path_or_repo_id}`) or pass a checkpoint directory."
    ) from e


def read_hf_config(directory: str) -> Any:
  """The checkpoint's `transformers` config (text config for multimodal Gemma 3)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
  with open(path) as f:
    model_type = json.load(f).get("model_type")
  if model_type not in FAMILIES:
    raise UnsupportedConfigError(
        f"model_type {model_type!r} in {path} is not supported; supported model types: {', '.join(FAMILIES)}."
    )
  import transformers  # Deferred: heavy import.

  hf_config = transformers.AutoConfig.from_pretrained(directory)
  return hf_config.get_text_config() if model_type == "gemma3" else hf_config


def config_from_hf(hf_config: Any) -> TransformerConfig:
  """Our family config for a `transformers` config object."""
  model_type = hf_config.model_type
  if model_type not in FAMILIES:
    raise UnsupportedConfigError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}.")
  return FAMILIES[model_type].from_hf(hf_config)


def weight_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
      raise FileNotFoundError(f"{index} lists shard files that are missing: {missing}.")
    return [os.path.join(directory, n) for n in names]
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(
        f"{directory} has no *.safetensors weights (only safetensors are read; convert .bin with "
        "`transformers` `save_pretrained(safe_serialization=True)`)."
    )
  return files


def canonical_name(name: str) -> str:
  for old, new in _PREFIX_REWRITES:
    if name.startswith(old):
      return new + name[len(old) :]
  return name


def _get_variable(model: nnx.Module, path: ParamPath) -> nnx.Variable:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def _sampled_bytes(data: np.ndarray, samples: int = 256, block: int = 4096) -> bytes:
  """Evenly spaced blocks of a file's bytes, for the fingerprint."""
  # Tells apart checkpoints that differ in weights, not only in shapes, without hashing gigabytes:
  # a fine-tune changes nearly every weight, so any sample sees it.
  starts = np.linspace(0, max(len(data) - block, 0), samples).astype(np.int64)
  return b"".join(data[s:s + block].tobytes() for s in np.unique(starts))


def _fingerprint(directory: str, files: list[SafetensorsFile]) -> str:
  """A hash of config.json, the tensor headers and sampled weight bytes of a checkpoint."""
  with open(os.path.join(directory, "config.json"), "rb") as f:
    digest = hashlib.sha256(f.read())
  for file in files:
    digest.update(json.dumps(file.header, sort_keys=True).encode())
    digest.update(_sampled_bytes(file._mmap))
  return digest.hexdigest()[:16]


def checkpoint_info(path_or_repo_id: str, *, revision: str | None = None,
                    allow_download: bool = False) -> CheckpointInfo:
  """Where a checkpoint is, its model type and fingerprint, without loading its weights."""
  from neurodiff_jax.models import lora  # Deferred: lora imports this module.

  if (request := lora.adapter_request(path_or_repo_id, revision=revision, allow_download=allow_download)) is not None:
    return lora.adapter_checkpoint_info(request, allow_download=allow_download)
  directory = resolve_checkpoint(path_or_repo_id, revision=revision, allow_download=allow_download)
  files = [SafetensorsFile(p) for p in weight_files(directory)]
  return CheckpointInfo(directory, read_hf_config(directory).model_type, _fingerprint(directory, files))


def model_config(path_or_repo_id: str, *, revision: str | None = None) -> TransformerConfig:
  """A checkpoint's architecture from its config.json (an adapter's: its base's), without reading any weight."""
  from neurodiff_jax.models import lora  # Deferred: lora imports this module.

  if (request := lora.adapter_request(path_or_repo_id, revision=revision)) is not None:
    path_or_repo_id, revision = request.base, request.base_revision
  return config_from_hf(read_hf_config(resolve_checkpoint(path_or_repo_id, revision=revision)))


def load_model(
    path_or_repo_id: str,
    dtype: jnp.dtype | str = jnp.float32,
    mesh: Mesh | None = None,
    *,
    rules: ShardingRules = ShardingRules(),
    revision: str | None = None,
    allow_download: bool = False,
) -> Transformer:
  """Loads an HF safetensors checkpoint or BASE+ADAPTER (models/lora.py) into a `Transformer` (on `mesh` if given)."""
  from neurodiff_jax.models import lora  # Deferred: lora imports this module.

  if (request := lora.adapter_request(path_or_repo_id, revision=revision, allow_download=allow_download)) is not None:
    return lora.load_adapted(request, dtype, mesh, rules=rules, allow_download=allow_download)
  directory = resolve_checkpoint(path_or_repo_id, revision=revision, allow_download=allow_download)
  hf_config = read_hf_config(directory)
  cfg = config_from_hf(hf_config)
  if mesh is not None:  # before any tensor is read: a model axis that would split nothing is refused
    check_model_axis(int(dict(mesh.shape).get("model", 1)), cfg, where=directory, rules=rules)
  dtype = jnp.dtype(dtype)
  model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))

  table = {m.hf_name: m for m in param_table(cfg)}
  files = [SafetensorsFile(p) for p in weight_files(directory)]
  tied_head = embed = None
  seen: set[str] = set()
  for file in files:
    for raw_name in file.keys():
      name = canonical_name(raw_name)
      if IGNORED_TENSORS.search(raw_name):
        continue
      if name == "lm_head.weight" and cfg.tie_embeddings:
        tied_head = (file, raw_name)  # Some tied checkpoints store a copy: checked against the embedding below.
        continue
      if name == "model.embed_tokens.weight":
        embed = (file, raw_name)
      if name not in table:
        raise CheckpointError(
            f"unexpected tensor {raw_name!r} in {file.path}: not part of a {cfg.family} model with this config."
        )
      spec = table[name]
      if file.shape(raw_name) != spec.hf_shape:
        raise CheckpointError(
            f"tensor {raw_name!r} in {file.path} has shape {file.shape(raw_name)}, but config.json implies "
            f"{spec.hf_shape}; the weights and config.json disagree."
        )
      _place(model, spec, file.get(raw_name), dtype, mesh, rules)
      seen.add(name)
  missing = [n for n in table if n not in seen]
  if missing:
    more = " ..." if len(missing) > 5 else ""
    raise CheckpointError(f"checkpoint {directory} is missing tensor(s) {missing[:5]}{more}; it does not hold the "
                          "architecture its config.json describes: re-download or re-convert it.")
  if tied_head is not None:
    _check_tied_head(tied_head, embed, table["model.embed_tokens.weight"].hf_shape)
  model.checkpoint = CheckpointInfo(directory, hf_config.model_type, _fingerprint(directory, files))
  return model


def _check_tied_head(head: tuple[SafetensorsFile, str], embed: tuple[SafetensorsFile, str],
                     shape: tuple[int, ...], rows: int = 4096) -> None:
  """A stored lm_head of a tied model must equal the embedding, which the model uses as its head.

  transformers keeps a stored head that differs (and unties it), so loading such a checkpoint as
  tied would not match the reference model. Compared in blocks of rows of the memory maps.
  """
  file, name = head
  if file.shape(name) != shape:
    raise CheckpointError(f"{name} in {file.path} has shape {file.shape(name)}, but tied embeddings need {shape}.")
  h, e = file.get(name), embed[0].get(embed[1])
  for lo in range(0, shape[0], rows):
    if not np.array_equal(h[lo:lo + rows].astype(np.float32), e[lo:lo + rows].astype(np.float32)):
      raise CheckpointError(
          f"{name} in {file.path} differs from the embedding, but config.json ties them (tie_word_embeddings=true): "
          "set tie_word_embeddings to false in config.json to load the stored head, as transformers does.")


def _place(model, spec: ParamMap, hf_array: np.ndarray, dtype, mesh: Mesh | None, rules: ShardingRules) -> None:
  view = spec.to_ours(hf_array)  # a view of the memory map where the layout change allows one
  if mesh is None:
    value = jax.device_put(np.asarray(view).astype(dtype, copy=False))
  else:
    # Each device's block is read from the map and converted alone: a host never holds a whole tensor it
    # does not need (a mesh across processes: only its own devices' shards).
    sharding = param_sharding(spec.path, view.shape, mesh, rules)
    value = jax.make_array_from_callback(view.shape, sharding, lambda idx: np.asarray(view[idx]).astype(dtype))
  _get_variable(model, spec.path).set_value(value)


def load_tokenizer(path_or_repo_id: str, *, revision: str | None = None) -> Any:
  """The checkpoint's tokenizer via `transformers.AutoTokenizer` (never downloaded); an adapter's, else its base's."""
  import transformers

  from neurodiff_jax.models import lora  # Deferred: lora imports this module.

  request = lora.adapter_request(path_or_repo_id, revision=revision)
  directory = lora.tokenizer_directory(request) if request is not None else resolve_checkpoint(path_or_repo_id,
                                                                                                 revision=revision)
  return transformers.AutoTokenizer.from_pretrained(directory)


def save_hf_checkpoint(
    model: Transformer, hf_config: Any, directory: str, *, dtype: jnp.dtype | str | None = None,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
) -> str:
  """Writes `model` as an HF checkpoint directory (config.json + model.safetensors)."""
  cfg = config_from_hf(hf_config)
  if cfg != model.cfg:
    raise ValueError("hf_config does not describe this model's architecture.")
  os.makedirs(directory, exist_ok=True)
  out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(model.dtype)
  tensors = {}
  for spec in param_table(cfg):
    value = np.asarray(jax.device_get(_get_variable(model, spec.path).value))
    tensors[spec.hf_name] = np.ascontiguousarray(spec.to_hf(value)).astype(out_dtype)
  tensors.update(extra_tensors or {})
  hf_config.dtype = str(np.dtype(out_dtype).name)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  hf_config.save_pretrained(directory)
  return directory


__all__ = ["FAMILIES", "IGNORED_TENSORS", "CheckpointError", "CheckpointInfo", "canonical_name", "checkpoint_info",
           "config_from_hf", "load_model", "model_config", "weight_files",
           "load_tokenizer", "read_hf_config", "resolve_checkpoint", "save_hf_checkpoint"]
