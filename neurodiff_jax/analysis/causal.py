"""The causal test (Minder et al. 2025; docs/methods.md §5): do a latent set's chat parts carry chat behaviour?

Run the chat model on chat-formatted text, but replace its residual after block L with
  x̃ = x_base + Σ_{j∈S} f_j (d_j^chat − d_j^base)
(codes f of the paired activations, decoder rows d in original units) and let the chat model run
on from there. KL(P_chat ‖ P_patched) of the next-token distributions says how much of the chat
model's behaviour the latents S restore on top of the base residual. S = ∅ ("all base") is the
ceiling, S = all latents the error-patch baseline; "template" puts the chat residual back on the
chat-template tokens only (and the base residual elsewhere). KL is reported over the assistant's
reply, its first 10 content tokens and the rest, with bootstrap intervals over conversations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neurodiff_jax.activations.datasets import KIND_TEXT, _content_spans, _conversation_kinds
from neurodiff_jax.crosscoder.model import Crosscoder
from neurodiff_jax.models.sharding import mesh_of, put_batch, put_replicated
from neurodiff_jax.models.transformer import Transformer
from neurodiff_jax.utils.plots import figure, save_png

REGIONS = ("reply", "first", "rest")
TEMPLATE = "template"  # the group value that patches by token kind instead of by latents
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ChatEvalSet:
  """Right-padded chat conversations and the token masks the causal KL is reported over, all [n, T].

  A position t is scored for the token it predicts, t + 1: `reply` marks positions whose next token
  belongs to the assistant's reply (its content and the template tokens that close the turn),
  `first` those whose next token is one of the reply's first `first_n` content tokens, `rest` the
  remaining reply positions. `template` marks chat-template tokens themselves (never the BOS at 0).
  """

  ids: np.ndarray  # int32 [n, T]; padding is the tokenizer's pad id
  mask: np.ndarray  # bool [n, T]: real tokens
  reply: np.ndarray  # bool [n, T]: the next token is part of the assistant's reply
  first: np.ndarray  # bool [n, T]: the next token is one of the reply's first `first_n` content tokens
  rest: np.ndarray  # bool [n, T]: reply & ~first
  template: np.ndarray  # bool [n, T]: the token is chat-template scaffolding or a special token (BOS at 0 excluded)

  @property
  def num_conversations(self) -> int:
    """n, the number of conversations."""
    return int(self.ids.shape[0])

  def region(self, name: str) -> np.ndarray:
    """The bool [n, T] mask of a region in REGIONS."""
    if name not in REGIONS:
      raise ValueError(f"unknown region {name!r}; choose one of {', '.join(REGIONS)}.")
    return getattr(self, name)


def _check_conversation(conv: Any, i: int) -> list[dict[str, str]]:
  """`conv` as a list of {"role", "content"} dicts ending with the assistant's reply, or an error naming the fix."""
  if not isinstance(conv, Sequence) or isinstance(conv, str) or not conv:
    raise ValueError(f"conversation {i} is not a non-empty list of {{'role', 'content'}} messages; give each "
                     "conversation as such a list, ending with the assistant's reply.")
  for k, message in enumerate(conv):
    if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
      raise ValueError(f"conversation {i} message {k} is not a dict with 'role' and 'content' keys: {message!r}.")
  if conv[-1]["role"] != "assistant":
    raise ValueError(f"conversation {i} ends with a {conv[-1]['role']!r} message; the causal test scores the "
                     "assistant's reply, so end each conversation with a message of role 'assistant' (drop trailing "
                     "turns, or add the chat model's reply, e.g. from models.greedy_generate).")
  if not str(conv[-1]["content"]).strip():
    raise ValueError(f"conversation {i}'s assistant reply is empty; give it a reply with at least one token.")
  return [dict(m) for m in conv]


def chat_eval_set(tokenizer: Any, conversations: Sequence[list[dict]], max_len: int, first_n: int = 10) -> ChatEvalSet:
  """Renders `conversations` with the chat template, tokenizes and right-pads them, and marks the reply's tokens.

  Each conversation is a list of {"role", "content"} messages whose last one is the assistant's
  reply. Conversations longer than `max_len` tokens are cut; one whose reply is cut off entirely is
  an error. The template renders BOS, so the text is tokenized with add_special_tokens=False.
  """
  if not conversations:
    raise ValueError("no conversations given; pass at least one conversation ending with an assistant reply.")
  if max_len < 2:
    raise ValueError(f"max_len={max_len} leaves no token to predict; use max_len >= 2.")
  if first_n < 1:
    raise ValueError(f"first_n={first_n} must be >= 1 (the paper uses the first 10 reply tokens).")
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat template; use the chat model's tokenizer or set "
                     "tokenizer.chat_template.")
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("chat_eval_set finds the reply's and the template's tokens by character offsets, which needs a "
                     "fast tokenizer; load it with use_fast=True (models.load_tokenizer does).")
  special = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int32)
  rows = []
  for i, conv in enumerate(conversations):
    conv = _check_conversation(conv, i)
    rendered = tokenizer.apply_chat_template(conv, tokenize=False)
    spans = _content_spans(rendered, conv, f"conversation {i}")  # the reply's content is non-empty: it is the last span
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)  # [n, 2]
    kinds = _conversation_kinds(ids, offsets, spans, special)
    # The reply starts at the first token that reaches into its content and runs to the end: the content
    # and the tokens that close the turn (`<end_of_turn>`, `<|eot_id|>`, ...).
    starts = np.flatnonzero(offsets[:, 1] > spans[-1, 0])
    if not len(starts):
      raise ValueError(f"conversation {i}: no token of the assistant's reply was found in the rendered text.")
    r0 = max(int(starts[0]), 1)  # token 0 has no position before it to predict it (a template without BOS or header)
    length = min(len(ids), max_len)
    if r0 >= length:
      raise ValueError(f"conversation {i} has {r0} tokens before the assistant's reply, so max_len={max_len} cuts the "
                       f"whole reply off; raise max_len above {r0} or shorten the conversation's earlier turns.")
    content = np.flatnonzero((np.arange(len(ids)) >= r0) & (kinds == KIND_TEXT))[:first_n]  # [<= first_n]
    rows.append((ids[:length], kinds[:length], r0, content[content < length]))

  n, t_max = len(rows), max(len(r[0]) for r in rows)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = np.full((n, t_max), pad, np.int32)
  mask, reply, first, template = (np.zeros((n, t_max), bool) for _ in range(4))
  for i, (doc_ids, kinds, r0, content) in enumerate(rows):
    length = len(doc_ids)
    ids[i, :length] = doc_ids
    mask[i, :length] = True
    reply[i, r0 - 1 : length - 1] = True  # position t predicts token t + 1
    first[i, content - 1] = True
    template[i, :length] = kinds != KIND_TEXT
    template[i, 0] = False  # BOS: never patched, so never counted as a template token
  return ChatEvalSet(ids=ids, mask=mask, reply=reply, first=first, rest=reply & ~first, template=template)


def _group_selection(name: str, value: np.ndarray | str, m: int) -> tuple[np.ndarray, bool]:
  """(float32 [m] 0/1 latent mask, use-template flag) of one group, or an error naming the fix."""
  if isinstance(value, str):
    if value != TEMPLATE:
      raise ValueError(f"group {name!r} is the string {value!r}; the only string group is {TEMPLATE!r} (chat residual "
                       "on template tokens, base elsewhere). Give other groups as arrays of latent indices.")
    return np.zeros(m, np.float32), True
  s = np.asarray(value)
  if s.ndim != 1 or (s.size and not np.issubdtype(s.dtype, np.integer)):
    raise ValueError(f"group {name!r} must be a 1-D array of integer latent indices (or {TEMPLATE!r}); got dtype "
                     f"{s.dtype} and shape {s.shape}.")
  bad = s[(s < 0) | (s >= m)]
  if bad.size:
    raise ValueError(f"group {name!r} has latent index {int(bad[0])}, out of range for a crosscoder with m={m} latents "
                     f"(valid: 0 … {m - 1}); check the group was built for this crosscoder.")
  sel = np.zeros(m, np.float32)
  sel[s.astype(np.int64)] = 1.0  # a set: an index given twice counts once
  return sel, False


def _batch_functions(chat: Transformer, base: Transformer, cc: Crosscoder, layer: int) -> tuple[Callable, Callable]:
  """Jitted (prepare, group_kl) over the models' states, split once (compiled once per batch shape)."""
  chat_def, _ = nnx.split(chat)
  base_def, _ = nnx.split(base)

  @jax.jit
  def prepare(chat_state, base_state, params, ids, mask):
    """The chat model's residual at L and logits, the base residual at L, and the codes f [B, T, m]."""
    out = nnx.merge(chat_def, chat_state)(ids, mask, capture=(layer,))
    x_chat = out.residuals[layer]  # [B, T, d]
    x_base = nnx.merge(base_def, base_state)(ids, mask, capture=(layer,), stop_at_layer=layer).residuals[layer]
    b, t, d = x_chat.shape
    pair = jnp.stack([x_base, x_chat], axis=-2).reshape(b * t, 2, d)  # model 0 = base, 1 = chat
    f = dataclasses.replace(cc, params=params).encode(pair).reshape(b, t, -1)  # [B, T, m]
    return x_chat, x_base, f, out.logits

  @jax.jit
  def group_kl(chat_state, delta, ids, mask, keep_chat, template, x_chat, x_base, f, logits_chat, sel, use_template):
    """Per-token KL(P_chat ‖ P_patched) [B, T] of one group (latent mask `sel` [m], or the template patch)."""
    patch = jnp.einsum("BTm,md->BTd", f * sel, delta, precision=HIGHEST)  # Σ_{j∈S} f_j (d_j^chat − d_j^base)
    patched = x_base.astype(jnp.float32) + patch
    patched = jnp.where((use_template & template)[..., None], x_chat.astype(jnp.float32), patched)
    # BOS (position 0) and padding keep the chat residual: BOS residuals are huge outliers that the
    # store excludes, so the crosscoder never saw them and its codes there mean nothing; padding is
    # never scored. Position 0 being unpatched also makes its KL 0 (up to rounding).
    patched = jnp.where(keep_chat[..., None], x_chat.astype(jnp.float32), patched).astype(x_chat.dtype)
    logits = nnx.merge(chat_def, chat_state)(ids, mask, interventions={layer: lambda _: patched}).logits
    logp = jax.nn.log_softmax(logits_chat.astype(jnp.float32), axis=-1)  # [B, T, V]
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)  # [B, T]
    return jnp.where(mask, kl, 0.0)

  return prepare, group_kl


def causal_kl(chat: Transformer, base: Transformer, cc: Crosscoder, layer: int, data: ChatEvalSet,
              groups: Mapping[str, np.ndarray | str], batch_size: int = 8) -> dict[str, np.ndarray]:
  """Per-token KL(P_chat ‖ P_patched) [n, T] float32 per group (0 on padding), patching layer `layer`.

  A group is an int array of latent indices S (empty: all base; np.arange(m): all latents) or the
  string "template" (chat residual on template tokens, base residual elsewhere). Model 0 of the
  crosscoder is the base, model 1 the chat model; codes and decoder rows are in original units.
  A batch holds the chat logits and the codes on the device, about batch_size · T · (V + m) · 4
  bytes: lower `batch_size` for large vocabularies or dictionaries.
  """
  m, d = cc.cfg.dict_size, cc.cfg.d_model
  if cc.cfg.num_models != 2:
    raise ValueError(f"the causal test patches one base and one chat model; this crosscoder reads "
                     f"num_models={cc.cfg.num_models}. Use a crosscoder trained on the (base, chat) pair.")
  for what, model in (("chat", chat), ("base", base)):
    if model.cfg.hidden_size != d:
      raise ValueError(f"the {what} model's hidden size is {model.cfg.hidden_size} but the crosscoder's d_model is "
                       f"{d}; load the models the crosscoder was trained on (the store's manifest names them).")
    if not 0 <= layer < model.cfg.num_layers:
      raise ValueError(f"layer {layer} is out of range for the {what} model ({model.cfg.num_layers} layers); use the "
                       "layer the crosscoder was trained on.")
  if not groups:
    raise ValueError("no groups given; pass at least one, e.g. {'all_base': np.array([], int)}.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  selections = {name: _group_selection(name, value, m) for name, value in groups.items()}

  prepare, group_kl = _batch_functions(chat, base, cc, layer)
  _, chat_state = nnx.split(chat)
  _, base_state = nnx.split(base)
  decoder = cc.decoder()  # [m, 2, d] original units
  delta = jnp.asarray(decoder[:, 1] - decoder[:, 0])  # [m, d]
  mesh = mesh_of(chat)  # a model mesh: the crosscoder (on one device) joins the models there, replicated
  params = put_replicated(mesh, cc.params)
  n, t = data.ids.shape
  keep_chat = ~data.mask
  keep_chat[:, 0] = True
  sel_dev = {name: (jnp.asarray(sel), jnp.asarray(flag)) for name, (sel, flag) in selections.items()}
  out = {name: np.zeros((n, t), np.float32) for name in groups}
  for lo in range(0, n, batch_size):
    rows = np.arange(lo, min(lo + batch_size, n))
    # The last batch repeats its first row to the full batch size, so every batch has one shape (one compile).
    padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    ids, mask, keep, template = put_batch(mesh, data.ids[padded], data.mask[padded], keep_chat[padded],
                                          data.template[padded])
    x_chat, x_base, f, logits_chat = prepare(chat_state, base_state, params, ids, mask)
    for name, (sel, flag) in sel_dev.items():
      kl = group_kl(chat_state, delta, ids, mask, keep, template, x_chat, x_base, f, logits_chat, sel, flag)
      out[name][rows] = np.asarray(kl)[: len(rows)]
  return out


def causal_table(kl: dict[str, np.ndarray], data: ChatEvalSet, n_boot: int = 1000, seed: int = 0) -> list[dict]:
  """One row per (group, region): token-weighted mean KL and a 95% percentile bootstrap interval over conversations.

  Every group and region resamples the same conversations (one seed), so the intervals are paired.
  """
  if n_boot < 1:
    raise ValueError(f"n_boot={n_boot} must be >= 1.")
  n = data.num_conversations
  idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [n_boot, n] conversations per resample
  rows = []
  for group, values in kl.items():
    values = np.asarray(values, np.float64)
    if values.shape != data.ids.shape:
      raise ValueError(f"KL of group {group!r} has shape {values.shape}, but the eval set is {data.ids.shape}; pass "
                       "the ChatEvalSet causal_kl ran on.")
    for region in REGIONS:
      where = data.region(region)
      tokens = where.sum(1)  # [n]
      total = (values * where).sum(1)  # [n]
      n_tokens = int(tokens.sum())
      row = {"group": group, "region": region, "kl_mean": float("nan"), "ci_low": float("nan"),
             "ci_high": float("nan"), "n_tokens": n_tokens, "n_docs": int((tokens > 0).sum())}
      if n_tokens:
        row["kl_mean"] = float(total.sum() / n_tokens)
        boot_tokens = tokens[idx].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
          boot = total[idx].sum(1) / boot_tokens  # a resample with no token of the region is NaN, then left out
        row["ci_low"], row["ci_high"] = (float(v) for v in np.nanpercentile(boot, [2.5, 97.5]))
      rows.append(row)
  return rows


def causal_plot(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
  """A grouped bar chart of `causal_table` rows (bars: regions, groups on the x axis, 95% intervals), saved as PNG."""
  if not rows:
    raise ValueError("no rows to plot; pass the output of causal_table.")
  groups = list(dict.fromkeys(r["group"] for r in rows))
  regions = [r for r in REGIONS if any(row["region"] == r for row in rows)]
  by_key = {(r["group"], r["region"]): r for r in rows}
  fig = figure((max(6.0, 1.2 * len(groups) + 2), 4.0), dpi=120)
  ax = fig.subplots()
  width = 0.8 / len(regions)
  x = np.arange(len(groups))
  for k, region in enumerate(regions):
    cells = [by_key.get((g, region), {}) for g in groups]
    mean = np.asarray([c.get("kl_mean", np.nan) for c in cells], float)
    low = np.asarray([c.get("ci_low", np.nan) for c in cells], float)
    high = np.asarray([c.get("ci_high", np.nan) for c in cells], float)
    err = np.nan_to_num(np.stack([mean - low, high - mean]), nan=0.0).clip(min=0)
    ax.bar(x + (k - (len(regions) - 1) / 2) * width, np.nan_to_num(mean), width, yerr=err, capsize=3, label=region)
  ax.set_xticks(x, groups, rotation=20, ha="right")
  ax.set_ylabel("KL(chat ‖ patched), nats / token")
  ax.set_title("Causal test: KL to the unpatched chat model (95% bootstrap CI)")
  ax.legend(title="tokens")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return save_png(fig, path)


__all__ = ["REGIONS", "TEMPLATE", "ChatEvalSet", "causal_kl", "causal_plot", "causal_table", "chat_eval_set"]
