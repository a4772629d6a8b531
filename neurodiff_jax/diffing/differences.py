"""Paired activations (h_base, h_ft) streamed from a store or from the models, and what the methods share.

Norm difference, PCA and the SAE on differences read the same thing: both models' residuals at a
few layers for every token of a dataset. `pair_chunks` yields them chunk by chunk, from
`ctx.store` when it is set (in store order, the next chunk read on a thread while this one is
used) or else from one jitted forward pass of both models over `ctx.batches` (stopping after the
deepest layer asked for). Each chunk is a fixed number of rows, so every consumer compiles once;
rows past the data are marked invalid. A row carries a reference (`ref`) from which its context is
decoded at the end: the store token index, or `doc · REF_STRIDE + position` on the fly.

Also here: turning fractions of depth into layers that the store holds, decoding contexts with the
token marked, merging top-k lists, and the small HTML/PNG helpers of the methods' `section.html`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import html
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurodiff_jax.activations.datasets import KIND_SPECIAL
from neurodiff_jax.diffing.context import DiffContext, layers_of
from neurodiff_jax.utils.config import ConfigError

REF_STRIDE = 1 << 16  # on the fly, ref = doc · REF_STRIDE + position (documents are cut far below 65,536 tokens)
_T_BUCKET = 32  # on the fly, batches are padded to a multiple of this many positions (few compilations)


@dataclasses.dataclass
class PairChunk:
  """One chunk of paired activations: per layer [n, 2, d] on the device (0 = base, 1 = fine-tuned), row metadata."""

  acts: dict[int, jax.Array]  # layer -> [n, 2, d] float32
  valid: np.ndarray  # [n] bool: a real token (not padding, not a filler row)
  ref: np.ndarray  # [n] int64: store token index, or doc · REF_STRIDE + position
  token_id: np.ndarray  # [n] int32
  position: np.ndarray  # [n] int32
  kind: np.ndarray  # [n] uint8 (activations.datasets.KIND_*)


def layer_fraction(layer: int, num_layers: int) -> float:
  """The fraction of depth that `layers_of` maps to `layer`."""
  return layer / max(num_layers - 1, 1)


def resolve_layers(ctx: DiffContext, fractions: Sequence[float], what: str) -> list[int]:
  """Layers at `fractions` of depth; with a store, each must be a harvested layer (else an error listing them)."""
  if isinstance(fractions, (int, float)):
    fractions = (fractions,)
  layers = layers_of(list(fractions), ctx.pair.num_layers)
  store = ctx.store
  if store is None:
    return layers
  lay = store.layout
  if lay.num_models != 2 or lay.d_model != ctx.pair.base.cfg.hidden_size:
    raise ConfigError(f"the store {store.root} holds {lay.num_models} models of width {lay.d_model}; {what} needs the "
                      f"pair's 2 models of width {ctx.pair.base.cfg.hidden_size}. Point config.store at a store of "
                      "this pair, or set config.store='' to compute the activations on the fly.")
  missing = [l for l in layers if l not in store.layers]
  if missing:
    have = ", ".join(f"{l} (fraction {layer_fraction(l, ctx.pair.num_layers):.3g})" for l in store.layers)
    raise ConfigError(f"{what}: fractions {list(fractions)} give layer(s) {missing} of {ctx.pair.num_layers}, which "
                      f"the store {store.root} did not harvest; it holds layers {have}. Give fractions that map to "
                      "those (fraction f is layer round(f·(num_layers−1))), or set config.store='' to compute the "
                      "activations on the fly.")
  return layers


def pair_forward(ctx: DiffContext, layers: Sequence[int]) -> Any:
  """A jitted `(ids [B, T], mask [B, T]) -> {layer: [B·T, 2, d]}`: both models in one pass, up to the last layer."""
  layers = tuple(sorted(layers))
  gb, sb = nnx.split(ctx.pair.base)
  gf, sf = nnx.split(ctx.pair.ft)
  last = layers[-1]

  @jax.jit
  def run(sb, sf, ids, mask):
    rb = nnx.merge(gb, sb)(ids, mask, capture=layers, stop_at_layer=last).residuals
    rf = nnx.merge(gf, sf)(ids, mask, capture=layers, stop_at_layer=last).residuals
    out = {}
    for l in layers:
      x = jnp.stack([rb[l], rf[l]], axis=2).astype(jnp.float32)  # [B, T, 2, d]
      out[l] = x.reshape(-1, 2, x.shape[-1])
    return out

  return lambda ids, mask: run(sb, sf, ids, mask)


def store_chunk_rows(ctx: DiffContext, batch_size: int) -> int:
  """Rows per store chunk: as many tokens as `batch_size` documents of `max_len` tokens."""
  return max(int(batch_size), 1) * max(int(ctx.max_len), 1)


def pair_chunks(ctx: DiffContext, layers: Sequence[int], batch_size: int) -> Iterator[PairChunk]:
  """The paired activations at `layers` of every token: from `ctx.store` if set, else computed by the models."""
  layers = sorted(layers)
  if ctx.store is not None:
    yield from _store_chunks(ctx, layers, store_chunk_rows(ctx, batch_size))
  else:
    yield from _model_chunks(ctx, layers, batch_size)


def _model_chunks(ctx: DiffContext, layers: list[int], batch_size: int) -> Iterator[PairChunk]:
  forward = pair_forward(ctx, layers)
  for b in ctx.batches(batch_size):
    bsz, t = b.ids.shape
    tp = min(-(-t // _T_BUCKET) * _T_BUCKET, max(int(ctx.max_len), t))
    ids = np.zeros((bsz, tp), np.int32)
    mask = np.zeros((bsz, tp), bool)
    kinds = np.zeros((bsz, tp), np.uint8)
    ids[:, :t], mask[:, :t], kinds[:, :t] = b.ids, b.mask, b.kinds
    acts = forward(*ctx.pair.put(ids, mask))
    pos = np.broadcast_to(np.arange(tp), (bsz, tp))
    valid = mask & (b.docs >= 0)[:, None]
    ref = np.maximum(b.docs, 0)[:, None].astype(np.int64) * REF_STRIDE + pos
    yield PairChunk(acts, valid.reshape(-1), ref.reshape(-1), ids.reshape(-1), pos.reshape(-1).astype(np.int32),
                    kinds.reshape(-1))


def _store_chunks(ctx: DiffContext, layers: list[int], rows: int) -> Iterator[PairChunk]:
  from neurodiff_jax.activations.reader import to_dtype

  store = ctx.store
  n = store.layout.num_tokens
  rows = min(rows, max(n, 1))

  def read(lo: int) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    hi = min(lo + rows, n)
    acts = {}
    for l in layers:
      x = np.zeros((rows, 2, store.layout.d_model), np.float32)
      to_dtype(store.read(l, lo, hi), np.float32, out=x[:hi - lo])
      acts[l] = x
    meta = {k: store.metadata(k, lo, hi) for k in ("token_id", "position", "token_kind")}
    return acts, meta

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-read") as pool:
    nxt = pool.submit(read, 0) if n else None
    for lo in range(0, n, rows):
      acts, meta = nxt.result()
      nxt = pool.submit(read, lo + rows) if lo + rows < n else None
      m = min(rows, n - lo)
      valid = np.arange(rows) < m
      ref = np.where(valid, lo + np.arange(rows), -1).astype(np.int64)
      yield PairChunk({l: jnp.asarray(x) for l, x in acts.items()}, valid, ref, _pad(meta["token_id"], rows, np.int32),
                      _pad(meta["position"], rows, np.int32), _pad(meta["token_kind"], rows, np.uint8))


def _pad(a: np.ndarray, rows: int, dtype: Any) -> np.ndarray:
  """`a` as `dtype`, zero-padded to `rows` entries."""
  return np.concatenate([np.asarray(a, dtype), np.zeros(rows - len(a), dtype)])


# ---- top-k lists ----


def merge_topk(vals: np.ndarray, refs: np.ndarray, new_vals: np.ndarray, new_refs: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
  """The k largest of two (value, ref) lists along the last axis (both [..., *]); ties keep the earlier ones."""
  v = np.concatenate([vals, new_vals], axis=-1)
  r = np.concatenate([refs, np.broadcast_to(new_refs, new_vals.shape)], axis=-1)
  order = np.argsort(-v, axis=-1, kind="stable")[..., :k]
  return np.take_along_axis(v, order, -1), np.take_along_axis(r, order, -1)


def empty_topk(shape: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
  """An empty top-k list (values, refs) of leading shape `shape`."""
  return np.zeros(shape + (0,), np.float64), np.zeros(shape + (0,), np.int64)


# ---- contexts ----


def context_tokens(ctx: DiffContext, ref: int, before: int = 16, after: int = 4) -> tuple[list[int], int]:
  """(token ids of the context around row `ref`, index of the row's token in it), within its document."""
  if ctx.store is not None:
    store = ctx.store
    lo, hi = max(0, ref - before), min(store.layout.num_tokens, ref + after + 1)
    ids = store.metadata("token_id", lo, hi)
    docs = store.metadata("doc_index", lo, hi)
    same = np.nonzero(docs == docs[ref - lo])[0]
    ids = ids[same[0]:same[-1] + 1]
    return [int(i) for i in ids], ref - lo - int(same[0])
  doc, pos = divmod(int(ref), REF_STRIDE)
  ids = ctx.corpus().ids[doc]
  lo = max(0, pos - before)
  return [int(i) for i in ids[lo:pos + after + 1]], pos - lo


def decode_context(ctx: DiffContext, ref: int, before: int = 16, after: int = 4) -> dict[str, str]:
  """{"before", "token", "after"}: the decoded text around row `ref` and its token."""
  ids, i = context_tokens(ctx, ref, before, after)
  tok = ctx.pair.tokenizer
  return {"before": tok.decode(ids[:i]), "token": tok.decode(ids[i:i + 1]), "after": tok.decode(ids[i + 1:])}


def context_columns(ctx: DiffContext, refs: Sequence[int]) -> dict[str, list]:
  """Per ref, its decoded context: columns before, token, after, and `context` with the token in [[ ]]."""
  cols: dict[str, list] = {"before": [], "token": [], "after": [], "context": []}
  for r in refs:
    c = decode_context(ctx, int(r))
    for k in ("before", "token", "after"):
      cols[k].append(c[k])
    cols["context"].append(f"{c['before']}[[{c['token']}]]{c['after']}")
  return cols


def not_special(kind: np.ndarray) -> np.ndarray:
  """Rows that are not special tokens (BOS, turn markers), whose residuals are outliers in every model."""
  return kind != KIND_SPECIAL


# ---- HTML and plots ----


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str = "{:.4g}") -> str:
  """A small HTML table of `rows` (dicts), every cell escaped; floats formatted with `fmt`."""
  head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
  body = []
  for r in rows:
    cells = []
    for c in columns:
      v = r.get(c, "")
      s = fmt.format(v) if isinstance(v, (float, np.floating)) else str(v)
      cells.append(f"<td>{html.escape(s)}</td>")
    body.append("<tr>" + "".join(cells) + "</tr>")
  return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def context_html(before: str, token: str, after: str) -> str:
  """A context with its token outlined (all text escaped)."""
  return (f'{html.escape(before)}<span class="tok fire">{html.escape(token)}</span>{html.escape(after)}')


def contexts_table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str = "{:.4g}") -> str:
  """Like `table_html` with a last column of each row's context (before/token/after) with the token marked."""
  head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th>context</th>"
  body = []
  for r in rows:
    cells = "".join(f"<td>{html.escape(fmt.format(r[c]) if isinstance(r[c], (float, np.floating)) else str(r[c]))}"
                    "</td>" for c in columns)
    body.append(f"<tr>{cells}<td>{context_html(r['before'], r['token'], r['after'])}</td></tr>")
  return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_section(out: Any, title: str, parts: Sequence[str]) -> None:
  """Writes `out/section.html`: an <h2> naming the method and the given (already escaped) HTML parts."""
  text = f"<section><h2>{html.escape(title)}</h2>\n" + "\n".join(parts) + "\n</section>\n"
  (out / "section.html").write_text(text, encoding="utf-8")


def source_name(ctx: DiffContext) -> str:
  """Where the activations come from, in words."""
  if ctx.store is not None:
    return f"the activation store {ctx.store.root} ({ctx.store.layout.num_tokens} tokens)"
  return f"both models run on the datasets (at most {ctx.max_documents} documents of ≤ {ctx.max_len} tokens)"


__all__ = ["REF_STRIDE", "PairChunk", "context_columns", "context_html", "context_tokens", "contexts_table_html",
           "decode_context", "empty_topk", "layer_fraction", "merge_topk", "not_special", "pair_chunks",
           "pair_forward", "resolve_layers", "source_name", "store_chunk_rows",
           "table_html", "write_section"]
