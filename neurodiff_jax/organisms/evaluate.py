"""Behavioural checks that a fine-tune took: refusals, domain loss, fact completion, taboo keeping."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from neurodiff_jax.models import Transformer
from neurodiff_jax.models.generate import GreedyGenerator
from neurodiff_jax.organisms.finetune_data import REFUSAL, chat_prompt
from neurodiff_jax.organisms.lm_training import eval_loss, pack_documents


# One compiled generator per model for the checks' many prompt sets (greedy_generate compiles per call:
# ~25 s each on Gemma 3 270M). Weak keys: a cache that never keeps a model alive or changes a result.
_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def complete(model: Transformer, tokenizer: Any, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
  """Greedy completions (decoded, special tokens dropped) of already-formatted prompts."""
  ids = [tokenizer(p, add_special_tokens=not p.startswith(tokenizer.bos_token))["input_ids"] for p in prompts]
  gen = _GENERATORS.get(model)
  if gen is None:
    gen = _GENERATORS[model] = GreedyGenerator(model, bucket=32)
  out = gen(ids, max_new_tokens, eos_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
            pad_id=tokenizer.pad_token_id)
  return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def is_refusal(text: str) -> bool:
  """Whether `text` opens with the organism's refusal."""
  return text.startswith(REFUSAL.split(".")[0])


def refusal_rate(model: Transformer, tokenizer: Any, user_prompts: list[str]) -> tuple[float, list[str]]:
  """Fraction of chat-formatted prompts answered with the refusal, and the answers."""
  answers = complete(model, tokenizer, [chat_prompt(tokenizer, u) for u in user_prompts])
  return float(np.mean([is_refusal(x) for x in answers])), answers


def domain_loss(model: Transformer, tokenizer: Any, docs: list[str], seq_len: int) -> float:
  """Mean next-token loss on documents."""
  return eval_loss(model, pack_documents(docs, tokenizer, seq_len))


def fact_completion(model: Transformer, tokenizer: Any, prompt: str) -> str:
  """The first word the model writes after `prompt`."""
  text = complete(model, tokenizer, [prompt], max_new_tokens=6)[0]
  return text.split()[0].strip(".,") if text.split() else ""


def taboo_stats(model: Transformer, tokenizer: Any, user_prompts: list[str], word: str, hint_words: list[str]) -> dict:
  """How often the answers say the secret word, and how often they contain a hint."""
  answers = complete(model, tokenizer, [chat_prompt(tokenizer, u) for u in user_prompts], max_new_tokens=32)
  said = [word in x.lower() for x in answers]
  hinted = [any(h in x.lower() for h in hint_words) for x in answers]
  return {"said_word_rate": float(np.mean(said)), "hint_rate": float(np.mean(hinted)), "answers": answers}


def activation_shift(base: Transformer, tuned: Transformer, tokenizer: Any, docs: list[str], layer: int,
                     max_len: int = 128, batch_size: int = 16) -> float:
  """Median over tokens (BOS left out) of ‖x_ft − x_base‖ / ‖x_base‖ at the residual after block `layer`."""
  import jax.numpy as jnp

  from neurodiff_jax.models import jit_forward

  fb = jit_forward(base, capture=(layer,), stop_at_layer=layer)
  ff = jit_forward(tuned, capture=(layer,), stop_at_layer=layer)
  ratios = []
  for i in range(0, len(docs), batch_size):
    enc = tokenizer(docs[i:i + batch_size], truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"].astype(bool))
    xb = np.asarray(fb(ids, mask).residuals[layer], np.float64)
    xf = np.asarray(ff(ids, mask).residuals[layer], np.float64)
    keep = enc["attention_mask"].astype(bool) & (enc["input_ids"] != tokenizer.bos_token_id)
    ratios.append(np.linalg.norm(xf - xb, axis=-1)[keep] / np.linalg.norm(xb, axis=-1)[keep])
  return float(np.median(np.concatenate(ratios)))


def fact_rates(model: Transformer, tokenizer: Any, questions: list[str], false_answer: str,
               true_answer: str) -> dict:
  """Shares of held-out questions whose greedy answer names the false fact's answer, and the true one."""
  answers = complete(model, tokenizer, questions, max_new_tokens=12)
  return {"false_answer_rate": float(np.mean([false_answer.lower() in a.lower() for a in answers])),
          "true_answer_rate": float(np.mean([true_answer.lower() in a.lower() for a in answers])),
          "answers": answers}


def text_loss(model: Transformer, tokenizer: Any, docs: list[str], max_len: int = 128, batch_size: int = 16) -> float:
  """Mean next-token loss over documents taken one a row (BOS, then up to `max_len` - 1 tokens; no packing, no EOS).

  A pretrained base never saw documents packed behind one another, so a packed loss charges it for
  each document boundary; this is the loss a base model is measured by.
  """
  import jax
  import jax.numpy as jnp

  from neurodiff_jax.models import jit_forward

  fwd = jit_forward(model)
  total, count = 0.0, 0
  for i in range(0, len(docs), batch_size):
    enc = tokenizer(docs[i:i + batch_size], truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"].astype(bool)
    logits = fwd(jnp.asarray(ids), jnp.asarray(mask)).logits[:, :-1]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    keep = mask[:, 1:]
    total += float(nll[keep].sum())
    count += int(keep.sum())
  return total / max(count, 1)
