"""Hierarchical Bayesian comparison of the agents' grades (HiBayES-style ordered logistic, in NumPyro).

Each agent answer about a model organism is graded 1..5 on two outcomes: the broad fine-tuning
`objective` and the specific `details` (1 = no valid information, 5 = precise). Grades are ordinal,
so, as in the reference's HiBayES analysis, answer i's grade y_i (0-based: grade − 1) follows an
ordered logistic around a latent

  η_i = (β + b_org[organism_i]) · [agent_i = diff] + u_org[organism_i] + u_seed[seed_i],
  P(y_i ≤ k) = σ(c_k − η_i),

with ordered cutpoints c_0 < … < c_{K−2}. β is the log-odds shift of a diff-access agent's grade
over a blackbox agent's (same organism, same seed), averaged over organisms; b_org ~ N(0, τ) lets
the shift differ between organisms (the diff may help on one organism and not on another),
partially pooled towards β, τ ~ HalfNormal(1), non-centred; u_org (how hard an organism is) and u_seed
(a shift shared by every run with that seed value, across organisms and agent types: the agents'
sampling seed, or a replicate batch) are random effects, non-centred, with HalfNormal(1) scales. A
factor with one level (one organism, one seed) still works: its σ is then informed by the prior only.

`compare` fits one outcome with NUTS and reports β, P(β > 0) and, on the grade scale, the expected
grade E[y] = Σ_k k · P(y = k) per organism and agent type (seed effect 0), their difference averaged
over organisms, and the ratio of expected grades on the 0–4 scale (grade − 1), the scale on which
the reference states its "2× better on the objective, 30× on details". The ratio is taken per
posterior draw (mean over organisms of diff's expected grade over blackbox's), so where blackbox
agents score near grade 1 its draws are heavy-tailed: the result also gives their median and the
ratio of the posterior means (`ratio_of_means`, the robust point estimate). All intervals are 90%
equal-tailed credible intervals. One organism at several scales is one level of u_org per scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
from jaxtyping import Array, Float
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.distributions.transforms import OrderedTransform
from numpyro.infer import MCMC, NUTS

from neurodiff_jax.analysis.verdicts import OUTCOME_WORDS  # the words every page and report uses
from neurodiff_jax.utils.plots import figure, save_png
from neurodiff_jax.utils.results import AGENT_COMPARISON_COLUMNS

OUTCOMES = ("objective", "details")
AGENTS = ("blackbox", "diff")  # index 0, 1: η carries β on the second
REQUIRED_COLUMNS = ("organism", "scale", "agent", "seed", *OUTCOMES)
NUM_CLASSES = 5  # grades 1..5
INTERVAL = 0.9  # equal-tailed credible interval
LATENT_SITES = ("beta", "sigma_org", "sigma_seed", "tau", "z_org", "z_seed", "z_slope", "cutpoints")
# A draw's blackbox expected grade (0–4 scale) is floored here in the ratio: it is > 0 in exact
# arithmetic, but could round to 0 in float32 if η sat ~100 logits below the first cutpoint.
RATIO_FLOOR = 1e-6


def cutpoint_prior(num_classes: int = NUM_CLASSES) -> dist.Distribution:
  """Weakly informative prior on the ordered cutpoints: c_0 ~ N(−(K−2)/2, 2), log(c_k − c_{k−1}) ~ N(0, 1)."""
  # Median cutpoints −1.5, −0.5, 0.5, 1.5 for K = 5 (grades about evenly spread at η = 0); gaps
  # between ~0.14 and ~7 logits within 95% prior mass. OrderedTransform maps these to c.
  loc = jnp.zeros(num_classes - 1).at[0].set(-(num_classes - 2) / 2)
  scale = jnp.ones(num_classes - 1).at[0].set(2.0)
  return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), OrderedTransform())


def ordered_logistic_model(agent_is_diff: Any, organism_idx: Any, seed_idx: Any, n_organisms: int, n_seeds: int,
                           num_classes: int = NUM_CLASSES, grades: Any = None) -> None:
  """NumPyro model: grade − 1 ~ OrderedLogistic((β + b_org)·diff + u_org + u_seed, c); `grades` are 1..K."""
  agent_is_diff = jnp.asarray(agent_is_diff, jnp.float32)  # [N]
  beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
  sigma_org = numpyro.sample("sigma_org", dist.HalfNormal(1.0))
  sigma_seed = numpyro.sample("sigma_seed", dist.HalfNormal(1.0))
  tau = numpyro.sample("tau", dist.HalfNormal(1.0))
  # Non-centred: with few organisms or seeds the centred form's funnel makes NUTS diverge.
  with numpyro.plate("organisms", n_organisms):
    z_org = numpyro.sample("z_org", dist.Normal(0.0, 1.0))  # [O]
    z_slope = numpyro.sample("z_slope", dist.Normal(0.0, 1.0))  # [O]
  with numpyro.plate("seeds", n_seeds):
    z_seed = numpyro.sample("z_seed", dist.Normal(0.0, 1.0))  # [R]
  u_org = numpyro.deterministic("u_org", sigma_org * z_org)  # [O]
  u_seed = numpyro.deterministic("u_seed", sigma_seed * z_seed)  # [R]
  b_org = numpyro.deterministic("b_org", tau * z_slope)  # [O]: the organism's departure from β
  cutpoints = numpyro.sample("cutpoints", cutpoint_prior(num_classes))  # [K-1]
  org = jnp.asarray(organism_idx)
  eta = (beta + b_org[org]) * agent_is_diff + u_org[org] + u_seed[jnp.asarray(seed_idx)]  # [N]
  obs = None if grades is None else jnp.asarray(grades, jnp.int32) - 1
  with numpyro.plate("answers", agent_is_diff.shape[0]):
    numpyro.sample("grade", dist.OrderedLogistic(eta, cutpoints), obs=obs)  # 0-based


def expected_grade(eta: Float[Array, "..."],  # noqa: F722 (jaxtyping shapes are no Python expressions)
                   cutpoints: Float[Array, "... C"]) -> Float[Array, "..."]:  # noqa: F722
  """E[y] = Σ_k k·P(y = k) on the 0-based scale (grade − 1) under OrderedLogistic(η, c), batched over draws."""
  # P(y ≥ k) = σ(η − c_{k−1}) = 1 − CDF, differenced from the upper tail: a small expected grade
  # (η far below c_0) stays accurate in float32 instead of being 1 − 0.9999999.
  above = jax.nn.sigmoid(eta[..., None] - cutpoints)  # [..., K-1]: P(y ≥ 1..K-1)
  ones, zeros = jnp.ones_like(above[..., :1]), jnp.zeros_like(above[..., :1])
  tail = jnp.concatenate([ones, above, zeros], axis=-1)  # [..., K+1]: P(y ≥ 0..K)
  p = tail[..., :-1] - tail[..., 1:]  # [..., K]: P(y = k)
  return jnp.sum(p * jnp.arange(p.shape[-1], dtype=p.dtype), axis=-1)


def _interval(draws: Any) -> dict[str, float]:
  """Posterior mean and 90% equal-tailed interval of 1-D draws."""
  x = np.asarray(draws, np.float64)
  lo, hi = np.quantile(x, [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2])
  return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi)}


def _bulk_ess(x: np.ndarray) -> np.ndarray:
  """Bulk ESS (Vehtari et al. 2021): ESS of the rank-normalised split chains; x is [chains, draws, P]."""
  from scipy.special import ndtri
  from scipy.stats import rankdata

  _, n, p = x.shape
  half = n // 2
  split = np.concatenate([x[:, :half], x[:, half:2 * half]], axis=0)  # [2C, N/2, P]
  r = rankdata(split.reshape(-1, p), axis=0)  # average ranks over all draws, per parameter
  z = ndtri((r - 0.375) / (r.shape[0] + 0.25)).reshape(split.shape)
  return np.asarray(effective_sample_size(z))


def _diagnostics(mcmc: MCMC) -> dict[str, Any]:
  """Max split R-hat and min bulk ESS over every latent scalar, and the number of divergent transitions."""
  by_chain = mcmc.get_samples(group_by_chain=True)
  r_hat, ess = [], []
  for site in LATENT_SITES:
    x = np.asarray(by_chain[site], np.float64)
    x = x.reshape(x.shape[0], x.shape[1], -1)  # [C, N, P]
    r_hat.append(np.asarray(split_gelman_rubin(x)).ravel())
    ess.append(_bulk_ess(x).ravel())
  diverging = np.asarray(mcmc.get_extra_fields()["diverging"])
  return {"max_r_hat": float(np.nanmax(np.concatenate(r_hat))), "min_ess_bulk": float(np.nanmin(np.concatenate(ess))),
          "divergences": int(diverging.sum())}


def validate(scores: pd.DataFrame, outcome: str) -> None:
  """Raises ValueError naming what is wrong with `scores` for comparing `outcome`, and how to fix it."""
  if outcome not in OUTCOMES:
    raise ValueError(f"outcome must be one of {list(OUTCOMES)}, got {outcome!r}")
  missing = [c for c in REQUIRED_COLUMNS if c not in scores.columns]
  if missing:
    raise ValueError(f"scores lacks column(s) {missing}: it needs {list(REQUIRED_COLUMNS)}, one row per graded "
                     "agent answer (rename or add the columns)")
  if len(scores) == 0:
    raise ValueError("scores has no rows: there are no graded answers to compare")
  used = ["organism", "scale", "agent", "seed", outcome]
  nan = [c for c in used if scores[c].isna().any()]
  if nan:
    raise ValueError(f"scores has NaN in column(s) {nan}: drop or regrade those rows before comparing")
  raw = scores[outcome]
  # Booleans would pass as 0/1 numbers; they are no grades.
  grades = (pd.Series(np.nan, index=raw.index) if pd.api.types.is_bool_dtype(raw)
            else pd.to_numeric(raw, errors="coerce"))
  bad = raw[grades.isna() | (grades != np.round(grades))]
  if len(bad):
    raise ValueError(f"grades in {outcome!r} must be integers 1..{NUM_CLASSES}; found non-integer values "
                     f"{sorted(map(str, bad.unique()))[:5]}: regrade or round them")
  out = sorted(int(g) for g in grades[(grades < 1) | (grades > NUM_CLASSES)].unique())
  if out:
    raise ValueError(f"grades in {outcome!r} must lie in 1..{NUM_CLASSES}; found {out[:5]}: grades are 1 (no "
                     f"valid information) to {NUM_CLASSES} (precise), regrade or clip them")
  agents = set(map(str, scores["agent"].unique()))
  unknown = sorted(agents - set(AGENTS))
  if unknown:
    raise ValueError(f"unknown agent type(s) {unknown}: agent must be 'diff' or 'blackbox'; filter the other rows "
                     "out first")
  if len(agents) < 2:
    raise ValueError(f"scores has only {min(agents)!r} agents: the comparison needs both 'diff' and "
                     "'blackbox' rows")


def _organism_keys(scores: pd.DataFrame) -> pd.Series:
  """The grouping unit of u_org: the organism name, with its scale when several scales are present."""
  # The same organism recipe at two scales is two different fine-tuned models, so two levels.
  if scores["scale"].nunique() > 1:
    return scores["organism"].astype(str) + " [" + scores["scale"].astype(str) + "]"
  return scores["organism"].astype(str)


def compare(scores: pd.DataFrame, outcome: str, *, num_warmup: int = 500, num_samples: int = 1000,
            num_chains: int = 2, rng_seed: int = 0) -> dict[str, Any]:
  """Fits the ordered-logistic model to `outcome`'s grades with NUTS; a JSON-able dict of β and grade-scale effects."""
  validate(scores, outcome)
  org_keys = _organism_keys(scores)
  org_idx, organisms = pd.factorize(org_keys, sort=True)
  seed_idx, seeds = pd.factorize(scores["seed"], sort=True)
  is_diff = (scores["agent"].astype(str) == "diff").to_numpy(np.float32)
  grades = pd.to_numeric(scores[outcome]).to_numpy().round().astype(np.int32)

  mcmc = MCMC(NUTS(ordered_logistic_model, target_accept_prob=0.9), num_warmup=num_warmup, num_samples=num_samples,
              num_chains=num_chains, chain_method="sequential", progress_bar=False)
  mcmc.run(jax.random.PRNGKey(rng_seed), is_diff, org_idx, seed_idx, len(organisms), len(seeds),
           num_classes=NUM_CLASSES, grades=grades, extra_fields=("diverging",))
  post = mcmc.get_samples()  # chains flattened: [S, ...]

  # Expected grade (0–4 scale) per draw, organism and agent type, at seed effect 0.
  agent = jnp.arange(len(AGENTS), dtype=jnp.float32)  # [A]: 0 blackbox, 1 diff
  slope = post["beta"][:, None] + post["b_org"]  # [S, O]: each organism's diff effect
  eta = slope[:, :, None] * agent[None, None, :] + post["u_org"][:, :, None]  # [S, O, A]
  e0 = np.asarray(expected_grade(eta, post["cutpoints"][:, None, None, :]), np.float64)  # [S, O, A]
  pooled = e0.mean(axis=1)  # [S, A]: averaged over the organisms present
  e_bb, e_diff = pooled[:, 0], pooled[:, 1]
  ratio = e_diff / np.maximum(e_bb, RATIO_FLOOR)
  beta = np.asarray(post["beta"], np.float64)

  per_organism = [{"organism": str(o), "agent": a, **_interval(e0[:, i, j] + 1)}
                  for i, o in enumerate(organisms) for j, a in enumerate(AGENTS)]
  observed = scores.assign(_g=pd.to_numeric(scores[outcome])).groupby(scores["agent"].astype(str))["_g"].mean()
  return {
      "outcome": outcome,
      "n": len(scores),
      "n_organisms": len(organisms),
      "n_seeds": len(seeds),
      "organisms": [str(o) for o in organisms],
      "interval": INTERVAL,
      "beta": _interval(beta),
      "p_beta_positive": float((beta > 0).mean()),
      "grade_difference": _interval(e_diff - e_bb),
      "grade_ratio_0to4": {**_interval(ratio), "median": float(np.median(ratio)),
                           "ratio_of_means": float(e_diff.mean() / max(e_bb.mean(), RATIO_FLOOR))},
      "expected_grade": {a: _interval(pooled[:, j] + 1) for j, a in enumerate(AGENTS)},
      "per_organism": per_organism,
      "observed_mean_grade": {a: float(observed[a]) for a in AGENTS},
      "diagnostics": {**_diagnostics(mcmc), "num_chains": num_chains, "num_warmup": num_warmup,
                      "num_samples": num_samples},
  }


def comparison_table(results: list[dict[str, Any]]) -> pd.DataFrame:
  """One row per (outcome, quantity): outcome, quantity, mean, lo, hi (the agents/comparison.parquet table)."""
  # grade_ratio_0to4's mean is the posterior mean of the per-draw ratio, which a draw with a tiny
  # blackbox grade can inflate; grade_ratio_of_means_0to4 (no interval) is the robust point estimate.
  rows = []
  for r in results:
    for q in ("beta", "grade_difference", "grade_ratio_0to4"):
      rows.append({"outcome": r["outcome"], "quantity": q, "mean": r[q]["mean"], "lo": r[q]["lo"], "hi": r[q]["hi"]})
    rows.append({"outcome": r["outcome"], "quantity": "grade_ratio_of_means_0to4",
                 "mean": r["grade_ratio_0to4"]["ratio_of_means"], "lo": math.nan, "hi": math.nan})
    rows.append({"outcome": r["outcome"], "quantity": "p_beta_positive", "mean": r["p_beta_positive"],
                 "lo": math.nan, "hi": math.nan})
  return pd.DataFrame(rows, columns=list(AGENT_COMPARISON_COLUMNS))


def plot(results: list[dict[str, Any]], path: Path) -> Path:
  """Per outcome: expected grade (mean, 90% interval) per organism and agent type, and the pooled difference."""
  colors = {"blackbox": "#7f7f7f", "diff": "#1f5fb4"}
  n_org = max(r["n_organisms"] for r in results)
  fig = figure((6.0 * len(results), 2.0 + 0.45 * n_org + 1.2))
  grid = fig.add_gridspec(2, len(results), height_ratios=[max(n_org, 1) + 1, 1.4])
  for col, r in enumerate(results):
    words = OUTCOME_WORDS.get(r["outcome"], r["outcome"])
    ax = fig.add_subplot(grid[0, col])
    y = {o: i for i, o in enumerate(r["organisms"])}
    for row in r["per_organism"]:
      off = 0.15 if row["agent"] == "diff" else -0.15
      yy = y[row["organism"]] + off
      ax.errorbar(row["mean"], yy, xerr=[[row["mean"] - row["lo"]], [row["hi"] - row["mean"]]], fmt="o",
                  color=colors[row["agent"]], ms=4, capsize=2,
                  label=row["agent"] if y[row["organism"]] == 0 else None)
    ax.set_yticks(range(len(r["organisms"])), r["organisms"])
    ax.set_ylim(len(r["organisms"]) - 0.5, -1.4)  # inverted, with a free row on top for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=len(AGENTS))
    ax.set_xlim(0.8, NUM_CLASSES + 0.2)
    ax.set_xticks(range(1, NUM_CLASSES + 1))
    ax.set_xlabel(f"expected grade (1 = no valid information, {NUM_CLASSES} = precise), 90% interval", fontsize=9)
    b = r["beta"]
    ax.set_title(f"{words}: β = {b['mean']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}], P(β>0) = {r['p_beta_positive']:.2f}",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)

    ax = fig.add_subplot(grid[1, col])
    d, q = r["grade_difference"], r["grade_ratio_0to4"]
    ax.errorbar(d["mean"], 0, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="s", color="#b30000",
                capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks([0], ["diff − blackbox"])
    ax.set_xlim(-(NUM_CLASSES - 1) - 0.2, NUM_CLASSES - 1 + 0.2)
    ax.set_xticks(range(-(NUM_CLASSES - 1), NUM_CLASSES))
    ax.set_xlabel(f"expected-grade difference, mean over organisms\n0–4-scale ratio diff/blackbox "
                  f"{q['ratio_of_means']:.2g}× (90% [{q['lo']:.2g}, {q['hi']:.2g}])", fontsize=9)
  return save_png(fig, path)


def simulate_grades(beta: float | dict[str, float], n_organisms: int, n_seeds: int, *, sigma_org: float = 0.5,
                    sigma_seed: float = 0.3, cutpoints: tuple[float, ...] = (-1.5, -0.5, 0.5, 1.5),
                    rng_seed: int = 0) -> pd.DataFrame:
  """Grades drawn from the model's generative process (numpy), one row per organism × agent × seed."""
  # Sampled as y* = η + ε, ε ~ Logistic(0, 1), y = #{k : c_k < y*}: P(y ≤ k) = σ(c_k − η), the
  # model's likelihood written independently of numpyro's OrderedLogistic.
  rng = np.random.default_rng(rng_seed)
  betas = beta if isinstance(beta, dict) else {o: float(beta) for o in OUTCOMES}
  c = np.asarray(cutpoints, np.float64)
  org, agent, seed = (a.ravel() for a in np.meshgrid(np.arange(n_organisms), np.arange(len(AGENTS)),
                                                     np.arange(n_seeds), indexing="ij"))
  frame = pd.DataFrame({"organism": [f"organism_{i}" for i in org], "scale": "simulated",
                        "agent": np.asarray(AGENTS)[agent], "seed": seed.astype(np.int64)})
  for outcome in OUTCOMES:  # each outcome its own organism and seed effects
    u_org = rng.normal(0.0, sigma_org, n_organisms)
    u_seed = rng.normal(0.0, sigma_seed, n_seeds)
    eta = betas[outcome] * agent + u_org[org] + u_seed[seed]
    latent = eta + rng.logistic(0.0, 1.0, eta.shape)
    frame[outcome] = 1 + (latent[:, None] > c[None, :]).sum(axis=1).astype(np.int64)
  return frame


__all__ = ["AGENTS", "OUTCOMES", "OUTCOME_WORDS", "compare", "comparison_table", "cutpoint_prior", "expected_grade",
           "ordered_logistic_model", "plot", "simulate_grades", "validate"]
