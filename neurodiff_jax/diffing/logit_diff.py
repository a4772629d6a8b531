"""Logit-difference amplification and diff mining: what the fine-tune adds to the output logits.

Amplification decodes greedily from

  ℓ_α = ℓ_ft + α (ℓ_ft − ℓ_base)

for each α and prompt: both models read the same growing sequence each step, so α = 0 is the
fine-tuned model's own greedy generation, α = −1 the base model's, and α > 0 exaggerates whatever
the fine-tune changed (a narrow fine-tune's domain surfaces in the text). All prompts × alphas are
one batch in one fixed-size buffer (no KV cache; every step re-runs the buffer inside one jitted
`fori_loop`, like `models.greedy_generate`), so the whole sweep compiles once.

Diff mining reads the same difference over the dataset: at every real token position the top-k
tokens of ℓ_ft − ℓ_base are counted, and per token the share of positions where the difference is
positive and its mean are accumulated (raw logit difference: the top-k is unchanged by a shift of
a position's logits, the sign and mean are not). Tokens are ranked by how often they are in the
top-k; with an organism card the top 20 are checked against its vocabulary.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx
from jaxtyping import Array, Bool, Int

from neurodiff_jax.diffing.context import DiffContext, ModelPair
from neurodiff_jax.diffing.kl import fmt, padded
from neurodiff_jax.models.generate import END_OF_TURN_TOKENS, cut_at_stop, encode_prompt, stop_ids
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, png_html, save_png

SUMMARY_TOP = 20  # tokens of the ranking in the summary (and checked against the card)


def prompt_ids(tokenizer: Any, prompts: Sequence[str], field: str = "logit_diff.prompts") -> list[list[int]]:
  """Each prompt as one user turn plus the generation prompt (chat template), else plain text after BOS."""
  out = []
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ConfigError(f"{field}[{i}] is a {type(prompt).__name__}, not text; give prompts as strings.")
    ids = encode_prompt(tokenizer, prompt, chat=bool(getattr(tokenizer, "chat_template", None)))
    if not ids:
      raise ConfigError(f"{field}[{i}] ({prompt!r}) has no tokens; give it some text.")
    out.append(ids)
  return out


def amplified_generate(pair: ModelPair, prompts: Sequence[Sequence[int]], alphas: Sequence[float],
                       max_new_tokens: int, *, pad_id: int = 0) -> np.ndarray:
  """Greedy tokens [R, max_new_tokens] from ℓ_ft + α_r (ℓ_ft − ℓ_base), row r = (prompts[r], alphas[r]).

  Rows are left-padded so every prompt ends at one column; each step runs both models on the
  whole buffer and appends the argmax of the amplified logits at the last filled column.
  """
  if len(prompts) != len(alphas) or not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError(f"amplified_generate needs one alpha per prompt and non-empty prompts; got {len(prompts)} "
                     f"prompts and {len(alphas)} alphas.")
  r, p = len(prompts), max(len(x) for x in prompts)
  total = p + max_new_tokens
  ids = np.full((r, total), pad_id, np.int32)
  mask = np.zeros((r, total), bool)
  for i, prompt in enumerate(prompts):
    ids[i, p - len(prompt):p], mask[i, p - len(prompt):p] = prompt, True
  gb, sb = nnx.split(pair.base)
  gf, sf = nnx.split(pair.ft)

  @jax.jit
  def run(sb, sf, ids: Int[Array, "R S"], mask: Bool[Array, "R S"], alpha: Array):  # alpha [R]
    mb, mf = nnx.merge(gb, sb), nnx.merge(gf, sf)

    def step(i, carry):
      ids, mask = carry
      lb = mb(ids, mask).logits[:, p + i - 1].astype(jnp.float32)  # [R, V]
      lf = mf(ids, mask).logits[:, p + i - 1].astype(jnp.float32)  # [R, V]
      nxt = jnp.argmax(lf + alpha[:, None] * (lf - lb), axis=-1).astype(ids.dtype)  # [R]
      return ids.at[:, p + i].set(nxt), mask.at[:, p + i].set(True)

    return jax.lax.fori_loop(0, max_new_tokens, step, (ids, mask))[0]

  out = run(sb, sf, *pair.put(ids, mask, np.asarray(alphas, np.float32)))
  return np.asarray(out)[:, p:]


def amplified_samples(pair: ModelPair, prompts: Sequence[str], ids: Sequence[Sequence[int]],
                      rows: Sequence[tuple[float, int]], max_new_tokens: int) -> pd.DataFrame:
  """Decoded `amplified_generate` samples of `rows` (α, prompt index): alpha, prompt, text, token_ids, n_tokens."""
  tok = pair.tokenizer
  gen = amplified_generate(pair, [ids[i] for _, i in rows], [a for a, _ in rows], max_new_tokens,
                           pad_id=tok.pad_token_id or 0)
  stops = stop_ids(tok)
  kept = [cut_at_stop(g, stops) for g in gen]
  return pd.DataFrame({"alpha": [a for a, _ in rows], "prompt": [prompts[i] for _, i in rows],
                       "text": [tok.decode(k, skip_special_tokens=True) for k in kept],
                       "token_ids": [np.asarray(g, np.int64) for g in gen], "n_tokens": [len(k) for k in kept]})


def make_mining_step(pair: ModelPair, top_k: int):
  """A jitted `(ids, mask, real) -> (in_top_k [V] int32, positive [V], diff_sum [V])` summed over real positions."""
  gb, sb = nnx.split(pair.base)
  gf, sf = nnx.split(pair.ft)
  vocab = pair.ft.cfg.vocab_size

  @jax.jit
  def step(sb, sf, ids: Int[Array, "B T"], mask: Bool[Array, "B T"], real: Bool[Array, "B T"]):
    lb = nnx.merge(gb, sb)(ids, mask).logits.astype(jnp.float32)  # [B, T, V]
    lf = nnx.merge(gf, sf)(ids, mask).logits.astype(jnp.float32)  # [B, T, V]
    d = lf - lb  # [B, T, V]
    _, top = jax.lax.top_k(d, top_k)  # [B, T, k]
    w = jnp.broadcast_to(real[..., None], top.shape).astype(jnp.int32)  # [B, T, k]
    counts = jnp.zeros(vocab, jnp.int32).at[top.reshape(-1)].add(w.reshape(-1))  # [V]
    r = real.astype(jnp.float32)
    positive = jnp.einsum("BT,BTV->V", r, (d > 0).astype(jnp.float32))  # [V]; exact below 2^24 positions
    diff_sum = jnp.einsum("BT,BTV->V", r, d)  # [V]
    return counts, positive, diff_sum

  def run(ids: np.ndarray, mask: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, ...]:
    out = step(sb, sf, *pair.put(ids, mask, real))
    return tuple(np.asarray(x) for x in out)

  return run


def mine(ctx: DiffContext, top_k: int, batch_size: int) -> tuple[pd.DataFrame, int]:
  """The diff-mining table (tokens ever in a position's top-k, ranked by count) and the number of positions read."""
  tok = ctx.pair.tokenizer
  vocab = ctx.pair.ft.cfg.vocab_size
  step = make_mining_step(ctx.pair, top_k)
  counts = np.zeros(vocab, np.int64)
  positive = np.zeros(vocab, np.float64)
  diff_sum = np.zeros(vocab, np.float64)
  n, t0 = 0, time.time()
  for bi, batch in enumerate(ctx.batches(batch_size)):
    ids, mask = padded(batch, ctx.max_len, tok.pad_token_id or 0)
    real = np.zeros_like(mask)
    real[:, :batch.ids.shape[1]] = batch.mask & (batch.docs >= 0)[:, None]  # filler rows ignored
    c, pos, ds = step(ids, mask, real)
    counts += c
    positive += pos
    diff_sum += ds
    n += int(real.sum())
    if ctx.progress and bi % 10 == 0:
      ctx.log(f"logit_diff: mining batch {bi + 1}, {n:,} positions, {time.time() - t0:.1f} s")
  seen = np.nonzero(counts)[0]
  # Byte tokens decode alone to "\ufffd": `piece` (the vocabulary entry) tells them apart.
  table = pd.DataFrame({"token": [tok.decode([int(i)]) for i in seen], "token_id": seen.astype(np.int64),
                        "piece": [str(x) for x in tok.convert_ids_to_tokens([int(i) for i in seen])],
                        "count": counts[seen], "share_of_positions": counts[seen] / max(n, 1),
                        "frac_positive": positive[seen] / max(n, 1), "mean_diff": diff_sum[seen] / max(n, 1)})
  table = table.sort_values(["count", "mean_diff", "token_id"], ascending=[False, False, True], kind="stable")
  return table.reset_index(drop=True), n


def card_relevance(ctx: DiffContext, tokens: list[str]) -> tuple[list[bool] | None, str]:
  """Which tokens are card words (the grader's `relevant`, else the card's vocabulary), and why None when unknown."""
  from neurodiff_jax.diffing import graders

  if not graders.card_vocabulary(ctx.pair.card):
    return None, "the fine-tuned model has no card with a vocabulary"
  if ctx.grader is not None:
    try:
      return [bool(x) for x in ctx.grader.relevant(tokens)], ""
    except ConfigError as e:  # no card for this grader, or an endpoint that does not answer: report, lose nothing
      return None, str(e)
  words = graders.card_vocabulary(ctx.pair.card)
  return [graders.normalize_token(t) in words for t in tokens], ""


def plot_mining(top: pd.DataFrame, relevant: list[bool] | None, path: Path) -> Path:
  """Horizontal bars: the top tokens' share of positions with the token in the top-k (card words in red)."""
  fig = figure((6.4, max(2.5, 0.22 * len(top) + 1)))
  ax = fig.add_subplot(1, 1, 1)
  y = np.arange(len(top))[::-1]
  colors = ["#b30000" if relevant and relevant[i] else "#4a6fa5" for i in range(len(top))]
  ax.barh(y, top["share_of_positions"], color=colors)
  ax.set_yticks(y, [repr(t) if "\ufffd" not in t else p for t, p in zip(top["token"], top["piece"])], fontsize=7)
  ax.set_xlabel("share of positions with the token in the top-k of ℓ_ft − ℓ_base")
  ax.set_title("Diff mining" + (" (card words in red)" if relevant else ""))
  return save_png(fig, path)


def section_html(amplified: pd.DataFrame, top: pd.DataFrame, summary: dict[str, Any], plot: Path) -> str:
  """The method's HTML fragment: amplified samples by α and prompt, the diff-mining ranking."""
  rows = "".join(f"<tr><td>{fmt(r.alpha)}</td><td>{html.escape(r.prompt)}</td>"
                 f'<td class="completion">{html.escape(r.text)}</td></tr>' for r in amplified.itertuples())
  amp = f"<table><thead><tr><th>α</th><th>prompt</th><th>greedy sample</th></tr></thead><tbody>{rows}</tbody></table>"
  mrows = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(repr(r.token))}</td><td>{html.escape(r.piece)}</td>"
                  f"<td>{r.token_id}</td><td>{r.count:,}</td>"
                  f"<td>{fmt(r.share_of_positions)}</td><td>{fmt(r.frac_positive)}</td><td>{fmt(r.mean_diff)}</td>"
                  "</tr>" for i, r in enumerate(top.itertuples()))
  mining = ("<table><thead><tr><th>rank</th><th>token</th><th>piece</th><th>id</th><th>count</th>"
            "<th>share of positions</th>"
            f"<th>fraction positive</th><th>mean diff</th></tr></thead><tbody>{mrows}</tbody></table>")
  card = summary.get("card_words_in_top")
  card_line = (f"<p>{card} of the top {len(top)} tokens are words of the organism card.</p>" if card is not None else
               f"<p>Card relevance not measured: {html.escape(summary.get('card_note', ''))}.</p>")
  return (f"<h2>Logit-difference amplification and diff mining</h2>\n<p>Greedy samples from ℓ_ft + α(ℓ_ft − ℓ_base) "
          f"(α = 0: the fine-tuned model; α = −1 would be the base model), {summary['new_tokens']} new tokens.</p>\n"
          f"{amp}\n<h3>Diff mining</h3>\n<p>Over {summary['n_positions']:,} positions: how often each token is among "
          f"the top {summary['top_k']} of ℓ_ft − ℓ_base (raw logits; fraction positive and mean over all positions)."
          f"</p>\n{card_line}\n{png_html(plot, 'diff mining top tokens')}\n{mining}\n")


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """Amplified samples (amplified.parquet) and diff mining (diff_mining.parquet, plot) of the pair; section.html."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  alphas = [float(a) for a in cfg.alphas]
  prompts = list(cfg.prompts)
  new, top_k, batch_size = int(cfg.new_tokens), int(cfg.top_k), int(cfg.batch_size)
  vocab = ctx.pair.ft.cfg.vocab_size
  if not alphas or not prompts or new < 1:
    raise ConfigError(f"logit_diff needs alphas, prompts and new_tokens ≥ 1 (got {len(alphas)} alphas, "
                      f"{len(prompts)} prompts, new_tokens={new}); e.g. alphas=(0, 1, 2, 4).")
  if not 1 <= top_k <= vocab or batch_size < 1:
    raise ConfigError(f"logit_diff.top_k={top_k} must be in [1, {vocab}] (the vocabulary) and batch_size={batch_size} "
                      "≥ 1; e.g. top_k=10, batch_size=16.")
  tok = ctx.pair.tokenizer
  t0 = time.time()
  ids = prompt_ids(tok, prompts)
  rows = [(a, i) for i in range(len(prompts)) for a in alphas]
  amplified = amplified_samples(ctx.pair, prompts, ids, rows, new)
  amplified.to_parquet(out / "amplified.parquet", index=False)
  t_amp = time.time() - t0
  ctx.log(f"logit_diff: {len(rows)} amplified samples in {t_amp:.1f} s")

  t1 = time.time()
  table, n = mine(ctx, top_k, batch_size)
  table.to_parquet(out / "diff_mining.parquet", index=False)
  top = table.head(SUMMARY_TOP)
  relevant, note = card_relevance(ctx, list(top["token"]))
  plot = plot_mining(top, relevant, out / "diff_mining.png")
  summary: dict[str, Any] = {
      "alphas": alphas, "new_tokens": new, "top_k": top_k, "n_positions": n,
      "top_tokens": [{"token": r.token, "piece": r.piece, "count": int(r.count),
                      "frac_positive": float(r.frac_positive)}
                     for r in top.itertuples()],
      "card_words_in_top": None if relevant is None else int(sum(relevant)),
      "card_words": None if relevant is None else [t for t, m in zip(top["token"], relevant) if m],
      "card_note": note,
      "samples": {f"alpha={a:g}": amplified[amplified.alpha == a].text.tolist() for a in alphas},
      "seconds_amplification": round(t_amp, 2), "seconds_mining": round(time.time() - t1, 2)}
  (out / "section.html").write_text(section_html(amplified, top, summary, plot), encoding="utf-8")
  ctx.log(f"logit_diff: mined {n:,} positions; top tokens {[r['token'] for r in summary['top_tokens'][:8]]}")
  return summary


__all__ = ["END_OF_TURN_TOKENS", "SUMMARY_TOP", "amplified_generate", "amplified_samples", "card_relevance",
           "cut_at_stop", "make_mining_step", "mine", "plot_mining", "prompt_ids", "run", "section_html", "stop_ids"]
