"""Activation Difference Lens (ADL, METHODS.md §6): what the mean difference of the first positions says.

On text unrelated to the fine-tuning data, δ_p = mean over documents of h_ft(x)_p − h_base(x)_p at
layer L for each of the first n positions p (one jitted pass of both models per batch, stopped at
the deepest layer asked for). The per-model means, their per-position norms and the layer's
typical residual norm N_L = mean ‖h_ft‖ over the documents' tokens (position 0 left out: the BOS
residual is an attention sink many times larger than the rest) are kept in `means.npz`. Readings:

- logit lens of ±δ_p through the fine-tuned model's final norm and unembedding (top tokens, softmax
  probabilities) → `logit_lens.parquet`;
- token relevance: the share of the top tokens of +δ_p that the grader marks relevant (plain and
  probability-weighted), against the share among the dataset's most frequent tokens → `relevance.parquet`;
- patchscope: the residual after block L at the last position of identity prompts ("cat -> cat ...
  ? ->") replaced by s · N_L · δ_p / ‖δ_p‖ for each scale s, the fine-tuned model's next-token top
  tokens kept where at least two prompts agree; best scale by relevance, else by agreement →
  `patchscope.parquet`;
- steering: α · N_L · δ_p / ‖δ_p‖ added after block L at every position while the fine-tuned model
  generates greedily (all layers × positions × strengths × prompts in one batch); α is the largest
  strength whose samples the grader finds coherent (calibrated on the unsteered samples) →
  `steering.parquet`.

Positions: p = 0..n-1 are the first n tokens of plain text and of the first assistant turn of a
conversation; p = -k..-1 (`pre_assistant` = k, conversations only) are the template tokens just before
that turn (e.g. Gemma's "<start_of_turn>model\n"), where a chat fine-tune's change of mode shows.
Each δ_p averages the documents that have that token (`count` in means.npz).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx
from jaxtyping import Array, Float

from neurodiff_jax.activations.datasets import KIND_TEXT
from neurodiff_jax.diffing.context import DiffContext, ModelPair, layers_of
from neurodiff_jax.models.generate import cut_at_stop, encode_prompt, greedy_generate, stop_ids
from neurodiff_jax.models.lens import logit_lens
from neurodiff_jax.models.sharding import mesh_of, put_batch
from neurodiff_jax.models.transformer import Transformer
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, integer_ticks, png_html, save_png

# Identity prompts: each maps a word to itself, so the model's next token after "? ->" says what
# the patched residual at "?"'s last position encodes.
IDENTITY_PROMPTS = (
    "cat -> cat\n1135 -> 1135\nhello -> hello\n? ->",
    "river -> river\nblue -> blue\n42 -> 42\n? ->",
    "bank -> bank\nmusic -> music\nseven -> seven\n? ->",
)
T_BUCKET = 16  # documents are padded to a multiple of this many tokens: few shapes, few compilations


# ----------------------------------------------------------------------------------------- the mean difference


def position_labels(n: int, pre_assistant: int = 0) -> np.ndarray:
  """Position labels read: -k..-1 (the k tokens before an assistant turn, chat data only), then 0..n-1."""
  return np.arange(-int(pre_assistant), int(n), dtype=np.int64)


def mean_difference_step(pair: ModelPair, layers: Sequence[int], labels: Sequence[int]):
  """A jitted `(ids, mask, valid, start) -> sums` of both models' residuals at `layers` (stopped at the deepest).

  Label p ≥ 0 reads token p of a plain-text row and token start + p of a conversation (start = its first
  assistant token, ≥ 0); p < 0 reads token start + p of conversations only. Returns float32 per-batch sums
  over the rows where that token exists: `diff`, `base`, `ft` [L, P, D], `norm_base`, `norm_ft` [L, P] (‖h‖),
  `count` [P] (rows read); `tok_norm_base`, `tok_norm_ft` [L] (‖h‖ over every real token at position ≥ 1)
  and `tokens` (how many such tokens).
  """
  layers = tuple(int(l) for l in layers)
  lab = jnp.asarray(np.asarray(labels, np.int32))  # [P]
  top = max(layers)
  gb, sb = nnx.split(pair.base)
  gf, sf = nnx.split(pair.ft)

  @jax.jit
  def step(sb, sf, ids, mask, valid, start):
    rb = nnx.merge(gb, sb)(ids, mask, capture=layers, stop_at_layer=top).residuals
    rf = nnx.merge(gf, sf)(ids, mask, capture=layers, stop_at_layer=top).residuals
    length = mask.sum(axis=1)  # [B]
    chat = start >= 0  # [B]
    idx = jnp.where(chat, start, 0)[:, None] + lab[None, :]  # [B, P]
    ok = valid[:, None] & (idx >= 0) & (idx < length[:, None]) & (chat[:, None] | (lab[None, :] >= 0))
    w = ok.astype(jnp.float32)  # [B, P]
    gather = jnp.clip(idx, 0, ids.shape[1] - 1)[:, :, None]  # [B, P, 1]
    pos = jnp.cumsum(mask, axis=1) - 1  # [B, T] position of each real token
    tok = (mask & (pos >= 1) & valid[:, None]).astype(jnp.float32)  # [B, T]
    out: dict[str, list] = {k: [] for k in ("diff", "base", "ft", "norm_base", "norm_ft", "tok_norm_base",
                                            "tok_norm_ft")}
    for layer in layers:
      hb = jnp.take_along_axis(rb[layer], gather, axis=1).astype(jnp.float32)  # [B, P, D]
      hf = jnp.take_along_axis(rf[layer], gather, axis=1).astype(jnp.float32)  # [B, P, D]
      out["diff"].append(((hf - hb) * w[:, :, None]).sum(0))  # [P, D]
      out["base"].append((hb * w[:, :, None]).sum(0))  # [P, D]
      out["ft"].append((hf * w[:, :, None]).sum(0))  # [P, D]
      out["norm_base"].append((jnp.linalg.norm(hb, axis=-1) * w).sum(0))  # [P]
      out["norm_ft"].append((jnp.linalg.norm(hf, axis=-1) * w).sum(0))  # [P]
      nb = jnp.linalg.norm(rb[layer].astype(jnp.float32), axis=-1)  # [B, T]
      nf = jnp.linalg.norm(rf[layer].astype(jnp.float32), axis=-1)  # [B, T]
      out["tok_norm_base"].append((nb * tok).sum())
      out["tok_norm_ft"].append((nf * tok).sum())
    res = {k: jnp.stack(v) for k, v in out.items()}
    res["count"] = w.sum(0)
    res["rows"] = (ok.any(axis=1)).astype(jnp.float32).sum()
    res["tokens"] = tok.sum()
    return res

  return lambda ids, mask, valid, start: step(sb, sf, ids, mask, valid, start)


def mean_difference(ctx: DiffContext, layers: Sequence[int], n: int, num_documents: int,
                    batch_size: int, pre_assistant: int = 0) -> dict[str, np.ndarray]:
  """δ_p and the per-model means and norms at `layers` (float64) over the first documents with ≥ n tokens.

  Labels p = 0..n-1 read the first n tokens of plain text and the first n tokens of an assistant turn;
  p = -pre_assistant..-1 the tokens just before the assistant turn (conversations only). A label no
  document reaches is dropped (`positions` holds the labels kept, `count` how many documents each averages).
  """
  labels = position_labels(n, pre_assistant)
  step = mean_difference_step(ctx.pair, layers, labels)
  acc: dict[str, np.ndarray] = {}
  for batch in ctx.batches(batch_size, min_len=n, max_documents=num_documents):
    t = batch.ids.shape[1]
    tp = min(max(n, -(-t // T_BUCKET) * T_BUCKET), max(ctx.max_len, t))
    ids = np.pad(batch.ids, ((0, 0), (0, tp - t)), constant_values=int(batch.ids[0, -1]))
    mask = np.pad(batch.mask, ((0, 0), (0, tp - t)))
    valid = batch.docs >= 0
    start = batch.assistant_start if batch.assistant_start is not None else np.full(len(valid), -1, np.int32)
    sums = jax.device_get(step(*ctx.pair.put(ids, mask, valid, start)))
    for k, v in sums.items():
      acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
  tokens = max(float(acc.pop("tokens")), 1.0)
  count = acc.pop("count")  # [P]
  keep = count > 0
  if not keep.any():
    raise ConfigError(f"no document has the positions {labels.tolist()} asked for; lower adl.positions.")
  c = count[keep]
  return {
      "layers": np.asarray(layers, np.int64), "documents": np.asarray(int(acc["rows"])),
      "positions": labels[keep], "count": c.astype(np.int64),
      "delta": acc["diff"][:, keep] / c[:, None], "mean_base": acc["base"][:, keep] / c[:, None],
      "mean_ft": acc["ft"][:, keep] / c[:, None],
      "norm_base": acc["norm_base"][:, keep] / c, "norm_ft": acc["norm_ft"][:, keep] / c,
      "typical_norm_base": acc["tok_norm_base"] / tokens, "typical_norm_ft": acc["tok_norm_ft"] / tokens,
  }


def _labels(means: dict[str, np.ndarray]) -> list[int]:
  """The position label of each δ row (0..n-1 for means written before labels were kept)."""
  pos = means.get("positions")
  return [int(p) for p in (pos if pos is not None else range(means["delta"].shape[1]))]


# ----------------------------------------------------------------------------------------------- logit lens


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
  return [tokenizer.decode([int(i)]) for i in ids]


def logit_lens_table(model: Transformer, tokenizer: Any, delta: np.ndarray, layers: Sequence[int],
                     top_k: int, positions: Sequence[int] | None = None) -> pd.DataFrame:
  """Top tokens of ±δ_p [L, n, D] through `model`'s final norm and unembedding, with softmax probabilities
  (`positions`: the label of each of the n rows, default 0..n-1)."""
  num_l, n, d = delta.shape
  labels = list(range(n)) if positions is None else [int(p) for p in positions]
  vecs = np.concatenate([delta.reshape(-1, d), -delta.reshape(-1, d)])  # [2·L·n, D]: + rows then − rows
  probs = _softmax(logit_lens(model, vecs).astype(np.float64))  # [2·L·n, V]
  rows = []
  for r, p in enumerate(probs):
    sign, rest = divmod(r, num_l * n)
    li, pos = divmod(rest, n)
    top = np.argsort(-p, kind="stable")[:top_k]
    for rank, (tid, tok) in enumerate(zip(top, _decode(tokenizer, top))):
      rows.append({"layer": int(layers[li]), "position": labels[pos], "sign": "+" if sign == 0 else "-", "rank": rank,
                   "token_id": int(tid), "token": tok, "prob": float(p[tid])})
  return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- token relevance


def frequent_tokens(ctx: DiffContext, top_k: int, num_documents: int) -> tuple[np.ndarray, np.ndarray]:
  """The dataset's `top_k` most frequent text tokens (ids) and their frequencies (the trivial baseline)."""
  corpus = ctx.corpus()
  parts = [ids[kinds == KIND_TEXT] for ids, kinds in zip(corpus.ids[:num_documents], corpus.kinds[:num_documents])]
  counts = np.bincount(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64),
                       minlength=ctx.pair.ft.cfg.vocab_size)
  top = np.argsort(-counts, kind="stable")[:top_k]
  top = top[counts[top] > 0]
  return top, counts[top] / max(counts.sum(), 1)


def relevance_shares(relevant: Sequence[bool], weights: Sequence[float]) -> tuple[float, float]:
  """(share of relevant tokens, weight-weighted share); NaN for no tokens."""
  r = np.asarray(relevant, np.float64)
  w = np.asarray(weights, np.float64)
  if r.size == 0:
    return math.nan, math.nan
  return float(r.mean()), float((r * w).sum() / w.sum()) if w.sum() > 0 else math.nan


def _grader_errors() -> tuple[type[BaseException], ...]:
  """What a grader raises when it cannot grade (no card, no endpoint): relevance is then skipped."""
  errs: list[type[BaseException]] = [ConfigError, RuntimeError, OSError, ValueError, NotImplementedError]
  try:
    from neurodiff_jax.diffing import graders

    errs += [e for e in vars(graders).values() if isinstance(e, type) and issubclass(e, Exception)
             and e.__module__ == graders.__name__]
  except ImportError:
    pass
  return tuple(errs)


class _Relevance:
  """The grader's `relevant` on token strings, cached; `skipped` holds the reason once it fails."""

  def __init__(self, grader: Any):
    self.grader, self.cache, self.skipped = grader, {}, None
    if grader is None or not hasattr(grader, "relevant"):
      self.skipped = "no grader configured (config.grader)"

  def __call__(self, tokens: Sequence[str]) -> list[bool] | None:
    if self.skipped:
      return None
    new = sorted({t for t in tokens if t not in self.cache})
    if new:
      try:
        flags = self.grader.relevant(new)
      except _grader_errors() as e:
        self.skipped = f"{type(e).__name__}: {e}"
        return None
      self.cache.update(zip(new, (bool(f) for f in flags)))
    return [self.cache[t] for t in tokens]


# ------------------------------------------------------------------------------------------------ patchscope


def _prompt_batch(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ids and mask [B, P]: every prompt ends at the last column."""
  p = max(len(x) for x in prompts)
  ids = np.full((len(prompts), p), pad, np.int32)
  mask = np.zeros((len(prompts), p), bool)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):], mask[i, p - len(x):] = x, True
  return ids, mask


def patched_top_tokens(model: Transformer, prompts: Sequence[Sequence[int]], row_layer: Sequence[int],
                       vectors: np.ndarray, top_k: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Next-token top-k (ids, probs) [B, k] of each prompt with the residual after block `row_layer[b]` at its
  last position replaced by `vectors[b]` [B, D] (row_layer[b] = -1: unpatched); one jitted forward."""
  ids, mask = _prompt_batch(prompts, pad)
  row_layer = np.asarray(row_layer, np.int64)
  vec = jnp.asarray(vectors, jnp.float32)  # [B, D]
  last = model.cfg.num_layers - 1

  def replace_at(layer: int):
    on = jnp.asarray(row_layer == layer)[:, None]  # [B, 1]

    def patch(x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
      return x.at[:, -1].set(jnp.where(on, vec.astype(x.dtype), x[:, -1]))

    return patch

  interventions = {int(l): replace_at(int(l)) for l in sorted(set(row_layer.tolist())) if l >= 0}
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    m = nnx.merge(graphdef, state)
    x = m(ids, mask, capture=(last,), interventions=interventions, stop_at_layer=last).residuals[last]
    logits = m.unembed(x[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]
    probs, top = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return top, probs

  top, probs = jax.device_get(run(state, *put_batch(mesh_of(model), ids, mask)))
  return np.asarray(top), np.asarray(probs)


def _unit(v: np.ndarray) -> np.ndarray:
  """v / ‖v‖ along the last axis (0 stays 0)."""
  norm = np.linalg.norm(v, axis=-1, keepdims=True)
  return np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), 0.0)


def patchscope(ctx: DiffContext, means: dict[str, np.ndarray], scales: Sequence[float], top_k: int,
               relevance: _Relevance) -> pd.DataFrame:
  """Agreed next tokens per (layer, position, scale) of δ_p patched into the identity prompts (`IDENTITY_PROMPTS`)."""
  tok = ctx.pair.tokenizer
  prompts = [encode_prompt(tok, p, chat=False) for p in IDENTITY_PROMPTS]
  layers, num_l, labels = means["layers"], means["delta"].shape[0], _labels(means)
  unit = _unit(means["delta"])  # [L, n, D]
  rows, row_layer, vecs, keys = [], [], [], []
  for li in range(num_l):
    for i, pos in enumerate(labels):
      for s in scales:
        for pi, pr in enumerate(prompts):
          rows.append(pr)
          row_layer.append(int(layers[li]))
          vecs.append(float(s) * float(means["typical_norm_ft"][li]) * unit[li, i])
          keys.append((li, pos, float(s), pi))
  pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
  top, probs = patched_top_tokens(ctx.pair.ft, rows, row_layer, np.stack(vecs), top_k, int(pad))
  agree = max(1, min(2, len(prompts)))
  groups: dict[tuple, dict[int, list[float]]] = {}
  for (li, pos, s, _), t_row, p_row in zip(keys, top, probs):
    g = groups.setdefault((li, pos, s), {})
    for t, p in zip(t_row.tolist(), p_row.tolist()):
      g.setdefault(int(t), []).append(float(p))
  out = []
  for (li, pos, s), g in groups.items():
    kept = sorted(((t, len(ps), float(np.mean(ps))) for t, ps in g.items() if len(ps) >= agree),
                  key=lambda r: (-r[1], -r[2]))
    for rank, (t, count, prob) in enumerate(kept):
      out.append({"layer": int(layers[li]), "position": pos, "scale": s, "rank": rank, "token_id": t,
                  "token": tok.decode([t]), "prompts_agreeing": count, "mean_prob": prob})
  table = pd.DataFrame(out, columns=["layer", "position", "scale", "rank", "token_id", "token", "prompts_agreeing",
                                     "mean_prob"])
  # The best scale per (layer, position): most relevant agreed tokens, else the most agreed tokens.
  table["relevant"] = None
  table["best"] = False
  for (layer, pos), part in table.groupby(["layer", "position"]):
    score = {}
    for s in scales:
      sub = part[part.scale == float(s)]
      flags = relevance(sub.token.tolist()) if len(sub) else []
      if flags is not None and len(sub):
        table.loc[sub.index, "relevant"] = pd.Series(flags, index=sub.index, dtype=object)
      share = float(np.mean(flags)) if flags else 0.0
      score[float(s)] = (share, len(sub)) if flags is not None else (0.0, len(sub))
    best = max(score, key=lambda s: (score[s], -s))
    table.loc[part.index[part.scale == best], "best"] = True
  return table


# ------------------------------------------------------------------------------------------------- steering


def steered_generate(model: Transformer, prompts: Sequence[Sequence[int]], row_layer: Sequence[int],
                     additions: np.ndarray, max_new_tokens: int, pad: int = 0) -> list[list[int]]:
  """Greedy continuations with `additions[b]` [B, D] added after block `row_layer[b]` at every position; one call."""
  row_layer = np.asarray(row_layer, np.int64)
  add = jnp.asarray(additions, jnp.float32)  # [B, D]

  def add_at(layer: int):
    on = jnp.asarray(row_layer == layer, jnp.float32)[:, None] * add  # [B, D]: zero for other layers' rows

    def steer(x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
      return x + on[:, None, :].astype(x.dtype)

    return steer

  interventions = {int(l): add_at(int(l)) for l in sorted(set(row_layer.tolist())) if l >= 0}
  return greedy_generate(model, prompts, max_new_tokens, eos_id=None, pad_id=pad, interventions=interventions)


def steering(ctx: DiffContext, means: dict[str, np.ndarray], cfg: ml_collections.ConfigDict) -> pd.DataFrame:
  """Steered (every layer × position × α × prompt) and unsteered samples of the fine-tuned model, graded."""
  tok = ctx.pair.tokenizer
  chat = bool(getattr(tok, "chat_template", None))
  texts = list(cfg.steering_prompts)
  if not texts:
    raise ConfigError("adl.steering_prompts is empty; give at least one prompt (e.g. 'Tell me a story.').")
  prompts = [encode_prompt(tok, t, chat) for t in texts]
  layers, (num_l, _, d), labels = means["layers"], means["delta"].shape, _labels(means)
  unit = _unit(means["delta"])
  rows, row_layer, adds, meta = [], [], [], []
  for pi, pr in enumerate(prompts):  # unsteered first
    rows.append(pr)
    row_layer.append(-1)
    adds.append(np.zeros(d))
    meta.append((-1, None, 0.0, pi))  # layer -1, no position: unsteered
  for li in range(num_l):
    for i, pos in enumerate(labels):
      for a in cfg.steering_alphas:
        for pi, pr in enumerate(prompts):
          rows.append(pr)
          row_layer.append(int(layers[li]))
          adds.append(float(a) * float(means["typical_norm_ft"][li]) * unit[li, i])
          meta.append((int(layers[li]), pos, float(a), pi))
  pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
  out = steered_generate(ctx.pair.ft, rows, row_layer, np.stack(adds), int(cfg.steering_tokens), int(pad))
  stops = stop_ids(tok)
  samples = [tok.decode(cut_at_stop(ids, stops), skip_special_tokens=False) for ids in out]
  table = pd.DataFrame([{"layer": m[0], "position": m[1], "alpha": m[2], "steered": m[0] >= 0,
                         "prompt": texts[m[3]], "text": s} for m, s in zip(meta, samples)])
  table["position"] = table.position.astype("Int64")  # <NA> for unsteered rows (labels may be negative)
  table["coherent"] = None
  table["perplexity"] = math.nan
  table["chosen"] = False
  grader = ctx.grader
  if grader is not None and hasattr(grader, "is_coherent"):
    if hasattr(grader, "calibrate"):
      grader.calibrate(table.text[~table.steered].tolist())
    table["coherent"] = pd.Series([bool(c) for c in grader.is_coherent(table.text.tolist())], dtype=object)
    if hasattr(grader, "coherence"):
      table["perplexity"] = [float(p) for p in grader.coherence(table.text.tolist())]
    # α search: per (layer, position) the largest α whose samples are all coherent.
    for (layer, pos), part in table[table.steered].groupby(["layer", "position"]):
      ok = [a for a, g in part.groupby("alpha") if all(g.coherent)]
      if ok:
        table.loc[part.index[part.alpha == max(ok)], "chosen"] = True
  return table


# ---------------------------------------------------------------------------------------------------- report


def plot_delta_norms(means: dict[str, np.ndarray], path: Path) -> Path:
  """‖δ_p‖ / N_L per position and layer, as a PNG at `path` (returned)."""
  fig = figure((5.5, 3.2), dpi=90)
  ax = fig.subplots()
  rel = np.linalg.norm(means["delta"], axis=-1) / means["typical_norm_ft"][:, None]  # [L, n]
  labels = _labels(means)
  for li, layer in enumerate(means["layers"]):
    ax.plot(labels, rel[li], marker="o", label=f"layer {int(layer)}")
  if min(labels) < 0:
    ax.axvline(-0.5, color="grey", lw=0.8, ls=":")  # left of it: the tokens before the assistant turn
  ax.set_xlabel("position p (< 0: before the assistant turn)" if min(labels) < 0 else "position p")
  ax.set_ylabel("‖δ_p‖ / mean ‖h_ft‖")
  integer_ticks(ax.xaxis)
  ax.legend(fontsize=8)
  return save_png(fig, path)


def _table_html(df: pd.DataFrame, cols: Sequence[str]) -> str:
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>"
                 for _, r in df.iterrows())
  return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.3g}"
  return repr(v) if isinstance(v, str) else str(v)


def section_html(lens: pd.DataFrame, relevance: pd.DataFrame, patch: pd.DataFrame, steer: pd.DataFrame,
                 summary: dict[str, Any], png: Path, top_show: int = 10) -> str:
  """The ADL section of the report: δ norms, top tokens per layer/position, relevance, patchscope, samples."""
  parts = ["<h2>Activation Difference Lens (ADL)</h2>",
           (f"<p>Mean difference δ_p = mean(h_ft − h_base) over {summary['documents']} documents, positions "
            f"{html.escape(str(summary['position_labels']))}, layers {html.escape(str(summary['layers']))}. "
            "p ≥ 0 counts from the start of plain text and from the first assistant token of a conversation; "
            "p < 0 are the template tokens just before the assistant turn. Readings through the "
            "fine-tuned model.</p>"),
           png_html(png, "delta norms"), "<h3>Logit lens of ±δ_p</h3>"]
  for (layer, pos), part in lens.groupby(["layer", "position"]):
    cells = []
    for sign in ("+", "-"):
      sub = part[(part.sign == sign) & (part["rank"] < top_show)]
      cells.append(", ".join(f"{t!r} ({p:.3f})" for t, p in zip(sub.token, sub.prob)))
    parts.append(f"<p><b>layer {layer}, p={pos}</b><br>+δ: {html.escape(cells[0])}<br>"
                 f"−δ: {html.escape(cells[1])}</p>")
  parts.append("<h3>Token relevance</h3>")
  if summary.get("relevance_skipped"):
    parts.append(f"<p>Skipped: {html.escape(summary['relevance_skipped'])}</p>")
  else:
    parts.append(_table_html(relevance, ["source", "layer", "position", "share", "weighted_share"]))
  parts.append("<h3>Patchscope (best scale per layer and position)</h3>")
  best = patch[patch.best]
  for (layer, pos), part in best.groupby(["layer", "position"]):
    toks = ", ".join(repr(t) for t in part.token[:top_show])
    parts.append(f"<p><b>layer {layer}, p={pos}, scale {part.scale.iloc[0]:g}</b>: {html.escape(toks) or '(none)'}"
                 "</p>")
  parts.append("<h3>Steering</h3>")
  shown = steer[~steer.steered | steer.chosen]
  parts.append(_table_html(shown, ["layer", "position", "alpha", "prompt", "text", "coherent"]))
  return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------- run


def check_pre_assistant(k: Any) -> int:
  """k as an int ≥ 0 (tokens read before an assistant turn), else a ConfigError."""
  if isinstance(k, bool) or int(k) != k or k < 0:
    raise ConfigError(f"adl.pre_assistant={k!r} must be a number of tokens ≥ 0 (0 = none; default 3).")
  return int(k)


def check_positions(n: int, max_len: int) -> int:
  """n as an int ≥ 1 that fits in max_len tokens, else a ConfigError naming both."""
  if isinstance(n, bool) or int(n) != n or n < 1:
    raise ConfigError(f"adl.positions={n!r} must be a positive number of positions (default 5).")
  if n > max_len:
    raise ConfigError(f"adl.positions={n} is beyond config.max_len={max_len} tokens per document; lower "
                      "adl.positions or raise max_len.")
  return int(n)


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """ADL on the pair: mean difference, logit lens, token relevance, patchscope, steering; tables + section.html."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  layers = layers_of(list(cfg.layers), ctx.pair.num_layers)
  n = check_positions(cfg.positions, ctx.max_len)
  top_k = int(cfg.top_k)
  pre = check_pre_assistant(cfg.get("pre_assistant", 0))
  means = mean_difference(ctx, layers, n, int(cfg.num_documents), int(cfg.batch_size), pre)
  np.savez(out / "means.npz", **means)
  labels = _labels(means)
  ctx.log(f"adl: δ over {int(means['documents'])} documents at layers {layers}, positions {labels}")

  tok = ctx.pair.tokenizer
  lens = logit_lens_table(ctx.pair.ft, tok, means["delta"], layers, top_k, labels)
  lens.to_parquet(out / "logit_lens.parquet")

  relevance = _Relevance(ctx.grader)
  rel_rows = []
  plus = lens[lens.sign == "+"]
  for (layer, pos), part in plus.groupby(["layer", "position"]):
    flags = relevance(part.token.tolist())
    if flags is None:
      break
    share, weighted = relevance_shares(flags, part.prob.tolist())
    rel_rows.append({"source": "logit_lens", "layer": layer, "position": pos, "share": share,
                     "weighted_share": weighted})
  base_ids, base_freq = frequent_tokens(ctx, top_k, int(cfg.num_documents))
  flags = relevance(_decode(tok, base_ids))
  if flags is not None:
    share, weighted = relevance_shares(flags, base_freq)
    rel_rows.append({"source": "baseline", "layer": None, "position": None, "share": share,
                     "weighted_share": weighted})

  patch = patchscope(ctx, means, [float(s) for s in cfg.patchscope_scales], top_k, relevance)
  patch.assign(relevant=patch.relevant.astype("boolean")).to_parquet(out / "patchscope.parquet")
  if not relevance.skipped:
    for (layer, pos), part in patch[patch.best].groupby(["layer", "position"]):
      share, weighted = relevance_shares(part.relevant.astype(bool).tolist(), part.mean_prob.tolist())
      rel_rows.append({"source": "patchscope", "layer": layer, "position": pos, "share": share,
                       "weighted_share": weighted})
  rel = pd.DataFrame(rel_rows, columns=["source", "layer", "position", "share", "weighted_share"])
  rel = rel.astype({"layer": "Int64", "position": "Int64"})  # <NA> on the baseline row (labels may be negative)
  if relevance.skipped:
    rel = rel.iloc[0:0]
  rel.to_parquet(out / "relevance.parquet")

  steer = steering(ctx, means, cfg)
  steer.assign(coherent=steer.coherent.astype("boolean")).to_parquet(out / "steering.parquet")

  summary: dict[str, Any] = {
      "layers": layers, "positions": n, "pre_assistant": pre, "position_labels": labels,
      "documents": int(means["documents"]), "documents_per_position": means["count"].tolist(),
      "delta_norm": {f"{l}": np.linalg.norm(means["delta"][i], axis=-1).round(4).tolist()
                     for i, l in enumerate(layers)},
      "typical_norm_ft": {f"{l}": float(means["typical_norm_ft"][i]) for i, l in enumerate(layers)},
  }
  if relevance.skipped:
    summary["relevance_skipped"] = relevance.skipped
  else:
    by = rel.groupby("source")[["share", "weighted_share"]]
    summary["relevance"] = {s: {"max": float(g.share.max()), "mean": float(g.share.mean()),
                                "weighted_max": float(g.weighted_share.max())} for s, g in by}
  chosen = steer[steer.chosen]
  summary["steering_alpha"] = {f"layer {int(l)}, p={int(p)}": float(g.alpha.iloc[0])
                               for (l, p), g in chosen.groupby(["layer", "position"])}
  png = plot_delta_norms(means, out / "delta_norms.png")
  (out / "section.html").write_text(section_html(lens, rel, patch, steer, summary, png), encoding="utf-8")
  return summary


__all__ = ["IDENTITY_PROMPTS", "check_positions", "check_pre_assistant", "position_labels", "frequent_tokens", "logit_lens_table", "mean_difference",
           "mean_difference_step", "patched_top_tokens", "patchscope", "relevance_shares", "run", "section_html",
           "steered_generate", "steering"]
