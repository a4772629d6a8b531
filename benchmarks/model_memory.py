"""Memory per device of Gemma 2 base + fine-tuned pairs on model meshes, and a harvest roofline (docs/pods.md).

No device is used: the weights' bytes come from the parameter shapes and `param_sharding`'s rule
(`neurodiff_jax.models.memory.pair_bytes_per_device`, exact: tests/models/test_model_mesh.py checks it
against the shards devices hold), the activations from its stated estimate for one harvest batch, the
FLOPs from `forward_flops_per_token`. Peak rates and bandwidths are assumptions, printed with the table.

  PYTHONPATH=. .venv/bin/python benchmarks/model_memory.py
"""

from __future__ import annotations

import argparse

import harness

MESHES = ((1, 1), (1, 2), (1, 4), (4, 2), (1, 8), (2, 4), (8, 1), (1, 16), (4, 16))
HARVEST_LAYER = {"2b": 13, "9b": 20, "27b": 22}  # the middle layer (2B: Minder et al. 2025's layer 13)
# Assumed rates (vendor datasheets) and utilisation: estimates, not measurements.
DEVICES = {"H100 SXM": dict(flops=989e12, hbm=3.35e12, link=450e9, memory=80e9),
           "TPU v5e": dict(flops=197e12, hbm=819e9, link=200e9, memory=16e9)}
MFU = 0.4


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq-len", type=int, default=1024)
  ap.add_argument("--tokens", type=float, default=10e6)
  args = ap.parse_args()
  from neurodiff_jax.models.memory import GEMMA2_SIZES, forward_flops_per_token, gemma2_config, pair_bytes_per_device

  gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
  print(f"pair = base + fine-tuned, bfloat16 weights; activations: one harvest batch of {args.batch} × {args.seq_len} "
        "tokens, one layer captured, bf16 store (estimate)\n")
  head = ["pair"] + [f"{m} weights / +act GB" for m in MESHES]
  rows = []
  for size in GEMMA2_SIZES:
    cfg = gemma2_config(size)
    cells = []
    for mesh in MESHES:
      p = pair_bytes_per_device(cfg, mesh, "bfloat16", batch=args.batch, seq_len=args.seq_len)
      cells.append(f"{gb(p.weights)} / {gb(p.total)}")
    rows.append([f"Gemma 2 {size} ({cfg.num_params / 1e9:.2f}B × 2)"] + cells)
  print(harness.markdown_table(head, rows))
  print(f"\nharvest roofline, {args.tokens:.0e} tokens, both models to the middle layer, {MFU:.0%} of bf16 peak:\n")
  head = ["pair", "layer", "GFLOP / token (pair)", "total FLOP"] + [f"{n}, 1 chip, s" for n in DEVICES]
  rows = []
  for size in GEMMA2_SIZES:
    cfg = gemma2_config(size)
    flops = 2 * forward_flops_per_token(cfg, HARVEST_LAYER[size] + 1, args.seq_len)
    total = flops * args.tokens
    rows.append([f"Gemma 2 {size}", HARVEST_LAYER[size], f"{flops / 1e9:.2f}", f"{total:.2e}"]
                + [f"{total / (d['flops'] * MFU):,.0f}" for d in DEVICES.values()])
  print(harness.markdown_table(head, rows))
  print("\nassumed: " + "; ".join(f"{n}: {d['flops'] / 1e12:.0f} TFLOP/s bf16, HBM {d['hbm'] / 1e12:.2f} TB/s, "
                                   f"{d['memory'] / 1e9:.0f} GB, link {d['link'] / 1e9:.0f} GB/s"
                                   for n, d in DEVICES.items()))


if __name__ == "__main__":
  main()
