"""The one rule for numerical comparisons in the tests: a tolerance scaled to what is compared.

Floating-point results that should be equal differ by rounding, and rounding scales with the
magnitude of the *terms* that were summed, not with the result: a β of -0.0014 that is the
difference of sums reaching 7 carries the rounding of 7. So a comparison never uses a bare absolute
tolerance (wrong for large values) nor a relative one on each element (wrong for values that cancel
to near zero): `assert_close` allows

    |actual - reference| <= c · scale,   scale = max |reference| (or the magnitude the caller names)

over the whole compared array, with `c` from `rounding` (precision × √reduction length × depth ×
a safety factor) and a `what` saying what the comparison defends. The safety factor comes from
measuring the comparisons under other reduction orders (1 and 2 XLA threads, 8 host devices,
torch at 1 and 2 threads: `python -m tests.reduction_orders`, docs/testing.md); tests/test_tolerances.py
shows the tolerances still fail on the errors real bugs make.

Set NEURODIFF_TOL_LOG=FILE to append one JSON line per comparison (test, what, err/scale, c): how
close each comparison came to its tolerance in that run.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

# Unit roundoff (half the machine epsilon): the relative error of one rounding.
U32 = float(np.finfo(np.float32).eps) / 2  # 5.96e-8
U64 = float(np.finfo(np.float64).eps) / 2  # 1.11e-16
UBF16 = 2.0 ** -9  # bfloat16 keeps 8 significant bits: 1.95e-3


def rounding(n: int = 1, depth: int = 1, u: float = U32, safety: float = 4.0) -> float:
  """c for a result of `depth` chained stages, each a sum of about `n` terms, rounded with unit roundoff `u`.

  Rounding errors of a length-n sum grow like √n (random signs; n·u is the worst case, never seen
  in practice), and errors of chained stages add. `safety` covers the constants the model leaves out
  (a few roundings per term, the norm and softmax steps, two implementations each rounding).
  """
  if n < 1 or depth < 1:
    raise ValueError(f"rounding needs n >= 1 and depth >= 1, got n={n}, depth={depth}")
  return safety * u * math.sqrt(n) * depth


def assert_close(actual, reference, *, c: float, what: str, scale=None, err_msg: str = "") -> None:
  """Asserts |actual - reference| <= c · scale everywhere (scale: max |reference| unless given); NaN and inf must match.

  `scale` may be an array broadcast against the values: elementwise magnitudes, for results of a
  few operations that cannot cancel (a ratio, a product), where a relative tolerance is the right one.
  """
  a = np.asarray(actual, np.float64)
  r = np.asarray(reference, np.float64)
  if a.shape != r.shape and a.size != 1 and r.size != 1:
    raise AssertionError(f"{what}: shapes differ: {a.shape} vs reference {r.shape} {err_msg}".rstrip())
  a, r = np.broadcast_arrays(a, r)
  if not 0 < c < 1:
    raise ValueError(f"{what}: c={c} is not a relative tolerance in (0, 1)")
  fin = np.isfinite(r)
  odd = (np.isnan(a) != np.isnan(r)) | (np.isinf(a) != np.isinf(r)) | (np.isinf(r) & (a != r))
  if odd.any():
    idx = tuple(int(i) for i in np.argwhere(odd)[0])
    raise AssertionError(f"{what}: non-finite values differ, first at {idx}: {a[idx]} vs reference {r[idx]} "
                         f"{err_msg}".rstrip())
  if scale is None:
    scale = float(np.abs(r[fin]).max()) if fin.any() else 0.0
  scale = np.broadcast_to(np.asarray(scale, np.float64), a.shape)
  if not (scale >= 0).all():
    raise ValueError(f"{what}: scale must be a non-negative magnitude, got {scale.min()}")
  with np.errstate(divide="ignore", invalid="ignore"):
    diff = np.where(fin, np.abs(a - r), 0.0)
    ratios = np.where(diff == 0, 0.0, diff / scale)  # err/scale: compared with c
  ratio = float(ratios.max()) if ratios.size else 0.0
  _log(what, ratio, c)
  if ratio > c:
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratios)), ratios.shape))
    raise AssertionError(
        f"{what}: |actual - reference| = {diff[idx]:.3g} > c·scale = {c:.3g} · {scale[idx]:.3g} = "
        f"{c * scale[idx]:.3g} (err/scale {ratio:.3g} = {ratio / c:.3g} c) at {idx}: {a[idx]:.8g} vs reference "
        f"{r[idx]:.8g} {err_msg}".rstrip())


def _log(what: str, ratio: float, c: float) -> None:
  """Appends the comparison's err/scale and c to $NEURODIFF_TOL_LOG when set (see the module docstring)."""
  path = os.environ.get("NEURODIFF_TOL_LOG")
  if not path:
    return
  test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
  with open(path, "a") as f:
    f.write(json.dumps({"test": test, "what": what, "err_over_scale": ratio, "c": c}) + "\n")



def _widest(config) -> int:
  return max(config.hidden_size, config.intermediate_size)


def _layers(config) -> int:
  return getattr(config, "num_hidden_layers", None) or config.num_layers


def forward_c(config, after: int = 0, n: int = 1) -> float:
  """c for float32 logits against another implementation or shape of the same model (an HF or our config).

  Each block is one stage of sums over at most max(d, d_ff) terms, the embedding and head one more
  (depth L + 1); `after` further stages of sums of at most `n` terms (a softmax over V, a mean over
  tokens) add to it.
  """
  return rounding(n=max(_widest(config), n), depth=_layers(config) + 1 + after)


def residual_c(config, layer: int, after: int = 0, n: int = 1) -> float:
  """c for the residual after block `layer` (layer + 1 stages), then `after` stages of sums of at most `n` terms."""
  return rounding(n=max(_widest(config), n), depth=layer + 1 + after)


def kl_c(config) -> float:
  """c for a per-token KL(P ‖ Q) of two forwards, at the scale `kl_magnitude`: a log-softmax over V, then the KL's sum.

  The logits' own rounding is smaller than the log-softmax's at these scales (|logit| ≤ |log p| + log V).
  """
  return rounding(n=config.vocab_size, depth=2)


def kl_magnitude(lp_p, lp_q) -> np.ndarray:
  """Per token Σ_v P(v) (|log P(v)| + |log Q(v)|): the magnitude of the log-probs that KL(P ‖ Q) sums.

  A KL is a cross-entropy minus an entropy, so its rounding is that of the log-probs (about log V each
  for near-uniform random models), however small the KL itself.
  """
  lp_p, lp_q = np.asarray(lp_p, np.float64), np.asarray(lp_q, np.float64)
  return (np.exp(lp_p) * (np.abs(lp_p) + np.abs(lp_q))).sum(-1)
