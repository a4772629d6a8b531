"""ADL's mean-difference pass: its cost against one forward pass of both models, and against PyTorch.

Builds two random-weight Gemma 2 checkpoints of a moderate size (default d = 512, 6 layers, vocab
512: big enough that the matmuls dominate on 2 cores) that share one tokenizer, makes the same
random token batches for every row, and times (fastest of `--reps` after a compiling call):

  * forward both (jax)   `jit_forward` of each model with logits: the unit
  * ADL pass (jax)       `diffing.adl.mean_difference_step` (one jitted call per batch: both models
                         stopped at the deepest layer asked for, the sums of h_ft − h_base, h_base,
                         h_ft and their norms) at layer fraction 0.5 and at 1.0 (every block runs)
  * forward both (torch) `AutoModelForCausalLM` of each checkpoint, no hidden states
  * ADL pass (torch)     the same sums from `output_hidden_states=True` of both models

Run from the repository root (one process, ~2 min on 2 cores):

  PYTHONPATH=. .venv/bin/python benchmarks/adl.py
  PYTHONPATH=. .venv/bin/python benchmarks/adl.py --d-model 256 --layers 4 --batches 2   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import harness
import numpy as np


def build_pair(root: Path, d: int, layers: int, vocab: int) -> tuple[str, str]:
  """Two random checkpoints (seeds 0, 1) of a Gemma 2 of width d and depth `layers`, one tokenizer."""
  import jax.numpy as jnp
  from flax import nnx

  from neurodiff_jax.models import Transformer, config_from_hf, save_hf_checkpoint
  from neurodiff_jax.organisms.random_model import hf_config_for
  from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer

  text = [f"the {w} of the river {i} runs past the mill and the grain" for i, w in enumerate(["old", "new"] * 200)]
  tok = train_bpe_tokenizer(text, vocab, min_frequency=1)
  heads = max(2, d // 64)
  cfg = hf_config_for("gemma2", len(tok), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
                      query_pre_attn_scalar=64, sliding_window=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  dirs = []
  for seed in (0, 1):
    path = root / f"m{seed}"
    save_hf_checkpoint(Transformer(config_from_hf(cfg), dtype=jnp.float32, rngs=nnx.Rngs(seed)), cfg, str(path))
    tok.save_pretrained(path)
    dirs.append(str(path))
  return dirs[0], dirs[1]


def fastest(call: Callable[[], object], reps: int) -> tuple[float, float]:
  """(first call s, fastest of `reps` later calls s)."""
  return harness.first_and_fastest(call, reps)[:2]


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark and prints a Markdown table."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batches", type=int, default=4)
  ap.add_argument("--positions", type=int, default=5)
  ap.add_argument("--reps", type=int, default=2)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from neurodiff_jax.diffing.adl import mean_difference_step, position_labels
  from neurodiff_jax.diffing.context import layers_of, load_pair
  from neurodiff_jax.models import jit_forward

  with tempfile.TemporaryDirectory() as tmp:
    base_dir, ft_dir = build_pair(Path(tmp), args.d_model, args.layers, args.vocab)
    pair = load_pair(base_dir, ft_dir)
    rng = np.random.default_rng(0)
    vocab = pair.base.cfg.vocab_size
    data = [rng.integers(3, vocab, (args.batch, args.seq)).astype(np.int32) for _ in range(args.batches)]
    mask = np.ones((args.batch, args.seq), bool)
    valid = np.ones(args.batch, bool)
    start = np.full(args.batch, -1, np.int32)  # plain text: positions from each document's start
    n = args.positions
    labels = position_labels(n)
    rows: list[tuple[str, float, float]] = []

    fb, ff = jit_forward(pair.base), jit_forward(pair.ft)

    def jax_forward():
      for ids in data:
        a, b = fb(jnp.asarray(ids), jnp.asarray(mask)), ff(jnp.asarray(ids), jnp.asarray(mask))
        jax.block_until_ready((a.logits, b.logits))

    rows.append(("forward both (jax, jit)", *fastest(jax_forward, args.reps)))
    unit = rows[-1][2]
    for frac in (0.5, 1.0):
      layers = layers_of([frac], pair.num_layers)
      step = mean_difference_step(pair, layers, labels)

      def jax_adl(step=step):
        acc = None
        for ids in data:
          sums = jax.device_get(step(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(valid), jnp.asarray(start)))
          acc = sums if acc is None else {k: acc[k] + v for k, v in sums.items()}
        return acc

      rows.append((f"ADL pass (jax), layer {layers[0]} of {pair.num_layers}", *fastest(jax_adl, args.reps)))
    adl_full = rows[-1][2]
    jax_sums = jax_adl()

    torch.set_num_threads(len(harness.os.sched_getaffinity(0)))
    tb = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tf = transformers.AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
    tmask = torch.ones(args.batch, args.seq, dtype=torch.long)

    def torch_forward():
      with torch.no_grad():
        for ids in data:
          t = torch.from_numpy(ids.astype(np.int64))
          tb(input_ids=t, attention_mask=tmask)
          tf(input_ids=t, attention_mask=tmask)

    rows.append(("forward both (torch)", *fastest(torch_forward, args.reps)))
    torch_unit = rows[-1][2]
    layer = layers_of([1.0], pair.num_layers)[0]

    def torch_adl():
      diff = torch.zeros(n, args.d_model, dtype=torch.float64)
      with torch.no_grad():
        for ids in data:
          t = torch.from_numpy(ids.astype(np.int64))
          hb = tb(input_ids=t, attention_mask=tmask, output_hidden_states=True).hidden_states[layer + 1]
          hf = tf(input_ids=t, attention_mask=tmask, output_hidden_states=True).hidden_states[layer + 1]
          diff += (hf[:, :n] - hb[:, :n]).sum(0).double()
          _ = (hb[:, :n].sum(0), hf[:, :n].sum(0), hb.norm(dim=-1).sum(), hf.norm(dim=-1).sum())
      return diff

    rows.append((f"ADL pass (torch, output_hidden_states), layer {layer}", *fastest(torch_adl, args.reps)))
    torch_adl_s = rows[-1][2]
    # The last layer's HF hidden state has the final norm applied, ours does not: compare at layer 0.5's pass
    # instead, recomputed here, so the check is of the same quantity.
    mid = layers_of([0.5], pair.num_layers)[0]
    with torch.no_grad():
      t = torch.from_numpy(data[0].astype(np.int64))
      want = (tf(input_ids=t, output_hidden_states=True).hidden_states[mid + 1][:, :n]
              - tb(input_ids=t, output_hidden_states=True).hidden_states[mid + 1][:, :n]).sum(0).numpy()
    got = jax.device_get(mean_difference_step(pair, [mid], labels)(jnp.asarray(data[0]), jnp.asarray(mask),
                                                                    jnp.asarray(valid), jnp.asarray(start)))["diff"][0]
    err = float(np.abs(got - want).max())
    del jax_sums

    tokens = args.batch * args.seq * args.batches
    print(f"\nADL mean-difference pass, {tokens:,} tokens ({args.batches} batches of {args.batch}x{args.seq}), "
          f"Gemma 2 random d={args.d_model}, {args.layers} layers, vocab {vocab}, float32, positions {n}")
    print(f"machine: {harness.machine()}")
    print(f"date: {datetime.date.today().isoformat()}; command: {' '.join(['benchmarks/adl.py', *sys.argv[1:]])}\n")
    print("| pass | first call s | fastest s | × jax forward of both | × torch forward of both |")
    print("|---|---|---|---|---|")
    for name, first, best in rows:
      print(f"| {name} | {first:.2f} | {best:.3f} | {best / unit:.2f} | {best / torch_unit:.2f} |")
    print(f"\nADL pass, every block (jax) vs torch: {torch_adl_s / adl_full:.2f}x faster; "
          f"max |Σδ jax − Σδ torch| at layer {mid} on one batch: {err:.2e}")


if __name__ == "__main__":
  main()
