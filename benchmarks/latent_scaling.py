"""Latent scaling of every latent in one pass, against a per-latent float64 loop and the reference's batched tensors.

Same data, same machine, same run (issue 16, item 7). A synthetic store (`write_arrays`, float32)
of N tokens from M = 2 models of width d, and a crosscoder with random parameters and m latents
(`init_params`, decoder rows rescaled per latent and model, a positive-ish `b_enc`, θ set to the
score quantile that gives ~k active latents per token; `--dead` latents can never fire). Timed:

  * ours, one pass    `latent_scaling(cc, store, layer)`: `run_pass` reads the store (prefetching
                      the next batch on a thread), one jitted step per batch runs the forward pass
                      and `LatentScaling.update` (four [B, d] × [d, m] products), float64 folds.
                      Beside it, the same `run_pass` with a forward-only accumulator (two scalar
                      sums, so XLA keeps the forward): their ratio is the cost of all βs as a
                      multiple of one crosscoder forward over the same tokens (target ≤ 2×).
                      `run_pass` jits a new step on every call, so each call compiles; the compile
                      seconds JAX reports are subtracted. `--reps` calls of each, alternated; medians.
  * ours, in memory   the same forward (`encode_inference` + `decode`) and the same
                      `LatentScaling.update` jitted over device-resident batches, no store: the
                      device-only cost, and the per-batch partial sums the precision replay uses.
  * per-latent loop   numpy float64, the obvious way: for each latent j, f_j = relu(x·W_enc[:, j] +
                      b_enc[j]) on the tokens where the float32 encoder fired (so every method
                      solves the same problem: a score within float32 rounding of θ could flip),
                      then for each model i and target y (x̂_i, x_i − x̂_i + f_j d_j^i, x_i) the
                      [N, d] arrays and β = ⟨f_j d, y⟩ / ‖f_j d‖² (closed-form dot products), or
                      `numpy.linalg.lstsq` on the flattened [N·d, 1] problem. x̂ comes once from
                      the float32 codes widened to float64 (a sparse product, timed as setup).
                      At m = 8192 this would take hours: `--loop-latents` latents are timed and
                      the time scaled to m.
  * reference method  the reference toolkit's closed-form scalars (science-of-finetuning/
                      diffing-toolkit, `latent_scaling/closed_form.py`), written again here in its
                      style in PyTorch (CPU, float32): one pass over the data per target (six),
                      each encoding every batch; for the reconstruction and activation targets
                      A += Yᵀ F[:, S]; for the error targets the [n, N_b, d] tensor of x_i − x̂_i
                      + f_j d_j^i for all n chosen latents is built by repeating x̂ and the
                      decoder rows, then a batched [d, N_b] × [N_b, 1] product per latent, at an
                      eighth of the batch size. Timed with all m latents on the first
                      `--ref-tokens` / `--ref-error-tokens` tokens of each pass, scaled to N.

All three agree on β for `--loop-latents` latents that fire (maximum relative error printed;
asserted ≤ 1e-4 against the float64 loop). The loop and the reference's check pass read the same
float32 codes (a separately jitted `encode_inference`, checked against the pass's firing counts):
torch's float32 encoder flips a few (token, latent) decisions whose score is within rounding of θ
(counted and printed), and one flip changes x̂ on its token and so every β^r there; the timed
reference passes use its own encoder.

Precision at 100M tokens (`--precision-tokens`): the per-batch float32 partial sums of the
in-memory pass (c2 = Σ f², rec, err) are resampled to 100M / batch batches and accumulated
(i) in one float32 running sum, (ii) as the library does (float32 for `--fold-every` batches,
then added into float64), (iii) in float64; printed: relative errors of the sums and of β, ν.

FLOPs (matmuls only): with U = 2·N·d·m one [N, d] × [d, m] product, a forward pass is 2·M U
(encode reads M·d inputs, decode writes M·d outputs) and latent scaling adds 4 U per model pair.
`--roofline-*` flags size the stated GPU estimate (printed as an estimate, never a measurement).

Run from the repository root:

  PYTHONPATH=. .venv/bin/python benchmarks/latent_scaling.py --quiet-wait 60  # defaults, ~3.5 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/latent_scaling.py --tokens 8192 --dict-size 1024 --loop-latents 4
  PYTHONPATH=. .venv/bin/python benchmarks/latent_scaling.py --tokens 262144 --dict-size 16384 --d-model 512
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import harness
import numpy as np

LAYER = 0
TARGETS = ("recon", "error", "act")


def make_data(tokens: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Paired activations x [N, 2, d] (original units) and the crosscoder's norm_scale [2] (powers of 2: exact)."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((tokens, d), dtype=np.float32)
  w = rng.standard_normal((tokens, d), dtype=np.float32)
  chat = 0.8 * z + 0.6 * w  # correlated models, as a base and its fine-tune are
  x = np.stack([2.0 * z, 4.0 * chat], axis=1)  # [N, 2, d]
  return x, np.array([0.5, 0.25], np.float32)


def make_crosscoder(x: np.ndarray, scale: np.ndarray, args: argparse.Namespace) -> Any:
  """A crosscoder with random parameters whose latents fire ~k times per token (θ from a score quantile)."""
  import jax
  import jax.numpy as jnp

  from neurodiff_jax.crosscoder.model import (
    Crosscoder,
    CrosscoderConfig,
    init_params,
    pre_activations,
    scores,
  )

  rng = np.random.default_rng(args.seed + 1)
  m, d = args.dict_size, args.d_model
  cfg = CrosscoderConfig(num_models=2, d_model=d, dict_size=m, sparsity=args.sparsity, k=args.k)
  p = init_params(jax.random.key(args.seed), cfg)
  p["w_dec"] = p["w_dec"] * jnp.asarray(rng.uniform(0.3, 3.0, size=(m, 2, 1)).astype(np.float32))
  p["b_dec"] = jnp.asarray(0.1 * rng.standard_normal((2, d)).astype(np.float32))
  sample = jnp.asarray(x[:min(len(x), 4096)] * scale[None, :, None])
  sigma = float(jnp.std(pre_activations(p, sample)))
  b = rng.uniform(0.0, 0.5, size=m).astype(np.float32) * sigma  # positive-ish: frequencies vary by latent
  b[:args.dead] = -1e4  # latents that never fire: β must come out NaN
  p["b_enc"] = jnp.asarray(b)
  theta = 0.0
  if args.sparsity == "batchtopk":
    s = np.asarray(scores(p, pre_activations(p, sample))).reshape(-1)
    theta = float(np.partition(s, len(s) - args.k * len(sample))[len(s) - args.k * len(sample)])
  return Crosscoder(cfg, p, theta, scale)


class ForwardOnly:
  """A `run_pass` accumulator that keeps only two scalar sums of the forward (so XLA cannot drop it)."""

  name = "forward_only"
  summed = ("f", "x_hat")

  def init(self) -> dict[str, np.ndarray]:
    """Two float32 zeros."""
    return {"f": np.zeros((), np.float32), "x_hat": np.zeros((), np.float32)}

  def specs(self) -> dict[str, Any]:
    """Replicated."""
    return {}

  def update(self, state: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Adds Σ f and Σ x̂ of the batch."""
    import jax.numpy as jnp

    return {"f": state["f"] + jnp.sum(ctx.f), "x_hat": state["x_hat"] + jnp.sum(ctx.x_hat)}

  def finalize(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sums."""
    return host


OTHERS: dict[str, tuple[float, float]] = {}  # section -> (CPU-s other processes or steal used, wall s)


class watch:
  """Records the CPU seconds other processes (and the hypervisor's steal) used during a section, in OTHERS.

  With `quiet_wait` > 0 it first waits (up to that many seconds) for the other processes to go idle.
  """

  quiet_wait = 0.0

  def __init__(self, name: str):
    self.name = name

  def __enter__(self) -> None:
    if self.quiet_wait > 0:
      harness.wait_quiet(self.quiet_wait)
    self.busy, self.own, self.start = harness.busy_cpu_s(), harness.own_cpu_s(), time.perf_counter()

  def __exit__(self, *exc: object) -> None:
    OTHERS[self.name] = (harness.others_cpu_s(self.busy, self.own), time.perf_counter() - self.start)


def timed_pass(fn: Any, compile_s: list[float]) -> tuple[Any, float, float]:
  """(result, wall seconds, compile seconds JAX reported during the call)."""
  compile_s.clear()
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start, sum(compile_s)


def ours_in_memory(cc: Any, xn: np.ndarray, batch: int, compile_s: list[float]) -> dict[str, Any]:
  """Device-only timings over all batches: the jitted forward, and forward + LatentScaling.update (per-batch sums)."""
  import jax
  import jax.numpy as jnp

  from neurodiff_jax.analysis.latent_scaling import LatentScaling
  from neurodiff_jax.analysis.stream import HIGHEST, Context
  from neurodiff_jax.crosscoder.model import decode, encode_inference

  cfg = cc.cfg
  params = {k: jnp.asarray(v, jnp.float32) for k, v in cc.params.items()}
  theta = jnp.float32(cc.theta)
  n = len(xn) // batch
  batches = [jax.device_put(xn[i * batch:(i + 1) * batch]) for i in range(n)]
  acc = LatentScaling(cc)
  zero = jax.device_put(acc.init())
  valid, token = jnp.ones(batch, bool), jnp.arange(batch, dtype=jnp.int32)
  kind, key = jnp.zeros(batch, jnp.int32), jax.random.key(0)

  def forward(params, theta, x):
    f = encode_inference(params, x, cfg, theta, precision=HIGHEST)  # [B, m]
    x_hat = decode(params, f, precision=HIGHEST)  # [B, M, d]
    return f, x_hat

  @jax.jit
  def fwd(params, theta, x):
    f, x_hat = forward(params, theta, x)
    return jnp.sum(f), jnp.sum(x_hat)

  @jax.jit
  def ls(params, theta, state, x):
    f, x_hat = forward(params, theta, x)
    ctx = Context(x=x, f=f, x_hat=x_hat, valid=valid, token=token, kind=kind, key=key, params=params)
    return acc.update(state, ctx)

  out: dict[str, Any] = {"batches": n}
  for name, call in (("forward", lambda x: fwd(params, theta, x)), ("ls", lambda x: ls(params, theta, zero, x))):
    compile_s.clear()
    jax.block_until_ready(call(batches[0]))
    out[f"{name}_compile_s"] = sum(compile_s)
    times, parts = [], []
    for x in batches:
      start = time.perf_counter()
      r = jax.block_until_ready(call(x))
      times.append(time.perf_counter() - start)
      if name == "ls":
        parts.append(jax.device_get(r))
    out[f"{name}_times"] = times
    if parts:
      out["partials"] = {k: np.stack([p[k] for p in parts]) for k in parts[0]}  # [batches, ...] float32
  return out


def float32_codes(cc: Any, xn: np.ndarray, batch: int) -> Any:
  """The crosscoder's float32 codes (jitted encode_inference, HIGHEST) as a float64 scipy CSC matrix [N, m]."""
  import jax
  import jax.numpy as jnp
  import scipy.sparse

  from neurodiff_jax.analysis.stream import HIGHEST
  from neurodiff_jax.crosscoder.model import encode_inference

  params = {k: jnp.asarray(v, jnp.float32) for k, v in cc.params.items()}
  enc = jax.jit(lambda p, t, x: encode_inference(p, x, cc.cfg, t, precision=HIGHEST))
  rows, cols, vals = [], [], []
  for lo in range(0, len(xn), batch):
    f = np.asarray(enc(params, jnp.float32(cc.theta), xn[lo:lo + batch]))
    r, c = np.nonzero(f)
    rows.append(r + lo)
    cols.append(c)
    vals.append(f[r, c].astype(np.float64))
  shape = (len(xn), cc.cfg.dict_size)
  return scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape).tocsc()


def loop_betas(j: int, x64: np.ndarray, xh64: np.ndarray, codes: Any, w_enc: np.ndarray, b_enc: np.ndarray,
               w_dec: np.ndarray, solver: str) -> dict[str, np.ndarray]:
  """β of latent j for every target and model (base, chat), the straightforward float64 way ({target: [2]})."""
  n = len(x64)
  fire = np.zeros(n, bool)
  fire[codes.indices[codes.indptr[j]:codes.indptr[j + 1]]] = True  # where the float32 encoder fired
  a = x64.reshape(n, -1) @ w_enc[:, j] + b_enc[j]  # [N]
  f = np.where(fire, np.maximum(a, 0.0), 0.0)
  d = w_dec[j, 1]  # the chat decoder row: the direction for both models
  pred = f[:, None] * d[None, :]  # [N, d]
  denom = np.sum(pred * pred)
  out = {t: np.zeros(2) for t in TARGETS}
  for i in (0, 1):
    targets = {"recon": xh64[:, i], "error": x64[:, i] - xh64[:, i] + f[:, None] * w_dec[j, i][None, :],
               "act": x64[:, i]}
    for t, y in targets.items():
      if solver == "lstsq":
        out[t][i] = np.linalg.lstsq(pred.reshape(-1, 1), y.reshape(-1), rcond=None)[0][0]
      else:
        out[t][i] = np.sum(pred * y) / denom
  return out


def time_loop(sample: np.ndarray, x64: np.ndarray, xh64: np.ndarray, codes: Any, w_enc: np.ndarray,
              b_enc: np.ndarray, w_dec: np.ndarray, lstsq_latents: int) -> tuple[dict, list, list, float]:
  """The loop's βs of `sample` ({target: [2, s]}), seconds per latent (closed form, lstsq), and lstsq's difference."""
  loop = {t: np.zeros((2, len(sample))) for t in TARGETS}
  loop_times: list[float] = []
  for c, j in enumerate(sample):
    start = time.perf_counter()
    b = loop_betas(int(j), x64, xh64, codes, w_enc, b_enc, w_dec, "dot")
    loop_times.append(time.perf_counter() - start)
    for t in TARGETS:
      loop[t][:, c] = b[t]
  lstsq_times, lstsq_err = [], 0.0
  for c, j in enumerate(sample[:lstsq_latents]):
    start = time.perf_counter()
    b = loop_betas(int(j), x64, xh64, codes, w_enc, b_enc, w_dec, "lstsq")
    lstsq_times.append(time.perf_counter() - start)
    lstsq_err = max([lstsq_err] + [float(rel_err(b[t], loop[t][:, c]).max()) for t in TARGETS])
  return loop, loop_times, lstsq_times, lstsq_err


class Reference:
  """The reference toolkit's closed-form scalars, in its style (PyTorch, float32, one [n, N_b, d] tensor per batch)."""

  def __init__(self, cc: Any, sparsity: str, k: int):
    import torch

    self.torch = torch
    p = {name: torch.from_numpy(np.asarray(v, np.float32).copy()) for name, v in cc.params.items()}
    m, num_models, d = p["w_dec"].shape
    self.w_enc = p["w_enc"].reshape(num_models * d, m)  # [M·d, m]
    self.b_enc = p["b_enc"]
    self.w_dec = p["w_dec"]  # [m, M, d]
    self.w_dec_flat = p["w_dec"].reshape(m, num_models * d)
    self.b_dec = p["b_dec"]
    self.norms = p["w_dec"].norm(dim=-1).sum(-1)  # [m]: the score weight
    self.theta, self.sparsity, self.k = float(cc.theta), sparsity, k

  def encode(self, x: Any) -> Any:
    """Inference codes [N_b, m] (threshold θ, or top-k per token)."""
    torch = self.torch
    a = x.reshape(x.shape[0], -1) @ self.w_enc + self.b_enc
    relu = torch.relu(a)
    s = relu * self.norms
    if self.sparsity == "batchtopk":
      return torch.where(s > self.theta, relu, 0.0)
    cut = torch.topk(s, self.k, dim=-1).values[:, -1:]
    return torch.where((s >= cut) & (s > 0), relu, 0.0)

  def decode(self, f: Any) -> Any:
    """x̂ [N_b, M, d] (decoder bias included)."""
    return (f @ self.w_dec_flat).reshape(f.shape[0], *self.b_dec.shape) + self.b_dec

  @staticmethod
  def remove_latents(act: Any, f_sel: Any, vecs: Any) -> Any:
    """[n, N_b, d]: act with each chosen latent's own part taken out, one copy of the batch per latent."""
    n, N = vecs.shape[0], act.shape[0]
    stacked = act.unsqueeze(0).repeat(n, 1, 1)  # [n, N_b, d]
    vecs_rep = vecs.unsqueeze(1).repeat(1, N, 1)  # [n, N_b, d]
    return stacked - vecs_rep * f_sel.T.unsqueeze(-1)  # [n, N_b, d]

  def target(self, name: str, x: Any, f: Any, x_hat: Any, idx: Any) -> Any:
    """The target of `name` ("{recon,error,act}_{0,1}"): [N_b, d], or [n, N_b, d] for the error targets."""
    kind, i = name.rsplit("_", 1)
    i = int(i)
    if kind == "recon":
      return x_hat[:, i]
    if kind == "act":
      return x[:, i]
    return x[:, i] - self.remove_latents(x_hat[:, i], f[:, idx], self.w_dec[idx, i])

  def closed_form(self, idx: Any, x: Any, batch: int, names: list[str], tokens: int,
                  codes: Any = None) -> dict[str, Any]:
    """β of latents `idx` for each target in `names` over tokens [0, tokens) of x, batch by batch; and counts.

    With `codes` (a scipy CSR [N, m]) the batch's codes are read from it instead of encoded, and
    `flips` counts the (token, latent) firing decisions its own encoder would have taken otherwise.
    """
    torch = self.torch
    flips = 0
    vecs = self.w_dec[idx, 1]  # [n, d]: the chat rows
    n, d = vecs.shape
    A = {t: torch.zeros(d, n) for t in names}
    C, count = torch.zeros(n), torch.zeros(n)
    for lo in range(0, tokens, batch):
      xb = x[lo:min(lo + batch, tokens)]
      f = self.encode(xb)
      if codes is not None:
        given = torch.from_numpy(codes[lo:lo + len(xb)].toarray().astype(np.float32))
        flips += int(((f != 0) != (given != 0)).sum())
        f = given
      x_hat = self.decode(f)
      f_sel = f[:, idx]  # [N_b, n]
      active = (f_sel != 0).sum(0)
      count += active
      mask = active > 0
      for t in names:
        y = self.target(t, xb, f, x_hat, idx)
        if y.ndim == 3:  # one target per latent: [n_active, d, N_b] x [n_active, N_b, 1]
          up = torch.bmm(y[mask].transpose(1, 2), f_sel[:, mask].T.unsqueeze(-1)).squeeze(-1).T
        else:
          up = y.T @ f_sel[:, mask]
        A[t][:, mask] += up
      C[mask] += (f_sel[:, mask] ** 2).sum(0)
    D = (vecs ** 2).sum(1)
    out = {t: ((A[t].T * vecs).sum(1) / (C * D)).numpy().astype(np.float64) for t in names}
    out["count"], out["flips"] = count.numpy(), flips
    return out


def time_reference(ref: Reference, xt: Any, names: list[str], args: argparse.Namespace) -> dict[str, float]:
  """Seconds of each of the reference's passes (one per target, all m latents), timed on a sample, scaled to N."""
  import torch

  every = torch.arange(args.dict_size)
  n = len(xt)
  out = {}
  for t in names:
    err = t.startswith("error")
    batch = args.ref_batch // 8 if err else args.ref_batch
    tokens = min(n, args.ref_error_tokens if err else args.ref_tokens)
    ref.closed_form(every, xt, batch, [t], batch)  # warm-up batch
    start = time.perf_counter()
    ref.closed_form(every, xt, batch, [t], tokens)
    out[t] = (time.perf_counter() - start) / tokens * n
  return out


def secs(v: float) -> str:
  """Seconds for a table cell: whole above 100, one decimal above 10, else two."""
  return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
  """|got − want| / |want| (elementwise)."""
  return np.abs(got - want) / np.maximum(np.abs(want), 1e-300)


def precision_replay(partials: dict[str, np.ndarray], acc: Any, batches: int, fold_every: int,
                     seed: int) -> dict[str, dict[str, float]]:
  """Relative errors of a float32 running sum and of float32-then-float64 folds over `batches` resampled batches."""
  rng = np.random.default_rng(seed)
  real = len(partials["c2"])
  pick = rng.integers(0, real, size=batches)
  keys = ("c2", "rec", "err")
  flat = np.concatenate([partials[k].reshape(real, -1) for k in keys], axis=1).astype(np.float32)  # [real, F]
  exact = np.bincount(pick, minlength=real).astype(np.float64) @ flat.astype(np.float64)  # exact to ~1e-16
  naive = np.zeros(flat.shape[1], np.float32)
  folded, window = np.zeros(flat.shape[1], np.float64), np.zeros(flat.shape[1], np.float32)
  for t, b in enumerate(pick):
    naive += flat[b]
    window += flat[b]
    if (t + 1) % fold_every == 0:
      folded += window
      window[:] = 0.0
  folded += window
  count = partials["count"].sum(0).astype(np.int64)  # finalize reads only whether a latent fired

  def unflat(v: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {"count": count}, 0
    for k in keys:
      size = partials[k][0].size
      out[k] = v[at:at + size].reshape(partials[k].shape[1:]).astype(np.float64)
      at += size
    return out

  res = {name: acc.finalize(unflat(v)) for name, v in (("naive", naive), ("folded", folded), ("exact", exact))}
  live = np.asarray(res["exact"]["c2"] > 0)
  table: dict[str, dict[str, float]] = {}
  for name in ("naive", "folded"):
    row = {"c2": rel_err(np.asarray(res[name]["c2"])[live], res["exact"]["c2"][live])}
    for t in TARGETS:
      row[f"beta_{t}"] = rel_err(res[name][f"beta_{t}"][..., live], res["exact"][f"beta_{t}"][..., live])
    for t in ("recon", "error"):
      row[f"nu_{t}"] = rel_err(res[name][f"nu_{t}"][..., live], res["exact"][f"nu_{t}"][..., live])
    table[name] = {f"{k} {s}": float(f(v)) for k, v in row.items() for s, f in (("max", np.max),
                                                                                ("median", np.median))}
  return table


def gemma_estimate(tokens: float, d: int, m: int, tflops: float, hbm_tbs: float, ref_latents: int,
                   ref_batch: int) -> list[str]:
  """Stated roofline estimates (FLOPs / peak, bytes / bandwidth) at Gemma 2 2B scale; never measurements."""
  unit = 2.0 * tokens * d * m  # one [N, d] x [d, m] product
  fwd, ls = 4 * unit, 8 * unit
  per_token_tensor = ref_latents * d * 4  # one (n, ·, d) float32 row per token
  ref_bytes = 6 * 2 * per_token_tensor * tokens  # six tensors of that shape per error target, written and read
  return [
      (f"one [N, d] x [d, m] product U = {unit:.3g} FLOP; forward 4 U = {fwd:.3g}; forward + latent scaling "
       f"8 U = {ls:.3g} FLOP"),
      (f"at {tflops:g} TFLOP/s: forward {fwd / tflops / 1e12 / 3600:.2f} h, the whole latent-scaling pass "
       f"{ls / tflops / 1e12 / 3600:.2f} h (the extra [4, m, d] product per batch is "
       f"{4 * m * d * 4 / 2**30:.1f} GiB, written and read once per batch: negligible beside the FLOPs)"),
      (f"reference error target, n = {ref_latents:,} latents: one (n, N_b, d) float32 tensor is "
       f"{per_token_tensor * ref_batch / 2**30:.2f} GiB at N_b = {ref_batch}; six of them per batch and target "
       f"move ≈ {ref_bytes / 1e15:.1f} PB over {tokens:.3g} tokens, ≈ {ref_bytes / hbm_tbs / 1e12 / 3600:.1f} h "
       f"per error target at {hbm_tbs:g} TB/s"),
  ]


def main(argv: list[str] | None = None) -> None:
  """Parses flags, builds the store and crosscoder, times every method on them and prints the tables."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=65_536, help="N tokens in the store")
  parser.add_argument("--d-model", type=int, default=256, help="width d per model")
  parser.add_argument("--dict-size", type=int, default=8192, help="latents m")
  parser.add_argument("--k", type=int, default=32, help="active latents per token (θ is set to give this)")
  parser.add_argument("--sparsity", choices=("batchtopk", "topk"), default="batchtopk")
  parser.add_argument("--dead", type=int, default=8, help="latents made unable to fire (their β must be NaN)")
  parser.add_argument("--batch", type=int, default=4096, help="tokens per step of our pass")
  parser.add_argument("--fold-every", type=int, default=64, help="batches summed in float32 before a float64 fold")
  parser.add_argument("--loop-latents", type=int, default=16, help="latents timed in the float64 loop (and compared)")
  parser.add_argument("--lstsq-latents", type=int, default=2, help="of those, timed again with numpy.linalg.lstsq")
  parser.add_argument("--ref-batch", type=int, default=128, help="reference batch (its default; error targets: /8)")
  parser.add_argument("--ref-tokens", type=int, default=4096, help="tokens timed per reference recon/act pass")
  parser.add_argument("--ref-error-tokens", type=int, default=256, help="tokens timed per reference error pass")
  parser.add_argument("--ref-check-batch", type=int, default=1024, help="batch of the reference's check pass")
  parser.add_argument("--precision-tokens", type=float, default=1e8, help="tokens of the accumulation replay")
  parser.add_argument("--threads", type=int, default=2, help="CPUs to pin to (XLA, torch and numpy)")
  parser.add_argument("--roofline-tflops", type=float, default=51.2,
                      help="float32 matmul rate of the GPU estimate (51.2: the H200 measured in train_step's table)")
  parser.add_argument("--roofline-hbm-tbs", type=float, default=4.8, help="HBM bandwidth of the estimate (H200)")
  parser.add_argument("--reps", type=int, default=2, help="store passes of each kind (the median is reported)")
  parser.add_argument("--quiet-wait", type=float, default=0.0,
                      help="wait up to this many seconds before each timed section for other processes to go idle")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.tokens % args.batch or args.tokens // args.batch < 1:
    parser.error("--tokens must be a positive multiple of --batch (the in-memory pass times whole batches).")
  for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[name] = str(args.threads)
  cpus = harness.pin(args.threads)  # before XLA starts: it sizes its pool from the affinity mask
  watch.quiet_wait = args.quiet_wait

  import jax
  import torch

  from neurodiff_jax.activations.store import write_arrays
  from neurodiff_jax.analysis.latent_scaling import LatentScaling, latent_scaling
  from neurodiff_jax.analysis.stream import run_pass

  torch.set_num_threads(args.threads)
  torch.set_grad_enabled(False)
  compile_s = harness.compile_seconds()
  N, d, m, B = args.tokens, args.d_model, args.dict_size, args.batch
  unit = 2.0 * N * d * m
  print(f"N={N:,} tokens, M=2 models, d={d}, m={m:,} latents, {args.sparsity} k={args.k}, batch {B}, "
        f"{args.threads} thread(s) on CPUs {cpus}; jax {jax.default_backend()}", flush=True)

  x, scale = make_data(N, d, args.seed)
  xn = x * scale[None, :, None]  # normalised: what every method works in
  cc = make_crosscoder(x, scale, args)
  with tempfile.TemporaryDirectory(prefix="bench_latent_scaling_") as tmp:
    start = time.perf_counter()
    store = write_arrays(os.path.join(tmp, "store"), {LAYER: x}, dtype="float32", roles=("base", "chat"))
    print(f"store written in {time.perf_counter() - start:.1f} s", flush=True)
    opts = {"batch_size": B, "exclude": (), "progress": False, "fold_every": args.fold_every}
    passes: dict[str, list[tuple[float, float]]] = {"ls": [], "forward": []}  # (wall, compile) per call
    for rep in range(args.reps):  # alternated, so that a busy spell on the machine hits both
      with watch(f"latent_scaling pass {rep + 1}"):
        res, wall, comp = timed_pass(lambda: latent_scaling(cc, store, LAYER, **opts), compile_s)
      passes["ls"].append((wall, comp))
      with watch(f"forward-only pass {rep + 1}"):
        _, fw, fw_comp = timed_pass(lambda: run_pass(cc, store, LAYER, [ForwardOnly()], **opts), compile_s)
      passes["forward"].append((fw, fw_comp))
      print(f"ours, through the store: latent_scaling {wall:.1f} s (compile {comp:.1f} s), forward-only pass "
            f"{fw:.1f} s (compile {fw_comp:.1f} s)", flush=True)
  ls_wall, ls_compile = (harness.median([p[i] for p in passes["ls"]]) for i in (0, 1))
  fw_compile = harness.median([p[1] for p in passes["forward"]])

  with watch("in memory"):
    mem = ours_in_memory(cc, xn, B, compile_s)
  mem_fwd, mem_ls = sum(mem["forward_times"]), sum(mem["ls_times"])
  print(f"ours in memory: forward {mem_fwd:.1f} s, forward + LatentScaling.update {mem_ls:.1f} s", flush=True)

  count = np.asarray(res["count"])
  live = np.flatnonzero(count > 0)
  dead = np.flatnonzero(count == 0)
  dead_nan = all(np.isnan(res[f"beta_{t}"][0][:, dead]).all() for t in TARGETS)
  rng = np.random.default_rng(args.seed + 2)
  sample = np.sort(rng.choice(live, size=min(args.loop_latents, len(live)), replace=False))

  # Per-latent float64 loop.
  start = time.perf_counter()
  codes = float32_codes(cc, xn, B)
  codes_s = time.perf_counter() - start
  code_counts = np.diff(codes.indptr)
  start = time.perf_counter()
  x64 = xn.astype(np.float64)
  w_dec = np.asarray(cc.params["w_dec"], np.float64)
  w_enc = np.asarray(cc.params["w_enc"], np.float64).reshape(2 * d, m)
  b_enc = np.asarray(cc.params["b_enc"], np.float64)
  xh64 = np.asarray(codes @ w_dec.reshape(m, 2 * d)).reshape(N, 2, d) + np.asarray(cc.params["b_dec"], np.float64)
  setup_s = time.perf_counter() - start
  with watch("loop"):
    loop, loop_times, lstsq_times, lstsq_err = time_loop(sample, x64, xh64, codes, w_enc, b_enc, w_dec,
                                                         args.lstsq_latents)
  loop_per = harness.median(loop_times)
  loop_total = codes_s + setup_s + loop_per * m
  lstsq_per = harness.median(lstsq_times) if lstsq_times else float("nan")
  lstsq_total = codes_s + setup_s + lstsq_per * m
  print(f"loop: {loop_per:.2f} s per latent (closed form), {lstsq_per:.2f} s (lstsq); setup {codes_s + setup_s:.1f} s",
        flush=True)

  # The reference's batched-tensor method: timed on all m latents over a sample of tokens, scaled to N.
  ref = Reference(cc, args.sparsity, args.k)
  xt = torch.from_numpy(xn)
  names = [f"{t}_{i}" for t in ("error", "recon", "act") for i in (0, 1)]
  with watch("reference"):
    ref_times = time_reference(ref, xt, names, args)
  ref_total = sum(ref_times.values())
  err_batch = args.ref_batch // 8
  tensor_bytes = m * err_batch * d * 4
  print(f"reference: {ref_total:.0f} s scaled to N (error targets {ref_times['error_0'] + ref_times['error_1']:.0f} s)",
        flush=True)
  start = time.perf_counter()
  check = ref.closed_form(torch.from_numpy(sample), xt, args.ref_check_batch, names, N, codes=codes.tocsr())
  check_s = time.perf_counter() - start

  # Agreement on the sampled latents, against the float64 loop.
  ours_err = max(float(rel_err(res[f"beta_{t}"][0][:, sample], loop[t]).max()) for t in TARGETS)
  ref_err = max(float(rel_err(np.stack([check[f"{t}_0"], check[f"{t}_1"]]), loop[t]).max()) for t in TARGETS)
  code_diff = int(np.abs(code_counts - count).sum())

  table = precision_replay(mem["partials"], LatentScaling(cc), round(args.precision_tokens / B),
                           args.fold_every, args.seed + 3)

  # Report.
  ls_run = harness.median([w - c for w, c in passes["ls"]])
  fw_run = harness.median([w - c for w, c in passes["forward"]])
  fwd_ref = fw_run
  rows = [
      ["ours: `latent_scaling` (store, one pass, all βs)", "all m, N", secs(ls_run), f"{ls_run / fwd_ref:.2f}×",
       "—"],
      ["ours: `run_pass`, forward only (store)", "all m, N", secs(fw_run), "1.00×", "—"],
      ["ours in memory: forward + `LatentScaling.update`", "all m, N", secs(mem_ls),
       f"{mem_ls / mem_fwd:.2f}× (in memory)", "—"],
      ["ours in memory: jitted forward (encode + decode)", "all m, N", secs(mem_fwd), "—", "—"],
      ["per-latent loop, numpy float64, closed form", f"{len(sample)} latents, scaled to m", secs(loop_total),
       f"{loop_total / fwd_ref:,.0f}×", f"**{loop_total / ls_run:,.0f}×**"],
      ["per-latent loop, numpy float64, `lstsq`", f"{len(lstsq_times)} latents, scaled to m", secs(lstsq_total),
       f"{lstsq_total / fwd_ref:,.0f}×", f"**{lstsq_total / ls_run:,.0f}×**"],
      ["reference method (PyTorch, 6 passes, [n, N_b, d] error targets)",
       f"{args.ref_error_tokens}/{args.ref_tokens} tokens per pass, scaled to N", secs(ref_total),
       f"{ref_total / fwd_ref:,.1f}×", f"**{ref_total / ls_run:,.1f}×**"],
  ]
  print(f"\n{harness.machine()}\n")
  print(harness.markdown_table(["method", "measured on", "s for all m latents over N tokens",
                                "× one forward pass", "ours is faster by"], rows))
  flops_ls, flops_fw = 8 * unit, 4 * unit
  print(f"\n- compile: latent_scaling {ls_compile:.1f} s, forward-only pass {fw_compile:.1f} s, in-memory forward "
        f"{mem['forward_compile_s']:.1f} s, in-memory forward + update {mem['ls_compile_s']:.1f} s; with compile "
        f"our pass takes {ls_wall:.1f} s (loop {loop_total / ls_wall:,.0f}×, lstsq loop "
        f"{lstsq_total / ls_wall:,.0f}×, reference {ref_total / ls_wall:,.1f}× slower)")
  print("- through the store, w/o compile, per call: latent_scaling "
        + ", ".join(f"{w - c:.1f}" for w, c in passes["ls"]) + " s; forward only "
        + ", ".join(f"{w - c:.1f}" for w, c in passes["forward"]) + " s; ratios "
        + ", ".join(f"{(a[0] - a[1]) / (b[0] - b[1]):.2f}×" for a, b in zip(passes["ls"], passes["forward"])))
  print(f"- FLOPs (matmuls): U = 2·N·d·m = {harness.flops(unit)}FLOP; forward 4 U = {harness.flops(flops_fw)}FLOP, "
        f"with latent scaling 8 U = {harness.flops(flops_ls)}FLOP; in memory: forward "
        f"{harness.flops(flops_fw / mem_fwd)}FLOP/s, forward + update {harness.flops(flops_ls / mem_ls)}FLOP/s; "
        f"through the store: {harness.flops(flops_ls / ls_run)}FLOP/s")
  print(f"- in-memory per batch: forward {harness.spread(mem['forward_times'], 'batches')}; forward + update "
        f"{harness.spread(mem['ls_times'], 'batches')}")
  print(f"- loop: codes from the float32 encoder {codes_s:.1f} s, x̂ in float64 {setup_s:.1f} s (setup, counted "
        f"once); closed form {harness.spread(loop_times, 'latents')}; lstsq {harness.spread(lstsq_times, 'latents')} "
        f"(max relative difference lstsq vs closed form {lstsq_err:.1e})")
  print("- reference per pass, scaled to N: " + ", ".join(f"{t} {s:,.0f} s" for t, s in ref_times.items())
        + f"; its error target holds one [{m}, {err_batch}, {d}] float32 tensor per copy = "
        f"{tensor_bytes / 2**20:,.0f} MiB (six such tensors per batch, four alive at once: "
        f"~{4 * tensor_bytes / 2**20:,.0f} MiB); its check pass (the {len(sample)} sampled latents, six targets, "
        f"batch {args.ref_check_batch}) {check_s:.1f} s")
  print(f"- agreement on {len(sample)} sampled live latents (latents {sample.tolist()}): max relative error of "
        f"β vs the float64 loop: ours {ours_err:.2e}, reference {ref_err:.2e}; firing counts of the codes the loop "
        f"and the reference's check read vs our pass: {code_diff} differences over all latents; the reference's own "
        f"torch encoder would have flipped {check['flips']} (token, latent) decisions of those codes")
  print("- CPU-s other processes (or steal) used while timing: " + ", ".join(
      f"{k} {o:.1f} in {w:.0f} s" for k, (o, w) in OTHERS.items()))
  print(f"- live latents {len(live)}, dead {len(dead)} (β NaN for all of them: {dead_nan}); mean active per token "
        f"{count.sum() / N:.1f}")
  print(f"\nAccumulation over {args.precision_tokens:.3g} tokens = {round(args.precision_tokens / B):,} batches "
        f"of {B} (per-batch float32 partial sums of the in-memory pass, resampled); relative error vs float64:\n")
  keys = [k for k in table["naive"] if k.endswith("max")] + ["beta_error median", "beta_recon median"]
  print(harness.markdown_table(["accumulation"] + keys, [
      [{"naive": "float32 running sum", "folded": f"float32 × {args.fold_every} batches, float64 folds (ours)"}[n]]
      + [f"{table[n][k]:.1e}" for k in keys] for n in ("naive", "folded")]))
  print("\nRoofline estimate at Gemma 2 2B scale (d = 2304, m = 73,728, 100M tokens; not a measurement):")
  for line in gemma_estimate(1e8, 2304, 73_728, args.roofline_tflops, args.roofline_hbm_tbs, 73_728, 16):
    print(f"- {line}")
  for line in gemma_estimate(1e8, 2304, 73_728, args.roofline_tflops, args.roofline_hbm_tbs, 5000, 16)[2:]:
    print(f"- {line}")

  assert dead_nan, "a latent that never fired has a finite β"
  assert ours_err <= 1e-4, f"our β differs from the float64 loop by {ours_err:.2e} > 1e-4"
  assert ref_err <= 1e-4, f"the reference's β differs from the float64 loop by {ref_err:.2e} > 1e-4"
  assert lstsq_err <= 1e-6 or not lstsq_times, f"lstsq and the closed form differ by {lstsq_err:.2e}"


if __name__ == "__main__":
  main()
