"""The dashboard's costs on a results root: each page's first and repeated render, and the Live page's calls.

A page is rendered headless with Streamlit's AppTest, as the tests drive it: "first" after clearing
Streamlit's caches (a new server reading the Parquet files, loading the models), "rerun" the same session run again
(what every widget change costs). The Live page's work is timed on `dashboard.live.LiveSession`
directly, on the model pair of the root's first run:

  * load both models once (the page caches the session: once per server);
  * both models' next-token table (first call compiles; later prompts in the same length bucket reuse it);
  * both models' greedy generations, unsteered and steered by a latent's decoder direction, with the
    session's `GreedyGenerator` (compiled once per shape) against `greedy_generate` (which traces its
    intervention and so compiles on every call, as the page did before) and against transformers'
    `generate` (PyTorch, greedy, with its KV cache) of both models; the tokens must agree.

Run from the repository root on a results root made by the demo (default: the default-scale demo's):

  PYTHONPATH=. .venv/bin/python benchmarks/dashboard.py
  PYTHONPATH=. .venv/bin/python benchmarks/dashboard.py --root /tmp/demo_small_home/demo/small --reps 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import harness

if TYPE_CHECKING:
  import pandas as pd

PAGES = ("overview", "compare", "latents", "adl", "live")
PROMPT = "Tell me about the weather in spring."
NEW_TOKENS = 32


def shown_latent(latents: pd.DataFrame) -> int:
  """The latent both parts open: the chat-only latent of highest Δnorm (any latent when the run has none)."""
  chat = latents[latents["tag"].astype(str) == "chat_only"]
  return int((chat if len(chat) else latents).sort_values("delta_norm", ascending=False)["latent"].iloc[0])


def page_times(root: Path, reps: int) -> list[list[str]]:
  """Each page's first render (data cache cleared) and fastest rerun, with the latent page on a chat-only latent."""
  import pandas as pd
  import streamlit as st
  from streamlit.testing.v1 import AppTest

  app = str(Path(harness.REPO_ROOT) / "neurodiff_jax" / "dashboard" / "app.py")
  os.environ["NEURODIFF_RESULTS"] = str(root)
  run = sorted(p for p in (root / "runs").iterdir() if (p / "analysis" / "latents.parquet").is_file())[0]
  latent = shown_latent(pd.read_parquet(run / "analysis" / "latents.parquet"))
  rows = []
  for page in PAGES + ("latent",):
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(app, default_timeout=600)
    at.query_params["page"] = "latents" if page == "latent" else page
    if page == "latent":
      at.query_params["run"], at.query_params["latent"] = run.name, str(latent)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    if at.exception:
      raise RuntimeError(f"page {page} raised: {[e.value for e in at.exception]}")
    again = []
    for _ in range(reps):
      t = time.perf_counter()
      at.run()
      again.append(time.perf_counter() - t)
    label = f"latent page ({run.name} #{latent})" if page == "latent" else f"{page}"
    rows.append([label, harness.ms(first), harness.ms(min(again))])
  return rows


def live_times(root: Path, reps: int) -> tuple[list[list[str]], list[str]]:
  """The Live page's calls on LiveSession, against greedy_generate and transformers; (rows, notes)."""
  import jax
  import numpy as np
  import torch
  import transformers

  from neurodiff_jax.dashboard.live import LiveSession, latent_steering, load_run
  from neurodiff_jax.dashboard.results import discover
  from neurodiff_jax.models.generate import cut_at_stop, greedy_generate

  results = discover(str(root))
  run = next(r for r in results.runs if r.models() is not None and r.analysis is not None)
  base_path, ft_path = run.models()
  t = time.perf_counter()
  session = LiveSession(base_path, ft_path)
  load_s = time.perf_counter() - t
  rows = [["load both models (once per server)", harness.ms(load_s), "—"]]
  first, best, _ = harness.first_and_fastest(lambda: session.next_token_table(PROMPT), reps)
  rows.append(["next-token table, both models", harness.ms(first), harness.ms(best)])
  other = "Tell me about the weather in autumn."  # the same length bucket: no compile
  t = time.perf_counter()
  session.next_token_table(other)
  rows.append(["next-token table, another prompt", "—", harness.ms(time.perf_counter() - t)])

  loaded = load_run(run.path)
  latent = shown_latent(run.latents())
  steer = latent_steering(loaded, latent, alpha=4.0)
  first, best, plain = harness.first_and_fastest(lambda: session.generate(PROMPT, NEW_TOKENS), reps)
  rows.append([f"generate {NEW_TOKENS} tokens, both models (GreedyGenerator)", harness.ms(first), harness.ms(best)])
  first, best, steered = harness.first_and_fastest(lambda: session.generate(PROMPT, NEW_TOKENS, steer=steer), reps)
  rows.append([f"… unsteered + steered by latent {latent} (GreedyGenerator)", harness.ms(first), harness.ms(best)])

  ids = session.encode(PROMPT)
  pad = session.tokenizer.pad_token_id or 0
  vec = steer.addition

  def traced():  # the page before: greedy_generate with the addition as a closure, compiled per call
    out = []
    for model in (session.base, session.ft):
      add = jax.numpy.asarray(np.stack([np.zeros_like(vec), vec]))
      out.append(greedy_generate(model, [ids, ids], NEW_TOKENS, pad_id=pad,
                                 interventions={steer.layer: lambda x, add=add: x + add[:, None, :]}))
    return out

  first, best, ref = harness.first_and_fastest(traced, reps)
  rows.append(["… the same with greedy_generate (compiles per call)", harness.ms(first), harness.ms(best)])
  cut = lambda row: cut_at_stop(row, session._stops)
  same_traced = [cut(r) for r in ref[0] + ref[1]] == [steered.ids[k] for k in ("base", "base_steered", "ft",
                                                                              "ft_steered")]

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  hf = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (base_path, ft_path)]
  x = torch.tensor([ids])

  def torch_generate():
    with torch.no_grad():
      return [m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                         min_new_tokens=NEW_TOKENS, pad_token_id=pad)[0, len(ids):].tolist() for m in hf]

  first, best, hf_out = harness.first_and_fastest(torch_generate, reps)
  rows.append([f"generate {NEW_TOKENS} tokens, both models (transformers, KV cache)", harness.ms(first),
               harness.ms(best)])
  same_hf = [cut(r) for r in hf_out] == [plain.ids["base"], plain.ids["ft"]]
  notes = [f"models: {base_path} vs {ft_path} (d={session.hidden_size}, {session.num_layers} layers); prompt "
           f"{len(ids)} tokens; steering: latent {latent} of {run.name} at α = 4 after layer {steer.layer}",
           f"tokens equal to greedy_generate's (steered and not): {same_traced}; to transformers' (unsteered): "
           f"{same_hf}"]
  return rows, notes


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark and prints Markdown tables."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", default=None, help="a results root (default: $NEURODIFF_HOME/demo/default)")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args(argv)
  from neurodiff_jax.utils.paths import neurodiff_home

  root = Path(args.root or Path(neurodiff_home()) / "demo" / "default").expanduser()
  if not (root / "runs").is_dir():
    sys.exit(f"{root} is not a results root with runs/: make one with `python -m launch.demo` or pass --root.")
  print(f"# Dashboard on {root} — {harness.machine()}, {datetime.date.today()}\n")
  pages = page_times(root, args.reps)
  print(harness.markdown_table(["page", "first render", f"rerun (fastest of {args.reps})"], pages))
  rows, notes = live_times(root, args.reps)
  print()
  print(harness.markdown_table(["Live page call", "first", f"later (fastest of {args.reps})"], rows))
  for n in notes:
    print(f"\n{n}")


if __name__ == "__main__":
  main()
