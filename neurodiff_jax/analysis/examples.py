"""Per-latent statistics and max-activating examples, streamed over a store (one pass, fixed memory).

`LatentStats` sums, per latent, how often it fires, its activation mass, and both restricted to
chat-template tokens (`token_kind` special or chat_template: turn markers, role names); its maximum
is carried. `template_share` is the fraction of a latent's firings that land on template tokens.

`TopExamples` keeps on the device, per latent, the `top_k` largest activations with their store
token index, and a uniform sample of `sample_size` of its firings (the firings with the largest
hash keys, a bottom-k sketch: the same sample whatever the batch order). Each batch merges its own
per-latent top-k into the running lists, so memory is [m, top_k + sample_size] whatever the number
of tokens. Examples per activation quantile are drawn from the sample at the end (`quantile_examples`),
the convention of SAE dashboards (a few contexts from each quantile of the latent's activations).

`ActivationHistogram` counts each latent's activations over every analysed token in fixed log-spaced
bins (a scatter-add per batch), [m, bins] whatever the number of tokens: the activation distribution
of a latent page, not the distribution of the few stored examples.

`contexts` reads each example's document window from the store, decodes it, and gives the
latent's activation on every token of the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE
from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.analysis.stream import Accumulator, Context
from neurodiff_jax.crosscoder.model import Crosscoder


def is_template(kind: Array) -> Array:
  """Chat-template tokens: special ids (turn markers) and template scaffolding outside message contents."""
  return (kind == KIND_SPECIAL) | (kind == KIND_TEMPLATE)


class LatentStats(Accumulator):
  """Firing counts, activation mass (both also on template tokens only), maximum, and the tokens counted."""

  name = "stats"
  summed = ("count", "mass", "count_template", "mass_template", "tokens", "tokens_template")

  def __init__(self, dict_size: int, latent_shards: int = 1):
    self.m = dict_size
    self.shard = dict_size % latent_shards == 0

  def __repr__(self) -> str:
    return f"LatentStats({self.m})"

  def init(self) -> dict[str, np.ndarray]:
    z = lambda dt: np.zeros(self.m, dt)
    return {"count": z(np.int32), "mass": z(np.float32), "count_template": z(np.int32),
            "mass_template": z(np.float32), "max": z(np.float32), "tokens": np.zeros((), np.int32),
            "tokens_template": np.zeros((), np.int32)}

  def specs(self) -> dict[str, P]:
    lat = P("latent") if self.shard else P()
    return {k: lat for k in ("count", "mass", "count_template", "mass_template", "max")}

  def update(self, state: dict[str, Array], ctx: Context) -> dict[str, Array]:
    f = ctx.f  # [B, m]
    tpl = (is_template(ctx.kind) & ctx.valid).astype(f.dtype)[:, None]  # [B, 1]
    on = (f > 0).astype(jnp.int32)
    return {"count": state["count"] + on.sum(0), "mass": state["mass"] + f.sum(0),
            "count_template": state["count_template"] + jnp.sum(on * tpl.astype(jnp.int32), 0),
            "mass_template": state["mass_template"] + jnp.sum(f * tpl, 0),
            "max": jnp.maximum(state["max"], f.max(0)), "tokens": state["tokens"] + ctx.valid.sum(),
            "tokens_template": state["tokens_template"] + jnp.sum(tpl).astype(jnp.int32)}

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """freq, max_act, template_share (of firings) and template_mass_share (of activation mass), per latent."""
    count, tokens = host["count"].astype(np.float64), max(int(host["tokens"]), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
      share = np.where(count > 0, host["count_template"] / count, np.nan)
      mass_share = np.where(host["mass"] > 0, host["mass_template"] / host["mass"], np.nan)
    return {"count": host["count"], "freq": count / tokens, "max_act": host["max"].astype(np.float64),
            "mean_act": np.where(count > 0, host["mass"] / np.maximum(count, 1), np.nan),
            "template_share": share, "template_mass_share": mass_share, "tokens": np.asarray(int(host["tokens"])),
            "template_token_fraction": np.asarray(int(host["tokens_template"]) / tokens)}


HIST_DECADES = (-4.0, 4.0)  # log10 of the activation range the histogram's bins span (codes are unit-free)
HIST_BINS = 64  # 8 bins a decade


def histogram_edges(bins: int = HIST_BINS, decades: tuple[float, float] = HIST_DECADES) -> np.ndarray:
  """The bins+1 log-spaced nominal edges of `ActivationHistogram`; bin 0 reaches down to 0, the last bin up to ∞."""
  return np.logspace(decades[0], decades[1], bins + 1)


class ActivationHistogram(Accumulator):
  """Per latent, a fixed-bin histogram of its activations over every analysed token where it fired: [m, bins].

  The bins are log-spaced (`histogram_edges`): bin k holds activations in [e_k, e_{k+1}), bin 0 everything in
  (0, e_1) and the last bin everything ≥ e_{bins-1}, so no firing is lost and each latent's bins sum to its firing
  count. Streaming and order-free: each batch's codes get a bin index, floor((log10 f − lo) · bins / (hi − lo))
  clipped to the bins, and a scatter-add of the firings (f > 0) into [m, bins] counts. Its temporary memory is a few
  [B, m] int32 arrays, like the other accumulators' (a compare of the codes against every edge, [B, m, bins], was
  measured to be materialised by XLA:CPU: 8.3 GB at B = 4,096, m = 8,192). Latents sit on the `latent` axis.
  """

  name = "histogram"
  summed = ("counts",)

  def __init__(self, dict_size: int, latent_shards: int = 1, bins: int = HIST_BINS,
               decades: tuple[float, float] = HIST_DECADES):
    if bins < 2 or not decades[1] > decades[0]:
      raise ValueError(f"bins={bins} must be at least 2 and decades={decades} increasing.")
    self.m, self.bins, self.decades = dict_size, int(bins), (float(decades[0]), float(decades[1]))
    self.shard = dict_size % latent_shards == 0

  def __repr__(self) -> str:
    return f"ActivationHistogram({self.m}, {self.bins}, {self.decades})"

  def init(self) -> dict[str, np.ndarray]:
    return {"counts": np.zeros((self.m, self.bins), np.int32)}

  def specs(self) -> dict[str, P]:
    return {"counts": P("latent", None)} if self.shard else {}

  def update(self, state: dict[str, Array], ctx: Context) -> dict[str, Array]:
    f = ctx.f  # [B, m]; 0 on excluded and padding tokens
    lo, hi = self.decades
    on = f > 0
    where = (jnp.log10(jnp.where(on, f, 1.0)) - lo) * (self.bins / (hi - lo))  # [B, m], the bin in fractional units
    idx = jnp.clip(jnp.floor(where), 0, self.bins - 1).astype(jnp.int32)  # [B, m]
    lat = jax.lax.broadcasted_iota(jnp.int32, f.shape, 1)  # [B, m]
    return {"counts": state["counts"].at[lat, idx].add(on.astype(jnp.int32))}

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """counts [m, bins] (int64) and the nominal edges [bins + 1]."""
    return {"counts": np.asarray(host["counts"], np.int64), "edges": histogram_edges(self.bins, self.decades)}


def _hash_keys(token: Array, m: int) -> Array:
  """A float in [0, 1) per (token, latent), from an integer hash: a fixed random order of the firings."""
  lat = jnp.arange(m, dtype=jnp.uint32)[None, :]
  h = token.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1) ^ (lat * jnp.uint32(0x85EBCA77))
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  h = h ^ (h >> 16)
  return (h >> 8).astype(jnp.float32) / jnp.float32(1 << 24)


def _batch_top(vals: Array, toks: Array, carry: tuple[Array, ...], k: int) -> tuple[Array, ...]:
  """Per latent, the k largest of a batch's `vals` [B, m] with their `toks` [B] and carried [B, m] arrays."""
  v, i = jax.lax.top_k(vals.T, min(k, vals.shape[0]))  # [m, k]
  return (v, toks[i], *(jnp.take_along_axis(c.T, i, axis=1) for c in carry))


def _sharded_batch_top(vals: Array, toks: Array, carry: tuple[Array, ...], k: int,
                       mesh: jax.sharding.Mesh | None) -> tuple[Array, ...]:
  """`_batch_top` with the batch split over `data`: each shard's top k, all-gathered, then the top k of those.

  Written as shard_map so that only [m, data · k] candidates cross devices: a top-k over a sharded
  batch axis left to XLA may gather the whole [B, m] code matrix onto every device.
  """
  if mesh is None or mesh.shape["data"] == 1:
    return _batch_top(vals, toks, carry, k)
  lat = "latent" if vals.shape[1] % mesh.shape["latent"] == 0 else None

  def local(vals, toks, *carry):
    part = _batch_top(vals, toks, carry, k)  # [m_local, k] each
    gathered = [jax.lax.all_gather(a, "data", axis=1, tiled=True) for a in part]  # [m_local, data·k]
    v, i = jax.lax.top_k(gathered[0], k)
    return (v, *(jnp.take_along_axis(a, i, axis=1) for a in gathered[1:]))

  spec_bm, spec_m = P("data", lat), P(lat, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(spec_bm, P("data"), *(spec_bm for _ in carry)),
                     out_specs=tuple(spec_m for _ in range(2 + len(carry))), check_vma=False)
  return fn(vals, toks, *carry)


def _merge(run: tuple[Array, ...], new: tuple[Array, ...], k: int) -> tuple[Array, ...]:
  """The k largest (by the first array) of the running lists [m, k] and a batch's candidates [m, k']."""
  both = [jnp.concatenate([a, b], 1) for a, b in zip(run, new)]
  v, i = jax.lax.top_k(both[0], k)
  return (v, *(jnp.take_along_axis(a, i, axis=1) for a in both[1:]))


class TopExamples(Accumulator):
  """Per latent: the top_k activations (value, token) and a uniform sample of sample_size firings."""

  name = "examples"

  def __init__(self, dict_size: int, top_k: int = 20, sample_size: int = 64, latent_shards: int = 1,
               mesh: jax.sharding.Mesh | None = None):
    if top_k < 1 or sample_size < 0:
      raise ValueError(f"top_k={top_k} must be ≥ 1 and sample_size={sample_size} ≥ 0.")
    self.m, self.k, self.r = dict_size, top_k, sample_size
    self.shard = dict_size % latent_shards == 0
    self.mesh = mesh

  def __repr__(self) -> str:
    return f"TopExamples({self.m}, {self.k}, {self.r})"

  def init(self) -> dict[str, np.ndarray]:
    m, k, r = self.m, self.k, max(self.r, 1)
    return {"top_val": np.zeros((m, k), np.float32), "top_tok": np.full((m, k), -1, np.int32),
            "sample_key": np.full((m, r), -1.0, np.float32), "sample_val": np.zeros((m, r), np.float32),
            "sample_tok": np.full((m, r), -1, np.int32)}

  def specs(self) -> dict[str, P]:
    return {k: P("latent") for k in self.init()} if self.shard else {}

  def update(self, state: dict[str, Array], ctx: Context) -> dict[str, Array]:
    f = ctx.f  # [B, m]
    top = _sharded_batch_top(f, ctx.token, (), self.k, self.mesh)
    top_val, top_tok = _merge((state["top_val"], state["top_tok"]), top, self.k)
    out = dict(state, top_val=top_val, top_tok=top_tok)
    if self.r:
      keys = jnp.where(f > 0, _hash_keys(ctx.token, self.m), -1.0)  # [B, m]
      batch = _sharded_batch_top(keys, ctx.token, (f,), self.r, self.mesh)  # (key, token, value)
      run = (state["sample_key"], state["sample_tok"], state["sample_val"])
      out["sample_key"], out["sample_tok"], out["sample_val"] = _merge(run, batch, self.r)
    return out

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The carried lists; empty slots have token -1."""
    top_tok = np.where(host["top_val"] > 0, host["top_tok"], -1)
    sample_tok = np.where(host["sample_key"] >= 0, host["sample_tok"], -1)
    return {"top_val": host["top_val"], "top_tok": top_tok, "sample_val": host["sample_val"], "sample_tok": sample_tok}


def quantile_examples(vals: np.ndarray, toks: np.ndarray, n_quantiles: int = 4,
                      per_quantile: int = 3) -> list[tuple[int, float, int]]:
  """(quantile, value, token) examples of one latent: its sampled firings split into activation quantiles."""
  ok = toks >= 0
  v, t = vals[ok], toks[ok]
  if not len(v):
    return []
  order = np.argsort(v, kind="stable")
  v, t = v[order], t[order]
  out = []
  for q, part in enumerate(np.array_split(np.arange(len(v)), n_quantiles)):
    if not len(part):
      continue
    pick = part[np.unique(np.linspace(0, len(part) - 1, min(per_quantile, len(part))).round().astype(int))]
    out += [(q + 1, float(v[i]), int(t[i])) for i in pick]
  return out


def example_rows(latents: Sequence[int] | np.ndarray, ex: dict[str, np.ndarray], n_quantiles: int = 4,
                 per_quantile: int = 3) -> pd.DataFrame:
  """One row per example of the chosen latents: latent, group ("top" or "q1".."qN"), rank, activation, token."""
  rows: list[dict[str, Any]] = []
  for j in latents:
    for r, (v, t) in enumerate(zip(ex["top_val"][j], ex["top_tok"][j])):
      if t >= 0:
        rows.append({"latent": int(j), "group": "top", "rank": r, "activation": float(v), "token": int(t)})
    for r, (q, v, t) in enumerate(quantile_examples(ex["sample_val"][j], ex["sample_tok"][j], n_quantiles,
                                                    per_quantile)):
      rows.append({"latent": int(j), "group": f"q{q}", "rank": r, "activation": v, "token": t})
  cols = ["latent", "group", "rank", "activation", "token"]
  return pd.DataFrame(rows, columns=cols).astype({"latent": "int64", "rank": "int64", "token": "int64"})


def dataset_names(store: ActivationStore) -> tuple[np.ndarray, list[str]]:
  """(first document index of each dataset, dataset names) from the store's manifest."""
  ds = store.manifest.get("datasets") or [{"path": "?"}]
  counts = [int(d.get("documents", 0)) for d in ds]
  names = [str(d.get("path", "?")).rsplit("/", 1)[-1] for d in ds]
  return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), names


def contexts(cc: Crosscoder, store: ActivationStore, layer: int, rows: pd.DataFrame, tokenizer: Any,
             before: int = 12, after: int = 4, chunk: int = 4096) -> pd.DataFrame:
  """`rows` (latent, token) with the example's document, position, dataset and decoded context window.

  Adds columns doc_index, position, dataset, token_id, context_tokens (decoded, one string per token),
  context_acts (the latent's activation on each), context_index (where the example token sits).
  """
  n = store.layout.num_tokens
  out = rows.copy()
  if not len(rows):
    for c in ("doc_index", "position", "dataset", "token_id", "context_tokens", "context_acts", "context_index"):
      out[c] = []
    return out
  tok = rows["token"].to_numpy()
  if tok.min() < 0 or tok.max() >= n:
    raise ValueError(f"example token {int(tok.max())} is outside the store's {n} tokens.")
  doc_all = store.metadata("doc_index")
  lo = np.maximum(tok - before, 0)
  hi = np.minimum(tok + after + 1, n)
  lo = np.array([l + int(np.argmax(doc_all[l:t + 1] == doc_all[t])) for l, t in zip(lo, tok)])  # same document
  hi = np.array([t + 1 + int(np.sum(doc_all[t + 1:h] == doc_all[t])) for t, h in zip(tok, hi)])
  need = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]))
  token_ids = store.metadata("token_id")
  # Contiguous runs of the tokens needed, each read once (windows of nearby examples merge).
  breaks = np.flatnonzero(np.diff(need) > 1) + 1
  runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(need, breaks)]
  wanted: dict[int, set[int]] = {}  # token -> the latents whose windows include it
  for a, b, j in zip(lo, hi, rows["latent"]):
    for t in range(a, b):
      wanted.setdefault(t, set()).add(int(j))
  acts: dict[tuple[int, int], float] = {}
  scale = cc.scale
  buf: list[np.ndarray] = []
  idx: list[int] = []

  def flush() -> None:
    if not buf:
      return
    x = np.concatenate(buf).astype(np.float32) * scale[None, :, None]
    f = np.asarray(cc.encode(x, normalized=True))  # [n, m]
    for i, t in enumerate(idx):
      for j in wanted[t]:
        acts[t, j] = float(f[i, j])
    buf.clear()
    idx.clear()

  for a, b in runs:
    buf.append(store.read(layer, a, b))
    idx.extend(range(a, b))
    if len(idx) >= chunk:
      flush()
  flush()
  starts, names = dataset_names(store)
  piece: dict[int, str] = {}

  def text(i: int) -> str:
    if i not in piece:
      piece[i] = tokenizer.decode([i]) if tokenizer is not None else str(i)
    return piece[i]

  positions = store.metadata("position")
  out["doc_index"] = doc_all[tok].astype(np.int64)
  out["position"] = positions[tok].astype(np.int64)
  out["dataset"] = [names[int(np.searchsorted(starts, d, side="right")) - 1] for d in doc_all[tok]]
  out["token_id"] = token_ids[tok].astype(np.int64)
  out["context_tokens"] = [[text(int(token_ids[i])) for i in range(a, b)] for a, b in zip(lo, hi)]
  out["context_acts"] = [[acts[i, int(j)] for i in range(a, b)] for a, b, j in zip(lo, hi, rows["latent"])]
  out["context_index"] = (tok - lo).astype(np.int64)
  return out


__all__ = ["HIST_BINS", "HIST_DECADES", "ActivationHistogram", "LatentStats", "TopExamples", "contexts",
           "dataset_names", "example_rows", "histogram_edges", "is_template", "quantile_examples"]
