"""analysis.verdicts: the causal test's sentence follows from the intervals, on planted tables."""

from __future__ import annotations

import pandas as pd

from neurodiff_jax.analysis.verdicts import causal_verdict, gap_closed, relation


def _table(groups: dict[str, tuple[float, float, float, int]], region: str = "reply") -> pd.DataFrame:
  return pd.DataFrame([{"group": g, "region": region, "kl_mean": m, "ci_low": lo, "ci_high": hi, "n_tokens": 100,
                        "n_docs": 10, "n_latents": n} for g, (m, lo, hi, n) in groups.items()])


BASELINES = {"all_base": (4.0, 3.8, 4.2, 0), "all_latents": (0.0, -0.1, 0.1, 64), "template_chat": (3.8, 3.6, 4.0, -1)}


def test_relation_and_gap():
  a, b = {"ci_low": 1.0, "ci_high": 2.0}, {"ci_low": 2.5, "ci_high": 3.0}
  assert relation(a, b) == "lower" and relation(b, a) == "higher"
  assert relation(a, {"ci_low": 2.0, "ci_high": 3.0}) == "overlap"  # touching intervals overlap
  assert gap_closed({"kl_mean": 1.0}, {"kl_mean": 4.0}, {"kl_mean": 0.0}) == 0.75


def test_significantly_more_than_the_dnorm_control():
  t = _table({**BASELINES, "nu_best_half": (1.0, 0.8, 1.2, 8), "nu_worst_half": (3.0, 2.8, 3.2, 8),
              "dnorm_top_half": (2.0, 1.7, 2.3, 8), "dnorm_bottom_half": (3.5, 3.3, 3.7, 8)})
  v = causal_verdict(t)
  assert v.relations == {("nu_best_half", "all_base"): "lower", ("nu_best_half", "dnorm_top_half"): "lower"}
  assert "closes 75% of the KL gap" in v.sentence and "8 best chat-only latents" in v.sentence
  assert "significantly below all-base" in v.sentence and "not significantly" not in v.sentence
  assert "significantly more than the 8 top chat-only latents by Δnorm (50%" in v.sentence
  assert "do not overlap" in v.sentence


def test_overlapping_and_worse_intervals_are_said_as_such():
  t = _table({**BASELINES, "nu_best_half": (3.5, 3.0, 4.0, 8), "dnorm_top_half": (3.4, 3.1, 3.9, 8)})
  v = causal_verdict(t)
  assert "not significantly below all-base" in v.sentence
  assert "not significantly more or less than" in v.sentence and "intervals overlap" in v.sentence
  t = _table({**BASELINES, "nu_best_half": (3.0, 2.9, 3.1, 8), "dnorm_top_half": (1.0, 0.9, 1.1, 8)})
  assert "significantly less than the 8 top" in causal_verdict(t).sentence


def test_no_chat_only_latents_and_missing_baselines():
  v = causal_verdict(_table(BASELINES))
  assert "no live chat-only latent to patch" in v.sentence
  assert "template tokens alone close 5% of the KL gap" in v.sentence and "not significantly below" in v.sentence
  assert causal_verdict(_table({"all_base": (4.0, 3.8, 4.2, 0)})).sentence.startswith("No verdict")
  assert causal_verdict(_table(BASELINES, region="first"), "first").sentence.startswith(
      "On the first reply tokens, there is no")
