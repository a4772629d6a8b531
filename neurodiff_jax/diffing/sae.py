"""A BatchTopK SAE on the activation differences δ = h_ft − h_base, trained with the crosscoder's code (M = 1).

An SAE is a crosscoder with one input: the model is `crosscoder.model` with `num_models = 1`, the
step is `crosscoder.step.make_train_step` (sharded, jitted, state donated, bad-batch and divergence
checks), the loop is `crosscoder.train.run_loop` and the checkpoints `crosscoder.checkpoint`
(Orbax, under `out/checkpoint`, resumed when the method is rerun with the same settings). Only the
batches differ: δ of a store read through the store reader (`windowed_batches`, [B, 2, d] →
x[:, 1] − x[:, 0] → [B, 1, d], no second copy of the store), or of the models run on the datasets
(epochs over `ctx.batches`, shuffled in a pool of 16 batches; special tokens left out). The input
is normalised like the crosscoder's (one scalar so that E‖δ‖ = √d; the decoder bias starts at mean δ).

After training, one pass over the data in order encodes every token (inference mode: BatchTopK's
threshold θ), for each latent counting how often it fires and keeping its top activations; live
latents (fired at least once) are read through the fine-tuned model's logit lens of their decoder
row. Outputs: `sae_latents.parquet` (frequency, activations, decoder norm), `sae_lens.parquet`,
`sae_top_contexts.parquet`, `sae_frequency.png`, `section.html`.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float

from neurodiff_jax.crosscoder import sharding
from neurodiff_jax.crosscoder.model import Crosscoder, decode, encode_inference
from neurodiff_jax.crosscoder.step import (
  crosscoder_config,
  init_state,
  loss_config,
  make_optimizer,
  make_train_step,
  pair_settings,
  sharded_init,
)
from neurodiff_jax.diffing import differences as dx
from neurodiff_jax.diffing.context import DiffContext
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, png_html, save_png

TOP_CONTEXTS = 5  # max-activating contexts kept per latent
TOP_TOKENS = 10  # tokens promoted / suppressed per latent in the lens table
POOL_BATCHES = 16  # on the fly: rows shuffled in a pool of this many batches
NORM_BATCHES = 8  # batches that estimate E‖δ‖ for the input normalisation
SHOWN = 12  # latents shown in section.html
HIGHEST = jax.lax.Precision.HIGHEST


def run_config(cfg: ml_collections.ConfigDict, steps: int | None = None) -> ml_collections.ConfigDict:
  """The crosscoder run config of the SAE: `cfg`'s size, k, steps, batch and lr; the rest the crosscoder's defaults."""
  c = ml_collections.ConfigDict({
      "dict_size": int(cfg.dict_size), "sparsity": "batchtopk", "k": int(cfg.k), "dec_init_norm": 0.3,
      "reconstruction": "squared", "l1_lambda": 1.0, "l1_warmup_frac": 0.05, "k_aux": 0, "aux_coef": 1 / 32,
      "dead_tokens": 0, "dead_frac": 0.05, "dead_max_tokens": 10_000_000, "theta_momentum": 0.99,
      "steps": int(cfg.steps if steps is None else steps), "batch_size": int(cfg.batch_size), "lr": float(cfg.lr),
      "warmup_frac": 0.01, "warmup_max_steps": 1000, "decay_frac": 0.2, "clip_norm": 1.0,
      "compute_dtype": "float32", "train_step": "auto", "pair_candidates": 0, "pair_heavy_fraction": 0.125,
      "pair_heavy_candidates": 0, "pair_capacity": 1.25, "seed": 0, "log_every": 50,
      "checkpoint_every": max(int(cfg.steps) // 4, 1), "keep_checkpoints": 1, "nan_policy": "stop"})
  if not 0 < c.k <= c.dict_size:
    raise ConfigError(f"sae.k={c.k} must be in [1, sae.dict_size={c.dict_size}].")
  for f in ("dict_size", "steps", "batch_size"):
    if c[f] < 1:
      raise ConfigError(f"sae.{f}={c[f]} must be at least 1.")
  return c


# ---- the difference batches ----


def difference_batch(x: np.ndarray) -> np.ndarray:
  """δ = h_ft − h_base of a paired batch [B, 2, d] as a one-model batch [B, 1, d] (float32)."""
  return (x[:, 1].astype(np.float32) - x[:, 0].astype(np.float32))[:, None, :]


def store_differences(store: Any, layer: int, batch_size: int, seed: int = 0,
                      window_bytes: int = 64 << 20) -> tuple[Callable[[int], np.ndarray], Any]:
  """(e -> δ batch e [B, 1, d], the reader's WindowedBatches): the store reader's shuffled stream, differenced."""
  from neurodiff_jax.activations.reader import windowed_batches

  batches = windowed_batches(store, layer, batch_size, seed=seed, window_bytes=window_bytes, process_index=0,
                             process_count=1)
  return (lambda e: difference_batch(batches(e))), batches


def model_differences(ctx: DiffContext, layer: int, batch_size: int, seed: int, docs_per_pass: int
                      ) -> Iterator[np.ndarray]:
  """Endless δ batches [B, 1, d] of the non-special tokens, from the models run on the datasets, pool-shuffled."""
  rng = np.random.default_rng(seed)
  pool: list[np.ndarray] = []
  size = 0
  target = POOL_BATCHES * batch_size
  while True:
    got = 0
    for chunk in dx.pair_chunks(ctx, [layer], docs_per_pass):
      keep = chunk.valid & dx.not_special(chunk.kind)
      rows = difference_batch(np.asarray(chunk.acts[layer])[keep])
      got += len(rows)
      pool.append(rows)
      size += len(rows)
      if size >= target:
        data = np.concatenate(pool)[rng.permutation(size)]
        cut = size // batch_size * batch_size
        yield from data[:cut].reshape(-1, batch_size, 1, data.shape[-1])
        pool, size = [data[cut:]], size - cut
    if got == 0:
      raise ConfigError("sae: the data hold no token besides special ones; give datasets with text.")


# ---- training ----


def _normalisation(first: list[np.ndarray], mean: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(norm_scale [1], normalised mean δ [1, d]) from a few batches (and the exact mean when known)."""
  x = np.concatenate(first)[:, 0].astype(np.float64)  # [n, d]
  mean = x.mean(0) if mean is None else mean
  norm = np.linalg.norm(x, axis=-1).mean()
  if not np.isfinite(norm) or norm <= 0:
    raise ConfigError(f"the differences at this layer have mean norm {norm}: the two models' activations are equal "
                      "(or not finite) there; choose another layer or another pair.")
  scale = np.array([np.sqrt(x.shape[1]) / norm], np.float32)
  return scale, (mean * scale[0]).astype(np.float32)[None, :]


def train_sae(ctx: DiffContext, cfg: ml_collections.ConfigDict, layer: int, out: Path) -> tuple[Crosscoder, dict]:
  """Trains (or resumes) the SAE on δ at `layer`; returns it and the last logged metrics."""
  from neurodiff_jax.crosscoder.checkpoint import Checkpointer, check_same_run
  from neurodiff_jax.crosscoder.train import config_json, run_loop

  config = run_config(cfg)
  config.seed = int(ctx.seed)
  d = ctx.pair.base.cfg.hidden_size
  ccfg = crosscoder_config(config, 1, d)
  lcfg = loss_config(config)
  tx = make_optimizer(config)
  mesh = sharding.make_mesh(1, 1)
  bs = int(config.batch_size)
  source = "store" if ctx.store is not None else "models"
  closer = None
  if ctx.store is not None:
    batch_of, reader = store_differences(ctx.store, layer, bs, seed=ctx.seed)
    closer = reader.close
    means = ctx.store.mean(layer).astype(np.float64)
    exact_mean = means[1] - means[0]
    first = [batch_of(e) for e in range(min(NORM_BATCHES, reader.batches_per_epoch))]
  else:
    gen = model_differences(ctx, layer, bs, ctx.seed, 16)
    exact_mean = None
    first = [next(gen) for _ in range(NORM_BATCHES)]
  scale, mean = _normalisation(first, exact_mean)
  where = {"source": source, "layer": layer, "store": str(getattr(ctx.store, "root", ""))}
  saved = {"run": config_json(config) | where, "crosscoder": ccfg.to_dict()}

  ckdir = out / "checkpoint"
  ckpt = Checkpointer(ckdir, keep=1)
  abstract = jax.eval_shape(lambda k: init_state(k, ccfg, tx, scale, mean), jax.random.key(config.seed))
  start = 0
  if ckpt.latest_step() is not None:
    try:
      check_same_run(ckpt.config()["run"], saved["run"])
      shard = sharding.state_shardings(abstract, mesh)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shard)
      state, data_state = ckpt.restore(target)
      start = int(data_state["next_index"])
      ctx.log(f"sae: resuming from step {ckpt.latest_step()} in {ckdir}")
    except Exception as e:  # noqa: BLE001 -- another run's checkpoint: start over rather than fail
      ctx.log(f"sae: the checkpoint in {ckdir} is not this run's ({e}); training from scratch")
      ckpt.close()
      shutil.rmtree(ckdir, ignore_errors=True)
      ckpt = Checkpointer(ckdir, keep=1)
      start = 0
  if start == 0:
    state = sharded_init(jax.random.key(config.seed), ccfg, tx, mesh, scale, mean)

  counter = {"next": start}
  if ctx.store is not None:
    def stream() -> Iterator[np.ndarray]:
      while True:
        counter["next"] += 1
        yield batch_of(counter["next"] - 1)
  else:
    # A resumed run continues on a freshly shuffled stream (the models' batches are not indexable).
    gen = model_differences(ctx, layer, bs, ctx.seed + start, 16) if start else gen
    pending = [] if start else list(first)

    def stream() -> Iterator[np.ndarray]:
      while True:
        counter["next"] += 1
        yield pending.pop(0) if pending else next(gen)

  last: dict = {}

  def log(step: int, metrics: dict, st: Any) -> None:
    last.clear()
    last.update(metrics, step=step)

  def save(st: Any, step: int) -> None:
    ckpt.save(step, st, {"next_index": counter["next"]}, saved)

  step_fn = make_train_step(ccfg, lcfg, tx, mesh, abstract, float(config.theta_momentum), config.compute_dtype,
                            config.train_step, pair_settings(config), config.nan_policy)
  try:
    state = run_loop(config, state, step_fn, stream(), mesh, save=save, log=log)
  finally:
    ckpt.close()
    if closer is not None:
      closer()
  model = jax.device_get(state["model"])
  sae = Crosscoder(cfg=ccfg, params={k: jnp.asarray(v) for k, v in model["params"].items()},
                   theta=float(model["theta"]), norm_scale=np.asarray(model["norm_scale"], np.float32))
  if last:
    (out / "sae_train_metrics.json").write_text(json.dumps(last, indent=1))
  elif (out / "sae_train_metrics.json").is_file():
    last = json.loads((out / "sae_train_metrics.json").read_text())
  return sae, last


# ---- reading the latents ----


def _make_eval(sae: Crosscoder, k: int) -> Callable:
  params = {n: jnp.asarray(v) for n, v in sae.params.items()}
  theta, scale = jnp.float32(sae.theta), jnp.float32(sae.scale[0])

  @jax.jit
  def ev(x: Float[Array, "n 2 d"], keep: Bool[Array, " n"]):
    delta = ((x[:, 1] - x[:, 0]) * scale)[:, None, :]  # [n, 1, d], normalised
    f = encode_inference(params, delta, sae.cfg, theta, HIGHEST) * keep[:, None]  # [n, m]
    err = jnp.sum(jnp.square(delta - decode(params, f, HIGHEST)), (1, 2)) * keep  # [n]
    kept = delta[:, 0] * keep[:, None]  # [n, d]
    vals, idx = jax.lax.top_k(f.T, min(k, f.shape[0]))  # [m, k]
    return ((f > 0).sum(0), f.sum(0), f.max(0), vals, idx, err.sum(), kept.sum(0), jnp.square(kept).sum(),
            (f > 0).sum())

  return ev


def latent_pass(ctx: DiffContext, sae: Crosscoder, layer: int, batch_size: int,
                k: int = TOP_CONTEXTS) -> dict[str, Any]:
  """One in-order pass: per latent firing count, activation sum and max, top-k (activation, ref); FVE and L0."""
  m = sae.cfg.dict_size
  ev = _make_eval(sae, k)
  fired, act_sum, act_max = np.zeros(m, np.int64), np.zeros(m), np.zeros(m)
  vals, refs = dx.empty_topk((m,))
  err = sumsq = active = 0.0
  total = 0.0
  n = 0
  for chunk in dx.pair_chunks(ctx, [layer], batch_size):
    keep = chunk.valid & dx.not_special(chunk.kind)
    if not keep.any():
      continue
    c, s, mx, v, idx, e, ds, sq, a = jax.device_get(ev(chunk.acts[layer], jnp.asarray(keep)))
    n += int(keep.sum())
    fired += np.asarray(c, np.int64)
    act_sum += s
    act_max = np.maximum(act_max, mx)
    err, sumsq, active = err + float(e), sumsq + float(sq), active + float(a)
    total = total + np.asarray(ds, np.float64)
    v = np.asarray(v, np.float64)
    v[v <= 0] = -np.inf  # a latent that did not fire on a row has no context there
    vals, refs = dx.merge_topk(vals, refs, v, chunk.ref[np.asarray(idx)], k)
  tot = sumsq - float(np.sum(np.square(total))) / max(n, 1)  # Σ‖δ − mean δ‖², normalised units
  return {"tokens": n, "fired": fired, "act_sum": act_sum, "act_max": act_max, "top_vals": vals, "top_refs": refs,
          "fve": 1.0 - err / tot if tot > 0 else float("nan"), "l0": active / max(n, 1)}


def run(ctx: DiffContext, cfg: ml_collections.ConfigDict, out: Path) -> dict:
  """Trains the SAE on δ at `cfg.layer`, reads its latents; writes the tables, plot and section.html."""
  from neurodiff_jax.models.lens import logit_lens, top_tokens

  out = Path(out)
  (layer,) = dx.resolve_layers(ctx, (cfg.layer,), "sae.layer")
  run_config(cfg)  # errors before any work
  sae, metrics = train_sae(ctx, cfg, layer, out)
  # The pass reads chunks of about one training batch of tokens.
  stats = latent_pass(ctx, sae, layer, max(1, int(cfg.batch_size) // max(int(ctx.max_len), 1)))
  n = stats["tokens"]
  m = sae.cfg.dict_size
  freq = stats["fired"] / max(n, 1)
  live = stats["fired"] > 0
  dec = sae.decoder()[:, 0, :]  # [m, d], original units
  latents = pd.DataFrame({"latent": np.arange(m), "live": live, "frequency": freq, "fired": stats["fired"],
                          "mean_activation": np.where(live, stats["act_sum"] / np.maximum(stats["fired"], 1), 0.0),
                          "max_activation": stats["act_max"], "decoder_norm": np.linalg.norm(dec, axis=-1)})
  latents.to_parquet(out / "sae_latents.parquet", index=False)

  live_ids = np.nonzero(live)[0]
  lens_rows = []
  for s in range(0, len(live_ids), 128):
    ids = live_ids[s:s + 128]
    for j, t in zip(ids, top_tokens(logit_lens(ctx.pair.ft, dec[ids]), ctx.pair.tokenizer, TOP_TOKENS)):
      for way in ("promoted", "suppressed"):
        for r, (tok, tid, lg) in enumerate(zip(t[way], t[f"{way}_ids"], t[f"{way}_logits"])):
          lens_rows.append({"latent": int(j), "direction": way, "rank": r, "token": tok, "token_id": int(tid),
                            "logit": float(lg)})
  lens = pd.DataFrame(lens_rows, columns=["latent", "direction", "rank", "token", "token_id", "logit"])
  lens.to_parquet(out / "sae_lens.parquet", index=False)

  rows = []
  for j in live_ids:
    ok = np.isfinite(stats["top_vals"][j])
    r_ids = stats["top_refs"][j][ok].tolist()
    cols = dx.context_columns(ctx, r_ids)
    for r, (v, ref) in enumerate(zip(stats["top_vals"][j][ok], r_ids)):
      rows.append({"latent": int(j), "rank": r, "activation": float(v), "ref": int(ref),
                   **{c: cols[c][r] for c in cols}})
  contexts = pd.DataFrame(rows, columns=["latent", "rank", "activation", "ref", "before", "token", "after", "context"])
  contexts.to_parquet(out / "sae_top_contexts.parquet", index=False)
  _frequency_plot(freq[live], out / "sae_frequency.png")

  summary = {"source": "store" if ctx.store is not None else "models", "layer": layer, "tokens": n,
             "dict_size": m, "k": int(cfg.k), "live_fraction": float(live.mean()), "fve": float(stats["fve"]),
             "l0": float(stats["l0"]), "train": {k: metrics[k] for k in ("loss/total", "l0", "fve/0", "step")
                                                 if k in metrics}}
  _section(ctx, out, layer, summary, latents, lens, contexts)
  return summary


def _frequency_plot(freq: np.ndarray, path: Path) -> None:
  fig = figure((6.4, 3.6))
  ax = fig.add_subplot(1, 1, 1)
  if len(freq):
    ax.hist(np.log10(np.maximum(freq, 1e-12)), bins=50)
  ax.set_xlabel("log10 firing frequency (live latents)")
  ax.set_ylabel("latents")
  ax.set_title("SAE on h_ft − h_base: latent frequencies")
  save_png(fig, path)


def _section(ctx: DiffContext, out: Path, layer: int, summary: dict, latents: pd.DataFrame, lens: pd.DataFrame,
             contexts: pd.DataFrame) -> None:
  parts = [
      (f"<p>A BatchTopK SAE (m = {summary['dict_size']}, k = {summary['k']}; the crosscoder's trainer with one "
       f"input) on δ = h_ft − h_base at layer {layer}, from {html.escape(dx.source_name(ctx))}. Read back over "
       f"{summary['tokens']} tokens (special tokens left out): fraction of variance explained {summary['fve']:.3f}, "
       f"L0 {summary['l0']:.1f}, live latents {summary['live_fraction']:.1%}. Latents by frequency below: the tokens "
       "their decoder direction promotes and suppresses through the fine-tuned model's logit lens, and their "
       "max-activating contexts (all in sae_latents / sae_lens / sae_top_contexts.parquet).</p>"),
      png_html(out / "sae_frequency.png", "histogram of the latents' firing frequencies"),
  ]
  shown = latents[latents.live].sort_values("frequency", ascending=False).head(SHOWN)
  for row in shown.itertuples():
    toks = {w: ", ".join(repr(t) for t in lens[(lens.latent == row.latent) & (lens.direction == w)].token.head(8))
            for w in ("promoted", "suppressed")}
    parts.append(f"<h3>Latent {row.latent}</h3><p>frequency {row.frequency:.3%}, max activation "
                 f"{row.max_activation:.3g}<br>promotes: {html.escape(toks['promoted'])}<br>suppresses: "
                 f"{html.escape(toks['suppressed'])}</p>")
    parts.append(dx.contexts_table_html(contexts[contexts.latent == row.latent].head(3).to_dict("records"),
                                        ["rank", "activation"]))
  dx.write_section(out, "SAE on the activation differences", parts)


__all__ = ["difference_batch", "latent_pass", "model_differences", "run", "run_config", "store_differences",
           "train_sae"]
