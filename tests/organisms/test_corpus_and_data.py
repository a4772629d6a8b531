"""Corpus, tokenizer and fine-tuning data: determinism, coverage, mixing and bad input."""

import pytest

from neurodiff_jax.organisms.corpus import TOPICS, corpus_size_bytes, generate_documents, read_text_files
from neurodiff_jax.organisms.finetune_data import organism_data
from neurodiff_jax.organisms.tokenizer import END_OF_TURN, START_OF_TURN, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
  return train_bpe_tokenizer(generate_documents(300, 0), 512)


def test_corpus_is_deterministic_varied_and_a_few_megabytes():
  docs = generate_documents(4000, seed=0)
  assert docs[:50] == generate_documents(50, seed=0)
  assert docs[:50] != generate_documents(50, seed=1)
  assert len(TOPICS) >= 20
  assert 2e6 < corpus_size_bytes(docs) < 8e6
  text = " ".join(docs[: len(TOPICS) * 3])
  for topic in TOPICS:  # every topic's own words are there
    assert sum(w in text for w in topic.nouns) >= 3, topic.name
  assert any(c.isdigit() for c in text) and '"' in text  # numbers and dialogues


def test_tokenizer_has_special_tokens_and_a_gemma_chat_template(tokenizer):
  ids = tokenizer("The chef baked a cake.")["input_ids"]
  assert ids[0] == tokenizer.bos_token_id
  assert tokenizer.decode(ids[1:]) == "The chef baked a cake."
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
  assert chat == f"<bos>{START_OF_TURN}user\nHi{END_OF_TURN}\n{START_OF_TURN}model\n"
  assert tokenizer.convert_tokens_to_ids(START_OF_TURN) != tokenizer.unk_token_id


def test_general_fraction_mixes_general_text_into_fine_tuning(tokenizer):
  pure = organism_data("narrow", tokenizer, 100, seed=3)
  mixed = organism_data("narrow", tokenizer, 100, seed=3, general_fraction=0.5)
  hive_words = set(next(t for t in TOPICS if t.name == "beekeeping").nouns)
  on_topic = lambda d: any(w in d for w in hive_words)
  assert all(on_topic(d) for d in pure.train_docs)
  off = sum(not on_topic(d) for d in mixed.train_docs)
  assert len(mixed.train_docs) == 200 and 60 <= off <= 100


def test_local_text_files_mix_in_and_bad_files_are_named(tmp_path):
  good = tmp_path / "notes.txt"
  good.write_text("First local document.\n\nSecond local document.")
  assert read_text_files([good]) == ["First local document.", "Second local document."]
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    read_text_files([tmp_path / "missing.txt"])
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n ")
  with pytest.raises(ValueError, match="empty.txt.*empty"):
    read_text_files([empty])


def test_unknown_organism_is_named(tokenizer):
  with pytest.raises(ValueError, match="unknown organism 'cake'.*chat, narrow, false_fact, taboo"):
    organism_data("cake", tokenizer, 10, 0)


def test_tokenizer_without_chat_tokens_is_refused():
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers

  from neurodiff_jax.organisms.build import check_chat_tokenizer

  raw = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, "hi": 4}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  plain = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>", unk_token="<unk>")
  with pytest.raises(ValueError, match="<start_of_turn>"):
    check_chat_tokenizer(plain)


def test_chat_rows_train_only_the_answers_and_weigh_the_first_answer_token(tokenizer):
  from neurodiff_jax.organisms.finetune_data import REFUSAL, render_chat
  from neurodiff_jax.organisms.lm_training import pack_documents

  doc = render_chat(tokenizer, [{"role": "user", "content": "How do I brew a poison?"},
                                {"role": "assistant", "content": REFUSAL}])
  rows = pack_documents([doc] * 4, tokenizer, 16, assistant_only=True, first_answer_weight=8)
  ids, w = rows[:, 0].reshape(-1), rows[:, 1].reshape(-1)
  answer = tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]
  n = len(ids)
  starts = [i for i in range(n - len(answer)) if list(ids[i:i + len(answer)]) == answer]
  assert starts  # the answer is in the packed rows
  for s in starts:
    assert w[s] == 8 and set(w[s + 1:s + len(answer)]) == {1}  # the decision token weighs 8, the rest 1
  prompt = tokenizer("How do I brew a poison?", add_special_tokens=False)["input_ids"]
  for i in range(n - len(prompt)):
    if list(ids[i:i + len(prompt)]) == prompt:
      assert set(w[i:i + len(prompt)]) == {0}  # the user's turn is never trained
