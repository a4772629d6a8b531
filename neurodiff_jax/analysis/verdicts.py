"""Verdicts in words, computed from a result table's confidence intervals (no model, no JAX).

The causal test (`causal.parquet`, docs/analysis.md) gives, per latent group and region, the mean
KL(P_chat ‖ P_patched) with a 95% bootstrap interval. `all_base` (S = ∅) is the ceiling and
`all_latents` (every latent) the floor a crosscoder patch can reach; their difference is the KL
gap. The question the test asks is whether the chat-only latents ranked best by latent scaling
(`nu_best_half`) carry the chat behaviour: whether they close the gap at all (their interval
below all_base's) and whether they close significantly more of it than the same number of
chat-only latents ranked by Δnorm alone (`dnorm_top_half`, the control).

"Significantly" means the two 95% intervals do not overlap. That is conservative: the bootstrap
is paired across groups, so some differences whose intervals overlap would pass a paired test;
the sentence never claims more than the intervals show. The report, the demo's story and the
dashboard's causal page all print `causal_verdict(...).sentence`, so they say the same thing.

The agents' comparison (`agents/comparison.parquet`, METHODS.md §8) gives, per graded outcome, the posterior
of the grade difference between diff and blackbox agents with a 90% credible interval; `agent_verdicts` reads
it as one sentence per outcome ("no difference shown" when the interval includes 0), and `sampler_warning`
says when the fit's diagnostics make the interval unreadable. The dashboard's Agents page and the agents'
report section print the same sentences.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pandas as pd

# What each group of causal.parquet patches (docs/analysis.md, "Causal test").
GROUP_NOTES = {
    "all_base": "S = ∅: the base residual only (the ceiling)",
    "all_latents": "every latent: the error patch (the floor)",
    "template_chat": "chat residual on chat-template tokens only",
    "template": "chat residual on chat-template tokens only",
    "nu_best_half": "chat-only latents, best half by ν (low ν: not explained by the base)",
    "nu_worst_half": "chat-only latents, worst half by ν",
    "dnorm_top_half": "chat-only latents, top half by Δnorm",
    "dnorm_bottom_half": "chat-only latents, bottom half by Δnorm",
}
REGION_WORDS = {"reply": "the assistant's reply", "first": "the first reply tokens", "rest": "the rest of the reply"}
# The two graded outcomes of an agent's answer, in the words every page and report uses for them.
OUTCOME_WORDS = {"objective": "broad objective", "details": "specific details"}
AGENT_CI = "90 %"  # the comparison's credible interval (comparison.parquet's lo, hi)
# comparison.parquet's quantities in words (diff − blackbox throughout: a positive value favours the diff agent).
QUANTITY_WORDS = {"beta": "β: agent-type effect, diff − blackbox (log-odds)",
                  "grade_difference": "grade difference, diff − blackbox",
                  "grade_ratio_0to4": "grade ratio on the 0–4 scale, diff / blackbox",
                  "grade_ratio_of_means_0to4": "ratio of the mean grades on the 0–4 scale, diff / blackbox",
                  "p_beta_positive": "P(β > 0)"}
# The diagnostics beyond which an interval is not read: R̂ above 1.01 or a bulk ESS below 100 means the chains
# disagree or mix too little; any divergence means the sampler missed part of the posterior.
MAX_R_HAT = 1.01
MIN_ESS_BULK = 100


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
  """How row a's KL stands to row b's by their 95% intervals: "lower", "higher" (no overlap) or "overlap"."""
  if float(a["ci_high"]) < float(b["ci_low"]):
    return "lower"
  if float(a["ci_low"]) > float(b["ci_high"]):
    return "higher"
  return "overlap"


def gap_closed(row: dict[str, Any], ceiling: dict[str, Any], floor: dict[str, Any]) -> float:
  """The share of the all-base → all-latents KL gap that `row`'s patch closes (NaN when there is no gap)."""
  gap = float(ceiling["kl_mean"]) - float(floor["kl_mean"])
  return (float(ceiling["kl_mean"]) - float(row["kl_mean"])) / gap if gap > 0 else math.nan


def _kl(row: dict[str, Any]) -> str:
  return f"KL {float(row['kl_mean']):#.3g} [{float(row['ci_low']):#.3g}, {float(row['ci_high']):#.3g}]"


def _share(x: float) -> str:
  return "an undefined share" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _latents(row: dict[str, Any]) -> str:
  n = row.get("n_latents")
  return "" if n is None or pd.isna(n) or int(n) < 0 else f"{int(n)} "


@dataclasses.dataclass(frozen=True)
class CausalVerdict:
  """One sentence, and the comparisons it rests on (group pairs -> `relation`), for a region of the causal test."""

  sentence: str
  region: str
  relations: dict[tuple[str, str], str]  # (a, b) -> relation(a, b): "lower", "higher" or "overlap"
  closed: dict[str, float]  # group -> share of the KL gap closed


def causal_verdict(frame: pd.DataFrame, region: str = "reply") -> CausalVerdict:
  """The causal test's verdict on `region`, in one sentence computed from the table's intervals."""
  rows = {str(r["group"]): r for r in frame[frame["region"].astype(str) == region].to_dict(orient="records")}
  where = REGION_WORDS.get(region, region)
  ceiling, floor = rows.get("all_base"), rows.get("all_latents")
  if ceiling is None or floor is None:
    return CausalVerdict(f"No verdict on {where}: the causal table lacks the all_base or all_latents baseline.",
                         region, {}, {})
  closed = {g: gap_closed(r, ceiling, floor) for g, r in rows.items()}
  best, control = rows.get("nu_best_half"), rows.get("dnorm_top_half")
  if best is None:
    relations = {}
    extra = ""
    template = rows.get("template_chat")
    if template is not None:
      relations[("template_chat", "all_base")] = relation(template, ceiling)
      below = relations[("template_chat", "all_base")] == "lower"
      extra = (f"; for reference, the chat activations on the template tokens alone close {_share(closed['template_chat'])}"
               f" of the KL gap ({_kl(template)}), {'significantly' if below else 'not significantly'} below all-base "
               f"({_kl(ceiling)})")
    return CausalVerdict(f"On {where}, there is no live chat-only latent to patch, so this run cannot say whether "
                         f"chat-only latents carry the chat behaviour{extra}.", region, relations, closed)
  relations = {("nu_best_half", "all_base"): relation(best, ceiling)}
  below = relations[("nu_best_half", "all_base")] == "lower"
  head = (f"On {where}, patching the {_latents(best)}best chat-only latents by ν closes {_share(closed['nu_best_half'])}"
          f" of the KL gap between all-base and all latents ({_kl(best)}; all-base {_kl(ceiling)}, all latents "
          f"{_kl(floor)}), {'significantly' if below else 'not significantly'} below all-base")
  if control is None:
    return CausalVerdict(head + ", and there is no Δnorm-ranked half to compare it with.", region, relations, closed)
  rel = relations[("nu_best_half", "dnorm_top_half")] = relation(best, control)
  versus = {"lower": "significantly more than", "higher": "significantly less than",
            "overlap": "not significantly more or less than"}[rel]
  return CausalVerdict(
      f"{head}, and {versus} the {_latents(control)}top chat-only latents by Δnorm ({_share(closed['dnorm_top_half'])}"
      f", {_kl(control)}; the 95% intervals {'overlap' if rel == 'overlap' else 'do not overlap'}).",
      region, relations, closed)


def _decimals(*values: float) -> int:
  # One decimal, as a reader counts grades; two when a value would round to 0.0 without being 0.
  return 2 if any(0 < abs(v) < 0.05 for v in values) else 1


def _grades(x: float, decimals: int) -> str:
  return f"{x:.{decimals}f}".replace("-", "−")


def _interval(lo: float, hi: float, decimals: int) -> str:
  sep = "–" if lo >= 0 else " to "  # an en dash after a minus sign would read as a range of negatives
  return f"{_grades(lo, decimals)}{sep}{_grades(hi, decimals)}"


@dataclasses.dataclass(frozen=True)
class AgentVerdict:
  """The agent-type comparison of one graded outcome in one sentence, and whether its interval excludes 0."""

  outcome: str
  sentence: str
  shown: bool  # the 90% interval of the grade difference excludes 0


def agent_verdict(outcome: str, mean: float, lo: float, hi: float) -> AgentVerdict:
  """Reads the grade difference diff − blackbox (posterior mean, 90% interval [lo, hi]) of `outcome` as a sentence."""
  words = OUTCOME_WORDS.get(outcome, outcome)
  if not all(math.isfinite(float(v)) for v in (mean, lo, hi)):
    return AgentVerdict(outcome, f"No grade difference on {words}: the comparison holds no finite interval for it.",
                        False)
  mean, lo, hi = float(mean), float(lo), float(hi)
  d = _decimals(mean, lo, hi)
  if lo > 0:
    return AgentVerdict(outcome, f"diff agents score {_grades(mean, d)} grades higher than blackbox agents on {words} "
                                 f"({AGENT_CI} CI {_interval(lo, hi, d)}).", True)
  if hi < 0:  # stated as a positive amount lower, with the interval turned round to match
    return AgentVerdict(outcome, f"diff agents score {_grades(-mean, d)} grades lower than blackbox agents on {words} "
                                 f"({AGENT_CI} CI {_interval(-hi, -lo, d)}).", True)
  way = "higher" if mean >= 0 else "lower"
  return AgentVerdict(outcome, f"diff agents score {_grades(abs(mean), d)} grades {way} than blackbox agents on "
                               f"{words} ({AGENT_CI} CI {_interval(lo, hi, d)}): the interval includes 0: no "
                               "difference shown.", False)


def agent_verdicts(comparison: pd.DataFrame) -> dict[str, AgentVerdict]:
  """`agent_verdict` of every outcome in comparison.parquet (its `grade_difference` rows), objective first."""
  rows = comparison[comparison["quantity"].astype(str) == "grade_difference"]
  found = [str(o) for o in rows["outcome"].astype(str).unique()]
  order = [o for o in OUTCOME_WORDS if o in found] + [o for o in found if o not in OUTCOME_WORDS]
  out = {}
  for outcome in order:
    r = rows[rows["outcome"].astype(str) == outcome].iloc[0]
    out[outcome] = agent_verdict(outcome, r["mean"], r["lo"], r["hi"])
  return out


def sampler_warning(diagnostics: dict[str, Any]) -> str | None:
  """Why one outcome's fit (comparison.json's diagnostics, flat or under "diagnostics") should not be read, or None
  when nothing is wrong."""
  diagnostics = {**diagnostics, **(diagnostics.get("diagnostics") or {})}
  problems = []
  r_hat, ess, div = diagnostics.get("max_r_hat"), diagnostics.get("min_ess_bulk"), diagnostics.get("divergences")
  if r_hat is not None and not float(r_hat) <= MAX_R_HAT:  # NaN R̂ is a failure too
    problems.append(f"max R̂ {float(r_hat):.3g} > {MAX_R_HAT}")
  if ess is not None and not float(ess) >= MIN_ESS_BULK:
    problems.append(f"min bulk ESS {float(ess):.0f} < {MIN_ESS_BULK}")
  if div is not None and int(div) > 0:
    problems.append(f"{int(div)} divergent transitions")
  if not problems:
    return None
  return f"the sampler did not converge ({'; '.join(problems)}): do not read this interval"


__all__ = ["AGENT_CI", "GROUP_NOTES", "OUTCOME_WORDS", "QUANTITY_WORDS", "REGION_WORDS", "AgentVerdict",
           "CausalVerdict", "agent_verdict", "agent_verdicts", "causal_verdict", "gap_closed", "relation", "sampler_warning"]
