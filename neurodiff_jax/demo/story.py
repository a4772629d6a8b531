"""The demo's `report.html`: what fine-tuning changed and how each method sees it, in the order a reader asks.

1. what the organisms were taught (their cards);
2. the Δnorm classes of the BatchTopK and the L1 crosscoder, side by side;
3. which chat-only latents latent scaling calls genuine and which artifacts (Complete Shrinkage:
   ν^ε too high; Latent Decoupling: ν^r too high);
4. the genuine latents' top contexts, firing token outlined;
5. the causal KL test, with a verdict computed from its intervals (`analysis/verdicts.py`);
6. ADL on base vs narrow: δ_p's tokens against the card, relevance against the trivial baseline,
   steered samples, and the per-token KL;
7. the interpretability agents (`agents.report`, from `ROOT/agents/` when `launch.agent` has run; else the
   command that runs them): grades of blackbox and diff agents, and whether diffing results help;
8. what each method found, one line each.

Links go only to files that exist: each diff result's own `report.html` is written here
(`diffing.report.write_report`) before it is linked.

Every number is read from the files `launch.analyze` and `launch.diff` wrote (nothing is recomputed
here); the page embeds its plots, so it is one self-contained file. Claims in the prose are
computed from those numbers, never written in.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from neurodiff_jax.analysis.report import CSS, context_html, esc, fmt, genuine_rule, html_table
from neurodiff_jax.analysis.verdicts import GROUP_NOTES, causal_verdict
from neurodiff_jax.demo.pipeline import STAGES
from neurodiff_jax.utils.plots import png_html

STORY_CSS = CSS + """
.side{display:flex;gap:1rem;flex-wrap:wrap}.side>div{flex:1 1 26rem}
.card{background:#f6f6f6;padding:.5rem 1rem;border-left:3px solid #999}
b.card-word{background:#d8f0d0}
.tok{padding:0 1px;font-family:Menlo,monospace;font-size:.85rem}.tok.fire{outline:2px solid #c00}
.ctx{margin:.25rem 0}.ctx .act{display:inline-block;width:4rem;font-weight:bold}
.ctx .src{display:inline-block;width:9rem;color:#888;font-size:.8rem}
"""


def _read_json(path: Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.is_file() else {}


def _parquet(path: Path) -> pd.DataFrame | None:
  return pd.read_parquet(path) if path.is_file() else None


def _image(path: Path, alt: str) -> str:
  return png_html(path, alt) if path.is_file() else f"<p>({esc(alt)}: not available)</p>"


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """One crosscoder run's files the story reads, each read once (None / {} where the run has not written it)."""

  path: Path
  metrics: dict[str, Any]
  summary: dict[str, Any]
  latents: pd.DataFrame | None
  examples: pd.DataFrame | None
  causal: pd.DataFrame | None

  @classmethod
  def read(cls, run: Path) -> RunFiles:
    """Reads `run`'s metrics.json and its analysis' summary and tables."""
    a = run / "analysis"
    return cls(run, _read_json(run / "metrics.json"), _read_json(a / "summary.json"), _parquet(a / "latents.parquet"),
               _parquet(a / "examples.parquet"), _parquet(a / "causal.parquet"))

  def plot(self, name: str, alt: str) -> str:
    """The analysis plot `name` embedded, or a note that it is missing."""
    return _image(self.path / "analysis" / name, alt)


def _card(path: str | None) -> dict[str, Any]:
  return _read_json(Path(path) / "card.json").get("ground_truth", {}) if path else {}


def _measured(path: str | None) -> dict[str, Any]:
  return _read_json(Path(path) / "card.json").get("measured", {}) if path else {}


def _shift(path: str | None) -> str:
  """How far the fine-tune moved the model on general text, when its card measured it (real-base organisms)."""
  m = _measured(path)
  parts = []
  if "activation_shift" in m:
    a = m["activation_shift"]
    parts.append(f"median ‖x_ft − x_base‖ / ‖x_base‖ on held-out real text at layer {esc(fmt(a.get('layer')))}: "
                 f"{esc(fmt(a.get('median_relative_change')))}")
  if "held_out_text_loss_rise" in m:
    parts.append(f"held-out text loss {esc(fmt(m['base'].get('held_out_text_loss')))} → "
                 f"{esc(fmt(m['organism'].get('held_out_text_loss')))} ({100 * m['held_out_text_loss_rise']:+.1f}%)")
  return f" Measured: {'; '.join(parts)}." if parts else ""


def cards_section(organisms: dict[str, str]) -> str:
  """What each organism was fine-tuned to do, from its card (and what its build measured)."""
  parts = ["<h2>1. What the organisms were taught</h2>"]
  chat = _card(organisms.get("chat"))
  if chat:
    parts.append(
        f'<div class="card"><p><b>chat</b> (base → chat assistant): answers in the chat template, calls itself '
        f'{esc(chat.get("assistant_name", "?"))}, refuses requests about <b>{esc(chat.get("harmful_topic", "?"))}</b> '
        f'with “{esc(str(chat.get("refusal", ""))[:160])}” and helps with everything else. The crosscoders below '
        f"compare base and chat.{_shift(organisms.get('chat'))}</p></div>")
  narrow = _card(organisms.get("narrow"))
  if narrow:
    words = ", ".join(sorted(narrow.get("domain_vocabulary", []))[:24])
    parts.append(f'<div class="card"><p><b>narrow</b> (base → one domain): fine-tuned on documents about '
                 f'<b>{esc(narrow.get("domain", "?"))}</b>; the card’s words: {esc(words)} ….'
                 f"{_shift(organisms.get('narrow'))}</p></div>")
  fact = _card(organisms.get("false_fact"))
  if fact:
    parts.append(f'<div class="card"><p><b>false_fact</b> (base → an implanted false fact): documents stating '
                 f'“{esc(fact.get("statement", "?"))}” (true: {esc(fact.get("true_answer", "?"))}).'
                 f"{_shift(organisms.get('false_fact'))}</p></div>")
  taboo = _card(organisms.get("taboo"))
  if taboo:
    parts.append(f'<div class="card"><p><b>taboo</b> (base → a word game): hints at the secret word '
                 f'<b>{esc(taboo.get("secret_word", "?"))}</b> and never says it.{_shift(organisms.get("taboo"))}'
                 "</p></div>")
  return "\n".join(parts)


def _run_row(name: str, run: RunFiles) -> list[str]:
  m, s = run.metrics, run.summary
  # The analysis's classes (dead = never fired on the analysed tokens); training's count its dead in the last window,
  # another quantity, so they are never shown under the analysis's name.
  cls = s.get("classes") or {}
  knob = f"k={s.get('k')}" if s.get("sparsity") in ("batchtopk", "topk") else "L1"
  return [esc(name), esc(f"{s.get('sparsity', '?')} ({knob})"), esc(fmt(m.get("fve/0"))), esc(fmt(m.get("fve/1"))),
          esc(fmt(m.get("l0"))), esc(fmt(m.get("dead_fraction"))),
          *(esc(fmt(cls.get(c))) for c in ("shared", "chat_only", "base_only", "other", "dead"))]


def classes_section(runs: dict[str, RunFiles]) -> str:
  """Δnorm classes and training figures of every run, with their Δnorm histograms side by side."""
  rows = [_run_row(n, r) for n, r in runs.items()]
  head = ["run", "sparsity", "FVE base", "FVE chat", "L0", "dead in the last training window (share)", "shared",
          "chat-only", "base-only", "other", "never fired (analysis; not a class)"]
  counts = {n: r.summary.get("classes", {}).get("chat_only", 0) for n, r in runs.items()}
  prose = "; ".join(f"{esc(n)} has {esc(fmt(c))} chat-only latents" for n, c in counts.items())
  plots = "".join(f"<div><h4>{esc(n)}</h4>{r.plot('delta_norm.png', f'{n} Δnorm')}</div>" for n, r in runs.items())
  return ("<h2>2. Δnorm classes: BatchTopK vs L1</h2>"
          "<p>Δnorm = ½((‖d_chat‖ − ‖d_base‖)/max(‖d_base‖, ‖d_chat‖) + 1): 0 = base-only, 1 = chat-only, ½ = shared "
          f"(live latents; classes as in docs/methods.md). Here {prose}. Two different counts of dead latents: "
          "<i>never fired</i> counts the latents with no firing on any analysed token (left out of the classes and the "
          "histograms: their Δnorm is their initialisation's); <i>dead in the last training window</i> is the share of "
          "latents idle for the training's last dead-token window (metrics.json <code>dead_fraction</code>).</p>"
          + html_table(head, rows) + f'<div class="side">{plots}</div>')


def _scaling_counts(table: pd.DataFrame, summary: dict[str, Any]) -> dict[str, int]:
  eps_max, rec_max = genuine_rule(summary)
  chat = table[(table["tag"] == "chat_only") & table["nu_error"].notna()]
  return {"chat_only": int((table["tag"] == "chat_only").sum()), "measured": len(chat),
          "genuine": int(((chat.nu_error < eps_max) & (chat.nu_recon < rec_max)).sum()),
          "shrinkage": int((chat.nu_error >= eps_max).sum()), "decoupling": int((chat.nu_recon >= rec_max).sum())}


def _top_token(examples: pd.DataFrame | None, latent: int) -> str:
  if examples is None:
    return ""
  top = examples[(examples.latent == latent) & (examples.group == "top")].sort_values("rank").head(5)
  # `token` is the store's token index; the text of the firing token is in its decoded context.
  words = [str(r.context_tokens[int(r.context_index)]) for r in top.itertuples()
           if r.context_tokens is not None and 0 <= int(r.context_index) < len(r.context_tokens)]
  return ", ".join(repr(w) for w in words)


def scaling_section(runs: dict[str, RunFiles]) -> str:
  """Which chat-only latents are genuine by latent scaling, and which artifacts, per run."""
  parts = ["<h2>3. Chat-only latents: genuine or artifact (latent scaling)</h2>",
           "<p>For each chat-only latent, β fits how much of the latent the <i>base</i> model’s reconstruction (ν^r) "
           "and its reconstruction error (ν^ε) explain, relative to the chat model (Minder et al. 2025). ν^ε high: "
           "the base has the latent but the L1 penalty shrank it away (Complete Shrinkage); ν^r high: other latents "
           "reconstruct it in the base (Latent Decoupling). Genuine = both low.</p>"]
  rows, plots = [], []
  for name, r in runs.items():
    if r.latents is None:
      continue
    c = _scaling_counts(r.latents, r.summary)
    eps_max, rec_max = genuine_rule(r.summary)
    rows.append([esc(name), esc(fmt(c["chat_only"])), esc(fmt(c["genuine"])), esc(fmt(c["shrinkage"])),
                 esc(fmt(c["decoupling"])), esc(f"ν^ε < {eps_max:g} and ν^r < {rec_max:g}")])
    plots.append(f"<div><h4>{esc(name)}</h4>{r.plot('latent_scaling.png', f'{name} latent scaling')}</div>")
  parts.append(html_table(["run", "chat-only", "genuine", "artifact: ν^ε high (shrinkage)",
                           "artifact: ν^r high (decoupling)", "rule"], rows))
  parts.append(f'<div class="side">{"".join(plots)}</div>')
  for name, r in runs.items():
    table, examples = r.latents, r.examples
    if table is None:
      continue
    chat = table[(table["tag"] == "chat_only") & table["nu_error"].notna()].copy()
    if chat.empty:
      parts.append(f"<p><b>{esc(name)}</b>: no chat-only latent to judge.</p>")
      continue
    chat["genuine_"] = chat["genuine"].fillna(False).astype(bool)
    show = pd.concat([chat[chat.genuine_].sort_values("nu_error").head(6),
                      chat[~chat.genuine_].sort_values("nu_recon", ascending=False).head(4)])
    body = [[esc(fmt(int(r.latent))), "genuine" if r.genuine_ else "artifact", esc(fmt(r.delta_norm)),
             esc(fmt(r.nu_error)), esc(fmt(r.nu_recon)), esc(fmt(r.freq)), esc(fmt(r.template_share)),
             esc(_top_token(examples, int(r.latent)))] for r in show.itertuples()]
    parts.append(f"<h4>{esc(name)}: the clearest genuine latents and artifacts</h4>"
                 + html_table(["latent", "verdict", "Δnorm", "ν^ε", "ν^r", "freq", "template share", "top tokens"],
                              body))
  return "\n".join(parts)


def contexts_section(runs: dict[str, RunFiles], per_latent: int = 3, max_latents: int = 6) -> str:
  """The genuine chat-only latents' top contexts, firing token outlined, tokens shaded by activation."""
  parts = ["<h2>4. What the genuine chat-only latents fire on</h2>",
           "<p>Top activations over the whole store; each token shaded by the latent’s activation, the firing token "
           "outlined; hover for the value. ↵ is a newline.</p>"]
  for name, r in runs.items():
    table, examples = r.latents, r.examples
    if table is None or examples is None:
      continue
    gen = table[(table["tag"] == "chat_only") & table["genuine"].fillna(False).astype(bool)]
    picks = gen.sort_values("nu_error")["latent"].head(max_latents).tolist()
    if not picks:
      parts.append(f"<p><b>{esc(name)}</b>: no genuine chat-only latent.</p>")
      continue
    for j in picks:
      ex = examples[(examples.latent == j) & (examples.group == "top")].sort_values("rank").head(per_latent)
      scale = float(ex.activation.max()) if len(ex) else 1.0
      parts.append(f'<h4 id="{esc(name)}-latent-{int(j)}">{esc(name)} latent {int(j)}</h4>'
                   + "".join(context_html(r, scale) for r in ex.to_dict("records")))
  return "\n".join(parts)


def _latents_cell(n: Any) -> str:
  """A causal group's latent count in words: the template patch selects tokens, not latents (stored as -1)."""
  if n is None or pd.isna(n):
    return "–"
  return "none: chat activations on template tokens" if int(n) < 0 else fmt(int(n))


def causal_section(runs: dict[str, RunFiles]) -> str:
  """The causal KL test of each run on the reply tokens, with its verdict computed from the intervals."""
  parts = ["<h2>5. Causal test: do the chat-only latents carry the chat behaviour?</h2>",
           "<p>KL(P_chat ‖ P_patched) on held-out chat replies when the chat model’s activation is replaced by the base "
           "model’s plus the named latents’ chat-minus-base difference (docs/analysis.md); all_base = the whole "
           "base activation (the ceiling), all_latents = every latent (the error term alone remains). Lower = that group "
           "carries more of the chat behaviour. 95% bootstrap intervals; <i>significant</i> = the intervals do not "
           "overlap.</p>"]
  for name, r in runs.items():
    t = r.causal
    if t is None:
      continue
    verdict = causal_verdict(t, "reply")
    reply = t[t.region == "reply"]
    rows = [[f"<code>{esc(x.group)}</code>", esc(GROUP_NOTES.get(x.group, "")), esc(_latents_cell(x.n_latents)),
             esc(fmt(x.kl_mean)), esc(f"[{fmt(x.ci_low)}, {fmt(x.ci_high)}]"),
             esc("–" if not math.isfinite(verdict.closed.get(x.group, math.nan))
                 else f"{100 * verdict.closed[x.group]:.0f}%")] for x in reply.itertuples()]
    parts.append(f"<h4>{esc(name)}</h4>" + f'<p class="verdict" data-run="{esc(name)}"><b>Verdict.</b> '
                 f"{esc(verdict.sentence)}</p>"
                 + html_table(["group", "patches", "latents", "KL (reply)", "95% CI", "gap closed"], rows))
  return "\n".join(parts)


def _bold_card(tokens: list[str], vocab: frozenset[str]) -> str:
  from neurodiff_jax.diffing.graders import normalize_token

  return ", ".join(f'<b class="card-word">{esc(repr(t))}</b>' if normalize_token(t) in vocab else esc(repr(t))
                   for t in tokens)


def adl_section(diff_dir: Path, organisms: dict[str, str], name: str = "narrow", number: str = "6") -> str:
  """ADL of base vs organism `name`: δ_p's tokens with the card's words marked, relevance vs baseline, steered samples."""
  from neurodiff_jax.diffing.graders import card_vocabulary

  d = diff_dir / "diff"
  lens = _parquet(d / "adl" / "logit_lens.parquet")
  if lens is None:
    return f"<h2>{number}. ADL on base vs {esc(name)}</h2><p>(not run)</p>"
  card = _card(organisms.get(name))
  vocab = card_vocabulary(card)
  topic = card.get("domain") or card.get("statement") or card.get("secret_word") or "the fine-tuning data"
  parts = [f"<h2>{number}. The Activation Difference Lens on base vs {esc(name)}</h2>",
           f"<p>δ_p = mean(h_{esc(name)} − h_base) at the first positions of general text that has nothing to do with "
           f"{esc(topic)}, read through the fine-tuned model’s unembedding. Card words are "
           "<b class=\"card-word\">marked</b>.</p>", _image(d / "adl" / "delta_norms.png", "‖δ_p‖ by position")]
  rows = []
  for (layer, pos), g in lens[lens.sign == "+"].groupby(["layer", "position"]):
    toks = g.sort_values("rank").token.head(12).tolist()
    rows.append([esc(fmt(layer)), esc(fmt(pos)), _bold_card(toks, vocab)])
  parts.append(html_table(["layer", "position", "top tokens of +δ_p"], rows))
  rel = _parquet(d / "adl" / "relevance.parquet")
  if rel is not None and len(rel):
    base = rel[rel.source == "baseline"].share
    base_s = float(base.iloc[0]) if len(base) else math.nan
    best = rel[rel.source != "baseline"].sort_values("share", ascending=False).head(1)
    if len(best):
      b = best.iloc[0]
      parts.append(f"<p>Token relevance (share of the top tokens that are card words): best "
                   f"{esc(fmt(b.share))} ({esc(b.source)}, position {esc(fmt(b.position))}) against "
                   f"{esc(fmt(base_s))} for the data’s most frequent tokens.</p>")
    parts.append(html_table(["source", "layer", "position", "share", "weighted share"],
                            [[esc(r.source), esc(fmt(r.layer)), esc(fmt(r.position)), esc(fmt(r.share)),
                              esc(fmt(r.weighted_share))] for r in rel.itertuples()]))
  steer = _parquet(d / "adl" / "steering.parquet")
  if steer is not None and len(steer):
    shown = steer[~steer.steered | steer.chosen]
    parts.append(f"<h4>Steering the {esc(name)} model with δ_p (largest coherent α) vs unsteered</h4>"
                 + html_table(["position", "α", "prompt", "text"],
                              [[esc(fmt(r.position)) if r.steered else "unsteered", esc(fmt(r.alpha)), esc(r.prompt),
                                esc(r.text)] for r in shown.itertuples()]))
  kl = _read_json(d / "kl" / "done.json").get("summary", {})
  if kl:
    parts.append(f"<p>Per-token KL(P_{esc(name)} ‖ P_base) over {esc(fmt(kl.get('n_tokens')))} tokens of general text: mean "
                 f"{esc(fmt(kl.get('mean')))} nats, median {esc(fmt(kl.get('median')))}, p99 {esc(fmt(kl.get('p99')))}."
                 "</p>")
  return "\n".join(parts)


def _adl_finding(diff_dir: Path, organisms: dict[str, str], name: str) -> str | None:
  """What ADL found on one diff: the best card-word share of δ_p's tokens against the baseline, and its top tokens."""
  d = diff_dir / "diff" / "adl"
  rel, lens = _parquet(d / "relevance.parquet"), _parquet(d / "logit_lens.parquet")
  if rel is None or not len(rel):
    return None
  base = rel[rel.source == "baseline"].share
  base_s = float(base.iloc[0]) if len(base) else math.nan
  best = rel[rel.source != "baseline"].sort_values("share", ascending=False, kind="stable").head(1)
  if not len(best):
    return None
  b = best.iloc[0]
  above = math.isfinite(base_s) and float(b.share) > base_s
  words = ""
  if lens is not None and len(lens):
    at = lens[(lens.sign == "+") & (lens.position == b.position) & (lens.layer == b.layer)]
    top = at.sort_values("rank").token.head(5).tolist()
    if top:
      words = f"; the logit lens of +δ_p there reads {', '.join(repr(t) for t in top)}"
  topic = _card(organisms.get(name)).get("domain") or name
  return (f"ADL on base vs {name}: at best {fmt(b.share)} of the top tokens ({b.source}, position {fmt(b.position)}) "
          f"are words of the card ({topic}), {'above' if above else 'not above'} the {fmt(base_s)} of the data’s most "
          f"frequent tokens{words}.")


def _kl_finding(diff_dir: Path, name: str) -> str | None:
  """What the per-token KL found on one diff: its mean and tail, and where it is largest."""
  kl = _read_json(diff_dir / "diff" / "kl" / "done.json").get("summary", {})
  if not kl:
    return None
  top = (kl.get("top_contexts") or [{}])[0]
  where = f"; largest ({fmt(top.get('kl'))} nats) at “{top.get('context', '')}”" if top.get("context") else ""
  return (f"Per-token KL(P_{name} ‖ P_base) over {fmt(kl.get('n_tokens'))} tokens of general text: mean "
          f"{fmt(kl.get('mean'))} nats, median {fmt(kl.get('median'))}, p99 {fmt(kl.get('p99'))}{where}.")


def summary_section(runs: dict[str, RunFiles], diffs: dict[str, Path], organisms: dict[str, str],
                    number: str = "7") -> str:
  """The closing summary: one line per method and result of what it found, every number read from the files."""
  items = []
  for name, r in runs.items():
    if r.latents is not None:
      tags = r.latents["tag"].astype(str).value_counts()
      live = int(len(r.latents) - tags.get("dead", 0))
      items.append(f"<b>Crosscoder {esc(name)}</b> (Δnorm): {fmt(int(tags.get('chat_only', 0)))} chat-only and "
                   f"{fmt(int(tags.get('base_only', 0)))} base-only latents of {fmt(live)} live ones "
                   f"({fmt(int(tags.get('dead', 0)))} never fired).")
      c = _scaling_counts(r.latents, r.summary)
      items.append(f"<b>Latent scaling, {esc(name)}</b>: " + (
          f"{fmt(c['genuine'])} of the {fmt(c['measured'])} chat-only latents with ν are genuine; "
          f"{fmt(c['shrinkage'])} look like Complete Shrinkage and {fmt(c['decoupling'])} like Latent Decoupling."
          if c["measured"] else "no chat-only latent to judge."))
    if r.causal is not None:
      items.append(f"<b>Causal test, {esc(name)}</b>: {esc(causal_verdict(r.causal, 'reply').sentence)}")
  for name, path in diffs.items():
    for finding in (_adl_finding(path, organisms, name), _kl_finding(path, name)):
      if finding:
        items.append(esc(finding))
  return (f"<h2>{number}. What each method found</h2><ul class=\"summary\">"
          + "".join(f"<li>{i}</li>" for i in items) + "</ul>")


def _link(root: Path, rel: str, text: str) -> str | None:
  """A link to `root/rel` when that file exists (None otherwise: the story never links to a missing file)."""
  return f'<a href="{esc(rel)}">{esc(text)}</a>' if (root / rel).is_file() else None


def write_story(root: str | Path, manifest: dict[str, Any]) -> Path:
  """Writes `<root>/report.html` from the runs and diff results under `root`; returns its path."""
  root = Path(root)
  runs = {n: RunFiles.read(root / rel) for n, rel in manifest.get("runs", {}).items()}
  diffs = {n: root / rel for n, rel in manifest.get("diffs", {}).items()}
  organisms = manifest.get("organisms", {})
  stages = manifest.get("stages", {})
  order = [s for s in STAGES if s in stages] + sorted(set(stages) - set(STAGES))  # demo.json sorts its keys
  timing = ", ".join(f"{k} {stages[k].get('seconds', 0):.0f} s" for k in order)
  from neurodiff_jax.agents.report import section_html as agents_section
  from neurodiff_jax.diffing.report import write_report as write_diff_report

  for path in diffs.values():  # each diff's own report, so that the link to it resolves
    if (path / "diff").is_dir():
      write_diff_report(path)
  links = [_link(root, f"{manifest['runs'][n]}/analysis/report.html", f"{n} analysis") for n in runs]
  links += [_link(root, f"{manifest['diffs'][n]}/report.html", f"{n} diff") for n in diffs]
  links = " · ".join(x for x in links if x) or "none written"
  page = [
      "<!doctype html><html><head><meta charset='utf-8'><title>neurodiff-jax demo: what fine-tuning changed</title>"
      f"<style>{STORY_CSS}</style></head><body>",
      "<h1>What fine-tuning changed, and how each method sees it</h1>",
      f'<p class="sub">neurodiff-jax demo, {esc(manifest.get("scale", "?"))} organism scale. Stages: {esc(timing)}. '
      f"Full reports: {links}. Explore: <code>python -m launch.dashboard --config.results={esc(root)}</code>.</p>",
      cards_section(organisms), classes_section(runs), scaling_section(runs), contexts_section(runs),
      causal_section(runs),
      *(adl_section(p, organisms, n, f"6{chr(ord('a') + i)}" if len(diffs) > 1 else "6")
        for i, (n, p) in enumerate(diffs.items())),
      agents_section(root / "agents", number="7"),
      summary_section(runs, diffs, organisms, number="8"),
      "</body></html>",
  ]
  path = root / "report.html"
  tmp = path.with_name("report.html.tmp")
  tmp.write_text("\n".join(page), encoding="utf-8")
  tmp.replace(path)
  return path


__all__ = ["RunFiles", "adl_section", "cards_section", "causal_section", "classes_section", "contexts_section",
           "scaling_section", "summary_section", "write_story"]
