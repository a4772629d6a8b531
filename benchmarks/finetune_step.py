"""The organisms' fine-tuning step on Gemma 3 270M: ours (JAX) against what a researcher runs in PyTorch.

One training step = forward, loss, backward, gradient-norm clipping and an AdamW update, on the same
batch of token ids (B × T, a chat-like loss mask: ~40% of the targets trained, the rest -100 in
torch's labels), the same packaged model (`gemma-3-270m`, dequantized float32), float32, in
subprocesses pinned to the same cores. Engines:

  * jax organism  `organisms.lm_training.TrainStep`: every block trained, the tied embedding frozen,
                  logits only at trained positions (what `launch.organism --config=organisms:*,gemma3` runs)
  * jax all       the same step with every parameter trained and logits everywhere (the toy organisms' step)
  * torch frozen  transformers `Gemma3ForCausalLM(labels=...)`, embedding `requires_grad=False`, torch.optim.AdamW
  * torch all     the same, every parameter trained (the usual `Trainer` fine-tune)

The speed-up that counts compares like with like: jax organism over torch frozen (the same trainable
parameters; torch's standard loss computes every position's logits, as a researcher's code does).
The first step's loss of each engine is printed: equal up to float32 rounding, it shows both run
the same objective on the same batch.

  PYTHONPATH=. .venv/bin/python benchmarks/finetune_step.py                  # ~10 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/finetune_step.py --reps 2 --batch 2 --seq 64   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness

ENGINES = ("jax_organism", "jax_all", "torch_frozen", "torch_all")


def batch(b: int, t: int, vocab: int, seed: int = 0):
  """(ids [b, t+1], 0/1 weights [b, t+1]) with about 40% of the targets trained, in runs as chat replies are."""
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (b, t + 1)).astype(np.int32)
  w = np.zeros((b, t + 1), np.int32)
  for r in range(b):
    pos = 0
    while pos < t + 1:
      prompt, reply = rng.integers(8, 24), rng.integers(6, 20)
      w[r, pos + prompt:pos + prompt + reply] = 1
      pos += prompt + reply
  return ids, w


def child(spec: dict) -> dict:
  """Runs in a pinned subprocess: builds one engine's step and times it."""
  harness.pin(spec["threads"])
  import numpy as np

  from neurodiff_jax.models import load_model, resolve_checkpoint

  path = resolve_checkpoint("gemma-3-270m")
  vocab = 262144
  ids, w = batch(spec["batch"], spec["seq"], vocab)
  out = {"engine": spec["engine"]}
  if spec["engine"].startswith("jax"):
    import jax.numpy as jnp

    from neurodiff_jax.organisms.lm_training import LMTrainConfig, TrainStep

    model = load_model(path)
    freeze = ("embed",) if spec["engine"] == "jax_organism" else ()
    cfg = LMTrainConfig(steps=100, batch_size=spec["batch"], seq_len=spec["seq"], learning_rate=4e-5,
                        warmup_steps=1, freeze=freeze)
    rows = np.stack([ids, w], axis=1)
    st = TrainStep(model, cfg, rows, gather=spec["engine"] == "jax_organism")
    rows_j = jnp.asarray(rows)
    state = [st.params, st.opt_state]

    def one():
      p, o, loss = st.step(state[0], state[1], rows_j)
      state[0], state[1] = p, o
      return float(loss)
  else:
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    if spec["engine"] == "torch_frozen":
      model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-5, weight_decay=0.01)
    # HF shifts the labels itself (logits at t score labels[t + 1]): the whole row goes in, untrained targets
    # -100, so the loss is ours; torch runs one more position a row than we do (T + 1, 0.8% at T = 128).
    tid = torch.as_tensor(ids, dtype=torch.long)
    labels = torch.as_tensor(np.where(w > 0, ids, -100), dtype=torch.long)

    def one():
      loss = model(input_ids=tid, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return float(loss)
  t0 = time.time()
  out["first_loss"] = one()
  out["first_s"] = time.time() - t0
  times, others = harness.time_calls(lambda i: one(), spec["reps"], spec["quiet_wait"])
  out.update(times=times, others=others, rss_mib=harness.rss_mib(), tokens=spec["batch"] * spec["seq"])
  return out


def main() -> None:
  """Runs each engine in a pinned subprocess and prints the table."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--engines", default=",".join(ENGINES))
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--quiet-wait", type=float, default=0.0)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  rows, results = [], {}
  for engine in args.engines.split(","):
    spec = dict(engine=engine, batch=args.batch, seq=args.seq, reps=args.reps, threads=args.threads,
                quiet_wait=args.quiet_wait)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=harness.child_env(args.threads))
    if proc.returncode:
      sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    results[engine] = r
  for engine, r in results.items():
    step = harness.median(r["times"])
    ref = results.get("torch_frozen" if engine != "torch_all" else "torch_all")
    rows.append([engine, f"{r['tokens'] / step:.1f}", f"{step:.2f}", f"{r['first_s']:.1f}", f"{r['first_loss']:.5f}",
                 f"{harness.median(ref['times']) / step:.2f}x" if ref else "n/a", f"{r['rss_mib']:.0f}",
                 harness.spread(r["times"], "steps"), harness.contended(r["times"], r["others"])])
  print(harness.machine())
  print(f"Gemma 3 270M (packaged Q4_K_M, dequantized float32), batch {args.batch} x {args.seq} tokens, "
        f"{args.threads} threads, {args.reps} timed steps after one untimed")
  print(harness.markdown_table(["engine", "tokens/s", "s/step (median)", "first step s", "first loss",
                                "speed-up vs torch frozen", "peak RSS MiB", "spread", "contended steps"], rows))


if __name__ == "__main__":
  main()
