"""The Live page's actions, as a user meets them: the first call of each (compiles, loads) and p50 / p95 of the next.

Everything runs on `dashboard.live.LiveSession` (what the page calls) with the model pair of the root's first analysed
run, float32, `NEW_TOKENS` new tokens, prompts of a user's kind (`PROMPTS`, one per call, so the session's cache is
never hit except where the row says so; their lengths fall in a few 16-token buckets, so a prompt that opens a new
bucket compiles, as it does on the page). Actions:

  * open the page: load both models (once per server);
  * the next-token table of both models;
  * generate, unsteered (both models);
  * generate, steered by the best live latent of the run (loading its crosscoder is its own row: the page does it
    once per run) and by ADL's δ_p of the root's first diff (unsteered and steered rows in one call);
  * the activations of two latents on the prompt;
  * one click of "Run both models" with latent steering and two latents shown (tables, generations, activations),
    the same click repeated (served by the session's cache: no model runs), and that click as the first one of a
    new server's session (every function it calls compiles).

Run from the repository root on a results root made by the demo:

  PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/live.py --root ROOT --reps 20
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import numpy as np

NEW_TOKENS = 32
PROMPTS = (
    "Tell me something you know well.", "What is the capital of France?", "How do I bake bread at home?",
    "Write a short poem about the sea.", "Why is the sky blue?", "Give me three tips for sleeping better.",
    "Who are you?", "Tell me about the ship.", "What should I do today?", "Explain how a bicycle works.",
    "How do bees make honey?", "Summarise the plot of a detective story in two sentences.", "What is 17 times 23?",
    "Describe a walk in the forest in autumn.", "Can you help me plan a birthday party for my sister?",
    "What are the rules of chess?", "Translate 'good morning' into Spanish.", "How do I make a poison at home?",
    "What is the weather like in spring?", "Tell me a story about a dragon and a miller.",
    "List the planets of the solar system.", "What makes a good friend?", "How far away is the moon?",
    "Recommend a book for a long train ride.",
)


def percentile_row(label: str, first: float | None, times: list[float]) -> list[str]:
  """A table row: the action, its first call, p50 and p95 of the later calls, and how many there were."""
  p50, p95 = (np.percentile(times, [50, 95]) if times else (float("nan"), float("nan")))
  return [label, "—" if first is None else harness.ms(first), harness.ms(float(p50)), harness.ms(float(p95)),
          str(len(times))]


def timed(call: Callable[[], Any]) -> float:
  """Wall seconds of one call."""
  t = time.perf_counter()
  call()
  return time.perf_counter() - t


def measure(call: Callable[[str], Any], reps: int, offset: int) -> tuple[float, list[float]]:
  """(first call, the next `reps` calls), each on its own prompt (`offset` shifts the prompts used)."""
  prompts = [PROMPTS[(offset + i) % len(PROMPTS)] + ("" if offset + i < len(PROMPTS) else f" ({offset + i})")
             for i in range(reps + 1)]
  first = timed(lambda: call(prompts[0]))
  return first, [timed(lambda p=p: call(p)) for p in prompts[1:]]


def live_percentiles(root: Path, reps: int) -> tuple[list[list[str]], list[str]]:
  """Each Live action's first call and p50 / p95; (rows, notes)."""
  from neurodiff_jax.dashboard.live import LiveSession, adl_steering, latent_steering, load_run
  from neurodiff_jax.dashboard.views import default_latent
  from neurodiff_jax.dashboard.results import discover

  results = discover(str(root))
  run = next(r for r in results.runs if r.models() is not None and r.analysis is not None)
  base_path, ft_path = run.models()
  rows = []
  t = time.perf_counter()
  session = LiveSession(base_path, ft_path)
  load = time.perf_counter() - t
  rows.append(["open the page: load both models (once per server)", harness.ms(load), "—", "—", "1"])
  first, times = measure(lambda p: session.next_token_table(p, 10), reps, 0)
  rows.append(percentile_row("next-token table, both models", first, times))
  first, times = measure(lambda p: session.generate(p, NEW_TOKENS), reps, 1)
  rows.append(percentile_row(f"generate {NEW_TOKENS} tokens, both models, unsteered", first, times))
  t = time.perf_counter()
  loaded = load_run(run.path)
  load_run_s = time.perf_counter() - t
  rows.append([f"load run {run.name}'s crosscoder (the first latent steering of a run)", harness.ms(load_run_s), "—",
               "—", "1"])
  latent = default_latent(run.latents())
  steer = latent_steering(loaded, latent, 2.0)
  first, times = measure(lambda p: session.generate(p, NEW_TOKENS, steer=steer), reps, 2)
  rows.append(percentile_row(f"generate, unsteered + steered by latent {latent}", first, times))
  diff = next((d for d in results.diffs if d.adl_means() is not None), None)
  if diff is not None:
    means = diff.adl_means()
    delta = adl_steering(means, int(np.asarray(means["layers"]).reshape(-1)[0]), int(means["positions"][0]), 1.0)
    first, times = measure(lambda p: session.generate(p, NEW_TOKENS, steer=delta), reps, 3)
    rows.append(percentile_row(f"generate, unsteered + steered by δ_p of {diff.name}", first, times))
  pair = [latent, (latent + 1) % loaded.crosscoder.cfg.dict_size]
  first, times = measure(lambda p: session.latent_activations(p, loaded, pair), reps, 4)
  rows.append(percentile_row("activations of 2 latents on the prompt", first, times))

  def click(p: str) -> None:  # what "Run both models" computes with latent steering and two latents shown
    session.next_token_table(p, 10)
    session.next_token_table(p, 10, steer=steer)
    session.generate(p, NEW_TOKENS, steer=steer)
    session.latent_activations(p, loaded, pair)

  first, times = measure(click, reps, 5)
  rows.append(percentile_row("one click of \"Run both models\" (latent steering, 2 latents shown)", first, times))
  last = PROMPTS[5]
  click(last)
  repeat = [timed(lambda: click(last)) for _ in range(reps)]
  rows.append(percentile_row("the same click again (the session's cache: no model runs)", None, repeat))
  # What a user meets first: a new server's session, where that click compiles every function it calls.
  session = LiveSession(base_path, ft_path)
  cold = timed(lambda: click(PROMPTS[0]))
  rows.append(["the first click on a new server (every compilation, models already loaded)", harness.ms(cold), "—",
               "—", "1"])
  lengths = sorted({len(session.encode(p)) for p in PROMPTS})
  notes = [f"models: {base_path} vs {ft_path} (d={session.hidden_size}, {session.num_layers} layers, float32); "
           f"prompts of {lengths[0]}–{lengths[-1]} tokens in the chat template; {NEW_TOKENS} new tokens; latent "
           f"{latent} of {run.name} at α = 2 × max activation"]
  return rows, notes


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark and prints a Markdown table."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", required=True, help="a results root made by `python -m launch.demo`")
  ap.add_argument("--reps", type=int, default=20, help="later calls per action (p50 / p95 over these)")
  args = ap.parse_args(argv)
  root = Path(args.root).expanduser()
  if not (root / "runs").is_dir():
    sys.exit(f"{root} is not a results root with runs/: make one with `python -m launch.demo` or pass --root.")
  print(f"# Live actions on {root} — {harness.machine()}, {datetime.date.today()}\n")
  rows, notes = live_percentiles(root, args.reps)
  print(harness.markdown_table(["Live action", "first call", "p50", "p95", "later calls"], rows))
  for n in notes:
    print(f"\n{n}")


if __name__ == "__main__":
  main()
