"""The crosscoder (docs/methods.md §2): one shared dictionary of m latents read from and written to M models.

Parameters are a plain pytree (`Params`): `w_enc [M, d, m]`, `b_enc [m]`, `w_dec [m, M, d]`,
`b_dec [M, d]`. Pre-activations `a = Σ_i x_i W_enc[i] + b_enc`, codes `f` (sparse, see
`sparsity.py`), reconstruction `x̂_i = f W_dec[:, i] + b_dec[i]`. Decoder norms are free: they are
what Δnorm reads. The selection score of latent j is `s_j = relu(a_j) · Σ_i ‖W_dec[j, i]‖`
(`scores`, the one place it is computed). The model works on normalised inputs
(`x · norm_scale[i]`, one scalar per model so that E‖x_i‖ = √d); `Crosscoder` takes and returns
activations in their original units unless told they are normalised already.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from neurodiff_jax.crosscoder import sparsity

Params = dict[str, Array]
SPARSITY = ("batchtopk", "topk", "l1")


@dataclasses.dataclass(frozen=True)
class CrosscoderConfig:
  """The architecture: what a checkpoint needs to be used (training settings live in the run config)."""

  num_models: int
  d_model: int
  dict_size: int
  sparsity: str = "batchtopk"  # one of SPARSITY (checked in __post_init__ with a message naming them)
  k: int = 32  # active latents per token (BatchTopK: on average over the batch)
  dec_init_norm: float = 0.1

  def __post_init__(self):
    if self.sparsity not in SPARSITY:
      raise ValueError(f"unknown sparsity {self.sparsity!r}; choose one of {', '.join(SPARSITY)}.")
    if self.num_models < 1 or self.d_model < 1 or self.dict_size < 1:
      raise ValueError(f"num_models, d_model and dict_size must be positive, got {self.num_models}, "
                       f"{self.d_model}, {self.dict_size}.")
    if self.sparsity != "l1" and not 0 < self.k <= self.dict_size:
      raise ValueError(f"k={self.k} must be in [1, dict_size={self.dict_size}]: a token cannot use more latents "
                       "than the dictionary has.")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (stored with every checkpoint)."""
    return dataclasses.asdict(self)


def init_params(key: Array, cfg: CrosscoderConfig, mean: Float[Array, "M d"] | None = None) -> Params:
  """Decoder rows random with norm `dec_init_norm` per model, `W_enc = W_decᵀ`, `b_dec` = data mean, `b_enc = 0`."""
  m, M, d = cfg.dict_size, cfg.num_models, cfg.d_model
  w_dec = jax.random.normal(key, (m, M, d), jnp.float32)  # [m, M, d]
  w_dec = w_dec * (cfg.dec_init_norm / jnp.linalg.norm(w_dec, axis=-1, keepdims=True))
  return {
      "w_enc": jnp.transpose(w_dec, (1, 2, 0)),  # [M, d, m]
      "b_enc": jnp.zeros((m,), jnp.float32),
      "w_dec": w_dec,
      "b_dec": jnp.zeros((M, d), jnp.float32) if mean is None else jnp.asarray(mean, jnp.float32),
  }


def pre_activations(params: Params, x: Float[Array, "B M d"], precision: Any = None) -> Float[Array, "B m"]:
  """a = Σ_i x_i W_enc[i] + b_enc."""
  w = params["w_enc"]
  a = jnp.dot(x.reshape(x.shape[0], -1).astype(w.dtype), w.reshape(-1, w.shape[-1]), precision=precision)
  return a + params["b_enc"]


def decoder_norms(params: Params) -> Float[Array, "m M"]:
  """‖W_dec[j, i]‖ for every latent j and model i."""
  return jnp.linalg.norm(params["w_dec"].astype(jnp.float32), axis=-1)


def latent_norms(params: Params) -> Float[Array, "m"]:
  """Σ_i ‖W_dec[j, i]‖: latent j's decoder norm summed over the models (weights its score and its L1 penalty)."""
  return decoder_norms(params).sum(-1)


def scores(params: Params, a: Float[Array, "B m"]) -> Float[Array, "B m"]:
  """The selection score s_j = relu(a_j) · Σ_i ‖W_dec[j, i]‖ (float32)."""
  return jax.nn.relu(a.astype(jnp.float32)) * latent_norms(params)


def decode(params: Params, f: Float[Array, "B m"], precision: Any = None) -> Float[Array, "B M d"]:
  """x̂_i = f W_dec[:, i] + b_dec[i]."""
  w = params["w_dec"]
  x = jnp.dot(f.astype(w.dtype), w.reshape(w.shape[0], -1), precision=precision)
  return x.reshape(f.shape[0], *w.shape[1:]) + params["b_dec"]


def encode_train(params: Params, x: Float[Array, "B M d"], cfg: CrosscoderConfig,
                 precision: Any = None) -> tuple[Float[Array, "B m"], Float[Array, "B m"], Float[Array, ""]]:
  """Training-time codes: (f, pre-activations a, BatchTopK cut-off score or 0)."""
  a = pre_activations(params, x, precision)
  relu = jax.nn.relu(a)
  if cfg.sparsity == "l1":
    return relu, a, jnp.zeros((), jnp.float32)
  s = jax.lax.stop_gradient(scores(params, a))
  if cfg.sparsity == "batchtopk":
    mask, cut = sparsity.batch_topk_mask(s, cfg.k)
  else:
    mask, cut = sparsity.topk_mask(s, cfg.k), jnp.zeros((), jnp.float32)
  return jnp.where(mask, relu, 0.0), a, cut


def encode_inference(params: Params, x: Float[Array, "B M d"], cfg: CrosscoderConfig, theta: Float[Array, ""],
                     precision: Any = None) -> Float[Array, "B m"]:
  """Codes of each token on its own: BatchTopK by the threshold θ, TopK per token, L1 by ReLU."""
  a = pre_activations(params, x, precision)
  relu = jax.nn.relu(a)
  if cfg.sparsity == "l1":
    return relu
  s = scores(params, a)
  mask = sparsity.threshold_mask(s, theta) if cfg.sparsity == "batchtopk" else sparsity.topk_mask(s, cfg.k)
  return jnp.where(mask, relu, 0.0)


@dataclasses.dataclass
class Crosscoder:
  """A trained crosscoder for analysis: parameters, θ and the input normalisation.

  Inputs and outputs are in the models' original units by default. Batches that are normalised
  already (the store reader's `normalize=True`, which multiplies by the same `norm_scale`) go in
  with `normalized=True`, so that nothing is normalised twice.
  """

  cfg: CrosscoderConfig
  params: Params
  theta: float = 0.0
  norm_scale: np.ndarray | None = None  # [M]; x_normalised = x · norm_scale

  @property
  def scale(self) -> np.ndarray:
    """The per-model normalisation scalars, [M] float32 (x_normalised = x · scale; ones when trained unnormalised)."""
    s = np.ones(self.cfg.num_models, np.float32) if self.norm_scale is None else self.norm_scale
    return np.asarray(s, np.float32).reshape(self.cfg.num_models)

  def _check(self, x: Any, what: str, want: tuple[str, ...], sizes: dict[str, int]) -> Array:
    """`x` as float32 if its shape is [n, *want]; else an error naming the expected shape and the fix."""
    x = jnp.asarray(x, jnp.float32)
    expect = "[n, " + ", ".join(f"{k}={sizes[k]}" for k in want) + "]"
    if x.ndim == len(want) + 1 and all(x.shape[i + 1] == sizes[k] for i, k in enumerate(want)):
      return x
    fix = ""
    if want == ("M", "d") and x.ndim == 2 and x.shape[-1] == sizes["d"]:
      fix = (f" It got one model's activations [n, d]: stack the {sizes['M']} models' activations on axis 1, "
             "e.g. np.stack([x_base, x_chat], axis=1).")
    elif x.ndim == len(want) + 1:
      wrong = [f"{k}={x.shape[i + 1]} (this crosscoder has {k}={sizes[k]})" for i, k in enumerate(want)
               if x.shape[i + 1] != sizes[k]]
      fix = f" Got {', '.join(wrong)}: check the models, layer and dictionary it was trained on."
    raise ValueError(f"{what} needs {expect} ({'tokens, ' + ', '.join(want)}); got shape {tuple(x.shape)}.{fix}")

  def encode(self, x: ArrayLike, *, normalized: bool = False) -> Float[Array, "n m"]:
    """Sparse codes [n, m] of activations `x` [n, M, d], each token on its own.

    `x` in original units, or `normalized=True` for inputs already multiplied by `norm_scale`.
    """
    x = self._check(x, "Crosscoder.encode", ("M", "d"), {"M": self.cfg.num_models, "d": self.cfg.d_model})
    if not normalized:
      x = x * jnp.asarray(self.scale)[:, None]
    return encode_inference(self.params, x, self.cfg, jnp.float32(self.theta))

  def decode(self, f: ArrayLike, *, normalized: bool = False) -> Float[Array, "n M d"]:
    """Reconstructed activations [n, M, d] from codes [n, m]: original units, or normalised with `normalized=True`."""
    f = self._check(f, "Crosscoder.decode", ("m",), {"m": self.cfg.dict_size})
    x = decode(self.params, f)
    return x if normalized else x / jnp.asarray(self.scale)[:, None]

  def __call__(self, x: ArrayLike, *, normalized: bool = False) -> Float[Array, "n M d"]:
    """Reconstruction of `x` [n, M, d], in the units `x` is in (`normalized` as in `encode`)."""
    return self.decode(self.encode(x, normalized=normalized), normalized=normalized)

  def encoder(self) -> np.ndarray:
    """W_enc in original units, [M, d, m]: a = Σ_i x_i encoder()[i] + b_enc for x in original units."""
    return np.asarray(self.params["w_enc"], np.float32) * self.scale[:, None, None]

  def encoder_bias(self) -> np.ndarray:
    """b_enc, [m] (unit-free: it adds to the pre-activations)."""
    return np.asarray(self.params["b_enc"], np.float32)

  def decoder(self) -> np.ndarray:
    """W_dec in original units, [m, M, d]: x̂_i = f decoder()[:, i] + decoder_bias()[i] in original units."""
    return np.asarray(self.params["w_dec"], np.float32) / self.scale[None, :, None]

  def decoder_bias(self) -> np.ndarray:
    """b_dec in original units, [M, d]."""
    return np.asarray(self.params["b_dec"], np.float32) / self.scale[:, None]

  def decoder_norms(self) -> np.ndarray:
    """‖W_dec[j, i]‖ in model i's original units (what Δnorm reads), [m, M]."""
    return np.asarray(decoder_norms(self.params)) / self.scale[None, :]


__all__ = ["Crosscoder", "CrosscoderConfig", "Params", "decode", "decoder_norms", "encode_inference", "encode_train",
           "init_params", "latent_norms", "pre_activations", "scores"]
