"""The analysis report: PNG plots and one self-contained HTML page that reads as a short paper.

Reads only the results files of `analyze.py` in one directory (nothing is recomputed, no model is
loaded), so a report can be rebuilt, copied or mailed on its own:

  latents.parquet    the latent table (required)
  summary.json       run, store, dictionary and headline numbers (missing keys are left out)
  examples.parquet   decoded max-activating and per-quantile contexts (optional)
  causal.parquet     the causal KL table, and causal.png made by `causal.causal_plot` (optional)
  steering.parquet   steered completions (optional)
  logit_lens.parquet tokens a latent's decoder direction promotes and suppresses (optional; columns
                     `latent`, `direction` "promoted" | "suppressed", `rank`, `token`, `logit`)

For M > 2 models (a table whose pairwise columns carry `_m{k}`), the report reads base against
model 1 (`pair_view`).

`make_plots` writes delta_norm.png, latent_scaling.png and template_share.png beside them;
`write_report` writes report.html with every PNG inlined as a base64 data URI, inline CSS, no
script and no external link. Sections: setup, 1 Δnorm classes, 2 latent scaling (the verdict of
the genuine rule), 3 causal test, 4 template tokens, 5 example latents, 6 methods notes.

A latent card follows the SAE-dashboard order: top contexts (firing token outlined, every token
shaded by the latent's activation on it), a few contexts per activation quantile, the logit lens
when available, its statistics, then its steering samples. It has no activation histogram (the
dashboard's latent page draws `latent_histograms.npz`, every analysed activation in fixed bins);
the per-quantile rows, labelled with their activation ranges, show the spread here.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurodiff_jax.analysis.verdicts import GROUP_NOTES, causal_verdict
from neurodiff_jax.utils.plots import figure, png_html, save_png

THRESHOLDS = (0.1, 0.4, 0.6, 0.9)  # Δnorm class boundaries (docs/methods.md §3)
CLASSES = ("chat_only", "shared", "base_only", "other")  # live classes, in the order the report lists them
# "never fired" (tag `dead`: no firing on the analysed tokens) is never called a dead fraction: that name belongs to
# training's metrics.json `dead_fraction` (idle in the last training window), a different count.
CLASS_LABELS = {"chat_only": "chat-only", "base_only": "base-only", "shared": "shared", "other": "other",
                "dead": "never fired"}
CLASS_RANGES = {"chat_only": "Δnorm ≥ 0.9", "base_only": "Δnorm ≤ 0.1", "shared": "0.4 ≤ Δnorm ≤ 0.6",
                "other": "in between", "dead": "no firing on the analysed tokens (not a class)"}
COLORS = {"chat_only": "#d95f02", "base_only": "#1b9e77", "shared": "#7f7f7f", "other": "#7570b3"}
DEFAULT_RULE = (0.2, 0.5)  # (ν^ε, ν^r) thresholds when summary.json does not state the rule
PLOTS = ("delta_norm", "latent_scaling", "template_share")
REGION_NOTES = {"reply": "assistant reply", "first": "first 10 reply tokens", "rest": "rest of the reply"}


class ReportError(ValueError):
  """Results that cannot make a report (the message names the fix)."""


# ---------------------------------------------------------------- reading the results


def read_summary(results_dir: str | Path) -> dict[str, Any]:
  """summary.json as a dict ({} when absent)."""
  path = Path(results_dir) / "summary.json"
  return json.loads(path.read_text()) if path.is_file() else {}


def read_table(results_dir: str | Path) -> pd.DataFrame:
  """latents.parquet, with a clear error when it is missing."""
  path = Path(results_dir) / "latents.parquet"
  if not path.is_file():
    raise ReportError(f"no latent table at {path}: run the analysis first (python -m launch.analyze --config=analyze "
                      "--config.workdir=RUN), or point the report at its results directory.")
  table = pd.read_parquet(path)
  if "tag" not in table and "tag_m1" in table:
    table = pair_view(table, 1)
  if "tag" not in table or "latent" not in table:
    raise ReportError(f"{path} has no 'latent'/'tag' columns, so it is not a latent table; rerun the analysis's table "
                      "part (--config.force_parts=table).")
  return table


def pair_view(table: pd.DataFrame, k: int) -> pd.DataFrame:
  """A table of M > 2 models seen as base (model 0) against model k: its `_m{k}` columns under the M = 2 names."""
  names = {f"dec_norm_m{k}": "dec_norm_chat", f"enc_norm_m{k}": "enc_norm_chat"}
  names |= {c: c[: -len(f"_m{k}")] for c in table.columns if c.endswith(f"_m{k}") and c not in names}
  return table.rename(columns=names)


def _optional(results_dir: Path, name: str) -> pd.DataFrame | None:
  path = results_dir / name
  return pd.read_parquet(path) if path.is_file() else None


def genuine_rule(summary: dict[str, Any]) -> tuple[float, float]:
  """(ν^ε, ν^r) thresholds of the genuine rule, read from summary["genuine"]["rule"], else the defaults."""
  rule = str((summary.get("genuine") or {}).get("rule", ""))
  out = list(DEFAULT_RULE)
  for k, name in enumerate(("nu_error", "nu_recon")):
    hit = re.search(rf"{name}\s*<\s*([-+0-9.eE]+)", rule)
    if hit:
      try:
        out[k] = float(hit.group(1))
      except ValueError:
        pass  # an unreadable rule keeps the default; the report prints the rule text as given
  return out[0], out[1]


def genuine_values(column: pd.Series) -> np.ndarray:
  """The `genuine` column as float: 1 genuine, 0 not, NaN unknown (nullable bool, object None or float NaN)."""
  def one(v: Any) -> float:
    if v is None or pd.isna(v):
      return math.nan
    return 1.0 if bool(v) else 0.0
  return np.asarray([one(v) for v in column.astype(object)], np.float64)


def _col(table: pd.DataFrame, name: str) -> np.ndarray:
  """A float column, NaN when the table lacks it."""
  if name not in table:
    return np.full(len(table), np.nan)
  return pd.to_numeric(table[name], errors="coerce").to_numpy(np.float64)


def _live(table: pd.DataFrame) -> pd.DataFrame:
  return table[table["tag"] != "dead"]


# ---------------------------------------------------------------- plots


def plot_delta_norm(table: pd.DataFrame, path: str | Path) -> Path:
  """Histogram of the live latents' Δnorm (log counts), class regions shaded and boundaries marked."""
  live = _live(table)
  dn = _col(live, "delta_norm")
  dn = dn[np.isfinite(dn)]
  fig = figure()
  ax = fig.subplots()
  for lo, hi, tag in ((0.0, 0.1, "base_only"), (0.4, 0.6, "shared"), (0.9, 1.0, "chat_only")):
    n = int((live["tag"] == tag).sum())
    ax.axvspan(lo, hi, color=COLORS[tag], alpha=0.12, lw=0, label=f"{CLASS_LABELS[tag]} ({n})")
  if len(dn):
    counts, _, _ = ax.hist(dn, bins=np.linspace(0, 1, 51), color="#444444")
    if counts.max() > 50:  # at scale shared latents outnumber the tails by orders of magnitude
      ax.set_yscale("log")
      ax.set_ylabel("latents (log scale)")
  else:
    ax.text(0.5, 0.5, "no live latent", ha="center", va="center", transform=ax.transAxes)
  for t in THRESHOLDS:
    ax.axvline(t, color="black", ls="--", lw=0.8)
  ax.set_xlim(0, 1)
  ax.set_xlabel("Δnorm (0 base-only, 0.5 shared, 1 chat-only)")
  if not ax.get_ylabel():
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("latents")
  ax.set_title(f"Δnorm of the {len(dn)} live latents")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
  return save_png(fig, path)


def _scale(ax: Any, axis: str, values: np.ndarray, thr: float) -> None:
  """Log axis when every value is positive, else symlog; limits that include the rule's threshold."""
  vals = np.concatenate([values, [thr]])
  setter = getattr(ax, f"set_{axis}scale")
  limits = getattr(ax, f"set_{axis}lim")
  if (vals > 0).all():
    setter("log")
    limits(vals.min() / 2, vals.max() * 2)
  else:
    small = np.abs(vals[vals != 0])
    # linear around 0 only as far as the smallest ratio shown, so small positive ratios keep their decades
    linthresh = 10.0 ** np.floor(np.log10(small.min())) if len(small) else 1.0
    setter("symlog", linthresh=float(min(linthresh, 0.1)))
    span = vals.max() - min(vals.min(), 0.0)
    limits(min(vals.min(), 0.0) - 0.1 * span, vals.max() + 0.1 * span)


def plot_latent_scaling(table: pd.DataFrame, path: str | Path, rule: tuple[float, float] = DEFAULT_RULE) -> Path:
  """ν^ε against ν^r of the live chat-only latents coloured by the genuine rule, shared latents in grey."""
  from matplotlib.patches import Rectangle

  e_max, r_max = rule
  live = _live(table)
  ne, nr = _col(live, "nu_error"), _col(live, "nu_recon")
  ok = np.isfinite(ne) & np.isfinite(nr)
  chat = ok & (live["tag"] == "chat_only").to_numpy()
  shared = ok & (live["tag"] == "shared").to_numpy()
  genuine = genuine_values(live["genuine"]) if "genuine" in live else np.full(len(live), np.nan)
  fig = figure((6.0, 4.8))
  ax = fig.subplots()
  if shared.any():
    ax.scatter(ne[shared], nr[shared], s=6, color="#bbbbbb", alpha=0.5, lw=0, label=f"shared ({int(shared.sum())})")
  for mask, color, label in ((chat & (genuine == 1), "#1a9641", "chat-only, genuine"),
                             (chat & (genuine == 0), "#d7191c", "chat-only, artifact"),
                             (chat & np.isnan(genuine), "#fdae61", "chat-only, unjudged")):
    if mask.any():
      ax.scatter(ne[mask], nr[mask], s=18, color=color, edgecolor="black", lw=0.3, label=f"{label} ({int(mask.sum())})")
  shown = chat | shared
  if shown.any():
    _scale(ax, "x", ne[shown], e_max)
    _scale(ax, "y", nr[shown], r_max)
  else:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.text(0.5, 0.6, "no live chat-only latent with finite ν", ha="center", va="center", transform=ax.transAxes)
  (x0, _), (y0, _) = ax.get_xlim(), ax.get_ylim()
  ax.add_patch(Rectangle((x0, y0), e_max - x0, r_max - y0, facecolor="#1a9641", alpha=0.08, edgecolor="#1a9641",
                         ls="--", label=f"genuine rule: ν^ε < {e_max:g}, ν^r < {r_max:g}"))
  ax.set_xlabel("ν^ε = β^ε_base / β^ε_chat (Complete Shrinkage when high)")
  ax.set_ylabel("ν^r = β^r_base / β^r_chat (Latent Decoupling when high)")
  ax.set_title(f"Latent scaling of the {int(chat.sum())} chat-only latents with finite ν")
  ax.legend(fontsize=7, loc="best")
  return save_png(fig, path)


def plot_template_share(table: pd.DataFrame, path: str | Path, template_fraction: float | None = None) -> Path:
  """Histogram of the share of each latent's firings on chat-template tokens: chat-only against all live."""
  live = _live(table)
  share = _col(live, "template_share")
  chat = (live["tag"] == "chat_only").to_numpy()
  bins = np.linspace(0, 1, 21)
  fig = figure()
  ax = fig.subplots()
  drawn = False
  for mask, kw, label in ((np.isfinite(share), {"histtype": "step", "color": "#444444", "lw": 1.5}, "all live"),
                          (np.isfinite(share) & chat, {"histtype": "stepfilled", "color": COLORS["chat_only"],
                                                       "alpha": 0.5}, "chat-only")):
    if mask.any():
      v = share[mask]
      ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), label=f"{label} ({len(v)})", **kw)
      drawn = True
  if not drawn:
    ax.text(0.5, 0.5, "no live latent with a template share", ha="center", va="center", transform=ax.transAxes)
  ax.axvline(0.5, color="black", ls="--", lw=0.8)
  if template_fraction is not None and np.isfinite(template_fraction):
    ax.axvline(template_fraction, color="#2b83ba", ls=":", lw=1.2, label=f"template tokens: {template_fraction:.1%}")
  ax.set_xlim(0, 1)
  ax.set_xlabel("share of the latent's firings on chat-template tokens")
  ax.set_ylabel("fraction of latents")
  ax.set_title("Template share")
  if drawn:
    ax.legend(fontsize=8)
  return save_png(fig, path)


def make_plots(results_dir: str | Path) -> dict[str, Path]:
  """Writes delta_norm.png, latent_scaling.png and template_share.png into `results_dir`; returns their paths."""
  out = Path(results_dir)
  table, summary = read_table(out), read_summary(out)
  frac = (summary.get("template") or {}).get("template_token_fraction")
  frac = float(frac) if isinstance(frac, (int, float)) else None
  return {
      "delta_norm": plot_delta_norm(table, out / "delta_norm.png"),
      "latent_scaling": plot_latent_scaling(table, out / "latent_scaling.png", genuine_rule(summary)),
      "template_share": plot_template_share(table, out / "template_share.png", frac),
  }


# ---------------------------------------------------------------- HTML pieces


def esc(value: Any) -> str:
  """Text made safe for HTML (decoded tokens and completions can hold `<`, `&`, quotes)."""
  return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
  """A number with `digits` significant digits ("–" for None/NaN); other values as text."""
  if value is None or value is pd.NA:
    return "–"
  if isinstance(value, (bool, np.bool_)):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return f"{int(value):,}"
  if isinstance(value, (float, np.floating)):
    return "–" if not math.isfinite(float(value)) else f"{float(value):.{digits}g}"
  return str(value)


def pct(num: float, den: float) -> str:
  """num/den as a percentage ("–" when den is 0)."""
  return f"{100 * num / den:.1f}%" if den else "–"


def _share(value: Any) -> str:
  """A fraction as a percentage with 3 significant digits ("–" when unknown)."""
  if value is None or pd.isna(value):
    return "–"
  return f"{100 * float(value):.3g}%"


def _num(key: str, value: Any) -> str:
  """A number the reader (and the tests) can find: `<span data-key=key>`."""
  return f'<span class="num" data-key="{esc(key)}">{esc(fmt(value))}</span>'


def _image(path: Path, alt: str) -> str:
  if not path.is_file():
    return f'<p class="missing">({esc(alt)}: plot not available)</p>'
  return png_html(path, alt)


def html_table(header: Sequence[str], rows: Iterable[Sequence[str]], attrs: Sequence[str] | None = None) -> str:
  """An HTML table; `header` is escaped, cells are HTML already (escape them when building)."""
  head = "".join(f"<th>{esc(h)}</th>" for h in header)
  body = []
  for k, row in enumerate(rows):
    extra = f" {attrs[k]}" if attrs else ""
    body.append(f"<tr{extra}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
  return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


CSS = """
body{font-family:Georgia,'Times New Roman',serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222;
 line-height:1.45}
h1{font-size:1.7rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ccc;margin-top:2.2rem}
.sub{color:#666;margin-top:0}.abstract{background:#f6f6f6;padding:.8rem 1rem;border-left:3px solid #999}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem;font-family:Helvetica,Arial,sans-serif}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}th{background:#f0f0f0}
figure{margin:.8rem 0}img{max-width:100%}.missing{color:#999;font-style:italic}
.card{border:1px solid #ccc;border-radius:6px;padding:.6rem 1rem;margin:1.2rem 0;background:#fcfcfc}
.card h3{margin:.2rem 0}.facts{color:#555;font-size:.9rem;font-family:Helvetica,Arial,sans-serif}
.ctx{font-family:Menlo,Consolas,monospace;font-size:.8rem;margin:.15rem 0;display:flex;gap:.6rem}
.ctx .act{min-width:4rem;text-align:right;color:#333}.ctx .src{min-width:9rem;color:#999}
.toks{white-space:pre-wrap;word-break:break-all}.tok{border-radius:2px}
.fire{outline:2px solid #b30000;font-weight:bold}h4{margin:.7rem 0 .2rem;font-size:.95rem}
.completion{white-space:pre-wrap;font-family:Menlo,Consolas,monospace;font-size:.8rem}
.num{font-weight:bold}
"""


# ---------------------------------------------------------------- sections


def _setup(summary: dict[str, Any], table: pd.DataFrame) -> tuple[str, str]:
  """(title, setup table) from the summary."""
  models = summary.get("models") or []
  names = {m.get("role", f"model {k}"): Path(str(m.get("path", ""))).name or str(m.get("path", ""))
           for k, m in enumerate(models)}
  if len(models) >= 2:
    values = list(names.values())
    title = f"Crosscoder analysis: {names.get('chat', values[-1])} vs {names.get('base', values[0])}"
  else:
    title = f"Crosscoder analysis of {Path(str(summary.get('workdir', 'a training run'))).name}"
  rows = []
  for m in models:
    kind = f" ({m['model_type']})" if m.get("model_type") else ""
    rows.append((esc(f"{m.get('role', 'model')} model"), esc(f"{m.get('path', '?')}{kind}")))
  for key, label in (("workdir", "training run"), ("checkpoint_step", "checkpoint step"), ("store", "activation store"),
                     ("layer", "layer (residual after block)"), ("tokens", "tokens analysed")):
    if key in summary:
      rows.append((esc(label), esc(fmt(summary[key]))))
  dictionary = [f"{fmt(summary['dict_size'])} latents" if "dict_size" in summary else f"{len(table):,} latents"]
  if summary.get("sparsity"):
    dictionary.append(str(summary["sparsity"]))
  if summary.get("k"):
    dictionary.append(f"k = {fmt(summary['k'])}")
  rows.append(("dictionary", esc(", ".join(dictionary))))
  if len(models) > 2:
    rows.append(("models compared", esc(f"{models[0].get('path', 'model 0')} (base) against "
                                        f"{models[1].get('path', 'model 1')} (model 1; columns _m1 of the table)")))
  if summary.get("exclude"):
    rows.append(("token kinds left out", esc(", ".join(map(str, summary["exclude"])))))
  if "seconds" in summary:
    rows.append(("analysis time", esc(f"{fmt(summary['seconds'])} s")))
  return title, html_table(("", ""), rows)


def _classes(table: pd.DataFrame, out: Path) -> tuple[str, str]:
  """(abstract sentence, section 1)."""
  counts = table["tag"].value_counts()
  n_live = int((table["tag"] != "dead").sum())
  rows, attrs = [], []
  for tag in CLASSES + ("dead",):
    n = int(counts.get(tag, 0))
    share = pct(n, n_live) if tag != "dead" else pct(n, len(table)) + " of all"
    rows.append((esc(CLASS_LABELS[tag]), esc(CLASS_RANGES[tag]), f'<span class="count">{n}</span>', esc(share)))
    attrs.append(f'data-class="{tag}"')
  n_chat = int(counts.get("chat_only", 0))
  n_base = int(counts.get("base_only", 0))
  lead = (f"Of {_num('live', n_live)} live latents ({_num('never_fired', int(counts.get('dead', 0)))} more never "
          "fired on the analysed tokens), "
          f"{_num('chat_only', n_chat)} are chat-only and {_num('base_only', n_base)} base-only by Δnorm.")
  body = (f"<h2>1 Classes</h2><p>{lead} Δnorm compares the norms of a latent's two decoder rows "
          "(1: only the chat model uses it, 0: only the base model, 0.5: both alike); the classes are those of "
          "Minder et al. (2025). Shares are of the live latents.</p>"
          + html_table(("class", "Δnorm", "latents", "share"), rows, attrs)
          + _image(out / "delta_norm.png", "histogram of Δnorm"))
  return lead, body


def _scaling(table: pd.DataFrame, summary: dict[str, Any], out: Path) -> tuple[str, str]:
  """(abstract sentence, section 2: the latent-scaling verdict)."""
  e_max, r_max = genuine_rule(summary)
  rule_text = (summary.get("genuine") or {}).get("rule") or f"nu_error < {e_max:g} and nu_recon < {r_max:g}"
  chat = table[table["tag"] == "chat_only"]
  ne, nr = _col(chat, "nu_error"), _col(chat, "nu_recon")
  known = np.isfinite(ne) & np.isfinite(nr)
  gen = genuine_values(chat["genuine"]) if "genuine" in chat else np.full(len(chat), np.nan)
  n_chat, n_known = len(chat), int(known.sum())
  n_gen = int((gen[known] == 1).sum())
  shrink, decouple = int((ne[known] >= e_max).sum()), int((nr[known] >= r_max).sum())
  if not n_chat:
    verdict = ("No live latent is chat-only (Δnorm ≥ 0.9), so latent scaling has no chat-only latent to judge; "
               "the plot shows the shared latents for reference.")
    lead = "No latent is chat-only, so there is nothing for latent scaling to judge."
  elif not n_known:
    verdict = (f"None of the {_num('chat_only_live', n_chat)} chat-only latents has finite ν (latent scaling did not "
               "run on them).")
    lead = "Latent scaling gave no finite ν for the chat-only latents."
  else:
    verdict = (f"Of the {_num('chat_only_live', n_chat)} live chat-only latents, {_num('with_nu', n_known)} have "
               f"finite ν, and {_num('genuine', n_gen)} of them ({esc(pct(n_gen, n_known))}) are <em>genuine</em> by "
               "the rule "
               f"<code>{esc(rule_text)}</code>; the other {_num('artifact', n_known - n_gen)} look like sparsity "
               f"artifacts: {_num('shrinkage', shrink)} with ν^ε ≥ {e_max:g} (Complete Shrinkage: the base model "
               f"has what the latent adds) and {_num('decoupling', decouple)} with ν^r ≥ {r_max:g} (Latent "
               "Decoupling: other latents reconstruct it in the base model); a latent can be both. Median ν^ε "
               f"{esc(fmt(np.median(ne[known])))}, median ν^r {esc(fmt(np.median(nr[known])))}.")
    lead = (f"Latent scaling finds {_num('genuine_abstract', n_gen)} of {n_known} chat-only latents genuine "
            f"({esc(pct(n_gen, n_known))}).")
  extra = []
  for key, value in sorted(summary.items()):
    if key.endswith("_auc") and isinstance(value, (int, float)):
      extra.append(f"<li><code>{esc(key)}</code> = {esc(fmt(value))}</li>")
  if "nu_half" in chat and n_known:
    for half in ("best", "worst"):
      sel = (chat["nu_half"] == half).to_numpy() & known
      if sel.any():
        extra.append(f"<li>{half} half by rank(ν^ε) + rank(ν^r) ({int(sel.sum())} latents): median ν^ε "
                     f"{esc(fmt(np.median(ne[sel])))}, median ν^r {esc(fmt(np.median(nr[sel])))}</li>")
  body = (f"<h2>2 Latent scaling</h2><p class=\"verdict\">{verdict}</p>"
          + (f"<ul>{''.join(extra)}</ul>" if extra else "")
          + "<p>Each point is a latent: ν = β_base / β_chat for the reconstruction (ν^r) and for the error with the "
            "latent's own part added back (ν^ε). A genuinely chat-specific latent has both ratios near 0; the "
            "paper's code ranks chat-only latents by rank(ν^ε) + rank(ν^r) and compares the halves (section 3).</p>"
          + _image(out / "latent_scaling.png", "latent scaling scatter"))
  return lead, body


def _causal(causal: pd.DataFrame | None, out: Path) -> tuple[str, str]:
  """(abstract sentence, section 3)."""
  head = "<h2>3 Causal test</h2>"
  if causal is None or not len(causal):
    return "", head + '<p class="missing">Not run (no causal.parquet in the results).</p>'
  groups = list(dict.fromkeys(causal["group"]))
  regions = [r for r in ("reply", "first", "rest") if r in set(causal["region"])]
  regions += [r for r in dict.fromkeys(causal["region"]) if r not in regions]
  cell = {(r["group"], r["region"]): r for r in causal.to_dict(orient="records")}
  rows = []
  for g in groups:
    any_row = next(cell[(g, r)] for r in regions if (g, r) in cell)
    n_lat = any_row.get("n_latents")
    n_lat = "template" if n_lat is not None and not pd.isna(n_lat) and int(n_lat) < 0 else fmt(n_lat)
    cells = [f"<code>{esc(g)}</code><br><small>{esc(GROUP_NOTES.get(g, ''))}</small>", esc(n_lat)]
    for r in regions:
      c = cell.get((g, r))
      cells.append("–" if c is None else f"{esc(fmt(c['kl_mean']))} [{esc(fmt(c['ci_low']))}, {esc(fmt(c['ci_high']))}]"
                   f"<br><small>{esc(fmt(c.get('n_tokens')))} tokens, {esc(fmt(c.get('n_docs')))} docs</small>")
    rows.append(cells)
  header = ["group", "latents"] + [f"KL: {REGION_NOTES.get(r, r)}" for r in regions]
  lead, verdict = "", ""
  best, worst = cell.get(("nu_best_half", "reply")), cell.get(("nu_worst_half", "reply"))
  if best and worst:
    overlap = not (best["ci_high"] < worst["ci_low"] or worst["ci_high"] < best["ci_low"])
    lower = "best" if best["kl_mean"] < worst["kl_mean"] else "worst"
    verdict = (f"On the assistant's reply, patching in the best half of the chat-only latents by ν gives KL "
               f"{esc(fmt(best['kl_mean']))} [{esc(fmt(best['ci_low']))}, {esc(fmt(best['ci_high']))}], the worst half "
               f"{esc(fmt(worst['kl_mean']))} [{esc(fmt(worst['ci_low']))}, {esc(fmt(worst['ci_high']))}]: the {lower} "
               f"half brings the model closer to the chat model, and the 95% intervals "
               f"{'overlap' if overlap else 'do not overlap'}.")
    ceiling, floor = cell.get(("all_base", "reply")), cell.get(("all_latents", "reply"))
    if ceiling and floor and ceiling["kl_mean"] - floor["kl_mean"] > 0:
      gap = ceiling["kl_mean"] - floor["kl_mean"]
      verdict += (f" Of the gap between all-base ({esc(fmt(ceiling['kl_mean']))}) and all latents "
                  f"({esc(fmt(floor['kl_mean']))}), the best half closes "
                  f"{esc(pct(ceiling['kl_mean'] - best['kl_mean'], gap))} and the worst half "
                  f"{esc(pct(ceiling['kl_mean'] - worst['kl_mean'], gap))}.")
    lead = (f"In the causal test the {lower} half by ν is closer to the chat model on the reply "
            f"(intervals {'overlap' if overlap else 'do not overlap'}).")
  body = (head + "<p>The chat model runs on chat-formatted text with its residual at the crosscoder's layer replaced "
          "by x_base + Σ_{j∈S} f_j (d_j^chat − d_j^base); the table gives KL(P_chat ‖ P_patched) in nats per token, "
          "mean and 95% bootstrap interval over conversations. Lower means the latent set S restores more of the chat "
          "model's behaviour.</p>"
          + f'<p class="verdict" id="causal-verdict"><strong>Verdict.</strong> {esc(causal_verdict(causal).sentence)}</p>'
          + (f'<p class="verdict">{verdict}</p>' if verdict else "")
          + html_table(header, rows) + _image(out / "causal.png", "causal test bar chart"))
  return lead, body


def _template(table: pd.DataFrame, summary: dict[str, Any], out: Path) -> str:
  """Section 4."""
  t = summary.get("template") or {}
  live, chat = _live(table), table[table["tag"] == "chat_only"]
  share_live, share_chat = _col(live, "template_share"), _col(chat, "template_share")
  mostly = int((share_chat > 0.5).sum())
  frac = t.get("template_token_fraction")
  parts = []
  if isinstance(frac, (int, float)) and math.isfinite(frac):
    parts.append(f"Chat-template tokens (turn markers, role names, special tokens) are {esc(pct(frac, 1))} of the "
                 "analysed tokens.")
  if len(chat):
    parts.append(f"{_num('chat_only_mostly_template', mostly)} of the {len(chat)} chat-only latents fire mostly "
                 f"(more than half of their firings) on them; median template share "
                 f"{esc(fmt(np.nanmedian(share_chat) if np.isfinite(share_chat).any() else np.nan))} for chat-only "
                 "latents against "
                 f"{esc(fmt(np.nanmedian(share_live) if np.isfinite(share_live).any() else np.nan))} for all live "
                 "latents.")
  else:
    parts.append("There is no chat-only latent to compare; the plot shows all live latents.")
  return ("<h2>4 Template tokens</h2><p>" + " ".join(parts) + " A chat-only latent that fires only on the template "
          "may track the format rather than the chat behaviour (Minder et al. 2025 find many such latents).</p>"
          + _image(out / "template_share.png", "template share histogram"))


def pick_latents(table: pd.DataFrame, examples: pd.DataFrame | None, max_latents: int = 8,
                 n_base: int = 2) -> list[int]:
  """The latents given a card: chat-only by ν rank (best first), up to `n_base` base-only, then the highest Δnorm.

  Only latents with examples are picked when examples.parquet has any.
  """
  live = _live(table)
  if examples is not None and len(examples):
    live = live[live["latent"].isin(set(examples["latent"].tolist()))]
  chat = live[live["tag"] == "chat_only"].copy()
  chat["_rank"] = _col(chat, "nu_rank")
  chat = chat.sort_values(["_rank", "delta_norm"], ascending=[True, False], na_position="last", kind="stable")
  base = live[live["tag"] == "base_only"].sort_values("delta_norm", kind="stable")
  n_b = min(len(base), n_base, max_latents)
  picks = [int(j) for j in chat["latent"].head(max_latents - n_b)] + [int(j) for j in base["latent"].head(n_b)]
  if len(picks) < max_latents:  # few chat-only latents: show those closest to chat-only next
    rest = live[~live["latent"].isin(picks)].sort_values("delta_norm", ascending=False, kind="stable")
    picks += [int(j) for j in rest["latent"].head(max_latents - len(picks))]
  return picks


def context_html(row: dict[str, Any], scale: float) -> str:
  """One example: its activation, source and tokens shaded by activation, the firing token outlined."""
  toks = row.get("context_tokens")
  acts = row.get("context_acts")
  idx = row.get("context_index")
  if toks is None or (isinstance(toks, float) and math.isnan(toks)):
    toks, acts, idx = [str(row.get("token_id", row.get("token", "?")))], [row.get("activation", 0.0)], 0
  toks = list(toks)
  acts = list(acts) if acts is not None else [0.0] * len(toks)
  idx = int(idx) if idx is not None and not pd.isna(idx) else -1
  spans = []
  for i, (t, a) in enumerate(zip(toks, acts)):
    a = float(a) if a is not None else 0.0
    alpha = 0.0 if not (scale > 0 and math.isfinite(a)) else min(max(a / scale, 0.0), 1.0)
    text = str(t).replace("\n", "↵").replace("\t", "→") or "∅"
    cls = "tok fire" if i == idx else "tok"
    spans.append(f'<span class="{cls}" title="{esc(fmt(a))}" style="background:rgba(255,120,0,{alpha * 0.85:.2f})">'
                 f"{esc(text)}</span>")
  src = []
  if row.get("dataset") is not None and not (isinstance(row.get("dataset"), float) and math.isnan(row["dataset"])):
    src.append(str(row["dataset"]))
  if row.get("doc_index") is not None and not pd.isna(row.get("doc_index")):
    src.append(f"doc {int(row['doc_index'])}")
  if row.get("position") is not None and not pd.isna(row.get("position")):
    src.append(f"pos {int(row['position'])}")
  return (f'<div class="ctx"><span class="act">{esc(fmt(row.get("activation")))}</span>'
          f'<span class="src">{esc(" ".join(src))}</span><span class="toks">{"".join(spans)}</span></div>')


def _stats_table(r: dict[str, Any]) -> str:
  """The latent's statistics as a two-row table (names, values)."""
  cols = [("Δnorm", "delta_norm"), ("‖d‖ base", "dec_norm_base"), ("‖d‖ chat", "dec_norm_chat"), ("cos", "dec_cos"),
          ("freq", "freq"), ("max act", "max_act"), ("template share", "template_share"),
          ("β^r base", "beta_recon_base"), ("β^r chat", "beta_recon_chat"), ("β^ε base", "beta_error_base"),
          ("β^ε chat", "beta_error_chat"), ("β base", "beta_act_base"), ("β chat", "beta_act_chat"),
          ("ν^r", "nu_recon"), ("ν^ε", "nu_error"), ("ν rank", "nu_rank")]
  cols = [(n, k) for n, k in cols if k in r]
  return html_table([n for n, _ in cols], [[esc(fmt(r[k])) for _, k in cols]])


def _card(j: int, r: dict[str, Any], ex: pd.DataFrame | None, lens: pd.DataFrame | None,
          steer: pd.DataFrame | None, top_contexts: int) -> str:
  """The card of latent j (dashboard order: top contexts, quantile contexts, logit lens, statistics, steering)."""
  tag = str(r.get("tag", ""))
  g = genuine_values(pd.Series([r.get("genuine")]))[0] if "genuine" in r else math.nan
  verdict = "" if math.isnan(g) else (", genuine by ν" if g == 1 else ", artifact by ν")
  half = f", {r['nu_half']} half by ν" if isinstance(r.get("nu_half"), str) and r["nu_half"] else ""
  label = "dead: never fired" if tag == "dead" else CLASS_LABELS.get(tag, tag)
  parts = [(f'<div class="card" id="latent-{j}"><h3>Latent {j}: {esc(label)}{esc(verdict)}'
            f"{esc(half)}</h3>"),
           (f'<p class="facts">Δnorm {esc(fmt(r.get("delta_norm")))} · fires on {esc(_share(r.get("freq")))} of '
            f'tokens · max activation {esc(fmt(r.get("max_act")))} · template share '
            f'{esc(fmt(r.get("template_share")))} · ν^ε {esc(fmt(r.get("nu_error")))} · ν^r '
            f'{esc(fmt(r.get("nu_recon")))}</p>')]
  rows = ex[ex["latent"] == j] if ex is not None else None
  if rows is not None and len(rows):
    # shading relative to the largest activation known: the table's maximum or the examples' (a partial pass)
    shown = pd.to_numeric(rows["activation"], errors="coerce").max()
    top_act = r.get("max_act")
    top_act = np.nan if top_act is None or pd.isna(top_act) else float(top_act)
    scale = float(np.nanmax([top_act, shown, 0.0]))
    top = rows[rows["group"] == "top"].sort_values(["activation"], ascending=False, kind="stable").head(top_contexts)
    if len(top):
      parts.append(f"<h4>Top {len(top)} activations</h4>")
      parts += [context_html(x, scale) for x in top.to_dict(orient="records")]
    quant = sorted({str(q) for q in rows["group"] if str(q).startswith("q") and str(q)[1:].isdigit()},
                   key=lambda q: -int(q[1:]))
    if quant:
      n_q = max(int(q[1:]) for q in quant)
      parts.append("<h4>Contexts per activation quantile (of a uniform sample of its firings)</h4>")
      for q in quant:
        sel = rows[rows["group"] == q].sort_values("activation", ascending=False, kind="stable")
        acts = pd.to_numeric(sel["activation"], errors="coerce")
        parts.append(f"<p class=\"facts\">quantile {q[1:]} of {n_q}: activations {esc(fmt(acts.min()))}–"
                     f"{esc(fmt(acts.max()))}</p>")
        parts += [context_html(x, scale) for x in sel.to_dict(orient="records")]
  else:
    parts.append('<p class="missing">No decoded contexts for this latent.</p>')
  if lens is not None and len(lens[lens["latent"] == j]):
    sel = lens[lens["latent"] == j]
    parts.append("<h4>Logit lens of the chat decoder direction</h4>")
    rows_html = []
    for direction in ("promoted", "suppressed"):
      d = sel[sel["direction"] == direction].sort_values("rank", kind="stable")
      if len(d):
        rows_html.append((esc(direction), " ".join(f"<code>{esc(t)}</code> ({esc(fmt(v))})"
                                                   for t, v in zip(d["token"], d["logit"]))))
    parts.append(html_table(("", "tokens (logit)"), rows_html))
  parts.append("<h4>Statistics</h4>" + _stats_table(r))
  if steer is not None and len(steer[steer["latent"] == j]):
    sel = steer[steer["latent"] == j].sort_values(["prompt", "model", "multiple"], kind="stable")
    parts.append("<h4>Steering: the decoder direction added at the layer, strength as a multiple of max "
                 "activation</h4>")
    parts.append(html_table(("prompt", "model", "× max act", "strength", "completion"),
                        [[esc(x["prompt"]), esc(x["model"]), esc(fmt(x.get("multiple"))), esc(fmt(x.get("strength"))),
                          f'<span class="completion">{esc(x["completion"])}</span>'] for x in sel.to_dict("records")]))
  parts.append("</div>")
  return "".join(parts)


def _examples(table: pd.DataFrame, ex: pd.DataFrame | None, lens: pd.DataFrame | None, steer: pd.DataFrame | None,
              max_latents: int, top_contexts: int) -> str:
  """Section 5: a card per picked latent, plus any steered latent not picked."""
  picks = pick_latents(table, ex, max_latents)
  if steer is not None and len(steer):
    picks += [int(j) for j in dict.fromkeys(steer["latent"].tolist()) if int(j) not in picks and
              int(j) in set(table["latent"].tolist())]
  head = ("<h2>5 Example latents</h2><p>The chat-only latents ranked best by latent scaling (low rank(ν^ε) + "
          "rank(ν^r)), then base-only latents for contrast" + (", then steered latents" if steer is not None else "")
          + ". Tokens are shaded by the latent's activation (relative to its maximum); the firing token is outlined; "
          "hover a token for its activation. ↵ marks a newline.</p>")
  if not picks:
    return head + '<p class="missing">No live latent to show.</p>'
  rows = table.set_index("latent", drop=False)
  return head + "".join(_card(j, rows.loc[j].to_dict(), ex, lens, steer, top_contexts) for j in picks)


METHODS = """<h2>6 Methods notes</h2>
<p><strong>Δnorm.</strong> For latent j with decoder rows d_j^base and d_j^chat (original units),
Δnorm_j = ½ ((‖d_j^chat‖ − ‖d_j^base‖) / max(‖d_j^chat‖, ‖d_j^base‖) + 1): 1 chat-only, 0 base-only,
0.5 shared. Classes: chat-only ≥ 0.9, base-only ≤ 0.1, shared in [0.4, 0.6], other in between; a latent
that never fired on the analysed tokens is dead whatever its Δnorm.</p>
<p><strong>Latent scaling.</strong> For latent j, with d = d_j^chat (used for both models) and codes f_j(x),
β_j = argmin_β Σ_x ‖β f_j(x) d − y(x)‖² = dᵀ Σ_x f_j(x) y(x) / (‖d‖² Σ_x f_j(x)²) for a target y per model:
the reconstruction x̂_i (β^r), the error with the latent's own part added back x_i − x̂_i + f_j d_j^i (β^ε), and
the raw activation x_i (β). ν^r = β^r_base / β^r_chat, ν^ε = β^ε_base / β^ε_chat. High ν^ε means Complete
Shrinkage (the base model's error already holds the direction), high ν^r Latent Decoupling (other latents
reconstruct it in the base model). All βs of all latents come from one pass of [m × d] accumulations.</p>
<p><strong>Normalised space.</strong> β and ν are computed on the crosscoder's normalised inputs (x_i times the
per-model scale that makes E‖x_i‖ = √d), as in the reference code, so a global scale difference between the
models does not bias ν. Decoder norms, Δnorm and the causal patch use original units.</p>
<p><strong>Causal test.</strong> The chat model's residual at the layer is replaced by
x_base + Σ_{j∈S} f_j (d_j^chat − d_j^base) and the chat model runs on; KL to the unpatched chat model's
next-token distribution over the assistant's reply, its first 10 content tokens and the rest, with 95% bootstrap
intervals over conversations.</p>
<p><strong>Template share.</strong> The fraction of a latent's firings on chat-template tokens (special tokens,
turn markers and role names outside message contents). <strong>Examples</strong> are the latent's top activations
over the store and a few firings per quantile of a uniform sample of its firings, one streaming pass.</p>
"""


def _diff_sections(out: Path) -> str:
  """The activation-difference methods' fragments (`diff/<method>/section.html`, written by launch.diff), if any.

  Read as files, not through `neurodiff_jax.diffing` (the two packages sit side by side).
  """
  root = out / "diff"
  if not root.is_dir():
    return ""
  parts = sorted(root.glob("*/section.html"), key=lambda p: p.stat().st_mtime)
  if not parts:
    return ""
  return ('<h2>Activation-difference methods</h2><p>Methods that read h_ft − h_base directly '
          "(python -m launch.diff), on the same model pair.</p>" + "\n".join(p.read_text(encoding="utf-8")
                                                                              for p in parts))


def write_report(results_dir: str | Path, max_latents: int = 8, top_contexts: int = 10) -> Path:
  """Writes `results_dir/report.html`, self-contained (plots inlined), from the results files there; returns it."""
  out = Path(results_dir)
  table, summary = read_table(out), read_summary(out)
  if not all((out / f"{p}.png").is_file() for p in PLOTS):
    make_plots(out)
  ex = _optional(out, "examples.parquet")
  causal = _optional(out, "causal.parquet")
  steer = _optional(out, "steering.parquet")
  lens = _optional(out, "logit_lens.parquet")
  title, setup = _setup(summary, table)
  lead1, classes = _classes(table, out)
  lead2, scaling = _scaling(table, summary, out)
  lead3, causal_html = _causal(causal, out)
  abstract = " ".join(s for s in (lead1, lead2, lead3) if s)
  page = [
      '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
      f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
      f"<h1>{esc(title)}</h1>",
      ('<p class="sub">Which latents of the crosscoder are specific to the chat model, which of those are real '
       "and which are artifacts of the sparsity penalty, and whether they carry the chat behaviour.</p>"),
      f'<p class="abstract">{abstract}</p>',
      "<h2>Setup</h2>", setup,
      classes, scaling, causal_html, _template(table, summary, out),
      _examples(table, ex, lens, steer, max_latents, top_contexts),
      METHODS, _diff_sections(out), "</body></html>",
  ]
  path = out / "report.html"
  tmp = path.with_name("report.html.tmp")
  tmp.write_text("\n".join(page), encoding="utf-8")
  tmp.replace(path)
  return path


__all__ = ["CLASSES", "CSS", "PLOTS", "THRESHOLDS", "ReportError", "context_html", "esc", "fmt", "genuine_rule",
           "genuine_values", "html_table",
           "make_plots", "pair_view", "pick_latents", "plot_delta_norm", "plot_latent_scaling", "plot_template_share",
           "read_summary", "read_table", "write_report"]
