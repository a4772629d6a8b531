"""PEFT LoRA adapters merged into a loaded model: W' = W + s·B·A for each adapted projection.

peft saves an adapter as a directory holding adapter_config.json and adapter_model.safetensors, whose
tensors are `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], with
s = α/r (α/√r for rsLoRA). The adapter is merged when it is loaded rather than run beside each
projection: an adapted forward is then exactly as fast as the base's, every method sees an adapted
model as any other checkpoint, and `apply_adapter` replaces only the adapted arrays, so several
adapters share one loaded base in one process. Whatever cannot be merged this way (DoRA, prompt
tuning, fully trained modules, ...) is refused with an error naming what is supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from neurodiff_jax.models.config import TransformerConfig, UnsupportedConfigError
from neurodiff_jax.models.hf_mapping import ParamMap, param_table
from neurodiff_jax.models.loading import (
    IGNORED_TENSORS,
    CheckpointInfo,
    _fingerprint,
    _sampled_bytes,
    canonical_name,
    config_from_hf,
    read_hf_config,
    resolve_checkpoint,
    weight_files,
)
from neurodiff_jax.models.safetensors_io import SafetensorsFile
from neurodiff_jax.models.sharding import ShardingRules
from neurodiff_jax.models.transformer import Transformer
from neurodiff_jax.utils.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The linear layers an adapter may adapt: everything else (embedding, lm_head, norms) is refused.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SUPPORTED = ("supported: plain LoRA (peft_type LORA) on the attention and MLP projections, with r, lora_alpha, "
              "use_rslora, rank_pattern, alpha_pattern, bias, layers_to_transform")
# adapter_config.json keys that change what an adapter computes, the values under which they change
# nothing, and what they are. Any other value is refused: merging B·A alone would give another model.
_REFUSED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA (a magnitude vector rescales each merged column)"),
    "fan_in_fan_out": ((False, None), "weights stored [in, out] (GPT-2 Conv1D layers)"),
    "modules_to_save": ((None, []), "fully trained modules saved beside the adapter"),
    "trainable_token_indices": ((None, [], {}), "trained rows of the embedding"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "use_qalora": ((False, None), "QA-LoRA (pooled inputs, for quantised layers)"),
    "use_bdlora": ((None, False, {}), "block-diagonal LoRA"),
    "layer_replication": ((None, []), "replicated layers"),
    "target_parameters": ((None, []), "LoRA on nn.Parameters (MoE experts)"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (applied only after its invocation tokens)"),
    "velora_config": ((None, {}), "VeLoRA"),
    "monteclora_config": ((None, {}), "MonteCLoRA"),
    "kasa_config": ((None, {}), "KaSA (truncates the base's singular values)"),
    "arrow_config": ((None, {}), "Arrow routing between adapters"),
}
# Keys named like a variant switch (`use_*`, `*_config`) that only configure initialisation or
# training; an unknown one that is set is refused, since peft adds its variants under such names.
_HARMLESS_KEYS = ("use_rslora", "eva_config", "corda_config", "lora_ga_config", "loftq_config", "megatron_config",
                  "runtime_config")
# Initialisations that rewrite the base's weights: such an adapter is relative to that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_BIAS_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.bias$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


@dataclasses.dataclass(frozen=True, eq=False)
class LoraFactors:
  """One adapted projection: ΔW = scale · B @ A, in HF layout [out, in]."""

  a: np.ndarray  # [r, in], memory-mapped
  b: np.ndarray  # [out, r], memory-mapped
  scale: float  # α/r, or α/√r with rsLoRA, per module
  tensor: str  # the adapter's name of lora_A, for messages


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
  """A PEFT LoRA adapter read from disk: its factors and replaced biases by HF tensor name (text-model naming)."""

  path: str
  base_model_name_or_path: str | None
  factors: Mapping[str, LoraFactors]  # "model.layers.0.self_attn.q_proj.weight" -> factors
  biases: Mapping[str, np.ndarray]  # "model.layers.0.self_attn.q_proj.bias" -> the bias replacing the base's
  config: Mapping[str, Any]  # adapter_config.json as read
  fingerprint: str  # of adapter_config.json, the tensor headers and sampled tensor bytes


def is_adapter_dir(path: str) -> bool:
  """Whether `path` is a PEFT adapter directory (adapter_config.json and no model config.json beside it)."""
  # A full checkpoint that also carries an adapter's files loads as the checkpoint, as it always has.
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and not os.path.isfile(os.path.join(path, "config.json")))


def _read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG_FILE}.")
  with open(path) as f:
    return json.load(f)


def _check_config(config: Mapping[str, Any], path: str) -> None:
  """Refuses every adapter_config.json setting under which W + s·B·A is not the adapted model."""
  peft_type = config.get("peft_type")
  if peft_type != "LORA":
    raise UnsupportedConfigError(
        f"{path}: peft_type {peft_type!r} is not supported (prompt tuning, IA3 and the other methods are not "
        f"merged weight deltas); {_SUPPORTED}.")
  for key, (neutral, what) in _REFUSED_KEYS.items():
    if config.get(key) not in neutral:
      raise UnsupportedConfigError(f"{path}: {what} ({key}={config[key]!r}) is not supported; {_SUPPORTED}.")
  for key, value in config.items():
    variant_like = key.startswith("use_") or key.endswith("_config")
    if variant_like and key not in _HARMLESS_KEYS and key not in _REFUSED_KEYS and value not in (None, False, {}, []):
      raise UnsupportedConfigError(
          f"{path}: {key}={value!r} is a peft setting this loader does not know; {_SUPPORTED}.")
  init = config.get("init_lora_weights")
  if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
    raise UnsupportedConfigError(
        f"{path}: init_lora_weights={init!r} rewrote the base's weights, so the adapter is relative to that rewritten "
        "base, not to base_model_name_or_path; save it converted to plain LoRA (peft's save_pretrained with "
        f"path_initial_model_for_weight_conversion) or merge it in peft; {_SUPPORTED}.")
  if config.get("bias", "none") not in ("none", "all", "lora_only"):
    raise UnsupportedConfigError(f"{path}: bias={config['bias']!r} is not supported; supported: none, all, lora_only.")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
  """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module path at a dot."""
  # As peft.utils.other.get_pattern_key: dict order decides between several matching keys.
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", module):
      return patterns[key]
  return default


def read_adapter(path: str) -> LoraAdapter:
  """Reads a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors); refuses what cannot merge."""
  directory = os.path.expanduser(str(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No adapter directory at {directory!r}: the path does not exist.")
  config = _read_config(directory)
  _check_config(config, os.path.join(directory, CONFIG_FILE))
  file_path = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(file_path):
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
      raise CheckpointError(
          f"{directory} holds adapter_model.bin (a pickle), but only safetensors are read: re-save the adapter "
          "with peft's save_pretrained(dir, safe_serialization=True).")
    raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}: the adapter's weights are missing.")
  file = SafetensorsFile(file_path)

  bias_mode = config.get("bias", "none")
  layers = config.get("layers_to_transform")
  layers = None if layers is None else {int(layers)} if isinstance(layers, int) else {int(i) for i in layers}
  pairs: dict[str, dict[str, str]] = {}
  biases: dict[str, np.ndarray] = {}
  embedding = [k for k in file.keys() if "lora_embedding_" in k and not IGNORED_TENSORS.search(k)]
  if embedding:  # before the embedding's full copy, which peft saves beside it, is reported as unexpected
    module = embedding[0].removeprefix(_PREFIX).split(".lora_")[0]
    raise UnsupportedConfigError(
        f"{file_path}: LoRA on {module!r} ({embedding[0]}) is not supported; supported: the attention and MLP "
        f"projections ({', '.join(PROJECTIONS)}), not the embedding or lm_head.")
  for key in file.keys():
    if not key.startswith(_PREFIX):
      raise CheckpointError(f"tensor {key!r} in {file_path} does not start with {_PREFIX!r}: not a peft-saved adapter.")
    name = key[len(_PREFIX):]
    if IGNORED_TENSORS.search(name):
      continue  # the vision tower of a multimodal wrapper, which the port does not run
    if ".lora_" in name and name.split(".lora_")[0].rsplit(".", 1)[-1] not in PROJECTIONS:
      module = name.split(".lora_")[0]
      raise UnsupportedConfigError(
          f"{file_path}: LoRA on {module!r} ({key}) is not supported; supported: the attention and MLP projections "
          f"({', '.join(PROJECTIONS)}), not the embedding or lm_head.")
    if (m := _LORA_KEY.match(name)) is not None:
      module = m["module"]
      if layers is not None and (layer := _LAYER.search(f".{module}.")) and int(layer[1]) not in layers:
        raise CheckpointError(f"{file_path} adapts {module!r}, outside layers_to_transform={sorted(layers)}; "
                              "the tensors and adapter_config.json disagree.")
      pairs.setdefault(module, {})[m["which"]] = key
    elif bias_mode != "none" and (m := _BIAS_KEY.match(name)) is not None:
      biases[canonical_name(m["module"] + ".bias")] = file.get(key)
    else:
      raise CheckpointError(
          f"unexpected tensor {key!r} in {file_path}: a LoRA adapter holds lora_A/lora_B weights (and biases with "
          "bias='all' or 'lora_only'); full tensors (modules_to_save, a resized embedding) are not supported.")

  factors: dict[str, LoraFactors] = {}
  for module, keys in sorted(pairs.items()):
    if set(keys) != {"A", "B"}:
      missing = "lora_B" if "B" not in keys else "lora_A"
      raise CheckpointError(f"{file_path} has no {missing} for {module!r}; the adapter file is incomplete.")
    a, b = file.get(keys["A"]), file.get(keys["B"])
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))  # peft's defaults
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise CheckpointError(
          f"{file_path}: {keys['A']} has shape {a.shape} and {keys['B']} {b.shape}, but adapter_config.json gives "
          f"{module!r} rank {r} (A [r, in], B [out, r]); the tensors and the config disagree.")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors[canonical_name(module + ".weight")] = LoraFactors(a, b, scale, keys["A"])
  if not factors and not biases:
    raise CheckpointError(f"{file_path} holds no LoRA tensors.")

  with open(os.path.join(directory, CONFIG_FILE), "rb") as f:
    digest = hashlib.sha256(f.read())
  digest.update(json.dumps(file.header, sort_keys=True).encode())
  digest.update(_sampled_bytes(file._mmap))
  return LoraAdapter(directory, config.get("base_model_name_or_path") or None, factors, biases, config,
                     digest.hexdigest()[:16])


def adapter_delta(adapter: LoraAdapter, hf_name: str) -> np.ndarray | None:
  """ΔW = s · B @ A of HF tensor `hf_name` in HF layout [out, in], float32; None where the adapter leaves it alone.

  Biases the adapter replaces (bias='all'/'lora_only') are whole tensors in `adapter.biases`, not deltas.
  """
  f = adapter.factors.get(canonical_name(hf_name))
  return None if f is None else np.asarray(_delta(f.a, f.b, np.float32(f.scale)))


@jax.jit
def _delta(a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
  # peft's get_delta_weight: (B @ A) · s in float32, at full precision (no TF32 on GPUs).
  return jnp.matmul(b.astype(jnp.float32), a.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale


def _model_names(path: str) -> set[str]:
  """The names a model path goes by: as given, its real path, its basename, and an HF cache snapshot's repo id."""
  p = os.path.expanduser(str(path)).rstrip("/")
  names = {p, os.path.basename(p)}
  if os.path.exists(p):
    names.add(os.path.realpath(p))
  if (m := _HF_CACHE_SNAPSHOT.search(p + "/")) is not None:
    names |= {f"{m[1]}/{m[2]}", m[2]}
  return {n.lower() for n in names if n}


def _check_fits(adapter: LoraAdapter, cfg: TransformerConfig, base_names: Iterable[str]) -> list[tuple[ParamMap, Any]]:
  """Every adapted tensor's base tensor with its factors or bias; raises where the base is not the adapter's."""
  table = {m.hf_name: m for m in param_table(cfg)}
  out: list[tuple[ParamMap, Any]] = []
  for name, f in adapter.factors.items():
    spec = table.get(name)
    if spec is None:
      raise CheckpointError(f"adapter {adapter.path} adapts {name!r}, which the base ({cfg.family}, {cfg.num_layers} "
                            "layers) does not have: this adapter was trained on another base.")
    (out_dim, in_dim), a, b = spec.hf_shape, f.a.shape, f.b.shape
    if a[1] != in_dim or b[0] != out_dim:
      raise CheckpointError(
          f"adapter tensors {f.tensor} {a} and its lora_B {b} do not fit the base's {name} {spec.hf_shape} "
          f"[out, in] (A must be [r, {in_dim}], B [{out_dim}, r]): this adapter was trained on another base.")
    out.append((spec, f))
  for name, bias in adapter.biases.items():
    spec = table.get(name)
    if spec is None or tuple(bias.shape) != spec.hf_shape:
      have = "none" if spec is None else spec.hf_shape
      raise CheckpointError(f"adapter {adapter.path} replaces bias {name} {tuple(bias.shape)}, but the base's is "
                            f"{have}: this adapter was trained on another base.")
    out.append((spec, bias))

  named = adapter.base_model_name_or_path
  given = [n for n in base_names if n]
  if named and given and not _model_names(named) & set().union(*map(_model_names, given)):
    raise CheckpointError(
        f"adapter {adapter.path} was trained on {named!r} (base_model_name_or_path in {CONFIG_FILE}), but the base "
        f"given is {given[0]!r}: load it as 'BASE+ADAPTER' with its base ('{named}+{adapter.path}'), or set "
        f"base_model_name_or_path if {given[0]!r} is that model under another name.")
  return out


def _combined_fingerprint(base: str, adapter: str) -> str:
  return hashlib.sha256(f"{base}+{adapter}".encode()).hexdigest()[:16]


@jax.jit
def _add(w: jax.Array, delta: jax.Array) -> jax.Array:
  # In float32 and rounded once, as peft's merge of a float32 base (W += s·B·A).
  return (w.astype(jnp.float32) + delta).astype(w.dtype)


def _merge(model: Transformer, adapter: LoraAdapter, base_names: Iterable[str], *, consume: bool) -> Transformer:
  """`apply_adapter`; with `consume`, each replaced base array is freed as soon as its successor exists."""
  info: CheckpointInfo | None = getattr(model, "checkpoint", None)
  if info is not None and info.adapter is not None:
    raise UnsupportedConfigError(
        f"the model already has adapter {info.adapter} merged; apply adapters to the base model, one at a time.")
  targets = _check_fits(adapter, model.cfg, base_names)
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for spec, value in targets:
    var = flat[spec.path]
    old = var[...]
    sharding = old.sharding
    if isinstance(value, LoraFactors):
      # ΔW is formed on the device from the small factors (only A and B cross from the host) and goes
      # through the weight's own transform, which is linear (a transpose and reshapes), so
      # to_ours(W + ΔW) = to_ours(W) + to_ours(ΔW) (tests/models/test_lora.py checks every table entry).
      delta = spec.to_ours(_delta(value.a, value.b, np.float32(value.scale)))
      new = jax.device_put(_add(old, jax.device_put(delta, sharding)), sharding)
    else:
      new = jax.device_put(np.asarray(spec.to_ours(np.asarray(value))).astype(old.dtype), sharding)
    if consume:
      new.block_until_ready()
      old.delete()
    flat[spec.path] = var.replace(new)
  # copy=True: fresh Variables around the shared arrays, so setting a parameter of one model never changes the other.
  merged = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())), copy=True)
  if info is None:  # a model built in code, not loaded: only the adapter identifies the result
    info = CheckpointInfo("", model.cfg.family, "unknown")
  merged.checkpoint = dataclasses.replace(
      info, fingerprint=_combined_fingerprint(info.fingerprint, adapter.fingerprint), adapter=adapter.path)
  return merged


def apply_adapter(model: Transformer, adapter: LoraAdapter, *, base_path: str | None = None) -> Transformer:
  """A new model with the adapter merged (W + s·B·A); `model` is unchanged and shares every array not adapted.

  Each adapted array keeps the base's dtype and sharding. `base_path` (default: where `model` was
  loaded from) is checked against the adapter's base_model_name_or_path; shapes are always checked.
  """
  info = getattr(model, "checkpoint", None)
  return _merge(model, adapter, [base_path, info.path if info is not None else None], consume=False)


@dataclasses.dataclass(frozen=True)
class AdapterRequest:
  """A model argument naming a PEFT adapter: the base (as given, or as the adapter names it) and the adapter dir."""

  base: str
  adapter_dir: str
  base_revision: str | None
  base_from_adapter: bool  # the base came from base_model_name_or_path, not from 'BASE+ADAPTER'


def adapter_request(path_or_repo_id: str, *, revision: str | None = None,
                    allow_download: bool = False) -> AdapterRequest | None:
  """The adapter that `path_or_repo_id` names ('BASE+ADAPTER', an adapter directory or cached repo), else None."""
  arg = str(path_or_repo_id)
  path = os.path.expanduser(arg)
  if os.path.exists(path):
    directory = path
  elif "+" in arg:
    # Split at the last '+' only: a base path may itself contain '+'.
    base, adapter_dir = arg.rsplit("+", 1)
    adapter_dir = os.path.expanduser(adapter_dir)
    if not os.path.isdir(adapter_dir) or not os.path.isfile(os.path.join(adapter_dir, CONFIG_FILE)):
      raise FileNotFoundError(
          f"{arg!r} is not a path, and {adapter_dir!r} after its last '+' is not a PEFT adapter directory (one with "
          f"{CONFIG_FILE}); 'BASE+ADAPTER' needs both.")
    return AdapterRequest(base, adapter_dir, revision, base_from_adapter=False)
  else:
    from neurodiff_jax.models import gguf  # Deferred: as in resolve_checkpoint.

    if gguf.is_gguf(arg):
      return None
    try:
      directory = resolve_checkpoint(arg, revision=revision, allow_download=allow_download)
    except FileNotFoundError:
      return None  # the caller's resolve_checkpoint raises its own error
  if not os.path.isdir(directory) or not is_adapter_dir(directory):
    return None
  config = _read_config(directory)
  base = config.get("base_model_name_or_path")
  if not base:
    raise CheckpointError(f"adapter {directory} names no base model (base_model_name_or_path is empty in "
                          f"{CONFIG_FILE}); load it as 'BASE+ADAPTER' ('<base>+{directory}').")
  return AdapterRequest(base, directory, config.get("revision"), base_from_adapter=True)


def _base_directory(request: AdapterRequest, allow_download: bool) -> str:
  try:
    directory = resolve_checkpoint(request.base, revision=request.base_revision, allow_download=allow_download)
  except FileNotFoundError as e:
    if not request.base_from_adapter:
      raise
    raise FileNotFoundError(
        f"adapter {request.adapter_dir} names its base {request.base!r} (base_model_name_or_path), which is neither "
        f"a local directory nor in the local HF cache; load it as 'BASE+ADAPTER' ('<base>+{request.adapter_dir}')."
    ) from e
  if is_adapter_dir(directory):
    raise UnsupportedConfigError(
        f"the base {request.base!r} of adapter {request.adapter_dir} is itself an adapter; stacked adapters are not "
        "supported: merge the first one into a checkpoint (save_hf_checkpoint) and use that as the base.")
  return directory


def load_adapted(request: AdapterRequest, dtype: jnp.dtype | str = jnp.float32, mesh: Mesh | None = None, *,
                 rules: ShardingRules = ShardingRules(), allow_download: bool = False) -> Transformer:
  """The request's base loaded and the adapter merged into it (`load_model`'s path for adapters)."""
  from neurodiff_jax.models.loading import load_model

  adapter = read_adapter(request.adapter_dir)
  directory = _base_directory(request, allow_download)
  _check_fits(adapter, config_from_hf(read_hf_config(directory)), [request.base, directory])  # before loading it
  base = load_model(directory, dtype, mesh, rules=rules)
  # Nothing else holds the freshly loaded base, so each replaced array is freed as it goes: the merge
  # holds one adapted tensor twice at a time, not the adapted part of the model.
  return _merge(base, adapter, [request.base, directory], consume=True)


def adapter_checkpoint_info(request: AdapterRequest, *, allow_download: bool = False) -> CheckpointInfo:
  """`checkpoint_info` of an adapted model, without loading weights (the same fingerprint as `load_adapted`'s)."""
  adapter = read_adapter(request.adapter_dir)
  directory = _base_directory(request, allow_download)
  hf_config = read_hf_config(directory)
  _check_fits(adapter, config_from_hf(hf_config), [request.base, directory])
  files = [SafetensorsFile(p) for p in weight_files(directory)]
  fingerprint = _combined_fingerprint(_fingerprint(directory, files), adapter.fingerprint)
  return CheckpointInfo(directory, hf_config.model_type, fingerprint, adapter.path)


def tokenizer_directory(request: AdapterRequest) -> str:
  """Where an adapted model's tokenizer is: the adapter directory if it saved one, else the base's directory."""
  if any(os.path.isfile(os.path.join(request.adapter_dir, n)) for n in _TOKENIZER_FILES):
    return request.adapter_dir
  return _base_directory(request, allow_download=False)


__all__ = ["PROJECTIONS", "AdapterRequest", "LoraAdapter", "LoraFactors", "adapter_checkpoint_info", "adapter_delta",
           "adapter_request", "apply_adapter", "is_adapter_dir", "load_adapted", "read_adapter",
           "tokenizer_directory"]
