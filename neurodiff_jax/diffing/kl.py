"""Per-token KL divergence between the fine-tuned and the base model's next-token distributions.

At every real token t of the dataset both models predict the next token; the method measures

  KL_t = KL(P_ft(· | x_≤t) ‖ P_base(· | x_≤t)) = Σ_v P_ft(v) (log P_ft(v) − log P_base(v))

in float32 from the two log-softmaxes, in one jitted function of both models per batch. It
reports where the fine-tune changed the output distribution: summary statistics (overall and by
token kind: text, special, chat template), the mean KL by position, and the highest-KL contexts
with the token marked, the KL at every token of their window (`context_kl`, for colouring the text)
and both models' top next token. Only [B, T] numbers leave the device; the per-token values are
kept on the host (4 bytes a token) for exact quantiles, never written out.
"""

from __future__ import annotations

import html
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx
from jaxtyping import Array, Bool, Int

from neurodiff_jax.activations.datasets import KIND_SPECIAL, KIND_TEMPLATE, KIND_TEXT
from neurodiff_jax.diffing.context import DiffContext, ModelPair, TokenBatch
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, integer_ticks, png_html, save_png

KIND_NAMES = {KIND_TEXT: "text", KIND_SPECIAL: "special", KIND_TEMPLATE: "template"}
CONTEXT_BEFORE = 12  # tokens shown before the marked token
CONTEXT_AFTER = 4  # and after it
LENGTH_BUCKET = 32  # batches are padded to a multiple of this length: a few compilations, not one per length


def make_kl_step(pair: ModelPair):
  """A jitted `(ids, mask) -> (kl, top_ft, top_base, p_top_ft, p_top_base)` [B, T] of both models, split once."""
  gb, sb = nnx.split(pair.base)
  gf, sf = nnx.split(pair.ft)

  @jax.jit
  def step(sb, sf, ids: Int[Array, "B T"], mask: Bool[Array, "B T"]):
    lb = nnx.merge(gb, sb)(ids, mask).logits.astype(jnp.float32)  # [B, T, V]
    lf = nnx.merge(gf, sf)(ids, mask).logits.astype(jnp.float32)  # [B, T, V]
    lpb = jax.nn.log_softmax(lb, axis=-1)
    lpf = jax.nn.log_softmax(lf, axis=-1)
    kl = jnp.sum(jnp.exp(lpf) * (lpf - lpb), axis=-1)  # [B, T]
    top_f = jnp.argmax(lf, axis=-1)  # [B, T]
    top_b = jnp.argmax(lb, axis=-1)  # [B, T]
    p_f = jnp.exp(jnp.take_along_axis(lpf, top_f[..., None], axis=-1)[..., 0])  # [B, T]
    p_b = jnp.exp(jnp.take_along_axis(lpb, top_b[..., None], axis=-1)[..., 0])  # [B, T]
    # Rounding can leave KL a hair below 0 where the two distributions agree.
    return jnp.maximum(kl, 0.0), top_f, top_b, p_f, p_b

  def run(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    out = step(sb, sf, *pair.put(ids, mask))
    return tuple(np.asarray(x) for x in out)

  return run


def padded(batch: TokenBatch, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch's ids and mask right-padded to a multiple of LENGTH_BUCKET (at most max_len, at least its own T)."""
  b, t = batch.ids.shape
  target = max(t, min(max_len, -(-t // LENGTH_BUCKET) * LENGTH_BUCKET))
  ids = np.full((b, target), pad_id, batch.ids.dtype)
  mask = np.zeros((b, target), bool)
  ids[:, :t], mask[:, :t] = batch.ids, batch.mask
  return ids, mask


def stats(values: np.ndarray) -> dict[str, float]:
  """n, mean, median, p90, p99 and max of a 1-D array (NaN for an empty one)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return {"n_tokens": 0, "mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
  q = np.quantile(v, [0.5, 0.9, 0.99])
  return {"n_tokens": int(v.size), "mean": float(v.mean()), "median": float(q[0]), "p90": float(q[1]),
          "p99": float(q[2]), "max": float(v.max())}


def decode_tokens(tokenizer: Any, ids: Any) -> list[str]:
  """Each id decoded on its own (special tokens kept)."""
  return [tokenizer.decode([int(i)]) for i in ids]


def distinct_top(cands: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
  """The k highest-KL candidates with distinct `key`s (context window ids and the marked offset)."""
  seen, out = set(), []
  for c in sorted(cands, key=lambda d: -d["kl"]):  # stable: among equal KLs the earlier document wins
    if c["key"] not in seen:
      seen.add(c["key"])
      out.append(c)
      if len(out) == k:
        break
  return out


def _mark(tokens: list[str], at: int) -> str:
  return "".join(tokens[:at]) + "«" + tokens[at] + "»" + "".join(tokens[at + 1:])


def fmt(x: Any) -> str:
  """A number with 4 significant digits ("–" when not finite), other values as escaped text."""
  if isinstance(x, (float, np.floating)):
    return "–" if not math.isfinite(float(x)) else f"{float(x):.4g}"
  return html.escape(str(x))


def plot_by_position(profile: pd.DataFrame, path: Path) -> Path:
  """Mean KL by position index (with the token count per position on a second axis)."""
  fig = figure((6.4, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(profile["position"], profile["mean_kl"], color="#b30000", lw=1.5)
  ax.set_xlabel("position in document")
  integer_ticks(ax.xaxis)
  ax.set_ylabel("mean KL(P_ft ‖ P_base) [nats]")
  ax2 = ax.twinx()
  ax2.fill_between(profile["position"], profile["n_tokens"], color="#999", alpha=0.2, step="mid")
  ax2.set_ylabel("tokens", color="#777")
  ax.set_zorder(ax2.get_zorder() + 1)
  ax.patch.set_visible(False)
  ax.set_title("Per-token KL by position")
  return save_png(fig, path)


def _context_html(tokens: list[str], at: int) -> str:
  parts = [f'<span class="tok{" fire" if i == at else ""}">{html.escape(t)}</span>' for i, t in enumerate(tokens)]
  return f'<span class="toks">{"".join(parts)}</span>'


def section_html(summary: dict[str, Any], by_kind: pd.DataFrame, top: pd.DataFrame, plot: Path) -> str:
  """The method's HTML fragment: statistics by kind, the position profile, the highest-KL contexts."""
  head = ["kind", "tokens", "mean", "median", "p90", "p99", "max"]
  rows = "".join("<tr>" + "".join(f"<td>{fmt(r[c])}</td>" for c in ["kind", "n_tokens", "mean", "median", "p90",
                                                                      "p99", "max"]) + "</tr>"
                 for _, r in by_kind.iterrows())
  stats_table = f"<table><thead><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr></thead><tbody>{rows}</tbody></table>"
  ctx_rows = "".join(
      f"<tr><td>{fmt(r.kl)}</td><td>{fmt(r.doc)}:{fmt(r.position)}</td>"
      f"<td>{_context_html(list(r.context_tokens), int(r.marked))}</td>"
      f"<td>{html.escape(repr(r.next_token))}</td><td>{html.escape(repr(r.top_ft))} ({fmt(r.p_top_ft)})</td>"
      f"<td>{html.escape(repr(r.top_base))} ({fmt(r.p_top_base)})</td></tr>" for r in top.itertuples())
  ctx_table = ("<table><thead><tr><th>KL</th><th>doc:pos</th><th>context (marked: the token whose next-token "
               "distributions differ)</th><th>actual next</th><th>ft top next (p)</th><th>base top next (p)</th></tr>"
               f"</thead><tbody>{ctx_rows}</tbody></table>")
  return (f"<h2>Per-token KL divergence</h2>\n<p>KL(P_ft ‖ P_base) of the two models' next-token distributions at "
          f"{summary['n_tokens']:,} tokens of {summary['n_documents']:,} documents (nats, float32 log-softmax). "
          f"Mean {fmt(summary['mean'])}, median {fmt(summary['median'])}, p99 {fmt(summary['p99'])}, max "
          f"{fmt(summary['max'])}.</p>\n{stats_table}\n{png_html(plot, 'mean KL by position')}\n"
          f"<h3>Highest-KL contexts</h3>\n{ctx_table}\n")


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """Per-token KL over `ctx.batches`: kl_summary / kl_by_position / kl_top_contexts Parquet, a plot, section.html."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  batch_size, k = int(cfg.batch_size), int(cfg.top_contexts)
  if batch_size < 1 or k < 0:
    raise ConfigError(f"kl.batch_size={batch_size} must be ≥ 1 and kl.top_contexts={k} ≥ 0; e.g. 16 and 20.")
  tok = ctx.pair.tokenizer
  pad = tok.pad_token_id or 0
  step = make_kl_step(ctx.pair)
  values, kinds = [], []
  pos_sum = np.zeros(ctx.max_len, np.float64)
  pos_n = np.zeros(ctx.max_len, np.int64)
  cand: list[dict[str, Any]] = []  # the running top-k contexts
  n_docs, t0 = 0, time.time()
  for bi, batch in enumerate(ctx.batches(batch_size)):
    ids, mask = padded(batch, ctx.max_len, pad)
    kl, top_f, top_b, p_f, p_b = step(ids, mask)
    t = batch.ids.shape[1]
    kl, top_f, top_b, p_f, p_b = (x[:, :t] for x in (kl, top_f, top_b, p_f, p_b))
    real = batch.mask & (batch.docs >= 0)[:, None]  # [B, T]; filler rows ignored
    n_docs += int((batch.docs >= 0).sum())
    values.append(kl[real].astype(np.float32))
    kinds.append(batch.kinds[real])
    rows, cols = np.nonzero(real)
    np.add.at(pos_sum, cols, kl[rows, cols])
    np.add.at(pos_n, cols, 1)
    if k and rows.size:
      new, seen = [], set()
      for i in np.argsort(-kl[rows, cols], kind="stable"):
        r, c = rows[i], cols[i]
        lo, hi = max(0, c - CONTEXT_BEFORE), min(int(batch.mask[r].sum()), c + CONTEXT_AFTER + 1)
        key = (batch.ids[r, lo:hi].tobytes(), int(c - lo))
        if key in seen:  # repeated documents repeat their contexts: keep one, look further down
          continue
        seen.add(key)
        new.append({"kl": float(kl[r, c]), "doc": int(batch.docs[r]), "position": int(c), "key": key,
                    "window": batch.ids[r, lo:hi].copy(), "window_kl": kl[r, lo:hi].astype(np.float64).copy(),
                    "at": int(c - lo),
                    "next": int(batch.ids[r, c + 1]) if c + 1 < hi else -1, "top_ft_id": int(top_f[r, c]),
                    "top_base_id": int(top_b[r, c]), "p_top_ft": float(p_f[r, c]), "p_top_base": float(p_b[r, c])})
        if len(new) == k:
          break
      cand = distinct_top(cand + new, k)
    if ctx.progress and bi % 10 == 0:
      ctx.log(f"kl: batch {bi + 1}, {sum(v.size for v in values):,} tokens, {time.time() - t0:.1f} s")
  kl_all = np.concatenate(values) if values else np.zeros(0, np.float32)
  kind_all = np.concatenate(kinds) if kinds else np.zeros(0, np.uint8)

  by_kind = [{"kind": "all", **stats(kl_all)}]
  by_kind += [{"kind": name, **stats(kl_all[kind_all == code])} for code, name in KIND_NAMES.items()]
  by_kind_df = pd.DataFrame(by_kind)
  by_kind_df.to_parquet(out / "kl_summary.parquet", index=False)

  keep = pos_n > 0
  profile = pd.DataFrame({"position": np.nonzero(keep)[0], "mean_kl": pos_sum[keep] / pos_n[keep],
                          "n_tokens": pos_n[keep]})
  profile.to_parquet(out / "kl_by_position.parquet", index=False)
  plot = plot_by_position(profile, out / "kl_by_position.png")

  top_rows = []
  for c in cand:
    window, at = decode_tokens(tok, c["window"]), c["at"]
    nxt = tok.decode([c["next"]]) if c["next"] >= 0 else ""
    top_rows.append({"doc": c["doc"], "position": c["position"], "kl": c["kl"], "token": window[at],
                     "context": _mark(window, at), "context_tokens": window,
                     "context_kl": [float(v) for v in c["window_kl"]], "marked": at, "next_token": nxt,
                     "top_ft": tok.decode([c["top_ft_id"]]), "top_ft_id": c["top_ft_id"], "p_top_ft": c["p_top_ft"],
                     "top_base": tok.decode([c["top_base_id"]]), "top_base_id": c["top_base_id"],
                     "p_top_base": c["p_top_base"]})
  cols = ["doc", "position", "kl", "token", "context", "context_tokens", "context_kl", "marked", "next_token", "top_ft",
          "top_ft_id", "p_top_ft", "top_base", "top_base_id", "p_top_base"]
  top = pd.DataFrame(top_rows, columns=cols)
  top.to_parquet(out / "kl_top_contexts.parquet", index=False)

  summary: dict[str, Any] = {**stats(kl_all), "n_documents": n_docs, "seconds": round(time.time() - t0, 2)}
  summary["by_kind"] = {r["kind"]: {"n_tokens": r["n_tokens"], "mean": r["mean"]} for r in by_kind[1:]}
  summary["top_contexts"] = [{"kl": r["kl"], "context": r["context"]} for r in top_rows[:5]]
  (out / "section.html").write_text(section_html(summary, by_kind_df, top, plot), encoding="utf-8")
  ctx.log(f"kl: {summary['n_tokens']:,} tokens, mean {summary['mean']:.4g}, p99 {summary['p99']:.4g} nats")
  return summary


__all__ = ["CONTEXT_AFTER", "CONTEXT_BEFORE", "KIND_NAMES", "decode_tokens", "distinct_top", "fmt", "make_kl_step",
           "padded", "plot_by_position", "run", "section_html", "stats"]
