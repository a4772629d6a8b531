"""The check both reports' causal verdicts share: the sentence says what the 95% intervals in causal.parquet say."""

from __future__ import annotations

from typing import Any


def check_verdict(verdict: str, rows: dict[str, Any]) -> bool:
  """Asserts `verdict` matches one region's causal rows (group -> row); whether the ν halves were there to judge."""
  if "nu_best_half" not in rows or "dnorm_top_half" not in rows:
    assert "no live chat-only latent to patch" in verdict
    return False
  best, ctrl = rows["nu_best_half"], rows["dnorm_top_half"]
  base, floor = rows["all_base"], rows["all_latents"]
  assert f"closes {100 * (base.kl_mean - best.kl_mean) / (base.kl_mean - floor.kl_mean):.0f}% of the KL gap" in verdict
  assert f"KL {best.kl_mean:#.3g} [{best.ci_low:#.3g}, {best.ci_high:#.3g}]" in verdict
  below = best.ci_high < base.ci_low
  assert ("not significantly below all-base" in verdict) == (not below)
  assert ("significantly below all-base" if below else "not significantly below all-base") in verdict
  if best.ci_high < ctrl.ci_low:
    assert "significantly more than the" in verdict and "do not overlap" in verdict
  elif best.ci_low > ctrl.ci_high:
    assert "significantly less than the" in verdict and "do not overlap" in verdict
  else:
    assert "not significantly more or less than the" in verdict and "intervals overlap" in verdict
  return True
