"""Harvest throughput: `launch.harvest`'s pipeline against the same two models in `transformers`.

Two random Gemma 2 checkpoints of the forward benchmark's ~100M size (`benchmarks/forward.py`),
"base" and "fine-tuned" (another seed), share one BPE tokenizer; the dataset is the organisms'
generated corpus as JSONL. Each engine runs in a fresh subprocess pinned to the same `--threads`
cores and harvests every token (BOS dropped) of both models at `--layer`, stored as bf16:

  * jax         `neurodiff_jax.activations.harvest` into a TensorStore store (jit, both models in
                one step, stop at the layer, documents packed into fixed-shape rows, async writes)
  * torch       `AutoModelForCausalLM` (eager), layers after `--layer` removed and no LM head
                (as nnsight's `.stop()` would), documents in order, each batch padded to its
                longest document, activations gathered, cast to bf16 and saved with `np.save`
  * torch-sort  the same with documents sorted by length first (the usual padding saving;
                jax packs documents into rows instead)

and prints a Markdown table: tokens harvested, harvest seconds (after models are loaded and
tokens are ready; jax's includes compiling one step per batch shape, reported apart), tokens/s
with and without that compile time, the speed-up of jax over each engine, and peak RSS; plus the
largest difference between the two engines' stored activations.

  PYTHONPATH=. .venv/bin/python benchmarks/harvest.py                 # ~6 min on 2 cores
  PYTHONPATH=. .venv/bin/python benchmarks/harvest.py --small         # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import harness
from harness import hf_config


def prepare(work: Path, small: bool, n_docs: int) -> dict:
  """Checkpoints, tokenizer and dataset in `work`; returns their paths."""

  def config(tok):
    c = hf_config("gemma2", small)
    c.vocab_size = max(c.vocab_size, len(tok))  # the tiny config's 512 would not hold the 2048 ids
    c.bos_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return c

  return harness.write_model_pair(work, n_docs, config)


def run_jax(spec: dict) -> dict:
  """Harvests with neurodiff_jax; returns timings."""
  from configs.harvest_tiny import get_config
  from neurodiff_jax.activations.harvest import harvest

  compile_s = harness.compile_seconds()
  c = get_config()
  c.base_model, c.finetuned_model, c.datasets = spec["base"], spec["finetuned"], [spec["data"]]
  c.layers, c.seq_len, c.batch_size = (spec["layer"],), spec["seq_len"], spec["batch_size"]
  c.out_dir, c.shard_tokens = spec["out"], 0  # default shard size, as a real harvest uses
  store = harvest(c)
  return {"tokens": store.layout.num_tokens, "compile_s": sum(compile_s), **store.timing}


def run_torch(spec: dict, sort: bool) -> dict:
  """Harvests with transformers + np.save; returns timings."""
  import ml_dtypes
  import torch
  import transformers

  from neurodiff_jax.activations.datasets import DatasetSpec, tokenize_corpus

  torch.set_num_threads(spec["threads"])
  t0 = time.perf_counter()
  tok = transformers.AutoTokenizer.from_pretrained(spec["base"])
  corpus = tokenize_corpus(tok, [DatasetSpec(spec["data"])], max_length=spec["seq_len"])
  models = []
  for role in ("base", "finetuned"):
    m = transformers.AutoModelForCausalLM.from_pretrained(spec[role], attn_implementation="eager").eval()
    m.model.layers = m.model.layers[:spec["layer"] + 1]
    m.model.norm = torch.nn.Identity()  # HF's last hidden state is after the final norm; we want the residual
    models.append(m.model)
  load_s = time.perf_counter() - t0
  order = sorted(range(len(corpus.ids)), key=lambda i: len(corpus.ids[i])) if sort else list(range(len(corpus.ids)))
  out, tokens, B = Path(spec["out"]), 0, spec["batch_size"]
  out.mkdir(parents=True, exist_ok=True)
  t1 = time.perf_counter()
  with torch.no_grad():
    for bi in range(0, len(order), B):
      rows = [corpus.ids[i] for i in order[bi:bi + B]]
      width = max(len(r) for r in rows)
      ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
      mask = torch.zeros((len(rows), width), dtype=torch.long)
      for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.as_tensor(row)
        mask[r, :len(row)] = 1
      acts = [m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[spec["layer"] + 1]
              for m in models]
      x = torch.stack(acts, dim=2)  # [B, T, M, d]
      keep = mask.bool().clone()
      keep[:, 0] = False  # BOS
      sel = x[keep].float().numpy().astype(ml_dtypes.bfloat16)
      np.save(out / f"batch_{bi // B:06d}.npy", sel.view(np.uint16))  # .npy has no bf16: its bits
      tokens += sel.shape[0]
  return {"tokens": tokens, "load_s": load_s, "harvest_s": time.perf_counter() - t1, "compile_s": 0.0}


def child(spec: dict) -> None:
  """Runs one engine in this (fresh) process and prints a JSON result."""
  cpus = harness.pin(spec["threads"])
  res = run_jax(spec) if spec["engine"] == "jax" else run_torch(spec, sort=spec["engine"] == "torch-sort")
  res.update(engine=spec["engine"], cpus=cpus, peak_rss_mib=harness.rss_mib())
  print("RESULT " + json.dumps(res), flush=True)


def compare(jax_store: str, torch_dir: str, layer: int) -> tuple[float, float]:
  """Largest and median per-token relative difference ‖a − b‖ / ‖b‖ between the engines' stored activations."""
  from neurodiff_jax.activations.store import ActivationStore

  store = ActivationStore.open(jax_store)
  ours = store.read(layer, 0, store.layout.num_tokens).astype(np.float32)
  import ml_dtypes

  theirs = np.concatenate([np.load(p).view(ml_dtypes.bfloat16).astype(np.float32)
                           for p in sorted(Path(torch_dir).glob("batch_*.npy"))])
  rel = np.linalg.norm(ours - theirs, axis=-1) / np.linalg.norm(theirs, axis=-1)  # [tokens, M]
  return float(rel.max()), float(np.median(rel))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny models, a smoke test")
  ap.add_argument("--docs", type=int, default=160)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--layer", type=int, default=5)
  ap.add_argument("--seq-len", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--engines", default="jax,torch,torch-sort")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(json.loads(args.child))
    return
  layer = min(args.layer, 1) if args.small else args.layer
  with tempfile.TemporaryDirectory(prefix="harvest-bench-") as tmp:
    work = Path(tmp)
    paths = prepare(work, args.small, args.docs)
    results = []
    for engine in args.engines.split(","):
      spec = dict(paths, engine=engine, threads=args.threads, layer=layer, seq_len=args.seq_len,
                  batch_size=args.batch_size, out=str(work / f"out-{engine}"))
      env = harness.child_env(args.threads, "cpu")
      proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                            text=True)
      line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not line:
        sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
      results.append(json.loads(line[-1][7:]))
    jax_rate = next((r["tokens"] / r["harvest_s"] for r in results if r["engine"] == "jax"), None)
    jax_steady = next((r["tokens"] / (r["harvest_s"] - r["compile_s"]) for r in results if r["engine"] == "jax"), None)
    print(f"\nharvest: 2 × Gemma 2 ({'tiny' if args.small else '~100M'}), layer {layer}, {args.docs} documents, "
          f"seq_len {args.seq_len}, batch {args.batch_size}, bf16 output, {args.threads} threads; "
          f"{harness.machine()}\n")
    head = ["engine", "tokens", "harvest s", "of which compile s", "tokens/s", "tokens/s w/o compile",
            "jax speed-up (w/o compile)", "load s", "peak RSS MiB"]
    rows = []
    for r in results:
      rate, steady = r["tokens"] / r["harvest_s"], r["tokens"] / (r["harvest_s"] - r["compile_s"])
      speed = f"{jax_rate / rate:.2f}× ({jax_steady / steady:.2f}×)" if jax_rate else "n/a"
      rows.append([r["engine"], f"{r['tokens']:,}", f"{r['harvest_s']:.1f}", f"{r['compile_s']:.1f}", f"{rate:,.0f}",
                   f"{steady:,.0f}", speed, f"{r['load_s']:.1f}", f"{r['peak_rss_mib']:.0f}"])
    print(harness.markdown_table(head, rows))
    if {"jax", "torch"} <= {r["engine"] for r in results}:
      worst, median = compare(str(work / "out-jax"), str(work / "out-torch"), layer)
      print(f"\nper-token ‖jax − torch‖ / ‖torch‖ over all stored activations: max {worst:.2e}, median {median:.2e} "
            "(both stored in bf16, whose rounding is up to 2^-9 ≈ 2e-3 of a value)")


if __name__ == "__main__":
  main()
