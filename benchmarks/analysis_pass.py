"""What each accumulator of the analysis pass costs, as a multiple of the crosscoder's forward pass alone.

  PYTHONPATH=. python benchmarks/analysis_pass.py                      # d 256, m 8192, 65,536 tokens
  PYTHONPATH=. python benchmarks/analysis_pass.py --dict-size 16384 --tokens 32768

Same synthetic store and crosscoder for every row (random parameters, BatchTopK with θ set for
about k active latents per token); each row is one `run_pass` over the whole store, the fastest of
`--repeats` calls after one that compiles. Rows: the forward only (an accumulator that adds nothing),
`LatentStats` (counts, mass, template share, max), `TopExamples` (top-k and the bottom-k hash
sample, per batch `lax.top_k` over [m, B] twice), `LatentScaling`, `ActivationHistogram`, and all four (what
`launch.analyze` runs). An accumulator that does not read the reconstruction (`LatentStats`,
`TopExamples`, `ActivationHistogram` alone) lets XLA drop the decoder, so those rows can be cheaper than the
forward pass; the last row is the one to read. `ActivationHistogram` (issue 26) bins every code of every token:
a bin index per code and one scatter-add per batch. The state of `TopExamples` is [m, top_k + sample_size] whatever
the tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from neurodiff_jax.activations.store import write_arrays
from neurodiff_jax.analysis.examples import ActivationHistogram, LatentStats, TopExamples
from neurodiff_jax.analysis.latent_scaling import LatentScaling
from neurodiff_jax.analysis.stream import Accumulator, run_pass
from neurodiff_jax.crosscoder.model import Crosscoder, CrosscoderConfig, init_params, pre_activations, scores


class Nothing(Accumulator):
  """Sums the codes and the reconstruction (so XLA keeps the whole forward) and nothing else."""

  name = "nothing"
  summed = ("n",)

  def init(self) -> dict[str, np.ndarray]:
    return {"n": np.zeros((), np.float32)}

  def update(self, state, ctx):
    return {"n": state["n"] + jnp.sum(ctx.f) + jnp.sum(ctx.x_hat)}

  def finalize(self, host):
    return host


def main() -> None:
  """Prints the table."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=65_536)
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--dict-size", type=int, default=8192)
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--batch", type=int, default=4096)
  p.add_argument("--top-k", type=int, default=20)
  p.add_argument("--sample-size", type=int, default=64)
  p.add_argument("--repeats", type=int, default=2, help="timed calls per row (the fastest counts)")
  p.add_argument("--only", nargs="*", default=(), help="rows to run (by name; default all)")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  n, d, m = args.tokens, args.d_model, args.dict_size
  x = rng.standard_normal((n, 2, d)).astype(np.float32)
  x[:, 1] += 0.7 * x[:, 0]
  kind = rng.choice([0, 1, 2], size=n, p=[0.8, 0.05, 0.15])
  with tempfile.TemporaryDirectory() as tmp:
    store = write_arrays(f"{tmp}/s", {0: x}, metadata={"token_kind": kind, "position": np.arange(n) % 128})
    cfg = CrosscoderConfig(num_models=2, d_model=d, dict_size=m, sparsity="batchtopk", k=args.k)
    params = init_params(jax.random.key(0), cfg)
    s = np.asarray(scores(params, pre_activations(params, jnp.asarray(x[:4096]))))
    theta = float(np.quantile(s, 1 - args.k / m))  # about k latents per token above θ
    cc = Crosscoder(cfg, params, theta, np.ones(2, np.float32))
    rows = [("forward only", [Nothing()]), ("LatentStats alone", [LatentStats(m)]),
            ("TopExamples alone", [TopExamples(m, args.top_k, args.sample_size)]),
            ("LatentScaling alone", [LatentScaling(cc)]),
            ("ActivationHistogram alone", [ActivationHistogram(m)]),
            ("all three (before issue 26)", [LatentStats(m), LatentScaling(cc), TopExamples(m, args.top_k,
                                                                                         args.sample_size)]),
            ("all four (launch.analyze)", [LatentStats(m), LatentScaling(cc), ActivationHistogram(m),
                                           TopExamples(m, args.top_k, args.sample_size)])]
    rows = [r for r in rows if not args.only or r[0] in args.only]
    times = {}
    for name, accs in rows:
      run_pass(cc, store, 0, accs, batch_size=args.batch, progress=False)  # compile
      best = float("inf")
      for _ in range(args.repeats):
        t = time.perf_counter()
        out = run_pass(cc, store, 0, accs, batch_size=args.batch, progress=False)
        best = min(best, time.perf_counter() - t)
      times[name] = best
    l0 = float(np.mean(out["stats"]["count"])) * m / n
  base = times.get("forward only", float("nan"))
  print(f"analysis pass, {n:,} tokens, d={d}, m={m:,}, batch {args.batch}, L0 {l0:.1f}, "
        f"{jax.devices()[0].platform} ({jax.device_count()} device)")
  print(f"{'pass':30s} {'s':>8s} {'× forward':>10s} {'ktok/s':>8s}")
  for name, t in times.items():
    print(f"{name:30s} {t:8.2f} {t / base:10.2f} {n / t / 1e3:8.2f}")
  state = m * (args.top_k * 8 + args.sample_size * 12)
  print(f"TopExamples state: {state / 2**20:.1f} MiB at m={m:,} (at m=73,728: "
        f"{73_728 * (args.top_k * 8 + args.sample_size * 12) / 2**20:.1f} MiB), whatever the number of tokens")


if __name__ == "__main__":
  main()
