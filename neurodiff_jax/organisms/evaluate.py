"""Behavioural checks that a fine-tune took: refusals, domain loss, fact completion, taboo keeping."""

from __future__ import annotations

from typing import Any

import numpy as np

from neurodiff_jax.models import Transformer, greedy_generate
from neurodiff_jax.organisms.finetune_data import REFUSAL, chat_prompt
from neurodiff_jax.organisms.lm_training import eval_loss, pack_documents


def complete(model: Transformer, tokenizer: Any, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
  """Greedy completions (decoded, special tokens dropped) of already-formatted prompts."""
  ids = [tokenizer(p, add_special_tokens=not p.startswith(tokenizer.bos_token))["input_ids"] for p in prompts]
  out = greedy_generate(model, ids, max_new_tokens, eos_id=tokenizer.convert_tokens_to_ids("<end_of_turn>"),
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
