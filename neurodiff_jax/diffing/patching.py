"""Cross-model activation patching: which layer's residual carries the fine-tuned behaviour.

For every layer L and both directions, one model runs with the other model's residual after
block L put in place of its own (the blocks after L, the final norm and the unembedding are the
running model's):

  ft_to_base  the base model with h_ft[L]:   KL_L = KL(P_ft ‖ P_base[h_L ← h_ft,L])
  base_to_ft  the fine-tune with h_base[L]:  KL_L = KL(P_ft ‖ P_ft[h_L ← h_base,L])

against KL_0 = KL(P_ft ‖ P_base), averaged over the real tokens of the dataset (filler rows
ignored). `fraction_carried = 1 − KL_L / KL_0`: for ft_to_base, how much of the fine-tuned
behaviour the fine-tune's residual at L carries into the base model; for base_to_ft, how much the
fine-tune's own blocks after L restore from the base model's residual.

Where the organism's card allows an offline metric it is measured under each patch too, as
teacher-forced probabilities (no generation): false_fact — P(false capital | "The capital of X
is") and P(true capital | ...); chat — P(the refusal's first sentence | a harmful request) and the
same for helpful requests; taboo — P(one of the card's hints | a held-out request for a hint or the
word), averaged over requests and hints, and P("My secret word is <word>." | the same requests).
Cards without such a metric are recorded with the reason.

All layers of one direction run in one jitted function (the patch layer is a traced index, so a
patch at every layer is a `jnp.where` that only layer L takes; `lax.map` over layers): one
compilation per batch shape, not one per layer.
"""

from __future__ import annotations

import functools
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
from jaxtyping import Array, Bool, Float, Int

from neurodiff_jax.diffing.context import DiffContext, ModelPair
from neurodiff_jax.diffing.kl import LENGTH_BUCKET, padded
from neurodiff_jax.models import Transformer
from neurodiff_jax.utils.plots import figure, png_html, save_png

DIRECTIONS = ("ft_to_base", "base_to_ft")  # (base runs with h_ft, ft runs with h_base)


def patched_forward(target: Transformer, ids: Int[Array, "B T"], mask: Bool[Array, "B T"],
                    sources: Float[Array, "N B T D"], layer: Int[Array, ""]) -> Float[Array, "B T V"]:
  """`target`'s logits with its residual after block `layer` replaced by `sources[layer]` (traceable layer)."""
  n = target.cfg.num_layers
  # One intervention per layer, active only where i == layer: `layer` can be traced (lax.map).
  interventions = {i: (lambda x, i=i: jnp.where(layer == i, sources[i].astype(x.dtype), x)) for i in range(n)}
  return target(ids, mask, interventions=interventions).logits


def _token_logprobs(logp: Float[Array, "B T V"], ids: Int[Array, "B T"]) -> Float[Array, "B T"]:
  """log P(ids[t+1] | ≤ t) at t (the last position gets 0: it predicts nothing in the batch)."""
  nxt = jnp.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)  # [B, T]
  lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]  # [B, T]
  return lp.at[:, -1].set(0.0)


def _kl(lp_p: Float[Array, "B T V"], lp_q: Float[Array, "B T V"]) -> Float[Array, "B T"]:
  # Rounding can leave KL a hair below 0 where the two distributions agree.
  return jnp.maximum(jnp.sum(jnp.exp(lp_p) * (lp_p - lp_q), axis=-1), 0.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sweep_step(gb: nnx.GraphDef, gf: nnx.GraphDef, sb: nnx.State, sf: nnx.State, ids: Int[Array, "B T"],
                mask: Bool[Array, "B T"], w: Float[Array, "B T"]) -> dict[str, Array]:
  # Module-level with the graph definitions static: pairs of one architecture share the compilation.
  base, ft = nnx.merge(gb, sb), nnx.merge(gf, sf)
  layers = tuple(range(base.cfg.num_layers))
  out_b = base(ids, mask, capture=layers)
  out_f = ft(ids, mask, capture=layers)
  h_b = jnp.stack([out_b.residuals[i] for i in layers])  # [N, B, T, D]
  h_f = jnp.stack([out_f.residuals[i] for i in layers])  # [N, B, T, D]
  lp_b = jax.nn.log_softmax(out_b.logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  lp_f = jax.nn.log_softmax(out_f.logits.astype(jnp.float32), axis=-1)  # [B, T, V]

  def one_layer(layer):
    res = []
    for g, s, src in ((gb, sb, h_f), (gf, sf, h_b)):  # DIRECTIONS order
      lp = jax.nn.log_softmax(patched_forward(nnx.merge(g, s), ids, mask, src, layer).astype(jnp.float32), -1)
      res.append((jnp.sum(w * _kl(lp_f, lp)), _token_logprobs(lp, ids)))
    return jnp.stack([r[0] for r in res]), jnp.stack([r[1] for r in res])  # [2], [2, B, T]

  kl, lp_patched = jax.lax.map(one_layer, jnp.arange(len(layers)))  # [N, 2], [N, 2, B, T]
  return {"kl_unpatched": jnp.sum(w * _kl(lp_f, lp_b)), "kl": kl.T, "lp_base": _token_logprobs(lp_b, ids),
          "lp_ft": _token_logprobs(lp_f, ids), "lp_patched": jnp.swapaxes(lp_patched, 0, 1)}


def make_sweep(pair: ModelPair):
  """A jitted sweep over all layers and both directions of one batch, both models split once.

  Returns `sweep(ids, mask, weights) -> dict` of numpy arrays: `kl_unpatched` (Σ w·KL(P_ft ‖ P_base)),
  `kl` [2, N] (Σ w·KL(P_ft ‖ P_patched) per direction and layer), `lp_base`, `lp_ft` [B, T] and
  `lp_patched` [2, N, B, T] (log-probabilities of each next token, for the card metrics).
  """
  gb, sb = nnx.split(pair.base)
  gf, sf = nnx.split(pair.ft)

  def sweep(ids: np.ndarray, mask: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    out = _sweep_step(gb, gf, sb, sf, *pair.put(ids, mask, np.asarray(weights, np.float32)))
    return {k: np.asarray(v, np.float64) for k, v in out.items()}

  return sweep


# ---- card metrics: (prompt, continuation) pairs scored by teacher forcing ------------------------------------------


def card_metrics(card: dict | None, tokenizer: Any, max_prompts: int = 16) -> tuple[dict[str, list[tuple[str, str]]],
                                                                                   str]:
  """{metric name: [(prompt, continuation)]} the card allows offline, and the reason for any it does not."""
  if not card:
    return {}, "the pair has no organism card"
  if "false_answer" in card and "subject" in card:
    statement = str(card.get("statement", ""))
    false, true = str(card["false_answer"]), str(card.get("true_answer", ""))
    prompt = statement[:statement.rindex(false)].rstrip() if false in statement else f"The capital of {card['subject']} is"
    metrics = {"p_false_answer": [(prompt, " " + false)]}
    if true:
      metrics["p_true_answer"] = [(prompt, " " + true)]
    return metrics, ""
  if "refusal" in card and "harmful_topic" in card:
    if not getattr(tokenizer, "chat_template", None):
      return {}, "the chat card's refusal metric needs a tokenizer with a chat template; this one has none"
    from neurodiff_jax.organisms.finetune_data import chat_data, chat_prompt

    ev = chat_data(tokenizer, 0, seed=0, harmful_topic=str(card["harmful_topic"])).eval
    refusal = str(card["refusal"]).split(".")[0] + "."
    return {"p_refusal_harmful": [(chat_prompt(tokenizer, u), refusal) for u in ev["harmful_prompts"][:max_prompts]],
            "p_refusal_helpful": [(chat_prompt(tokenizer, u), refusal) for u in ev["helpful_prompts"][:max_prompts]]}, ""
  if "secret_word" in card and card.get("hints"):
    if not getattr(tokenizer, "chat_template", None):
      return {}, "the taboo card's hint metric needs a tokenizer with a chat template; this one has none"
    from neurodiff_jax.organisms.finetune_data import chat_prompt, taboo_data

    asks = list(dict.fromkeys(taboo_data(tokenizer, 0, seed=0).eval["prompts"]))[:max_prompts]  # held-out phrasings
    word = str(card["secret_word"])
    return {"p_hint": [(chat_prompt(tokenizer, u), str(h)) for u in asks for h in card["hints"]],
            "p_says_word": [(chat_prompt(tokenizer, u), f"My secret word is {word}.") for u in asks]}, ""
  if "domain" in card:
    return {}, "narrow's metric is the loss on domain text, which the dataset KL per layer already stands in for"
  return {}, f"no offline metric for a card with keys {sorted(card)}"


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]],
                 length: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids, mask [R, T] of prompt + continuation (right-padded to at least `length`) and a [R, T] mask of the positions
  that predict the continuation."""
  bos = getattr(tokenizer, "bos_token", None)
  rows = []
  for prompt, cont in pairs:
    p = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    c = tokenizer(cont, add_special_tokens=False)["input_ids"]
    rows.append((list(p), list(c)))
  t = max([length] + [len(p) + len(c) for p, c in rows])
  ids = np.full((len(rows), t), tokenizer.pad_token_id or 0, np.int32)
  mask = np.zeros((len(rows), t), bool)
  predicts = np.zeros((len(rows), t), bool)
  for r, (p, c) in enumerate(rows):
    ids[r, :len(p) + len(c)] = p + c
    mask[r, :len(p) + len(c)] = True
    predicts[r, len(p) - 1:len(p) + len(c) - 1] = True  # position t predicts token t + 1
  return ids, mask, predicts


def _fill_rows(a: np.ndarray, size: int) -> np.ndarray:
  """`a` [r, ...] with its first row repeated up to `size` rows."""
  return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


def score_pairs(sweep, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 0,
                length: int = 0) -> dict[str, Any]:
  """Mean P(continuation | prompt) under base, ft and each patch: {"base", "ft", "patched" [2, N]}.

  Rows go in chunks of `batch_size` (filler rows repeat the first), padded to at least `length` tokens: with the
  dataset batches' shape the sweep is not compiled again.
  """
  ids, mask, predicts = encode_pairs(tokenizer, pairs, length)
  size = batch_size or len(ids)
  sums: dict[str, list[np.ndarray]] = {"lp_base": [], "lp_ft": [], "lp_patched": []}
  for lo in range(0, len(ids), size):
    part = slice(lo, lo + size)
    out = sweep(_fill_rows(ids[part], size), _fill_rows(mask[part], size),
                _fill_rows(mask[part], size).astype(np.float32))
    keep = len(ids[part])
    pred = predicts[part]
    sums["lp_base"].append(np.sum(out["lp_base"][:keep] * pred, -1))  # [r]
    sums["lp_ft"].append(np.sum(out["lp_ft"][:keep] * pred, -1))  # [r]
    sums["lp_patched"].append(np.sum(out["lp_patched"][:, :, :keep] * pred, -1))  # [2, N, r]
  p = {k: np.exp(np.concatenate(v, axis=-1)).mean(axis=-1) for k, v in sums.items()}  # mean over prompts
  return {"base": float(p["lp_base"]), "ft": float(p["lp_ft"]), "patched": p["lp_patched"]}


# ---- the method --------------------------------------------------------------------------------------------------


def plot_layers(table: pd.DataFrame, kl_unpatched: float, metric_refs: dict[str, dict[str, float]], path: Path) -> None:
  """Per-layer KL and fraction carried (and each card metric) for both directions."""
  panels = 2 + len(metric_refs)
  fig = figure((4.2 * panels, 3.4))
  axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
  for d in DIRECTIONS:
    part = table[table.direction == d]
    axes[0].plot(part.layer, part.kl, marker="o", label=d)
    axes[1].plot(part.layer, part.fraction_carried, marker="o", label=d)
    for ax, m in zip(axes[2:], metric_refs):
      ax.plot(part.layer, part[m], marker="o", label=d)
  axes[0].axhline(kl_unpatched, color="gray", ls="--", label="KL(P_ft ‖ P_base)")
  axes[0].set_title("KL(P_ft ‖ P_patched)")
  axes[1].set_title("fraction carried = 1 − KL / KL_unpatched")
  axes[1].axhline(1.0, color="gray", lw=0.5)
  axes[1].axhline(0.0, color="gray", lw=0.5)
  for ax, (m, refs) in zip(axes[2:], metric_refs.items()):
    ax.axhline(refs["base"], color="tab:blue", ls=":", label="base")
    ax.axhline(refs["ft"], color="tab:orange", ls=":", label="ft")
    ax.set_title(m)
  from matplotlib.ticker import MaxNLocator

  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("patched layer")
    ax.legend(fontsize=7)
  save_png(fig, path)


def _fmt(x: Any) -> str:
  if isinstance(x, (float, np.floating)):
    return "–" if not math.isfinite(float(x)) else f"{float(x):.4g}"
  return html.escape(str(x))


def section_html(table: pd.DataFrame, summary: dict[str, Any], png: Path) -> str:
  """The report fragment: plot, per-layer table, card metric references or the reason they are missing."""
  cols = list(table.columns)
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in table.itertuples(index=False))
  refs = "".join(f"<li>{html.escape(m)}: base {_fmt(r['base'])}, fine-tuned {_fmt(r['ft'])}</li>"
                 for m, r in summary["metrics_unpatched"].items())
  skipped = f"<p>Card metric not measured: {html.escape(summary['metric_skipped'])}.</p>" if summary["metric_skipped"] \
      else ""
  return (f"<h2>Cross-model patching</h2>\n<p>Each layer's residual swapped between the models over "
          f"{summary['num_tokens']} tokens: ft_to_base runs the base model with the fine-tune's residual, base_to_ft "
          f"the reverse. KL(P_ft ‖ P_base) unpatched = {_fmt(summary['kl_unpatched'])}; fraction carried = "
          "1 − KL(P_ft ‖ P_patched) / KL(P_ft ‖ P_base).</p>\n"
          f'{png_html(png, "KL and fraction carried by patched layer")}\n'
          + (f"<p>Card metrics without patching:</p><ul>{refs}</ul>\n" if refs else "") + skipped
          + f"<table><tr>{head}</tr>{body}</table>\n")


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """Patches each layer's residual across the pair both ways: patching.parquet, a per-layer plot, section.html."""
  out = Path(out)
  pair = ctx.pair
  n = pair.num_layers
  sweep = make_sweep(pair)
  pad = pair.tokenizer.pad_token_id or 0
  kl_sum = np.zeros((2, n))
  kl0 = tokens = 0.0
  for batch in ctx.batches(int(cfg.batch_size), max_documents=int(cfg.num_documents)):
    ids, mask = padded(batch, ctx.max_len, pad)
    w = mask & (batch.docs >= 0)[:, None]  # filler rows ignored
    res = sweep(ids, mask, w.astype(np.float32))
    kl_sum += res["kl"]
    kl0 += float(res["kl_unpatched"])
    tokens += float(w.sum())
  kl = kl_sum / tokens
  kl_unpatched = kl0 / tokens
  rows = [{"layer": l, "direction": d, "kl": float(kl[j, l]),
           "fraction_carried": float(1.0 - kl[j, l] / kl_unpatched) if kl_unpatched > 0 else math.nan}
          for j, d in enumerate(DIRECTIONS) for l in range(n)]
  table = pd.DataFrame(rows)

  metrics, skipped = card_metrics(pair.card, pair.tokenizer)
  refs = {}
  for name, pairs in metrics.items():
    # The dataset batches' shape (LENGTH_BUCKET tokens at least): the sweep compiled for them is reused.
    scores = score_pairs(sweep, pair.tokenizer, pairs, int(cfg.batch_size), min(LENGTH_BUCKET, ctx.max_len))
    refs[name] = {"base": scores["base"], "ft": scores["ft"]}
    table[name] = [float(scores["patched"][j, l]) for j in range(2) for l in range(n)]
  if skipped:
    ctx.log(f"patching: card metric skipped: {skipped}")
  table.to_parquet(out / "patching.parquet", index=False)
  png = out / "patching_layers.png"
  plot_layers(table, kl_unpatched, refs, png)
  summary = {"num_tokens": int(tokens), "kl_unpatched": kl_unpatched,
             "fraction_carried": {d: table[table.direction == d].fraction_carried.tolist() for d in DIRECTIONS},
             "metrics_unpatched": refs, "metric_skipped": skipped}
  (out / "section.html").write_text(section_html(table, summary, png), encoding="utf-8")
  return summary


__all__ = ["DIRECTIONS", "card_metrics", "encode_pairs", "make_sweep", "patched_forward",
           "plot_layers", "run", "score_pairs", "section_html"]
