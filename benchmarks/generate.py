"""Greedy generation with a KV cache on Gemma 3 270M: ours against transformers' `generate` with its cache.

Batch 8 prompts (the first held-out documents of the real-text source, cut to 12-40 tokens; left
padded), 64 new tokens each, float32, the packaged `gemma-3-270m` model; each engine in a subprocess
pinned to the same cores:

  * jax cached      `models.generate.GreedyGenerator` (prefill, then one cached step a token, one jit)
  * torch generate  `model.generate(do_sample=False, use_cache=True, min_new_tokens=64)`, eager attention

Reports the first call (jax: trace and compile included) and the median of the timed calls, new
tokens/s, and whether every row's 64 tokens equal transformers'.

  PYTHONPATH=. .venv/bin/python benchmarks/generate.py            # ~5 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/generate.py --new 8 --reps 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import harness


def prompts(n: int) -> list[list[int]]:
  """Token ids of `n` real-text prompts (BOS first), 12 to 40 tokens long."""
  from neurodiff_jax.models import load_tokenizer
  from neurodiff_jax.organisms.real_text import real_text

  tok = load_tokenizer("gemma-3-270m")
  out = []
  for i, doc in enumerate(real_text("held_out")):
    ids = tok(doc)["input_ids"][:12 + (i * 7) % 29]
    if len(ids) >= 12:
      out.append(ids)
    if len(out) == n:
      return out
  raise RuntimeError("not enough held-out documents")


def child(spec: dict) -> dict:
  """One engine, pinned: the first call and `reps` timed calls; returns times and the tokens."""
  harness.pin(spec["threads"])
  rows = prompts(spec["batch"])
  new = spec["new"]
  from neurodiff_jax.models import resolve_checkpoint

  path = resolve_checkpoint("gemma-3-270m")
  if spec["engine"] == "jax":
    from neurodiff_jax.models import load_model
    from neurodiff_jax.models.generate import GreedyGenerator

    gen = GreedyGenerator(load_model(path), bucket=8)  # compiled once per shape; greedy_generate compiles per call

    def run():
      return gen(rows, new, pad_id=0)
  else:
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    def run():
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=0)
      return out[:, width:].tolist()
  t0 = time.time()
  tokens = run()
  first = time.time() - t0
  times, others = harness.time_calls(lambda i: run(), spec["reps"], spec["quiet_wait"])
  return {"engine": spec["engine"], "first_s": first, "times": times, "others": others, "tokens": tokens,
          "rss_mib": harness.rss_mib()}


def main() -> None:
  """Runs both engines and prints the table."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--quiet-wait", type=float, default=0.0)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  res = {}
  for engine in ("jax", "torch"):
    spec = dict(engine=engine, batch=args.batch, new=args.new, reps=args.reps, threads=args.threads,
                quiet_wait=args.quiet_wait)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=harness.child_env(args.threads))
    if proc.returncode:
      sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    res[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
  same = [a == b for a, b in zip(res["jax"]["tokens"], res["torch"]["tokens"])]
  ref = harness.median(res["torch"]["times"])
  rows = []
  for engine, r in res.items():
    t = harness.median(r["times"])
    rows.append([{"jax": "jax cached (GreedyGenerator)", "torch": "torch generate (cache)"}[engine],
                 f"{r['first_s']:.2f}", f"{t:.2f}", f"{args.batch * args.new / t:.1f}", f"{ref / t:.2f}x",
                 f"{r['rss_mib']:.0f}", harness.contended(r["times"], r["others"])])
  print(harness.machine())
  print(f"Gemma 3 270M (packaged, float32), batch {args.batch}, {args.new} new tokens, {args.threads} threads, "
        f"{args.reps} timed calls after the first")
  print(harness.markdown_table(["engine", "first call s", "s/call (median)", "new tokens/s", "speed-up vs torch",
                                "peak RSS MiB", "contended calls"], rows))
  print(f"rows whose {args.new} tokens equal transformers': {sum(same)}/{len(same)}")
  for i, ok in enumerate(same):
    if not ok:
      a, b = res["jax"]["tokens"][i], res["torch"]["tokens"][i]
      first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
      print(f"  row {i}: first differs at new token {first}")


if __name__ == "__main__":
  main()
