"""Weight amplification's models: W_base + α (W_ft − W_base), or + α ΔW of a LoRA adapter, for chosen parameters.

Shared by `launch.diff`'s amplification method (diffing/amplification.py: the α sweep, grading and
report) and the dashboard's Live page (an α slider), which may not import `diffing`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from neurodiff_jax.models.config import TransformerConfig
from neurodiff_jax.models.hf_mapping import ParamMap, param_table, tensor_group
from neurodiff_jax.models.lora import LoraAdapter, adapter_delta, read_adapter
from neurodiff_jax.models.transformer import Transformer
from neurodiff_jax.utils.config import ConfigError, did_you_mean

# Config names of the amplifiable modules -> the HF projection they name (weight and bias, where the family has one).
MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_o": "o_proj", "mlp_gate": "gate_proj",
           "mlp_up": "up_proj", "mlp_down": "down_proj"}
_EMBEDDINGS = ("embed_tokens", "lm_head")


def check_modules(names: Sequence[str]) -> list[str]:
  """The config's module names in MODULES order (() = all); an unknown name is a ConfigError listing the valid ones."""
  for name in names:
    if name not in MODULES:
      raise ConfigError(f"amplification.modules names {name!r}{did_you_mean(str(name), list(MODULES))}; modules: "
                        f"{', '.join(MODULES)} (norms and embeddings: include_norms, include_embeddings).")
  return [m for m in MODULES if m in names] if names else list(MODULES)


def selected_params(cfg: TransformerConfig, layers: Sequence[int], modules: Sequence[str], *,
                    include_norms: bool = False, include_embeddings: bool = False) -> list[ParamMap]:
  """The param-table entries amplified: the modules' weights and biases in `layers`, their norms with `include_norms`
  (the final norm too), the embedding and untied lm_head with `include_embeddings`."""
  projections = {MODULES[m] for m in modules}
  chosen = {int(layer) for layer in layers}
  out = []
  for spec in param_table(cfg):
    layer, module = tensor_group(spec.hf_name)
    module = module.removesuffix(".bias")
    if module in _EMBEDDINGS:
      keep = include_embeddings
    elif module.endswith("norm"):  # q_norm, input_layernorm, ..., final_norm (layer -1: every layer's output)
      keep = include_norms and (layer < 0 or layer in chosen)
    else:
      keep = layer in chosen and module in projections
    if keep:
      out.append(spec)
  return out


def delta_source(base: Transformer, ft: Transformer) -> tuple[LoraAdapter | None, str]:
  """The adapter to amplify along when `ft` is `BASE+ADAPTER` of this very `base`, else None; and why."""
  info_ft, info_base = getattr(ft, "checkpoint", None), getattr(base, "checkpoint", None)
  if info_ft is None or info_ft.adapter is None:
    return None, "weights: W_ft − W_base of the loaded models"
  if info_base is None or info_base.adapter is not None or \
     os.path.realpath(info_ft.path) != os.path.realpath(info_base.path):
    # The adapter's ΔW is relative to the model it was merged into, not to this base.
    return None, (f"weights: the fine-tune is adapter {info_ft.adapter} on {info_ft.path}, not on the base "
                  f"{getattr(info_base, 'path', '?')}, so W_ft − W_base is amplified")
  return read_adapter(info_ft.adapter), f"adapter: ΔW = s·B·A of {info_ft.adapter}"


def check_shapes(base: Transformer, ft: Transformer, specs: Sequence[ParamMap]) -> None:
  """ConfigError when a chosen parameter differs in shape or dtype between base and fine-tune."""
  fb, ff = dict(nnx.to_flat_state(nnx.state(base))), dict(nnx.to_flat_state(nnx.state(ft)))
  for spec in specs:
    b, f = fb[spec.path][...], ff[spec.path][...]
    if b.shape != f.shape or b.dtype != f.dtype:
      raise ConfigError(f"{spec.hf_name} is {b.dtype}{list(b.shape)} in the base but {f.dtype}{list(f.shape)} in the "
                        "fine-tune: weight amplification needs a model and its own fine-tune, loaded in one dtype.")


@jax.jit
def _lerp(b: jax.Array, f: jax.Array, alpha: jax.Array) -> jax.Array:
  # (1 − α) b + α f is b + α (f − b), but exact at both ends (α = 0: b, α = 1: f bit for bit), where
  # b + (f − b) rounds whenever f − b does.
  b32, f32 = b.astype(jnp.float32), f.astype(jnp.float32)
  return ((1.0 - alpha) * b32 + alpha * f32).astype(f.dtype)


@jax.jit
def _add_scaled(b: jax.Array, delta: jax.Array, alpha: jax.Array) -> jax.Array:
  # As the adapter's merge (float32, rounded once), so α = 1 is the loaded fine-tune bit for bit.
  return (b.astype(jnp.float32) + alpha * delta).astype(b.dtype)


def amplified_state(base: Transformer, ft: Transformer, specs: Sequence[ParamMap], alpha: float,
                    adapter: LoraAdapter | None = None) -> nnx.State:
  """The fine-tune's parameter state with each chosen parameter replaced by W_base + α ΔW (float32, then cast).

  ΔW is W_ft − W_base, or the adapter's s·B·A (through the table's `to_ours`) for the tensors it adapts.
  Parameters not chosen are the fine-tune's own arrays (shared, not copied).
  """
  flat_f = dict(nnx.to_flat_state(nnx.state(ft)))
  flat_b = dict(nnx.to_flat_state(nnx.state(base)))
  a = jnp.float32(alpha)
  for spec in specs:
    var = flat_f[spec.path]
    b, f = flat_b[spec.path][...], var[...]
    delta = None if adapter is None else adapter_delta(adapter, spec.hf_name)
    if delta is None:
      new = _lerp(b, f, a)
    else:
      new = _add_scaled(b, jnp.asarray(spec.to_ours(delta)), a)
    flat_f[spec.path] = var.replace(jax.device_put(new, f.sharding))
  return nnx.from_flat_state(list(flat_f.items()))


__all__ = ["MODULES", "amplified_state", "check_modules", "check_shapes", "delta_source", "selected_params"]
