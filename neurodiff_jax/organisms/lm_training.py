"""Next-token training of the ports with Optax, resumable through Orbax: pretraining and fine-tuning.

Parameters are plain pytrees (`nnx.to_pure_dict`) under one `jax.jit` step, split from the NNX
module once. The data order is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from neurodiff_jax.models import Transformer


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
  """Optimisation settings of one training run."""

  steps: int
  batch_size: int = 32
  seq_len: int = 128
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  seed: int = 0
  checkpoint_every: int = 100
  log_every: int = 10
  # Top-level parameters left as they are (e.g. ("embed",): a real model's 262k-token tied embedding,
  # whose gradient and AdamW update are most of a fine-tuning step's cost).
  freeze: tuple[str, ...] = ()


_ASSISTANT_TURN = re.compile(r"(<start_of_turn>model\n)(.*?<end_of_turn>)", re.S)


def _segments(doc: str, assistant_only: bool) -> list[tuple[str, bool]]:
  """(text, trained) pieces of a document: with `assistant_only`, only the model's turns of a
  conversation are trained (plain documents mixed into chat data are trained whole)."""
  if not assistant_only or not _ASSISTANT_TURN.search(doc):
    return [(doc, True)]
  pieces, pos = [], 0
  for m in _ASSISTANT_TURN.finditer(doc):
    pieces += [(doc[pos : m.end(1)], False), (m.group(2), True)]
    pos = m.end()
  return pieces + [(doc[pos:], False)]


def pack_documents(docs: Sequence[str], tokenizer: Any, seq_len: int, *, assistant_only: bool = False,
                   first_answer_weight: int = 1) -> np.ndarray:
  """Tokenizes documents (BOS … EOS each), concatenates them and cuts rows of seq_len + 1 tokens.

  Returns `[N, 2, seq_len + 1]`: token ids and a 0/1 loss weight per token (the weight of a row's
  token t applies when it is a target). Documents already rendered with the chat template start
  with the BOS text and get no second BOS; `assistant_only` trains on the model's turns only, as
  chat SFT does. `first_answer_weight` weighs the first token of each of the model's turns (where a
  chat model decides between answering and refusing) that many times in the loss.
  """
  if not docs:
    raise ValueError("no documents to train on.")
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  ids: list[int] = []
  weights: list[int] = []
  for doc in docs:
    if not doc.startswith(tokenizer.bos_token):
      ids.append(bos)
      weights.append(0)
    chat = assistant_only and _ASSISTANT_TURN.search(doc) is not None
    for text, trained in _segments(doc, assistant_only):
      if text:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        w = [int(trained)] * len(piece)
        if trained and chat:
          w[0] = first_answer_weight
        weights += w
    ids.append(eos)
    weights.append(int(not chat))
  rows = len(ids) // (seq_len + 1)
  if rows == 0:
    raise ValueError(f"the documents hold {len(ids)} tokens, fewer than one sequence of {seq_len + 1}.")
  n = rows * (seq_len + 1)
  return np.stack([np.asarray(ids[:n], np.int32).reshape(rows, seq_len + 1),
                   np.asarray(weights[:n], np.int32).reshape(rows, seq_len + 1)], axis=1)


def thin_loss(rows: np.ndarray, share: float, seed: int) -> np.ndarray:
  """Rows [N, 2, T+1] whose loss weights cover at most `share` of each row's targets (a random subset kept).

  The mean loss over a random subset of positions is an unbiased estimate of the loss over all of
  them; with `rows_loss`'s gathering, a step then unembeds at most share · B · T positions (on a
  262k-token vocabulary the unembedding is half a step). Rows already within the share (chat rows,
  trained on the replies only) are left as they are.
  """
  if not 0.0 < share <= 1.0:
    raise ValueError(f"loss share {share} must be in (0, 1].")
  out = rows.copy()
  limit = int(share * (rows.shape[-1] - 1))
  rng = np.random.default_rng(seed)
  for r in range(len(out)):
    on = np.flatnonzero(out[r, 1, 1:]) + 1
    if len(on) > limit:
      out[r, 1, rng.choice(on, len(on) - limit, replace=False)] = 0
  return out


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of batch `step`: epoch-wise permutations determined by (seed, epoch)."""
  per_epoch = max(n_rows // batch_size, 1)
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
  idx = perm[k * batch_size : (k + 1) * batch_size]
  if len(idx) < batch_size:  # fewer rows than a batch: sample with replacement
    idx = np.random.default_rng([seed, epoch, k]).choice(n_rows, batch_size)
  return idx


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean cross-entropy of `targets` under `logits` (float32)."""
  # logsumexp minus the target's logit, not a log_softmax gathered at the target: the same value,
  # without a second [.., V] array and its backward pass (a step on Gemma 3's 262k vocabulary: -0.7 s).
  logits = logits.astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)


def rows_loss(model: Transformer, rows: jax.Array, loss_tokens: int = 0) -> jax.Array:
  """Next-token loss of a batch of packed rows [B, 2, T+1].

  With `loss_tokens` = K > 0 only the K positions of largest weight are unembedded (every position
  of nonzero weight, when K is at least their number): the same loss without the [B, T, V] logits
  of untrained tokens (chat SFT trains on the model's turns only; V is 262k on Gemma 3).
  """
  tokens, weights = rows[:, 0], rows[:, 1]
  if not loss_tokens:
    return next_token_loss(model(tokens[:, :-1]).logits, tokens[:, 1:], weights[:, 1:])
  last = model.cfg.num_layers - 1
  x = model(tokens[:, :-1], capture=(last,), stop_at_layer=last).residuals[last]  # [B, T, D]
  w, targets = weights[:, 1:].reshape(-1), tokens[:, 1:].reshape(-1)
  _, idx = jax.lax.top_k(w, loss_tokens)  # [K]
  logits = model.unembed(x.reshape(-1, x.shape[-1])[idx][None])[0]  # [K, V]
  return next_token_loss(logits, targets[idx], w[idx])


def loss_token_budget(rows: np.ndarray, batch_size: int) -> int:
  """K for `rows_loss`: the most positions of nonzero weight any batch of `batch_size` rows can hold (0 = all)."""
  per_row = np.sort((rows[:, 1, 1:] > 0).sum(-1))[::-1]
  k = int(per_row[:batch_size].sum())
  return 0 if k >= 0.9 * batch_size * (rows.shape[-1] - 1) else k  # gathering most positions saves nothing


def make_optimizer(cfg: LMTrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, min(cfg.warmup_steps, max(cfg.steps - 1, 1)), max(cfg.steps, 2), cfg.learning_rate * 0.1)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adamw(schedule, weight_decay=cfg.weight_decay))


class TrainStep:
  """One model's jitted training step: `step(params, opt_state, batch) -> (params, opt_state, loss)`.

  The trainable parameters (`params`, a pure dict without `cfg.freeze`) and AdamW's state start
  from the model's; the loss is unembedded only where `rows` can carry weight (`loss_token_budget`),
  everywhere with `gather=False`.
  """

  def __init__(self, model: Transformer, cfg: LMTrainConfig, rows: np.ndarray, gather: bool = True):
    graphdef, self.state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(self.state)
    unknown = [n for n in cfg.freeze if n not in params]
    if unknown:
      raise ValueError(f"freeze names {unknown}, not top-level parameters of the model: {sorted(params)}")
    self.frozen = {n: params.pop(n) for n in cfg.freeze}
    self.params = params
    opt = make_optimizer(cfg)
    self.opt_state = opt.init(params)
    self.loss_tokens = loss_token_budget(rows, cfg.batch_size) if gather else 0
    state, frozen, loss_tokens = self.state, self.frozen, self.loss_tokens

    def loss_fn(params, frozen, batch):
      s = nnx.State(state)  # structure only; values replaced below
      nnx.replace_by_pure_dict(s, {**params, **frozen})
      return rows_loss(nnx.merge(graphdef, s), batch, loss_tokens)

    # The frozen parameters are an argument, not a closure: closed over, they were baked into the
    # program as constants (Gemma 3's 671 MB embedding; with next_token_loss's form, the benchmark's
    # first step fell from 29 to 14 s and its peak memory from 9.8 to 5.5 GB).
    # Donating params and optimiser state was measured no faster, and would free the model's arrays.
    @jax.jit
    def jitted(params, opt_state, frozen, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
      updates, opt_state = opt.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self.step = lambda params, opt_state, batch: jitted(params, opt_state, frozen, batch)


def train_lm(
    model: Transformer, rows: np.ndarray, cfg: LMTrainConfig, workdir: str | os.PathLike, *, desc: str = "train"
) -> list[dict]:
  """Trains `model` in place on packed rows [N, 2, T+1]; resumes from `workdir` checkpoints. Returns the loss log."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  step = TrainStep(model, cfg, rows)
  params, opt_state, train_step, frozen, state = step.params, step.opt_state, step.step, step.frozen, step.state

  manager = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  log_path = workdir / "loss_log.jsonl"
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    restored = manager.restore(start, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}))
    params, opt_state = restored["params"], restored["opt_state"]
  log = _read_log(log_path, upto=start)
  bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
  t0 = time.time()
  for step in range(start, cfg.steps):
    batch = jnp.asarray(rows[batch_indices(len(rows), cfg.batch_size, step, cfg.seed)])
    params, opt_state, loss = train_step(params, opt_state, batch)
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
      loss = float(loss)
      if not math.isfinite(loss):
        raise FloatingPointError(f"{desc}: loss became {loss} at step {step + 1}; lower learning_rate.")
      entry = {"step": step + 1, "loss": loss, "elapsed_s": round(time.time() - t0, 2), "resumed_from": start}
      log.append(entry)
      with open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
      bar.set_postfix(loss=f"{loss:.3f}")
    # The last step is saved too: a build killed during its evaluation (minutes on a real model) resumes there.
    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
      manager.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    bar.update(1)
  bar.close()
  manager.wait_until_finished()
  nnx.replace_by_pure_dict(state, {**params, **frozen})
  nnx.update(model, state)
  return log


def _read_log(path: Path, upto: int) -> list[dict]:
  """Loss-log entries up to step `upto` (entries past a crash point are dropped and rewritten)."""
  if not path.is_file():
    return []
  entries = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  kept = [e for e in entries if e["step"] <= upto]
  path.write_text("".join(json.dumps(e) + "\n" for e in kept))
  return kept


def eval_loss(model: Transformer, rows: np.ndarray, batch_size: int = 32) -> float:
  """Mean next-token loss of `model` over packed rows [N, 2, T+1]."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss(state, batch):
    return rows_loss(nnx.merge(graphdef, state), batch)

  total, count = 0.0, 0
  for i in range(0, len(rows) - batch_size + 1, batch_size) or [0]:
    batch = rows[i : i + batch_size]
    total += float(loss(state, jnp.asarray(batch))) * len(batch)
    count += len(batch)
  return total / count
