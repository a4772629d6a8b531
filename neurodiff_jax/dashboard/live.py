"""Live interaction with a model pair: next-token tables, greedy generations, steering, latent activations.

The dashboard's Live page holds one `LiveSession` per model pair (Streamlit's `st.cache_resource`), so
both models and the tokenizer load once per server session. Everything here is plain library code
(no Streamlit) and is tested directly against independent references (`tests/dashboard/test_live.py`).

Steering adds α · v to the residual after block L at every position (prompt and generated tokens),
in both models, through the forward's `interventions`. v is one unit of strength of its source:

- δ_p of a diff result's ADL (`adl/means.npz`): v = N_L · δ_p / ‖δ_p‖ with N_L the layer's typical
  residual norm of the fine-tuned model, the scaling `diffing/adl.py` steers with (α = 1 adds a vector
  as long as a typical residual);
- a PCA component of a diff result (`pca/components.npy`, unit vectors v_i at `done.json`'s layer):
  v = σ_i · v_i with σ_i = √variance_i (`pca_variance.parquet`), as the PCA section suggests;
- a crosscoder latent j: v = max_act_j · d_j^chat, the chat decoder row in original units times the
  latent's largest activation (`analysis/latents.parquet`), so α is a multiple of the latent's
  strongest firing, the convention of `analysis/steering.py`; a latent without one (never fired, or
  no analysis) steers in code units, v = d_j^chat (`latent_unit` says which, and the page's α label
  is its text).

Latent activations on typed text are the crosscoder's inference codes of the residuals at the run's
layer of both models, stacked [T, 2, d], normalised by the run's `norm_scale` and encoded with
`encode_inference` at full precision, as `analysis/stream.py` encodes the store.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from neurodiff_jax.crosscoder import Crosscoder
from neurodiff_jax.crosscoder import load as load_crosscoder
from neurodiff_jax.crosscoder.checkpoint import load_run_config
from neurodiff_jax.crosscoder.model import encode_inference
from neurodiff_jax.models import Transformer, amplify, load_model, load_tokenizer
from neurodiff_jax.models.sharding import put_batch
from neurodiff_jax.models.generate import GreedyGenerator, cut_at_stop, encode_prompt, stop_ids

T_BUCKET = 16  # prompts are right-padded to a multiple of this: few shapes, few compilations
CACHE_SIZE = 64  # results of model work a LiveSession keeps (generations, next-token distributions, residuals)
HIGHEST = jax.lax.Precision.HIGHEST


class LiveError(ValueError):
  """A live request that cannot run (a steering vector of the wrong size, a layer the models lack, ...)."""


# ------------------------------------------------------------------------------------------------ steering


@dataclasses.dataclass(frozen=True)
class Steering:
  """Add `alpha · vector` ([d], one unit of strength) after block `layer` at every position."""

  layer: int
  vector: np.ndarray
  alpha: float
  label: str = ""

  @property
  def addition(self) -> np.ndarray:
    """The vector added to the residual, [d] float32."""
    return (float(self.alpha) * np.asarray(self.vector, np.float64)).astype(np.float32)

  @property
  def key(self) -> tuple[int, str]:
    """What the models see of this steering (layer and the added vector's bytes), for LiveSession's cache."""
    return int(self.layer), hashlib.sha256(self.addition.tobytes()).hexdigest()


def _unit(v: np.ndarray) -> np.ndarray:
  norm = float(np.linalg.norm(v))
  return v / norm if norm > 0 else v


def adl_positions(means: dict[str, np.ndarray]) -> list[int]:
  """The position labels p of the δ_p rows (0..n-1 for means written before labels were kept)."""
  pos = means.get("positions")
  return [int(p) for p in (pos if pos is not None else range(np.asarray(means["delta"]).shape[1]))]


def adl_steering(means: dict[str, np.ndarray], layer: int, position: int, alpha: float) -> Steering:
  """Steering by δ_p of ADL's `means.npz` at `layer` and position label `position`: v = N_L · δ_p / ‖δ_p‖."""
  layers = [int(l) for l in np.asarray(means["layers"]).reshape(-1)]
  labels = adl_positions(means)
  if int(layer) not in layers:
    raise LiveError(f"ADL has no δ at layer {layer}; its means.npz holds layers {layers}: pick one of those.")
  if int(position) not in labels:
    raise LiveError(f"ADL has no δ at position {position}; its means.npz holds positions {labels}: pick one of those.")
  li, pi = layers.index(int(layer)), labels.index(int(position))
  delta = np.asarray(means["delta"], np.float64)[li, pi]  # [d]
  norm = float(np.asarray(means["typical_norm_ft"], np.float64).reshape(-1)[li])
  return Steering(int(layer), norm * _unit(delta), float(alpha), f"δ_p ADL layer {layer}, p={position}")


def read_pca(pca_dir: str | Path) -> dict[str, Any]:
  """A diff result's PCA outputs: {"layer", "components" [k, d], "std" [k]} from `<diff>/pca/`."""
  pca_dir = Path(pca_dir)
  comps = pca_dir / "components.npy"
  done = pca_dir / "done.json"
  if not comps.is_file() or not done.is_file():
    raise LiveError(f"no finished PCA in {pca_dir} (components.npy and done.json): run "
                    "`python -m launch.diff --config.methods='(\"pca\",)'` on this pair.")
  layer = int(json.loads(done.read_text())["summary"]["layer"])
  components = np.load(comps).astype(np.float64)
  var = pca_dir / "pca_variance.parquet"
  std = pd.read_parquet(var)["std"].to_numpy(np.float64)[:len(components)] if var.is_file() else \
      np.ones(len(components))
  return {"layer": layer, "components": components, "std": std}


def pca_steering(pca: dict[str, Any], component: int, alpha: float) -> Steering:
  """Steering by PCA component i of `read_pca`'s outputs: v = σ_i · v_i at the PCA's layer."""
  k = len(pca["components"])
  if not 0 <= int(component) < k:
    raise LiveError(f"PCA component {component} does not exist; this PCA kept components 0..{k - 1}.")
  i = int(component)
  return Steering(int(pca["layer"]), float(pca["std"][i]) * pca["components"][i], float(alpha),
                  f"PCA component {i} at layer {pca['layer']}")


@dataclasses.dataclass
class LoadedRun:
  """A crosscoder run for live use: the crosscoder, its layer and the latents' max activations (if analysed)."""

  path: Path
  crosscoder: Crosscoder
  layer: int
  max_act: np.ndarray | None  # [m] from analysis/latents.parquet, None without an analysis

  @functools.cached_property
  def _encode(self):
    cc = self.crosscoder
    params = {k: jnp.asarray(v, jnp.float32) for k, v in cc.params.items()}
    scale, theta, cfg = jnp.asarray(cc.scale)[:, None], jnp.float32(cc.theta), cc.cfg

    @jax.jit
    def encode(x):  # x [T, M, d] in original units → codes [T, m]
      return encode_inference(params, x * scale, cfg, theta, precision=HIGHEST)

    return encode

  def encode(self, x: np.ndarray) -> np.ndarray:
    """Codes [T, m] of activations [T, M, d] in original units, as the analysis pass encodes the store.

    Rows are padded with zeros to a multiple of T_BUCKET (inference codes are per token), so prompts of nearby
    lengths share one compilation instead of compiling per length.
    """
    x = np.asarray(x, np.float32)
    t = x.shape[0]
    padded = np.zeros((max(T_BUCKET, -(-t // T_BUCKET) * T_BUCKET),) + x.shape[1:], np.float32)
    padded[:t] = x
    return np.asarray(self._encode(jnp.asarray(padded)))[:t]


def load_run(path: str | Path) -> LoadedRun:
  """A crosscoder run's checkpoint (latest step), layer (analysis summary, else the run config) and max_act."""
  path = Path(path)
  cc = load_crosscoder(path)
  summary = path / "analysis" / "summary.json"
  layer = json.loads(summary.read_text()).get("layer") if summary.is_file() else None
  if layer is None:
    layer = load_run_config(path)[1]["run"]["layer"]
  table = path / "analysis" / "latents.parquet"
  max_act = None
  if table.is_file():
    lat = pd.read_parquet(table, columns=["latent", "max_act"])
    max_act = np.zeros(cc.cfg.dict_size, np.float64)
    max_act[lat.latent.to_numpy()] = lat.max_act.to_numpy(np.float64)
  return LoadedRun(path, cc, int(layer), max_act)


def latent_unit(run: LoadedRun, latent: int) -> tuple[float, str]:
  """(one unit of α for latent j, what that unit is): its max activation when the analysis found one (> 0), else
  1 code unit (a latent that never fired, or a run without an analysis). The Live page's α label is this text."""
  j = int(latent)
  if run.max_act is not None and 0 <= j < len(run.max_act) and run.max_act[j] > 0:
    return float(run.max_act[j]), f"× latent {j}'s max activation, {float(run.max_act[j]):.4g}"
  why = "it never fired on the analysed tokens" if run.max_act is not None else "the run has no analysis"
  return 1.0, f"× 1 code unit: latent {j} has no max activation ({why})"


def latent_steering(run: LoadedRun, latent: int, alpha: float) -> Steering:
  """Steering by latent j's chat decoder row at the run's layer: v = unit_j · d_j^chat (`latent_unit`)."""
  m = run.crosscoder.cfg.dict_size
  if not 0 <= int(latent) < m:
    raise LiveError(f"latent {latent} does not exist; this crosscoder has latents 0..{m - 1}.")
  j = int(latent)
  d = run.crosscoder.decoder()[j, -1].astype(np.float64)  # [d]: the fine-tuned (chat) model's decoder row
  unit, what = latent_unit(run, j)
  return Steering(run.layer, unit * d, float(alpha), f"latent {j} of {run.path.name} at layer {run.layer} (α {what})")


# ------------------------------------------------------------------------------------------------- session


@dataclasses.dataclass
class Generations:
  """Greedy continuations (text) of both models, unsteered and (when asked) steered, and where each stopped.

  `prompt_text` is the prompt as the models read it (the chat template applied, special tokens kept); `stops` maps
  each continuation (base, ft, base_steered, ft_steered) to why it ended: `stop_text` of it says so in words.
  """

  prompt: str
  base: str
  ft: str
  base_steered: str | None = None
  ft_steered: str | None = None
  ft_amplified: str | None = None  # the fine-tune with its weight difference amplified (`amplified_alpha`)
  amplified_alpha: float | None = None
  ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  prompt_text: str = ""
  stops: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # name -> (stop token or "", tokens)
  max_new_tokens: int = 0

  def stop_text(self, name: str) -> str:
    """Why continuation `name` ended: at a stop token (EOS, end of turn) or at the max_new_tokens limit."""
    token, n = self.stops.get(name, ("", len(self.ids.get(name, []))))
    if token:
      return f"stopped at {token!r} (end of sequence / turn) after {n} new token{'s' if n != 1 else ''}"
    return f"stopped at the {self.max_new_tokens}-token limit (no end-of-sequence token)"


@dataclasses.dataclass
class LatentActivations:
  """Per-token activations of chosen latents on a text: tokens [T], ids [T], acts [T, n] (columns = latents)."""

  tokens: list[str]
  token_ids: list[int]
  latents: list[int]
  acts: np.ndarray

  def frame(self) -> pd.DataFrame:
    """One row per token: position, token, token_id and one column `latent_<j>` per latent."""
    df = pd.DataFrame({"position": np.arange(len(self.tokens)), "token": self.tokens, "token_id": self.token_ids})
    for i, j in enumerate(self.latents):
      df[f"latent_{j}"] = self.acts[:, i]
    return df


def _forward_fn(model: Transformer):
  """A jitted forward over the model's state with an optional addition after one block (compiled per shape)."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("capture", "layer"))
  def run(state, ids, mask, add, capture=(), layer=-1):
    interventions = {layer: lambda x: x + add.astype(x.dtype)[None, None, :]} if layer >= 0 else None
    out = nnx.merge(graphdef, state)(ids, mask, capture=capture, interventions=interventions)
    return out.logits, out.residuals

  def forward(ids, mask, add=None, capture=(), layer=-1):
    a = jnp.zeros((model.cfg.hidden_size,), jnp.float32) if add is None else jnp.asarray(add, jnp.float32)
    return run(state, ids, mask, a, capture=tuple(capture), layer=int(layer))

  return forward


class LiveSession:
  """Both models of a pair and the fine-tuned model's tokenizer, loaded once; prompts, generations, latents."""

  def __init__(self, base_path: str, ft_path: str, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None):
    self.base_path, self.ft_path, self.dtype = str(base_path), str(ft_path), str(dtype)
    self.mesh = mesh  # a model mesh (`models.sharding.model_mesh`): each model's weights split over its devices
    self.base = load_model(self.base_path, dtype, mesh)
    self.ft = load_model(self.ft_path, dtype, mesh)
    for what in ("hidden_size", "num_layers", "vocab_size"):
      a, b = getattr(self.base.cfg, what), getattr(self.ft.cfg, what)
      if a != b:
        raise LiveError(f"the models differ in {what} ({a} vs {b}): {self.base_path} and {self.ft_path} are not a "
                        "base / fine-tuned pair; pick a run or diff of one pair.")
    self.tokenizer = load_tokenizer(self.ft_path)  # the fine-tuned model's: it has the chat template when any has
    self.chat = bool(getattr(self.tokenizer, "chat_template", None))
    self._stops = stop_ids(self.tokenizer)
    self._fwd = {"base": _forward_fn(self.base), "ft": _forward_fn(self.ft)}
    self._gen = {"base": GreedyGenerator(self.base, T_BUCKET), "ft": GreedyGenerator(self.ft, T_BUCKET)}
    self._amplified: tuple[float, nnx.State] | None = None  # the last α's parameters (one extra copy at a time)
    # Results of model work by (what, prompt ids, steering, length): a repeated click runs no model.
    self._cache: collections.OrderedDict[tuple, Any] = collections.OrderedDict()

  def _cached(self, key: tuple, work: Callable[[], Any]) -> Any:
    """`work()`'s result for `key`, computed once (the CACHE_SIZE most recent kept)."""
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    value = work()
    self._cache[key] = value
    while len(self._cache) > CACHE_SIZE:
      self._cache.popitem(last=False)
    return value

  @property
  def num_layers(self) -> int:
    """Blocks per model."""
    return int(self.base.cfg.num_layers)

  @property
  def hidden_size(self) -> int:
    """Residual width d."""
    return int(self.base.cfg.hidden_size)

  def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
    """A prompt's ids: a user turn with the generation prompt when the tokenizer has a chat template, else BOS+text."""
    if not isinstance(prompt, str) or not prompt.strip():
      raise LiveError("the prompt is empty; type some text.")
    ids = encode_prompt(self.tokenizer, prompt, self.chat if chat is None else bool(chat))
    if not ids:
      raise LiveError(f"the prompt {prompt!r} has no tokens; type some text.")
    return ids

  def _check_steer(self, steer: Steering | None) -> Steering | None:
    if steer is None:
      return None
    v = np.asarray(steer.vector)
    if v.shape != (self.hidden_size,):
      raise LiveError(f"the steering vector ({steer.label or 'given'}) has shape {v.shape}, but these models' residual "
                      f"has d={self.hidden_size}: steer with a diff or run of this model pair.")
    if not 0 <= int(steer.layer) < self.num_layers:
      raise LiveError(f"steering layer {steer.layer} is out of range for models with {self.num_layers} layers; "
                      "steer with a diff or run of this model pair.")
    return steer

  def _batch(self, ids: Sequence[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    t = len(ids)
    tp = -(-t // T_BUCKET) * T_BUCKET
    pad = getattr(self.tokenizer, "pad_token_id", None)
    row = np.full((1, tp), 0 if pad is None else int(pad), np.int32)
    row[0, :t] = ids
    mask = np.zeros((1, tp), bool)
    mask[0, :t] = True  # right padding: causal attention keeps the real tokens' outputs unchanged
    return put_batch(self.mesh, row, mask)

  def next_token_probs(self, ids: Sequence[int], steer: Steering | None = None) -> dict[str, np.ndarray]:
    """Each model's next-token distribution [V] (float64) after `ids`, steered when asked (cached: read-only)."""
    steer = self._check_steer(steer)

    def work() -> dict[str, np.ndarray]:
      x, mask = self._batch(ids)
      out = {}
      for name, fwd in self._fwd.items():
        add, layer = (steer.addition, steer.layer) if steer is not None else (None, -1)
        logits, _ = fwd(x, mask, add=add, layer=layer)
        # A traced index: a Python int would compile a new slice for every prompt length.
        z = np.asarray(jax.lax.dynamic_index_in_dim(logits[0], jnp.int32(len(ids) - 1), keepdims=False), np.float64)
        p = np.exp(z - z.max())
        out[name] = p / p.sum()
      return out

    return self._cached(("probs", tuple(int(i) for i in ids), steer.key if steer is not None else None), work)

  def next_token_table(self, prompt: str, top_k: int = 10, steer: Steering | None = None,
                       chat: bool | None = None) -> pd.DataFrame:
    """Both models' next tokens side by side: the union of each one's top k, by the larger probability.

    Columns: token, token_id, p_base, p_ft, rank_base, rank_ft (1 = most likely), p_diff = p_ft − p_base.
    """
    if int(top_k) < 1:
      raise LiveError(f"top_k={top_k} must be at least 1.")
    probs = self.next_token_probs(self.encode(prompt, chat), steer)
    ranks = {k: np.argsort(np.argsort(-p, kind="stable"), kind="stable") + 1 for k, p in probs.items()}
    ids = sorted({int(i) for p in probs.values() for i in np.argsort(-p, kind="stable")[:int(top_k)]})
    df = pd.DataFrame({"token": [self.tokenizer.decode([i]) for i in ids], "token_id": ids,
                       "p_base": probs["base"][ids], "p_ft": probs["ft"][ids],
                       "rank_base": ranks["base"][ids], "rank_ft": ranks["ft"][ids]})
    df["p_diff"] = df.p_ft - df.p_base
    order = np.maximum(df.p_base, df.p_ft).to_numpy()
    return df.iloc[np.argsort(-order, kind="stable")].reset_index(drop=True)

  def _generate(self, name: str, ids: list[int], max_new_tokens: int,
                steer: Steering | None) -> list[tuple[list[int], int | None]]:
    """[unsteered] or [unsteered, steered] continuations of one model, each (tokens before the first stop token, that
    stop token or None when the limit came first): both rows in one compiled call."""
    pad = getattr(self.tokenizer, "pad_token_id", None)
    if steer is None:
      rows, add, layer = [ids], None, -1
    else:  # [2, d]: row 0 unsteered, row 1 steered
      rows, add, layer = [ids, ids], np.stack([np.zeros(self.hidden_size, np.float32), steer.addition]), steer.layer
    outs = self._gen[name](rows, int(max_new_tokens), add=add, layer=int(layer), pad_id=0 if pad is None else int(pad))
    result = []
    for out in outs:
      kept = cut_at_stop(out, self._stops)
      result.append((kept, int(out[len(kept)]) if len(kept) < len(out) else None))
    return result

  def generate(self, prompt: str, max_new_tokens: int = 32, steer: Steering | None = None,
               chat: bool | None = None) -> Generations:
    """Greedy continuations of both models (cut at EOS / end of turn); steered ones too when `steer` is given.

    Cached by (prompt ids, steering, max_new_tokens): the same request again runs no model (the result is shared:
    read it, do not change it).
    """
    if int(max_new_tokens) < 1:
      raise LiveError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    steer = self._check_steer(steer)
    ids = self.encode(prompt, chat)
    key = ("gen", tuple(ids), int(max_new_tokens), steer.key if steer is not None else None)
    return self._cached(key, lambda: self._generations(prompt, ids, int(max_new_tokens), steer))

  @functools.cached_property
  def _amplification(self) -> tuple[list, Any, str]:
    """(the parameters amplified: every block's projections, the adapter to amplify along or None, its description);
    checked and read once per session."""
    specs = amplify.selected_params(self.ft.cfg, range(self.num_layers), list(amplify.MODULES))
    try:
      amplify.check_shapes(self.base, self.ft, specs)
    except ValueError as e:
      raise LiveError(str(e)) from None
    return (specs, *amplify.delta_source(self.base, self.ft))

  @property
  def amplification_source(self) -> str:
    """What the weight amplification adds α times: W_ft − W_base of the loaded models, or the adapter's ΔW."""
    return self._amplification[2]

  def amplified_state(self, alpha: float) -> nnx.State:
    """The fine-tune's parameters with every block's projections at W_base + α ΔW (`models.amplify`), the last α's kept."""
    if self._amplified is None or self._amplified[0] != float(alpha):
      specs, adapter, _ = self._amplification
      self._amplified = None  # the previous α's copy goes before the next is built
      self._amplified = (float(alpha), amplify.amplified_state(self.base, self.ft, specs, float(alpha), adapter))
    return self._amplified[1]

  def generate_amplified(self, prompt: str, alpha: float, max_new_tokens: int = 32, steer: Steering | None = None,
                         chat: bool | None = None) -> Generations:
    """`generate`'s continuations (steered too with `steer`) plus the fine-tune's greedy one with its weight
    difference amplified α times (unsteered)."""
    if not np.isfinite(alpha):
      raise LiveError(f"weight amplification α={alpha} must be a finite number.")
    gen = self.generate(prompt, max_new_tokens, steer=steer, chat=chat)
    ids = self.encode(prompt, chat)

    def work() -> tuple[list[int], int | None]:
      pad = getattr(self.tokenizer, "pad_token_id", None)
      out = self._gen["ft"]([ids], int(max_new_tokens), pad_id=0 if pad is None else int(pad),
                            state=self.amplified_state(alpha))[0]
      kept = cut_at_stop(out, self._stops)
      return kept, int(out[len(kept)]) if len(kept) < len(out) else None

    tokens, stop = self._cached(("amp", tuple(ids), int(max_new_tokens), float(alpha)), work)
    dec = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)
    return dataclasses.replace(gen, ft_amplified=dec(tokens), amplified_alpha=float(alpha),
                               ids={**gen.ids, "ft_amplified": tokens},
                               stops={**gen.stops, "ft_amplified": ("" if stop is None else dec([stop]), len(tokens))})

  def _generations(self, prompt: str, ids: list[int], max_new_tokens: int, steer: Steering | None) -> Generations:
    dec = lambda t: self.tokenizer.decode(t, skip_special_tokens=False)
    out, stops = {}, {}
    for name in ("base", "ft"):
      rows = self._generate(name, ids, max_new_tokens, steer)
      for suffix, (tokens, stop) in zip(("", "_steered"), rows):
        out[name + suffix] = tokens
        stops[name + suffix] = ("" if stop is None else dec([stop]), len(tokens))
    return Generations(prompt=prompt, base=dec(out["base"]), ft=dec(out["ft"]),
                       base_steered=dec(out["base_steered"]) if steer is not None else None,
                       ft_steered=dec(out["ft_steered"]) if steer is not None else None, ids=out,
                       prompt_text=dec(ids), stops=stops, max_new_tokens=max_new_tokens)

  def residuals(self, ids: Sequence[int], layer: int) -> np.ndarray:
    """Both models' residuals after block `layer` on `ids`, stacked [T, 2, d] (base first), float32."""
    if not 0 <= int(layer) < self.num_layers:
      raise LiveError(f"layer {layer} is out of range for models with {self.num_layers} layers: this run was trained "
                      "on another model pair; pick the run's own pair.")

    def work() -> np.ndarray:
      x, mask = self._batch(ids)
      # Sliced on the host: slicing the device array to the prompt's length compiled once per length.
      acts = [np.asarray(self._fwd[n](x, mask, capture=(int(layer),))[1][int(layer)][0], np.float32)[:len(ids)]
              for n in ("base", "ft")]
      return np.stack(acts, axis=1)

    return self._cached(("residuals", tuple(int(i) for i in ids), int(layer)), work)

  def latent_activations(self, text: str, run: LoadedRun, latents: Sequence[int],
                         chat: bool = False) -> LatentActivations:
    """Per-token activations of `latents` of `run`'s crosscoder on `text` (plain text after BOS by default)."""
    cc = run.crosscoder
    if cc.cfg.d_model != self.hidden_size or cc.cfg.num_models != 2:
      raise LiveError(f"{run.path} is a crosscoder of {cc.cfg.num_models} models with d={cc.cfg.d_model}, not of "
                      f"this pair (2 models, d={self.hidden_size}): pick the run's own model pair.")
    chosen = [int(j) for j in latents]
    bad = [j for j in chosen if not 0 <= j < cc.cfg.dict_size]
    if bad:
      raise LiveError(f"latent(s) {bad} do not exist; this crosscoder has latents 0..{cc.cfg.dict_size - 1}.")
    ids = self.encode(text, chat)
    codes = run.encode(self.residuals(ids, run.layer))  # [T, m]
    return LatentActivations(tokens=[self.tokenizer.decode([i]) for i in ids], token_ids=list(ids), latents=chosen,
                             acts=codes[:, chosen])


__all__ = ["CACHE_SIZE", "Generations", "LatentActivations", "LiveError", "LiveSession", "LoadedRun", "Steering",
           "adl_positions", "adl_steering", "latent_steering", "latent_unit", "load_run", "pca_steering", "read_pca"]
