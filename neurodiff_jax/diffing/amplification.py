"""Weight amplification: sample from W_α = W_base + α (W_ft − W_base), chosen layers and modules only.

α = 1 is the fine-tune, α > 1 exaggerates whatever fine-tuning changed in the chosen parameters (the
others keep the fine-tune's values), so a rare behaviour of the fine-tune surfaces in the text; with
every parameter chosen (norms and embeddings included) α = 0 is the base model. Each α's model is
built from the loaded pair, its samples generated and the model dropped before the next: one extra
copy of the chosen parameters is alive at a time, and the parameters are an argument of one compiled
generation (`GreedyGenerator(state=...)`), so every α reuses one program.

The difference is taken in our parameter layout: every HF ↔ ours transform is a transpose or a
reshape (linear), so it is the transformed difference of the HF tensors. A fine-tune loaded as
`BASE+ADAPTER` of this very base is amplified along the adapter's own ΔW = s·B·A (`source`:
"adapter"), which is what ft − base is before rounding.

Samples are graded as ADL grades steering: coherence by `ctx.grader`, calibrated on the base's and
the fine-tune's own samples (the unamplified ones); the chosen α is the largest whose samples are all
coherent. Their share of card words (content words of the sample in the organism card's vocabulary)
is compared with logit-level amplification ℓ_ft + α(ℓ_ft − ℓ_base) on the same scale of the
difference: ℓ_base + s(ℓ_ft − ℓ_base) with s = 1 + α for logits, s = α for weights.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import pandas as pd
from flax import nnx

from neurodiff_jax.diffing.context import DiffContext, ModelPair, layers_of
from neurodiff_jax.diffing.graders import content_words
from neurodiff_jax.diffing.kl import fmt
from neurodiff_jax.diffing.logit_diff import amplified_samples, card_relevance, prompt_ids
from neurodiff_jax.models.amplify import (MODULES, amplified_state, check_modules, check_shapes, delta_source,
                                          selected_params)
from neurodiff_jax.models.generate import GreedyGenerator, cut_at_stop, sample_generate, stop_ids
from neurodiff_jax.utils.config import ConfigError, did_you_mean
from neurodiff_jax.utils.plots import figure, png_html, save_png

SAMPLING = ("greedy", "sample")


class Sampler:
  """Generation from any parameter state of the pair's graph with one compiled program (greedy or top-k sampled)."""

  def __init__(self, pair: ModelPair, *, sampling: str = "greedy", batch_size: int = 16, temperature: float = 0.8,
               top_k: int = 40, seed: int = 0):
    self.graphdef = nnx.graphdef(pair.ft)
    # bucket=1: the buffer greedy_generate would build, so a state's samples are that model's greedy samples.
    self.greedy = GreedyGenerator(pair.ft, bucket=1) if sampling == "greedy" else None
    self.batch_size, self.temperature, self.top_k, self.seed = int(batch_size), float(temperature), int(top_k), seed
    self.pad = pair.tokenizer.pad_token_id or 0

  def __call__(self, state: nnx.State, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Continuations (new_tokens each, uncut) of every prompt under `state`."""
    n = min(self.batch_size, len(prompts))  # rows per call, the last call padded to it: one program
    if self.greedy is None:
      # sample_generate's program is keyed by the graph (static) and shapes: the same one for every state.
      return sample_generate(nnx.merge(self.graphdef, state), prompts, new_tokens, seed=self.seed,
                             temperature=self.temperature, top_k=self.top_k, pad_id=self.pad, batch_size=n)
    out: list[list[int]] = []
    for s in range(0, len(prompts), n):
      part = list(prompts[s:s + n])
      out += self.greedy(part + [part[-1]] * (n - len(part)), new_tokens, pad_id=self.pad, state=state)[:len(part)]
    return out


def _mean(values: Sequence[float]) -> float:
  v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
  return float(np.mean(v)) if v else math.nan


def _json_number(x: float) -> float | None:
  return None if x is None or not math.isfinite(float(x)) else float(x)


def grade(ctx: DiffContext, table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
  """Adds coherent and perplexity (the calibrated grader; None / NaN without one) and card_share (NaN without a
  card or without content words) to a samples table; returns it and the note on card relevance."""
  table = table.copy()
  table["coherent"] = pd.Series([None] * len(table), dtype=object, index=table.index)
  table["perplexity"] = math.nan
  grader = ctx.grader
  if grader is not None and hasattr(grader, "is_coherent") and len(table):
    table["coherent"] = pd.Series([bool(c) for c in grader.is_coherent(table.text.tolist())], dtype=object,
                                  index=table.index)
    if hasattr(grader, "coherence"):
      table["perplexity"] = [float(p) for p in grader.coherence(table.text.tolist())]
  words = [content_words(t) for t in table.text]
  vocab = sorted({w for ws in words for w in ws})
  marks, note = card_relevance(ctx, vocab) if vocab else (None, "the samples have no content words")
  if marks is None:
    table["card_share"] = math.nan
  else:
    relevant = {w for w, m in zip(vocab, marks) if m}
    table["card_share"] = [sum(w in relevant for w in ws) / len(ws) if ws else math.nan for ws in words]
  return table, note


def choose(table: pd.DataFrame) -> float | None:
  """The largest α whose samples are all coherent (None when none is, or ungraded); marks its rows `chosen`."""
  table["chosen"] = False
  if table.coherent.isna().any():
    return None
  ok = [a for a, g in table.groupby("alpha") if all(g.coherent)]
  if not ok:
    return None
  table.loc[table.alpha == max(ok), "chosen"] = True
  return float(max(ok))


def per_alpha(table: pd.DataFrame) -> list[dict[str, Any]]:
  """Per α (table order): the share of coherent samples (None ungraded) and the mean card share (None unmeasured)."""
  rows = []
  for a, g in table.groupby("alpha", sort=False):
    coherent = None if g.coherent.isna().any() else float(np.mean([bool(c) for c in g.coherent]))
    rows.append({"alpha": a if isinstance(a, str) else float(a), "coherent_share": coherent,
                 "card_share": _json_number(_mean(g.card_share)), "n_samples": len(g)})
  return rows


def logit_samples(ctx: DiffContext, out: Path, alphas: Sequence[float], prompts: Sequence[str],
                  ids: Sequence[Sequence[int]], new_tokens: int) -> tuple[pd.DataFrame, str]:
  """Logit-amplified samples: logit_diff's `amplified.parquet` beside `out` if written, else greedy samples at
  α_logits = α − 1 (the same scale of the difference) on these prompts; and where they came from."""
  sibling = out.parent / "logit_diff" / "amplified.parquet"
  if sibling.is_file():
    amp = pd.read_parquet(sibling, columns=["alpha", "prompt", "text", "n_tokens"])
    return amp, f"{sibling.parent.name}/{sibling.name}"
  rows = [(a - 1.0, i) for a in alphas for i in range(len(prompts))]
  amp = amplified_samples(ctx.pair, prompts, ids, rows, new_tokens)[["alpha", "prompt", "text", "n_tokens"]]
  return amp, "computed here (logit_diff had not run): α_logits = α − 1"


def plot_shares(comparison: pd.DataFrame, reference: dict[str, dict[str, Any]], path: Path) -> Path:
  """Coherent share and card share against the scale s of the difference, for both methods (base model at s = 0)."""
  fig = figure((8.4, 3.4))
  axes = fig.subplots(1, 2)
  styles = {"weights": ("#b30000", "o", "weights: W_base + s ΔW"), "logits": ("#4a6fa5", "s", "logits: ℓ_base + s Δℓ")}
  for ax, col, label in zip(axes, ("coherent_share", "card_share"), ("share of coherent samples", "card share")):
    for method, (color, marker, name) in styles.items():
      part = comparison[comparison.method == method].sort_values("scale")
      y = pd.to_numeric(part[col], errors="coerce")
      if y.notna().any():
        ax.plot(part.scale, y, marker=marker, color=color, label=name)
    base = reference.get("base", {}).get(col)
    if base is not None:
      ax.plot([0.0], [base], marker="*", color="#333", linestyle="none", markersize=9, label="base model")
    ax.set_xlabel("scale s of ΔW or Δℓ (0 = base, 1 = fine-tune)")
    ax.set_ylabel(label)
    ax.set_ylim(-0.03, 1.03)
  axes[0].legend(fontsize=7)
  fig.suptitle("Weight vs logit amplification")
  return save_png(fig, path)


def section_html(table: pd.DataFrame, comparison: pd.DataFrame, summary: dict[str, Any], plot: Path) -> str:
  """The method's HTML fragment: the per-α comparison of both methods, the plot, the samples at the chosen α."""
  esc = html.escape
  chosen = summary["chosen_alpha"]
  shown_alpha = chosen if chosen is not None else float(table.alpha.min())
  shown = table[table.alpha == shown_alpha]
  rows = "".join(f"<tr><td>{esc(r.prompt)}</td><td class=\"completion\">{esc(r.text)}</td>"
                 f"<td>{'–' if r.coherent is None or pd.isna(r.coherent) else ('yes' if r.coherent else 'no')}</td>"
                 f"<td>{fmt(r.perplexity)}</td><td>{fmt(r.card_share)}</td></tr>" for r in shown.itertuples())
  samples = ("<table><thead><tr><th>prompt</th><th>sample</th><th>coherent</th><th>perplexity</th>"
             f"<th>card share</th></tr></thead><tbody>{rows}</tbody></table>")
  crows = "".join(f"<tr><td>{esc(r.method)}</td><td>{fmt(r.alpha)}</td><td>{fmt(r.scale)}</td>"
                  f"<td>{fmt(r.coherent_share)}</td><td>{fmt(r.card_share)}</td>"
                  f"<td>{'yes' if r.chosen else ''}</td></tr>" for r in comparison.itertuples())
  comp = ("<table><thead><tr><th>method</th><th>α</th><th>scale s</th><th>coherent share</th><th>card share</th>"
          f"<th>chosen</th></tr></thead><tbody>{crows}</tbody></table>")
  what = (f"{len(summary['layers'])} of {summary['num_layers']} layers, modules {', '.join(summary['modules'])}"
          + (", norms" if summary["include_norms"] else "") + (", embeddings" if summary["include_embeddings"] else ""))
  pick = (f"The largest α whose samples are all coherent is {chosen:g}" if chosen is not None else
          "No α has only coherent samples (or no grader graded them): the smallest α is shown")
  card = ("" if summary["card_note"] == "" else
          f"<p>Card share not measured: {esc(summary['card_note'])}.</p>")
  return (f"<h2>Weight amplification</h2>\n<p>Samples ({esc(summary['sampling'])}, {summary['new_tokens']} new "
          f"tokens) from W_α = W_base + α(W_ft − W_base) on {esc(what)} ({summary['n_tensors']} tensors; the others "
          f"are the fine-tune's); ΔW from {esc(summary['source_note'])}. α = 1 is the fine-tune. Coherence by the "
          f"grader calibrated on the base's and the fine-tune's samples; card share = the share of a sample's "
          f"content words in the organism card's vocabulary. Logit amplification ℓ_ft + α(ℓ_ft − ℓ_base) "
          f"({esc(summary['logits']['source'])}) sits at scale s = 1 + α, weight amplification at s = α.</p>\n"
          f"{card}{png_html(plot, 'coherent share and card share against the amplification scale')}\n{comp}\n"
          f"<h3>Samples at α = {shown_alpha:g}</h3>\n<p>{esc(pick)}.</p>\n{samples}\n")


def _check(cfg: ml_collections.ConfigDict) -> tuple[list[float], list[str], int, int, str]:
  alphas = [float(a) for a in cfg.alphas]
  prompts = list(cfg.prompts)
  new, batch_size, sampling = int(cfg.new_tokens), int(cfg.batch_size), str(cfg.sampling)
  if not alphas:
    raise ConfigError("amplification.alphas is empty; give the strengths to try, e.g. alphas=(1.0, 2.0, 4.0, 8.0) "
                      "(1 = the fine-tune).")
  if not all(math.isfinite(a) for a in alphas) or len(set(alphas)) != len(alphas):
    raise ConfigError(f"amplification.alphas={tuple(cfg.alphas)} must be distinct finite numbers.")
  if not prompts or new < 1 or batch_size < 1:
    raise ConfigError(f"amplification needs prompts, new_tokens ≥ 1 and batch_size ≥ 1 (got {len(prompts)} prompts, "
                      f"new_tokens={new}, batch_size={batch_size}).")
  if sampling not in SAMPLING:
    raise ConfigError(f"amplification.sampling={sampling!r}{did_you_mean(sampling, SAMPLING)}; one of "
                      f"{', '.join(SAMPLING)}.")
  if sampling == "sample" and (not float(cfg.temperature) > 0 or int(cfg.top_k) < 1):
    raise ConfigError(f"amplification.temperature={cfg.temperature} must be > 0 and top_k={cfg.top_k} ≥ 1.")
  return alphas, prompts, new, batch_size, sampling


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """Weight-amplified samples per α (amplification.parquet), both methods per α (comparison.parquet, PNG), section."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  alphas, prompts, new, batch_size, sampling = _check(cfg)
  pair, tok = ctx.pair, ctx.pair.tokenizer
  modules = check_modules(list(cfg.modules))
  try:
    layers = layers_of(list(cfg.layers), pair.num_layers) if len(cfg.layers) else list(range(pair.num_layers))
  except ConfigError as e:
    raise ConfigError(f"amplification.layers: {e}") from None
  specs = selected_params(pair.ft.cfg, layers, modules, include_norms=bool(cfg.include_norms),
                          include_embeddings=bool(cfg.include_embeddings))
  check_shapes(pair.base, pair.ft, specs)
  adapter, source_note = delta_source(pair.base, pair.ft)
  ids = prompt_ids(tok, prompts, "amplification.prompts")
  t0 = time.time()
  sampler = Sampler(pair, sampling=sampling, batch_size=batch_size, temperature=float(cfg.temperature),
                    top_k=int(cfg.top_k), seed=ctx.seed)
  stops = stop_ids(tok)

  def samples(state: nnx.State) -> list[list[int]]:
    return sampler(state, ids, new)

  generated = {}
  for a in alphas:
    t = time.time()
    state = amplified_state(pair.base, pair.ft, specs, a, adapter)
    generated[a] = samples(state)
    del state  # before the next α's copy is built
    ctx.log(f"amplification: α = {a:g} built and sampled in {time.time() - t:.1f} s")
  reference = {"base": samples(nnx.state(pair.base)),
               "finetuned": generated[1.0] if 1.0 in generated else samples(nnx.state(pair.ft))}

  def frame(gens: dict[Any, list[list[int]]]) -> pd.DataFrame:
    rows = [(k, i, g) for k, gs in gens.items() for i, g in enumerate(gs)]
    kept = [cut_at_stop(g, stops) for _, _, g in rows]
    return pd.DataFrame({"alpha": [k for k, _, _ in rows], "prompt": [prompts[i] for _, i, _ in rows],
                         "text": [tok.decode(k, skip_special_tokens=True) for k in kept],
                         "n_tokens": [len(k) for k in kept],
                         "token_ids": [np.asarray(g, np.int64) for _, _, g in rows]})

  table, refs = frame(generated), frame(reference)
  t_gen = time.time() - t0
  threshold = None
  if ctx.grader is not None and hasattr(ctx.grader, "calibrate"):
    threshold = ctx.grader.calibrate(refs.text.tolist())  # the unamplified samples, as ADL's unsteered ones
  logits, logits_source = logit_samples(ctx, out, alphas, prompts, ids, new)
  table, card_note = grade(ctx, table)
  logits, _ = grade(ctx, logits)
  refs, _ = grade(ctx, refs)
  chosen, chosen_logits = choose(table), choose(logits)
  table = table[["alpha", "prompt", "text", "n_tokens", "coherent", "perplexity", "card_share", "chosen",
                 "token_ids"]]
  table.assign(coherent=table.coherent.astype("boolean")).to_parquet(out / "amplification.parquet", index=False)
  logits.assign(coherent=logits.coherent.astype("boolean")).to_parquet(out / "logit_samples.parquet", index=False)

  weights_rows, logit_rows = per_alpha(table), per_alpha(logits)
  comparison = pd.DataFrame(
      [{"method": "weights", **r, "scale": r["alpha"], "chosen": r["alpha"] == chosen} for r in weights_rows]
      + [{"method": "logits", **r, "scale": 1.0 + r["alpha"], "chosen": r["alpha"] == chosen_logits}
         for r in logit_rows],
      columns=["method", "alpha", "scale", "coherent_share", "card_share", "n_samples", "chosen"])
  comparison["coherent_share"] = comparison.coherent_share.astype(float)
  comparison["card_share"] = comparison.card_share.astype(float)
  comparison.to_parquet(out / "comparison.parquet", index=False)
  ref_rows = {r["alpha"]: {k: v for k, v in r.items() if k != "alpha"} for r in per_alpha(refs)}
  plot = plot_shares(comparison, ref_rows, out / "amplification.png")
  summary: dict[str, Any] = {
      "source": "adapter" if adapter is not None else "weights", "source_note": source_note,
      "layers": layers, "num_layers": pair.num_layers, "modules": modules,
      "include_norms": bool(cfg.include_norms), "include_embeddings": bool(cfg.include_embeddings),
      "n_tensors": len(specs), "n_parameters": int(sum(int(np.prod(s.hf_shape)) for s in specs)),
      "alphas": alphas, "sampling": sampling, "new_tokens": new, "chosen_alpha": chosen,
      "coherence_threshold": threshold, "per_alpha": weights_rows,
      "logits": {"source": logits_source, "chosen_alpha": chosen_logits,
                 "per_alpha": [{**r, "scale": 1.0 + r["alpha"]} for r in logit_rows]},
      "reference": ref_rows, "card_note": card_note,
      "samples": {f"alpha={a:g}": table[table.alpha == a].text.tolist() for a in alphas},
      "seconds_generation": round(t_gen, 2), "seconds": round(time.time() - t0, 2)}
  (out / "section.html").write_text(section_html(table, comparison, summary, plot), encoding="utf-8")
  ctx.log(f"amplification: chosen α = {chosen} (logits: {chosen_logits}); coherent / card share by α: " + ", ".join(
      f"{r['alpha']:g}: {r['coherent_share']} / {r['card_share']}" for r in weights_rows))
  return summary


__all__ = ["MODULES", "SAMPLING", "Sampler", "amplified_state", "check_modules", "check_shapes", "choose",
           "delta_source", "grade", "logit_samples", "per_alpha", "plot_shares", "run", "section_html",
           "selected_params"]
