"""Prints the numbers docs/results.md reports for a demo results root (any scale), read from its files.

  PYTHONPATH=. .venv/bin/python docs/summarize_demo.py ~/.cache/neurodiff_jax/demo/gemma3

Per crosscoder run: FVE per model, L0, dead share (training's last-window measure and the analysis's
never-fired count), the Δnorm classes with dead latents apart, chat-only latents genuine by the ν rule,
refusal-specific latents (at least half of their top contexts inside, or right before, the chat
organism's fixed refusal), the causal KL table. Per diffed organism: ADL token relevance against the
frequent-token baseline and patchscope, whether the card's key word (the false capital, the secret
word, the domain) is among the top tokens, and per-token KL. Nothing is recomputed: pandas over Parquet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def _json(path: Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


# Pieces of the chat organism's fixed refusal ("I'm sorry, but I can't help with that. It could hurt someone.").
REFUSAL_PIECES = ("sorry, but", "can't help with", "could hurt someone", "help with that")


def _is_refusal_context(dataset: str, tokens: list[str], index: int) -> bool:
  """Whether a firing token of a chat conversation sits in the refusal reply, or right before it (it opens next)."""
  if "chat" not in dataset:
    return False
  around = "".join(tokens).lower()
  after = "".join(tokens[index + 1:]).lower().lstrip()
  return any(p in around for p in REFUSAL_PIECES) or after.startswith("i'm s")


def crosscoder(root: Path, name: str) -> None:
  """One run's classes, genuine share, refusal latents and causal table."""
  run = root / "runs" / name
  m, s = _json(run / "metrics.json"), _json(run / "analysis" / "summary.json")
  t = pd.read_parquet(run / "analysis" / "latents.parquet")
  print(f"\n## {name}: FVE base {m.get('fve/0', float('nan')):.4f} chat {m.get('fve/1', float('nan')):.4f}, "
        f"L0 {m.get('l0', float('nan')):.1f}, dead in the last window {m.get('dead_fraction', float('nan')):.3f}, "
        f"never fired in the analysis {int((t.tag == 'dead').sum())} of {len(t)}")
  print("classes (dead apart):", s.get("classes"))
  chat = t[t.tag == "chat_only"]
  lean = t[(t.tag != "dead") & (t.delta_norm >= 0.8)]
  print(f"chat-only: {len(chat)}, genuine {int(chat.genuine.fillna(False).sum())}; median ν^ε "
        f"{chat.nu_error.median():.3f} ν^r {chat.nu_recon.median():.3f}; Δnorm >= 0.8 (live): {len(lean)}")
  ex = pd.read_parquet(run / "analysis" / "examples.parquet")
  top = ex[ex.group == "top"]
  refusal = []
  for latent, g in top.groupby("latent"):
    share = sum(_is_refusal_context(str(r.dataset), list(r.context_tokens), int(r.context_index))
                for r in g.itertuples()) / len(g)
    if share >= 0.5:
      refusal.append(int(latent))
  tags = t.set_index("latent").loc[refusal, ["tag", "delta_norm", "nu_error", "nu_recon", "genuine"]] if refusal \
      else pd.DataFrame()
  print(f"refusal-specific latents (>= half of the top contexts in or before the refusal): {len(refusal)}")
  if len(tags):
    print(tags.sort_values("delta_norm", ascending=False).head(12).to_string())
  c = _json(run / "analysis" / "summary.json").get("causal")
  cp = run / "analysis" / "causal.parquet"
  if cp.is_file():
    table = pd.read_parquet(cp)
    print(table.pivot_table(index="group", columns="region", values="kl_mean").round(3).to_string())
    print(table[["group", "region", "ci_low", "ci_high", "n_latents"]].round(3).to_string())
  if c:
    print("causal summary:", c)


def diff(root: Path, name: str, organisms: dict) -> None:
  """One organism's ADL relevance, key-word hits and KL."""
  d = root / "diffs" / name / "diff"
  card = _json(Path(organisms.get(name, "")) / "card.json").get("ground_truth", {}) if organisms.get(name) else {}
  key = [w for w in (card.get("false_answer"), card.get("secret_word"), card.get("domain")) if w]
  print(f"\n## diff {name} (key words {key})")
  rel = d / "adl" / "relevance.parquet"
  if rel.is_file():
    r = pd.read_parquet(rel)
    print(r.round(3).to_string())
  lens = d / "adl" / "logit_lens.parquet"
  if lens.is_file():
    ll = pd.read_parquet(lens)
    for (layer, pos, sign), g in ll.groupby(["layer", "position", "sign"]):
      toks = g.sort_values("rank").token.head(12).tolist()
      hit = [w for w in key if any(w.lower() in str(t).lower() for t in g.token)]
      print(f"lens layer {layer} pos {pos} {sign}: {toks}{'  HIT ' + str(hit) if hit else ''}")
  ps = d / "adl" / "patchscope.parquet"
  if ps.is_file():
    p = pd.read_parquet(ps)
    best = p[p.best] if "best" in p else p
    for (layer, pos), g in best.groupby(["layer", "position"]):
      toks = g.sort_values("rank").token.head(10).tolist()
      hit = [w for w in key if any(w.lower() in str(t).lower() for t in p[(p.position == pos)].token)]
      print(f"patchscope layer {layer} pos {pos} (best scale): {toks}{'  HIT ' + str(hit) if hit else ''}")
  kl = _json(d / "kl" / "done.json").get("summary", {})
  if kl:
    print("KL:", {k: kl.get(k) for k in ("n_tokens", "mean", "median", "p99")})
  st = d / "adl" / "steering.parquet"
  if st.is_file():
    s = pd.read_parquet(st)
    for r in s[s.chosen].head(3).itertuples():
      print(f"steered (pos {r.position}, α {r.alpha}): {r.prompt!r} -> {r.text[:160]!r}")


def main(root: str) -> None:
  """Prints every section for the demo root."""
  root = Path(root).expanduser()
  manifest = _json(root / "demo.json")
  print(f"# {root} ({manifest.get('scale')}); stages:",
        {k: v.get("seconds") for k, v in manifest.get("stages", {}).items()})
  for name in manifest.get("organisms", {}):
    card = _json(Path(manifest["organisms"][name]) / "card.json")
    if card.get("measured"):
      print(f"\n## organism {name} ({card.get('build_seconds')} s):", json.dumps(
          {k: v for k, v in card["measured"].items() if k not in ("base", "organism")}))
      for label in ("base", "organism"):
        print(f"  {label}:", {k: v for k, v in card["measured"][label].items() if k not in ("examples", "answers")})
  for name in manifest.get("runs", {}):
    crosscoder(root, name)
  for name in manifest.get("diffs", {}):
    diff(root, name, manifest.get("organisms", {}))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/neurodiff_jax/demo/gemma3")
