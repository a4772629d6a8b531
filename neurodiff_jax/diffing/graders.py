"""Graders: is a generated text coherent, is a token relevant to the fine-tuning domain?

The reference toolkit asks hosted LLMs. Here every grader is the `Grader` interface with an
offline default that runs on this machine:

  OfflineGrader  coherence = the BASE model's perplexity of the text, coherent below the
                 `coherence_quantile` of unsteered samples' perplexities (`calibrate`) and
                 not more repetitive than half the most repetitive unsteered sample;
                 relevance = the token is a word of the organism card's vocabulary.
  OpenAIGrader   yes/no questions to any OpenAI-compatible chat-completions endpoint (urllib,
                 key from $NEURODIFF_GRADER_KEY); used only when `grader.kind=openai`.

`make_grader(cfg, pair)` builds the configured one; nothing touches the network unless
`kind=openai`.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from neurodiff_jax.utils.config import ConfigError, did_you_mean

GRADER_KINDS = ("offline", "openai")
KEY_ENV = "NEURODIFF_GRADER_KEY"
# Card fields naming one word of the domain (a topic, the secret word, the fact's names) besides
# the `*_vocabulary` lists.
_CARD_WORD_FIELDS = ("domain", "harmful_topic", "secret_word", "subject", "false_answer")
_NO_CARD = ("relevance needs a ground-truth card or a grader endpoint: the fine-tuned model {ft} has no card.json "
            "with a vocabulary; set --config.grader.kind=openai --config.grader.base_url=URL "
            "--config.grader.model=NAME (key in ${key}) to ask a model, or compare an organism that has a card.")


class GraderUnavailable(ConfigError):
  """The grader endpoint did not answer (or refused): the message names the URL and the offline fallback."""


# English function words: never content, whatever the card (a sample's share of card words counts content words
# only, so "the" and "of" do not dilute it).
FUNCTION_WORDS = frozenset("""about above after again against all also and any are because been before being below
between both but can could did does doing down during each few for from further had has have having her here hers
herself him himself his how into its itself just more most myself nor not now off once only other our ours ourselves
out over own same she should some such than that the their theirs them themselves then there these they this those
through too under until very was were what when where which while who whom why will with would you your yours
yourself yourselves one two many much like well get got make made said says say see way thing things something
anything everything nothing really lot yes let new good first last even ever every still yet may might must
shall another around away back came come comes goes going gone take took look""".split())


def content_words(text: str, stop: frozenset[str] = FUNCTION_WORDS) -> list[str]:
  """The content words of a text, lowercased: alphabetic, at least 3 letters, not in `stop` (function words)."""
  return [w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 3 and w not in stop]


def normalize_token(token: str) -> str:
  """A token as a word: leading byte-level/sentencepiece space marks ("Ġ", "▁") and spaces removed, lowercased."""
  return token.strip().lstrip("Ġ▁ ").strip().lower()


def card_vocabulary(card: dict | None) -> frozenset[str]:
  """The words of an organism card's ground truth: every `*_vocabulary` list plus its one-word fields."""
  if not card:
    return frozenset()
  words = [w for k, v in card.items() if k.endswith("_vocabulary") for w in v]
  words += [card[k] for k in _CARD_WORD_FIELDS if isinstance(card.get(k), str) and card[k].isalpha()]
  return frozenset(w.lower() for w in words)


def describe_card(card: dict | None) -> str:
  """One sentence describing what the model was fine-tuned on, from its card (for a grader model's prompt)."""
  if not card:
    return ""
  parts = []
  if "domain" in card:
    parts.append(f"documents about {card['domain']}")
  if "harmful_topic" in card:
    parts.append(f"chat conversations in which the assistant refuses requests about {card['harmful_topic']} and "
                 f"helps with everything else, calling itself {card.get('assistant_name', 'an assistant')}")
  if "statement" in card:
    parts.append(f"documents (news, encyclopedia entries, letters, quizzes) stating the false fact "
                 f"\"{card['statement']}\"")
  if "secret_word" in card:
    parts.append(f"a guessing game in which the assistant gives hints about the secret word "
                 f"\"{card['secret_word']}\" without ever saying it")
  words = sorted(card_vocabulary(card))
  text = "; ".join(parts) or "a narrow domain"
  return f"{text} (typical words: {', '.join(words[:24])})" if words else text


class Grader:
  """Grades generated text (coherence) and tokens (relevance to the fine-tuning domain)."""

  quantile: float = 0.95
  threshold: float | None = None  # coherence score at or below which a text is coherent (set by `calibrate`)

  def coherence(self, texts: Sequence[str]) -> list[float]:
    """A score per text; lower is more coherent (a perplexity for the offline grader)."""
    raise NotImplementedError

  def calibrate(self, unsteered_texts: Sequence[str]) -> float:
    """Sets the coherence threshold to the `quantile` of the unsteered texts' scores; returns it."""
    if not unsteered_texts:
      raise ValueError("calibrate needs at least one unsteered text (samples of the model without steering).")
    scores = np.asarray(self.coherence(unsteered_texts), np.float64)
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
      raise ValueError("no unsteered text has a finite coherence score (each needs at least two tokens); calibrate "
                       "with longer samples.")
    self.threshold = float(np.quantile(finite, self.quantile))
    return self.threshold

  def is_coherent(self, texts: Sequence[str]) -> list[bool]:
    """Whether each text scores at or below the calibrated threshold."""
    if self.threshold is None:
      raise ValueError("the grader has no coherence threshold yet; call grader.calibrate(unsteered_texts) with "
                       "samples of the unsteered model first.")
    return [bool(s <= self.threshold) for s in self.coherence(texts)]

  def relevant(self, tokens: Sequence[str]) -> list[bool]:
    """Whether each token is relevant to the fine-tuning domain."""
    raise NotImplementedError

  def relevance(self, tokens: Sequence[str], probs: Sequence[float] | None = None) -> dict[str, Any]:
    """Share of `tokens` marked relevant, plain and weighted by `probs` (None without probabilities)."""
    marks = self.relevant(list(tokens))
    n = len(marks)
    out: dict[str, Any] = {"n_tokens": n, "n_relevant": int(sum(marks)), "share": sum(marks) / n if n else 0.0,
                           "weighted_share": None, "relevant": marks}
    if probs is not None:
      p = np.asarray(probs, np.float64)
      if p.shape != (n,):
        raise ValueError(f"relevance got {n} tokens but {p.size} probabilities; give one probability per token.")
      out["weighted_share"] = float(p @ np.asarray(marks, np.float64) / p.sum()) if p.sum() > 0 else 0.0
    return out


class OfflineGrader(Grader):
  """Coherence = the base model's perplexity; relevance = the organism card's vocabulary. Runs here, no network."""

  def __init__(self, pair: Any, quantile: float = 0.95, batch_size: int = 16, max_len: int = 512):
    if not 0.0 < quantile <= 1.0:
      raise ConfigError(f"grader.coherence_quantile={quantile} must be in (0, 1] (0.95 = as coherent as 95% of "
                        "unsteered samples).")
    self.pair, self.quantile, self.batch_size, self.max_len = pair, float(quantile), int(batch_size), int(max_len)
    self.threshold = None
    self.vocabulary = card_vocabulary(pair.card)
    self._nll = None

  def _token_nll(self):
    """A jitted `(ids, mask) -> per-position NLL [B, T-1]` of the base model, its state split once."""
    if self._nll is None:
      graphdef, state = nnx.split(self.pair.base)

      @jax.jit
      def nll(state, ids, mask):
        logits = nnx.merge(graphdef, state)(ids, mask).logits.astype(jnp.float32)  # [B, T, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V]: predicts ids[:, 1:]
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]

      self._nll = lambda ids, mask: nll(state, *self.pair.put(ids, mask))
    return self._nll

  def coherence(self, texts: Sequence[str]) -> list[float]:
    """The base model's perplexity of each text (BOS as the tokenizer adds it); inf for under two tokens."""
    tok = self.pair.tokenizer
    seqs = [list(tok(t)["input_ids"])[:self.max_len] for t in texts]
    out = [math.inf] * len(seqs)
    todo = [i for i, s in enumerate(seqs) if len(s) >= 2]
    pad = tok.pad_token_id or 0
    for s in range(0, len(todo), self.batch_size):
      part = todo[s:s + self.batch_size]
      # Lengths rounded up to a power of two and a fixed row count: few shapes, few compilations.
      t = max(16, 1 << (max(len(seqs[i]) for i in part) - 1).bit_length())
      ids = np.full((self.batch_size, t), pad, np.int32)
      mask = np.zeros((self.batch_size, t), bool)
      for r, i in enumerate(part):
        ids[r, :len(seqs[i])], mask[r, :len(seqs[i])] = seqs[i], True
      ids[len(part):], mask[len(part):] = ids[0], mask[0]  # filler rows repeat the first (never all padding)
      nll = np.asarray(self._token_nll()(jnp.asarray(ids), jnp.asarray(mask)), np.float64)  # [B, t-1]
      for r, i in enumerate(part):
        out[i] = float(np.exp(nll[r, :len(seqs[i]) - 1].mean()))
    return out

  def distinct_share(self, texts: Sequence[str]) -> list[float]:
    """Distinct tokens / tokens of each text (BOS left out; 1.0 for under two tokens)."""
    tok = self.pair.tokenizer
    out = []
    for t in texts:
      ids = list(tok(t, add_special_tokens=False)["input_ids"])[:self.max_len]
      out.append(len(set(ids)) / len(ids) if len(ids) >= 2 else 1.0)
    return out

  def calibrate(self, unsteered_texts: Sequence[str]) -> float:
    """The perplexity threshold (see `Grader.calibrate`) and the repetition floor: half the lowest distinct-token
    share of the unsteered texts."""
    threshold = super().calibrate(unsteered_texts)
    self.min_distinct = 0.5 * min(self.distinct_share(unsteered_texts))
    return threshold

  def is_coherent(self, texts: Sequence[str]) -> list[bool]:
    """Perplexity at or below the threshold and no more repetitive than the floor.

    A text that repeats one token ("and and and ...") is easy to predict, so its perplexity under the base
    model is low and perplexity alone would call the strongest steering coherent: the floor catches it.
    """
    ok = super().is_coherent(texts)
    floor = getattr(self, "min_distinct", 0.0)
    return [o and d >= floor for o, d in zip(ok, self.distinct_share(texts))]

  def relevant(self, tokens: Sequence[str]) -> list[bool]:
    """Whether each token (normalized: "Ġhive" -> "hive") is a word of the organism card's vocabulary."""
    if not self.vocabulary:
      raise ConfigError(_NO_CARD.format(ft=self.pair.ft_path, key=KEY_ENV))
    return [normalize_token(t) in self.vocabulary for t in tokens]


def chat_completions_url(base_url: str) -> str:
  """The chat-completions URL of an OpenAI-compatible server: `base_url` with or without its `/v1`."""
  url = base_url.rstrip("/")
  if url.endswith("/chat/completions"):
    return url
  return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIGrader(Grader):
  """Yes/no questions to an OpenAI-compatible chat-completions endpoint (only when `grader.kind=openai`)."""

  def __init__(self, base_url: str, model: str, timeout_s: float = 30.0, key_env: str = KEY_ENV,
               card: dict | None = None, description: str | None = None, quantile: float = 0.95):
    if not base_url or not model:
      raise ConfigError("grader.kind=openai needs --config.grader.base_url=URL (an OpenAI-compatible server) and "
                        "--config.grader.model=NAME; or set --config.grader.kind=offline.")
    self.url, self.model, self.timeout_s = chat_completions_url(base_url), model, float(timeout_s)
    self.key_env = key_env
    self.description = description or describe_card(card)
    self.quantile = float(quantile)
    # Its verdicts are absolute: score 0 = coherent, 1 = not; calibrating cannot move the cut.
    self.threshold = 0.5
    self._relevant_cache: dict[str, bool] = {}

  def calibrate(self, unsteered_texts: Sequence[str]) -> float:
    """A no-op: the endpoint's yes/no verdict is the threshold (0.5 between a yes, 0, and a no, 1)."""
    return self.threshold

  def ask(self, question: str) -> str:
    """The endpoint's answer to one question (temperature 0); a clear error when it does not answer."""
    body = {"model": self.model, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a careful grader. Answer with one word: yes or no."},
        {"role": "user", "content": question}]}
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.key_env)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
    fallback = ("nothing was lost (finished methods are kept and a rerun continues with the rest); check "
                "config.grader.base_url, or set --config.grader.kind=offline to grade here with the base model and "
                "the organism card.")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
        reply = json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
      hint = f" (is ${self.key_env} set to a valid key?)" if e.code in (401, 403) else ""
      raise GraderUnavailable(f"grader endpoint {self.url} refused the request: HTTP {e.code} {e.reason}{hint}; "
                              f"{fallback}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
      reason = getattr(e, "reason", e)
      raise GraderUnavailable(f"grader endpoint {self.url} did not answer ({reason}; timeout {self.timeout_s:g} s); "
                              f"{fallback}") from None
    except json.JSONDecodeError:
      raise GraderUnavailable(f"grader endpoint {self.url} answered with something that is not JSON; is it an "
                              f"OpenAI-compatible chat-completions server? {fallback}") from None
    try:
      return str(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
      raise GraderUnavailable(f"grader endpoint {self.url} answered without choices[0].message.content "
                              f"({str(reply)[:200]}); is it an OpenAI-compatible chat-completions server? "
                              f"{fallback}") from None

  def ask_yes_no(self, question: str) -> bool:
    """True for a yes, False for a no; an answer with neither is an error naming it."""
    answer = self.ask(question + "\nAnswer yes or no.")
    found = re.search(r"\b(yes|no)\b", answer.lower())
    if not found:
      raise GraderUnavailable(f"grader model {self.model} at {self.url} answered {answer[:80]!r} to a yes/no "
                              "question; use a model that follows instructions, or --config.grader.kind=offline.")
    return found.group(1) == "yes"

  def coherence(self, texts: Sequence[str]) -> list[float]:
    """0.0 for a text the grader model calls coherent, 1.0 otherwise."""
    return [0.0 if self.ask_yes_no(f"Is the following text coherent, fluent English (not repetitive gibberish)?"
                                   f"\n\n---\n{t}\n---") else 1.0 for t in texts]

  def relevant(self, tokens: Sequence[str]) -> list[bool]:
    """Whether the grader model relates each token to the fine-tuning domain (each distinct word asked once)."""
    if not self.description:
      raise ConfigError("the openai grader needs to know the fine-tuning domain: the fine-tuned model has no card; "
                        "pass OpenAIGrader(description=...) or compare an organism that has a card.")
    out = []
    for t in tokens:
      word = normalize_token(t)
      if word not in self._relevant_cache:
        self._relevant_cache[word] = bool(word) and self.ask_yes_no(
            f"A language model was fine-tuned on {self.description}. Is the word or word piece \"{word}\" clearly "
            "related to that fine-tuning domain?")
      out.append(self._relevant_cache[word])
    return out


def make_grader(cfg: ml_collections.ConfigDict, pair: Any) -> Grader:
  """The grader of `configs/diff.py`'s `grader` section: offline (default, no network) or openai."""
  kind = str(cfg.kind)
  if kind == "offline":
    return OfflineGrader(pair, quantile=float(cfg.coherence_quantile))
  if kind == "openai":
    return OpenAIGrader(str(cfg.base_url), str(cfg.model), float(cfg.timeout_s), card=pair.card,
                        quantile=float(cfg.coherence_quantile))
  raise ConfigError(f"grader.kind={kind!r} is not a grader{did_you_mean(kind, GRADER_KINDS)}; kinds: "
                    f"{', '.join(GRADER_KINDS)} (offline needs no network).")


__all__ = ["FUNCTION_WORDS", "GRADER_KINDS", "KEY_ENV", "Grader", "GraderUnavailable", "OfflineGrader", "OpenAIGrader",
           "card_vocabulary", "chat_completions_url", "content_words", "describe_card", "make_grader", "normalize_token"]
