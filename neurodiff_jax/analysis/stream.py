"""One streaming pass of a trained crosscoder over a store, feeding several accumulators.

Latent scaling, per-latent statistics and max-activating examples all need the same thing: the
crosscoder's inference-mode codes `f` (and reconstruction `x̂`) of every stored token. `run_pass`
reads the store in order (the next batch is read while the device works on this one), runs the
forward pass once per batch inside one jitted step, and hands the batch context to each
`Accumulator`'s pure `update`. Everything is in the crosscoder's normalised space
(`x · norm_scale`, docs/methods.md §4).

Sharding is training's: tokens on `data`, latents on `latent` (`crosscoder/sharding.py`); each
accumulator names the PartitionSpec of its arrays, and the sums over the batch are XLA's reductions.

Precision: matmuls at HIGHEST precision, sums over one batch in float32 on the device, and every
`fold_every` batches the device sums are added into float64 host sums and reset, so float32 never
accumulates over more than `fold_every · batch_size` tokens (benchmarks/latent_scaling.py measures
the difference at 100M tokens). The host state is saved every `save_every` folds, so a killed pass
resumes from its last save (`state_path`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int
from tqdm.auto import tqdm

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, KIND_TEXT
from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder.model import Crosscoder, decode, encode_inference

HIGHEST = jax.lax.Precision.HIGHEST
# Token kinds a pass can leave out: the store's kinds, and "bos" (a special token at position 0).
EXCLUDABLE = {"text": KIND_TEXT, "special": KIND_SPECIAL, "chat_template": KIND_TEMPLATE, "bos": -1}


@dataclasses.dataclass(frozen=True)
class Context:
  """What an accumulator sees of one batch (inside the jitted step)."""

  x: Float[Array, "B M d"]  # normalised activations
  f: Float[Array, "B m"]  # inference-mode codes, 0 on excluded and padding tokens
  x_hat: Float[Array, "B M d"]  # reconstruction (normalised)
  valid: Bool[Array, "B"]  # a stored token that is not excluded
  token: Int[Array, "B"]  # store token index
  kind: Int[Array, "B"]  # token_kind (activations.datasets.KIND_*)
  key: Array  # a PRNG key of this batch (the same on every run)
  params: dict[str, Array]  # the crosscoder's parameters (normalised units)


class Accumulator:
  """A quantity summed or merged over a pass: device state, a pure update, host folding, a result.

  Keys in `summed` are sums: each fold adds them (float64 / int64) to the host state and resets
  them on the device. Other keys are carried (top-k lists, maxima): the host keeps their latest
  value, and a resumed pass restarts the device from it.
  """

  name: str = ""
  summed: tuple[str, ...] = ()

  def init(self) -> dict[str, np.ndarray]:
    """The device state before the first batch (host arrays)."""
    raise NotImplementedError

  def specs(self) -> dict[str, P]:
    """PartitionSpec of each state array (default: replicated)."""
    return {}

  def update(self, state: dict[str, Array], ctx: Context) -> dict[str, Array]:
    """The state after one more batch (traced inside the jitted step)."""
    raise NotImplementedError

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The result from the folded host state."""
    raise NotImplementedError


def excluded_kinds(names: Sequence[str]) -> tuple[int, ...]:
  """Kind codes of the token kinds named in `names` (EXCLUDABLE); an unknown name is an error listing them."""
  out = []
  for n in names:
    if n not in EXCLUDABLE:
      raise ValueError(f"unknown token kind {n!r} to exclude; choose from {', '.join(EXCLUDABLE)}.")
    out.append(EXCLUDABLE[n])
  return tuple(out)


def token_mask(kind: np.ndarray, position: np.ndarray, exclude: Sequence[int]) -> np.ndarray:
  """True for tokens a pass counts: not of an excluded kind (code -1 = a special token at position 0)."""
  keep = np.ones(kind.shape, bool)
  for code in exclude:
    keep &= ~((kind == KIND_SPECIAL) & (position == 0)) if code == -1 else kind != code
  return keep


def crosscoder_fingerprint(cc: Crosscoder) -> str:
  """A short hash of a crosscoder's architecture and parameter sums (tells one checkpoint from another)."""
  parts = [json.dumps(cc.cfg.to_dict(), sort_keys=True), repr(float(cc.theta)), repr(cc.scale.tolist())]
  for k in sorted(cc.params):
    a = np.asarray(cc.params[k], np.float64)
    parts.append(f"{k}{a.shape}{a.sum()!r}{np.abs(a).sum()!r}{(a * a).sum()!r}")
  return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class _Prefetch:
  """Reads batch i + 1 of a store range on a thread while batch i is computed."""

  def __init__(self, read: Callable[[int], Any], first: int, last: int):
    self.read, self.next, self.last = read, first, last
    self.result: Any = None
    self.thread: threading.Thread | None = None
    self._start()

  def _start(self) -> None:
    if self.next >= self.last:
      self.thread = None
      return
    i = self.next

    def work():
      try:
        self.result = (i, self.read(i), None)
      except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
        self.result = (i, None, e)

    self.thread = threading.Thread(target=work, daemon=True)
    self.thread.start()

  def get(self) -> tuple[int, Any]:
    """The next batch (index, data); re-raises a failed read."""
    assert self.thread is not None
    self.thread.join()
    i, data, err = self.result
    if err is not None:
      raise err
    self.next += 1
    self._start()
    return i, data


def _save_state(path: Path, identity: str, next_batch: int, host: dict[str, dict[str, np.ndarray]]) -> None:
  """Writes the host state atomically (a killed save leaves the previous one)."""
  flat = {f"{a}/{k}": v for a, d in host.items() for k, v in d.items()}
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, __identity__=np.asarray(identity), __next__=np.asarray(next_batch), **flat)
  os.replace(tmp, path)


def _load_state(path: Path, identity: str) -> tuple[int, dict[str, dict[str, np.ndarray]]] | None:
  """(next batch, host state) saved by a pass with the same identity, else None."""
  if not path.is_file():
    return None
  with np.load(path) as z:
    if str(z["__identity__"]) != identity:
      return None
    host: dict[str, dict[str, np.ndarray]] = {}
    for key in z.files:
      if key.startswith("__"):
        continue
      a, k = key.split("/", 1)
      host.setdefault(a, {})[k] = z[key]
    return int(z["__next__"]), host


def _fold(acc: Accumulator, host: dict[str, np.ndarray], dev: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = dict(host)
  for k, v in dev.items():
    if k in acc.summed:
      wide = np.float64 if np.issubdtype(v.dtype, np.floating) else np.int64
      out[k] = out.get(k, 0) + v.astype(wide)
    else:
      out[k] = np.asarray(v)
  return out


def _device_state(acc: Accumulator, host: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """The device state to continue from: fresh sums, carried arrays from the host (if resuming)."""
  init = acc.init()
  if host is None:
    return init
  return {k: (v if k in acc.summed else host[k].astype(v.dtype)) for k, v in init.items()}


def run_pass(
    cc: Crosscoder,
    store: ActivationStore,
    layer: int,
    accumulators: Sequence[Accumulator],
    *,
    batch_size: int = 4096,
    exclude: Sequence[str] = ("bos",),
    mesh: jax.sharding.Mesh | None = None,
    max_tokens: int = 0,
    fold_every: int = 64,
    save_every: int = 8,
    state_path: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "analysis pass",
) -> dict[str, dict[str, np.ndarray]]:
  """Streams tokens [0, max_tokens or all) of `layer` through the crosscoder once; returns each accumulator's result."""
  names = [a.name for a in accumulators]
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"accumulators need distinct names, got {names}.")
  lay = store.layout
  if lay.num_models != cc.cfg.num_models or lay.d_model != cc.cfg.d_model:
    raise ValueError(f"the store {store.root} holds M={lay.num_models} models of width d={lay.d_model}, the crosscoder "
                     f"reads M={cc.cfg.num_models}, d={cc.cfg.d_model}: analyse it on the store it was trained on.")
  store.layer(layer)  # a missing layer is a StoreError listing the harvested ones
  n = lay.num_tokens if max_tokens <= 0 else min(int(max_tokens), lay.num_tokens)
  if n >= 2**31:
    raise ValueError(f"{n} tokens exceed the int32 token index of a pass; set max_tokens below 2**31.")
  codes = excluded_kinds(exclude)
  mesh = mesh or sharding.make_mesh(1, 1)
  data = mesh.shape["data"]
  if batch_size % data:
    raise ValueError(f"batch_size={batch_size} does not split over {data} data shards; use a multiple of {data}.")
  if cc.cfg.dict_size % mesh.shape["latent"]:
    raise ValueError(f"dict_size={cc.cfg.dict_size} does not split over {mesh.shape['latent']} latent shards.")
  num_batches = -(-n // batch_size)
  scale = cc.scale  # [M]: the normalisation the crosscoder was trained with

  specs = sharding.SPECS
  param_sh = {k: NamedSharding(mesh, specs.by_leaf()[k]) for k in cc.params}
  params = {k: jax.device_put(jnp.asarray(v, jnp.float32), param_sh[k]) for k, v in cc.params.items()}
  state_sh = [{k: NamedSharding(mesh, a.specs().get(k, P())) for k in a.init()} for a in accumulators]
  tok_sh = NamedSharding(mesh, P("data"))
  batch_sh = sharding.batch_sharding(mesh)
  cfg = cc.cfg
  base_key = jax.random.key(seed)

  def step(params, theta, states, x, valid, token, kind, index):
    f = encode_inference(params, x, cfg, theta, precision=HIGHEST)  # [B, m]
    f = jnp.where(valid[:, None], f, 0.0)
    x_hat = decode(params, f, precision=HIGHEST)  # [B, M, d]
    ctx = Context(x=x, f=f, x_hat=x_hat, valid=valid, token=token, kind=kind,
                  key=jax.random.fold_in(base_key, index), params=params)
    return [a.update(s, ctx) for a, s in zip(accumulators, states)]

  jstep = jax.jit(step, in_shardings=(param_sh, None, state_sh, batch_sh, tok_sh, tok_sh, tok_sh, None),
                  out_shardings=state_sh, donate_argnums=(2,))

  identity = json.dumps({"store": store.manifest.get("config_key"), "layer": layer, "tokens": n,
                         "batch_size": batch_size, "exclude": list(exclude), "seed": seed,
                         "crosscoder": crosscoder_fingerprint(cc),
                         "accumulators": {a.name: repr(a) for a in accumulators}}, sort_keys=True)
  path = Path(state_path) if state_path else None
  first, host = 0, {a.name: {} for a in accumulators}
  if path is not None:
    saved = _load_state(path, identity)
    if saved is not None:
      first, host = saved
  states = [jax.device_put(_device_state(a, host[a.name] or None), sh) for a, sh in zip(accumulators, state_sh)]
  theta = jnp.float32(cc.theta)

  def read(i: int):
    lo, hi = i * batch_size, min((i + 1) * batch_size, n)
    x = store.read(layer, lo, hi).astype(np.float32) * scale[None, :, None]
    kind = store.metadata("token_kind", lo, hi).astype(np.int32)
    valid = token_mask(kind, store.metadata("position", lo, hi), codes)
    pad = batch_size - (hi - lo)
    if pad:  # a fixed batch shape: one compilation
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
      kind = np.concatenate([kind, np.zeros(pad, np.int32)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    token = np.arange(lo, lo + batch_size, dtype=np.int32)
    return x, valid, token, kind

  def fold(next_batch: int, save: bool) -> None:
    nonlocal states
    dev = jax.device_get(states)
    for a, d in zip(accumulators, dev):
      host[a.name] = _fold(a, host[a.name], d)
    states = [jax.device_put(_device_state(a, host[a.name]), sh) for a, sh in zip(accumulators, state_sh)]
    if save and path is not None:
      _save_state(path, identity, next_batch, host)

  bar = tqdm(total=num_batches, initial=first, desc=desc, unit="batch", disable=not progress, smoothing=0.1)
  folds = 0
  prefetch = _Prefetch(read, first, num_batches)
  try:
    for _ in range(first, num_batches):
      i, (x, valid, token, kind) = prefetch.get()
      states = jstep(params, theta, states, x, valid, token, kind, i)
      bar.update(1)
      if (i + 1) % fold_every == 0 and i + 1 < num_batches:
        folds += 1
        fold(i + 1, save=folds % save_every == 0)
    fold(num_batches, save=True)
  finally:
    bar.close()
  return {a.name: a.finalize(host[a.name]) for a in accumulators}


def latent_selection(latents: Sequence[int] | np.ndarray | None, dict_size: int) -> np.ndarray:
  """The chosen latents as a sorted int array (None: all); an empty or out-of-range choice is an error."""
  if latents is None:
    return np.arange(dict_size)
  sel = np.asarray(latents, np.int64).reshape(-1)
  if sel.size == 0:
    raise ValueError("the chosen set of latents is empty; choose at least one latent, or None for all of them.")
  bad = sel[(sel < 0) | (sel >= dict_size)]
  if bad.size:
    raise ValueError(f"latent index {int(bad[0])} is out of range: the crosscoder has {dict_size} latents "
                     f"(0..{dict_size - 1}).")
  return np.unique(sel)


__all__ = ["EXCLUDABLE", "Accumulator", "Context", "crosscoder_fingerprint", "excluded_kinds", "latent_selection",
           "run_pass", "token_mask"]
