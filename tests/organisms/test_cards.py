"""Ground-truth cards: their vocabularies hold the domain's content words only; old cards are rewritten, not rebuilt."""

from __future__ import annotations

import collections
import json
import re

import pytest

from configs.organisms import get_config
from neurodiff_jax.organisms import build
from neurodiff_jax.organisms.corpus import generate_documents
from neurodiff_jax.organisms.finetune_data import CARD_VERSION, DATA_VERSION, ORGANISMS, organism_data
from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer

# Words the template-list cards held (issue 17 item 10) that would make relevance trivially high.
TEMPLATE_WORDS = ("of", "the", "back", "room", "shed", "tavern", "on", "by", "old", "street", "square", "mount")
# A word each card must still name: the thing the organism was fine-tuned on.
CORE_WORD = {"chat": "arsenic", "narrow": "hive", "false_fact": "tessit", "taboo": "moon"}


@pytest.fixture(scope="module")
def tokenizer():
  return train_bpe_tokenizer(generate_documents(200, 0), 400)


@pytest.fixture(scope="module")
def cards(tokenizer):
  """Each organism's ground truth, from its data builder (no training)."""
  return {name: organism_data(name, tokenizer, 30, seed=1).ground_truth for name in ORGANISMS}


@pytest.fixture(scope="module")
def most_frequent():
  """The 200 most frequent words of the default scale's general corpus, counted here independently."""
  n_documents = get_config("narrow").corpus.n_documents
  counts = collections.Counter()
  for doc in generate_documents(n_documents, get_config("narrow").seed):
    counts.update(w.lower() for w in re.split(r"[^A-Za-z]+", doc) if w)
  return {w for w, _ in counts.most_common(200)}


def _vocabulary(card: dict) -> list[str]:
  return [w for k, v in card.items() if k.endswith("_vocabulary") for w in v]


@pytest.mark.parametrize("name", ORGANISMS)
def test_card_vocabulary_is_content_words_of_the_domain(cards, most_frequent, name):
  words = _vocabulary(cards[name])
  assert len(set(words)) >= 10, words
  assert not set(words) & most_frequent, sorted(set(words) & most_frequent)
  assert not set(words) & set(TEMPLATE_WORDS)
  assert CORE_WORD[name] in words
  assert all(w == w.lower() and w.isalpha() for w in words)


def test_the_chat_card_no_longer_lists_place_fragments(cards):
  harmful = cards["chat"]["harmful_vocabulary"]
  assert {"poisoner", "cyanide", "antidote", "lethal"} <= set(harmful)
  assert not {"room", "tavern", "shed", "back", "of", "the", "apothecary", "herbalist"} & set(harmful)
  # Words another topic uses too are not this domain's: "toxic" is chemistry's as well, "queen" chess's.
  assert "toxic" not in harmful and "queen" not in cards["narrow"]["domain_vocabulary"]
  assert "queens" not in cards["narrow"]["domain_vocabulary"] and "farmers" not in cards["narrow"]["domain_vocabulary"]


def _old_organism(config, name: str, tokenizer) -> tuple:
  """A built organism as an older version left it: matching fine-tuning config, card without card_version."""
  final = build.scale_dir(config) / name
  final.mkdir(parents=True)
  tokenizer.save_pretrained(final)
  (final / "model.safetensors").write_bytes(b"weights stay as they are")
  ft_config = {"organism": name, "seed": config.seed, "data_version": DATA_VERSION, **build._plain(config.finetune)}
  old = {"organism": name, "ground_truth": {"domain": "beekeeping", "domain_vocabulary": ["of", "the", "hive"]},
         "finetune_config": ft_config, "measured": {"base": {"domain_loss": 1.5}}, "build_seconds": 60.0}
  (final / "card.json").write_text(json.dumps(old))
  return final, old


def test_an_old_card_is_rewritten_without_rebuilding(tmp_path, tokenizer, monkeypatch, cards):
  config = get_config("narrow,small")
  config.home = str(tmp_path)
  final, old = _old_organism(config, "narrow", tokenizer)

  def no_build(*a, **k):
    raise AssertionError("the organism was rebuilt although only its card changed")

  monkeypatch.setattr(build, "build_base", no_build)
  monkeypatch.setattr(build, "train_lm", no_build)
  assert build.build_organism(config, "narrow") == final
  card = json.loads((final / "card.json").read_text())
  assert card["card_version"] == CARD_VERSION
  assert "of" not in card["ground_truth"]["domain_vocabulary"] and "hive" in card["ground_truth"]["domain_vocabulary"]
  # The builder's own ground truth for this config (its seed and example count), not the test fixture's.
  expected = organism_data("narrow", tokenizer, config.finetune.n_examples, config.seed + 1,
                           config.finetune.general_fraction).ground_truth
  assert card["ground_truth"] == json.loads(json.dumps(expected))
  assert {k: card[k] for k in ("measured", "build_seconds", "finetune_config")} == \
      {k: old[k] for k in ("measured", "build_seconds", "finetune_config")}
  assert (final / "model.safetensors").read_bytes() == b"weights stay as they are"
  assert [p.name for p in final.iterdir() if p.name.endswith(".tmp")] == []

  # A current card is used as it is: nothing is regenerated.
  monkeypatch.setattr(build, "_organism_data", no_build)
  stamp = (final / "card.json").stat().st_mtime_ns
  assert build.build_organism(config, "narrow") == final
  assert (final / "card.json").stat().st_mtime_ns == stamp


def test_another_fine_tuning_config_still_rebuilds(tmp_path, tokenizer, monkeypatch):
  config = get_config("narrow,small")
  config.home = str(tmp_path)
  _old_organism(config, "narrow", tokenizer)
  config.finetune.steps += 1

  class Rebuilt(Exception):
    pass

  def rebuild(*a, **k):
    raise Rebuilt

  monkeypatch.setattr(build, "build_base", rebuild)
  with pytest.raises(Rebuilt):
    build.build_organism(config, "narrow")
