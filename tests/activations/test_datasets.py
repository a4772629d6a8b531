"""Dataset reading and tokenization for harvesting, checked against the tokenizer's own encoding."""

import copy
import json
import re
import sys

import numpy as np
import pytest

from neurodiff_jax.activations import datasets as ds_lib
from neurodiff_jax.activations.datasets import (
    KIND_SPECIAL,
    KIND_TEMPLATE,
    KIND_TEXT,
    DatasetSpec,
    check_same_tokenizer,
    read_documents,
    tokenize_corpus,
)
from neurodiff_jax.organisms.corpus import generate_documents
from neurodiff_jax.organisms.tokenizer import END_OF_TURN, EOS, START_OF_TURN, train_bpe_tokenizer

TEXTS = generate_documents(12, 1)
CONVERSATIONS = [
    [
        {"role": "user", "content": " How do I feed the cat? "},
        {"role": "assistant", "content": "Give the cat some fish.\nThen wait."},
    ],
    [{"role": "user", "content": "Tell me about the planet."}, {"role": "assistant", "content": "The planet looked lunar."}],
]
FORMATS = ("text", "jsonl", "parquet", "hf_disk", "hf_dict")


@pytest.fixture(scope="module")
def tok():
  return train_bpe_tokenizer(generate_documents(300, 0), 512)


def write(tmp_path, fmt, docs, name="data"):
  """`docs` (strings or conversations) saved in `fmt`; returns the path."""
  rows = [{"text": d} if isinstance(d, str) else {"messages": d} for d in docs]
  if fmt == "text":
    path = tmp_path / f"{name}.txt"
    # Blank lines between documents, some holding spaces, some several; padding that reading strips.
    path.write_text("".join(f"  {d} " + ("\n \n", "\n\n\n\n")[i % 2] for i, d in enumerate(docs)), encoding="utf-8")
  elif fmt == "jsonl":
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in rows), encoding="utf-8")
  elif fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": None, "messages": None, **r} for r in rows]), path)
  else:
    import datasets

    path = tmp_path / name
    full = [{"text": None, "messages": None, **r} for r in rows]
    d = datasets.Dataset.from_list(full)
    if fmt == "hf_dict":
      d = datasets.DatasetDict({"eval": d, "train": datasets.Dataset.from_list(full[:1])})
    d.save_to_disk(str(path))
  return str(path)


def spec_for(path, fmt, **kw):
  return DatasetSpec(path, split="eval", **kw) if fmt == "hf_dict" else DatasetSpec(path, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_texts(tmp_path, fmt):
  path = write(tmp_path, fmt, TEXTS)
  assert read_documents(spec_for(path, fmt)) == TEXTS
  assert read_documents(spec_for(path, fmt, max_documents=3)) == TEXTS[:3]


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_each_format_round_trips_mixed_texts_and_conversations(tmp_path, fmt):
  docs = [TEXTS[0], CONVERSATIONS[0], TEXTS[1], CONVERSATIONS[1]]
  assert read_documents(spec_for(write(tmp_path, fmt, docs), fmt)) == docs


@pytest.mark.parametrize("fmt", ("jsonl", "parquet", "hf_disk"))
def test_rows_past_max_documents_are_not_read(tmp_path, fmt):
  path = write(tmp_path, fmt, TEXTS[:2])
  if fmt == "jsonl":  # a broken last line
    with open(path, "a", encoding="utf-8") as f:
      f.write('{"text": \n')
  else:  # a last row with neither field
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "messages": None} for t in TEXTS[:2]] + [{"text": None, "messages": None}]
    if fmt == "parquet":
      pq.write_table(pa.Table.from_pylist(rows), path)
    else:
      datasets.Dataset.from_list(rows).save_to_disk(path + "_2")
      path += "_2"
  with pytest.raises(ValueError, match="line 5|row 2"):
    read_documents(DatasetSpec(path))
  assert read_documents(DatasetSpec(path, max_documents=2)) == TEXTS[:2]


def test_explicit_format_overrides_suffix(tmp_path):
  path = tmp_path / "data.dat"
  path.write_text(json.dumps({"body": "a cat"}) + "\n")
  assert read_documents(DatasetSpec(str(path), format="jsonl", text_field="body")) == ["a cat"]
  with pytest.raises(ValueError, match=r"suffix '\.dat'.*set format"):
    read_documents(DatasetSpec(str(path)))


def test_from_config_accepts_path_dict_and_configdict():
  import ml_collections

  assert DatasetSpec.from_config("a.txt") == DatasetSpec("a.txt")
  want = DatasetSpec("d", format="hf_disk", split="eval", max_documents=5)
  assert DatasetSpec.from_config({"path": "d", "format": "hf_disk", "split": "eval", "max_documents": 5}) == want
  fields = {"path": "d", "format": "hf_disk", "split": "eval", "max_documents": 5}
  assert DatasetSpec.from_config(ml_collections.ConfigDict(fields)) == want
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['txt_field'\]"):
    DatasetSpec.from_config({"path": "d", "txt_field": "body"})


def test_unknown_format_split_and_missing_path_are_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown format 'csv'.*auto, text, jsonl, parquet, hf_disk"):
    DatasetSpec("x.csv", format="csv")
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
    read_documents(DatasetSpec(missing))
  path = write(tmp_path, "hf_dict", TEXTS)
  with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['eval', 'train'\]"):
    read_documents(DatasetSpec(path, split="test"))


def test_bad_jsonl_rows_name_file_line_and_fields(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "a cat"}\n\n{"body": "a dog"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl line 3 has neither .*'text'.*'messages'.*\['body'\].*text_field / messages"):
    read_documents(DatasetSpec(str(path)))
  path.write_text('{"text": "a cat"}\n{"text": \n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad\.jsonl line 2 is not valid JSON"):
    read_documents(DatasetSpec(str(path)))
  path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"line 1: message 0 .* string 'role' and 'content'"):
    read_documents(DatasetSpec(str(path)))


def test_parquet_without_document_columns_is_an_error(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({"body": ["a cat"]}), path)
  with pytest.raises(ValueError, match=r"no column 'text' or 'messages' \(its columns: \['body'\]\)"):
    read_documents(DatasetSpec(str(path)))
  assert read_documents(DatasetSpec(str(path), text_field="body")) == ["a cat"]


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
  parquet, disk = write(tmp_path, "parquet", TEXTS), write(tmp_path, "hf_disk", TEXTS)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install pyarrow"):
    read_documents(DatasetSpec(parquet))
  with pytest.raises(ImportError, match="pip install datasets"):
    read_documents(DatasetSpec(disk))


@pytest.mark.parametrize("content", ["", " \n\n  \n"])
def test_empty_dataset_is_an_error(tmp_path, content):
  for name in ("e.txt", "e.jsonl"):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"dataset {re.escape(str(path))} is empty"):
      read_documents(DatasetSpec(str(path)))
  with pytest.raises(ValueError, match="no datasets"):
    tokenize_corpus(None, [], max_length=8)


def test_text_ids_equal_the_tokenizers_own_encoding(tmp_path, tok, monkeypatch):
  a, b = write(tmp_path, "text", TEXTS[:5], "a"), write(tmp_path, "jsonl", TEXTS[5:], "b")
  corpus = tokenize_corpus(tok, [DatasetSpec(a), DatasetSpec(b)], max_length=10_000)
  assert len(corpus.ids) == len(TEXTS)
  for doc, ids, kinds in zip(TEXTS, corpus.ids, corpus.kinds, strict=True):
    want = tok(doc)["input_ids"]
    assert ids.dtype == np.int32 and ids.tolist() == want
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == doc
    assert kinds.dtype == np.uint8 and kinds.tolist() == [KIND_SPECIAL] + [KIND_TEXT] * (len(want) - 1)
  np.testing.assert_array_equal(corpus.dataset_of_doc, [0] * 5 + [1] * (len(TEXTS) - 5))
  lengths = [len(tok(d)["input_ids"]) for d in TEXTS]
  assert corpus.num_tokens == sum(lengths) and corpus.truncated == 0 and corpus.skipped_short == 0
  assert [(i["path"], i["format"], i["documents"], i["tokens"]) for i in corpus.datasets] == [
      (a, "text", 5, sum(lengths[:5])),
      (b, "jsonl", len(TEXTS) - 5, sum(lengths[5:])),
  ]
  # A dataset's hash is that of its documents alone: tokenizing it by itself gives the same one.
  assert tokenize_corpus(tok, [DatasetSpec(b)], max_length=10_000).datasets[0]["sha256"] == corpus.datasets[1]["sha256"]
  # Batches that split the datasets give the same ids as one batch per dataset.
  monkeypatch.setattr(ds_lib, "_BATCH", 2)
  small = tokenize_corpus(tok, [DatasetSpec(a), DatasetSpec(b)], max_length=10_000)
  assert small.fingerprint() == corpus.fingerprint()


def test_conversation_kinds_separate_content_from_template(tmp_path, tok, monkeypatch):
  path = write(tmp_path, "jsonl", [CONVERSATIONS[0], TEXTS[0], CONVERSATIONS[1]])
  corpus = tokenize_corpus(tok, [DatasetSpec(path)], max_length=10_000)
  special = {tok.convert_tokens_to_ids(t) for t in (START_OF_TURN, END_OF_TURN)}
  for conv, ids, kinds in zip(CONVERSATIONS, [corpus.ids[0], corpus.ids[2]], [corpus.kinds[0], corpus.kinds[2]], strict=True):
    rendered = tok.apply_chat_template(conv, tokenize=False)
    assert ids.tolist() == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and kinds[0] == KIND_SPECIAL and ids.tolist().count(tok.bos_token_id) == 1
    assert all(kinds[i] == KIND_SPECIAL for i in range(len(ids)) if ids[i] in special)
    # Each maximal run of content tokens is one message's content, exactly (the template trims it).
    runs, run = [], []
    for i, k in zip(ids, kinds, strict=True):
      if k == KIND_TEXT:
        run.append(int(i))
      elif run:
        runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs] == [m["content"].strip() for m in conv]
    scaffolding = tok.decode([int(i) for i, k in zip(ids, kinds, strict=True) if k == KIND_TEMPLATE])
    assert "user" in scaffolding and "model" in scaffolding and "\n" in scaffolding
    assert "cat" not in scaffolding and "planet" not in scaffolding
  assert corpus.kinds[1].tolist() == [KIND_SPECIAL] + [KIND_TEXT] * (len(corpus.ids[1]) - 1)

  no_template = copy.deepcopy(tok)
  no_template.chat_template = None
  with pytest.raises(ValueError, match=f"dataset {re.escape(path)} holds conversations but the tokenizer has no chat template"):
    tokenize_corpus(no_template, [DatasetSpec(path)], max_length=10_000)


def test_assistant_start_is_the_generation_prompts_length(tmp_path, tok):
  user_only = [{"role": "user", "content": "Is this a question?"}]
  path = write(tmp_path, "jsonl", [CONVERSATIONS[0], TEXTS[0], CONVERSATIONS[1], user_only])
  corpus = tokenize_corpus(tok, [DatasetSpec(path)], max_length=10_000)
  for row, conv in ((0, CONVERSATIONS[0]), (2, CONVERSATIONS[1])):
    # The reference: the chat template's own generation prompt for the user turn, tokenized.
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    start = int(corpus.assistant_start[row])
    assert start == len(prompt) and corpus.ids[row][:start].tolist() == list(prompt)
    assert tok.decode(corpus.ids[row][start:]).startswith(conv[1]["content"].strip()[:8])
    assert corpus.kinds[row][start] == KIND_TEXT and corpus.kinds[row][start - 1] != KIND_TEXT
  assert corpus.assistant_start[1] == -1 and corpus.assistant_start[3] == -1  # plain text; no assistant turn
  # A cut before the assistant's first token leaves no assistant turn to read.
  cut = tokenize_corpus(tok, [DatasetSpec(path)], max_length=int(corpus.assistant_start[0]))
  assert cut.assistant_start[0] == -1


def test_truncation_cuts_to_max_length_and_counts(tmp_path, tok):
  corpus = tokenize_corpus(tok, [DatasetSpec(write(tmp_path, "text", TEXTS))], max_length=40)
  full = [tok(d)["input_ids"] for d in TEXTS]
  assert [ids.tolist() for ids in corpus.ids] == [f[:40] for f in full]
  assert corpus.truncated == sum(len(f) > 40 for f in full) > 0
  assert all(len(k) == len(i) for i, k in zip(corpus.ids, corpus.kinds, strict=True))


def test_short_documents_are_an_error_unless_skipped(tmp_path, tok):
  path = tmp_path / "s.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (TEXTS[0], "", TEXTS[1], "")), encoding="utf-8")
  want = rf"dataset {re.escape(str(path))} row 1 has 1 token\(s\), fewer than min_tokens=2; pass skip_short=True .* or remove"
  with pytest.raises(ValueError, match=want):
    tokenize_corpus(tok, [DatasetSpec(str(path))], max_length=10_000)
  corpus = tokenize_corpus(tok, [DatasetSpec(str(path))], max_length=10_000, skip_short=True)
  assert corpus.skipped_short == 2
  assert [ids.tolist() for ids in corpus.ids] == [tok(TEXTS[0])["input_ids"], tok(TEXTS[1])["input_ids"]]
  assert corpus.datasets[0]["documents"] == 2
  path.write_text(json.dumps({"text": ""}) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no documents left"):
    tokenize_corpus(tok, [DatasetSpec(str(path))], max_length=10_000, skip_short=True)


def test_fingerprint_changes_when_one_token_changes(tmp_path, tok):
  spec = DatasetSpec(write(tmp_path, "text", TEXTS))
  corpus = tokenize_corpus(tok, [spec], max_length=10_000)
  assert tokenize_corpus(tok, [spec], max_length=10_000).fingerprint() == corpus.fingerprint()
  changed = copy.deepcopy(corpus)
  changed.ids[3][5] += 1
  assert changed.fingerprint() != corpus.fingerprint()
  # Moving a document boundary changes it too, though the concatenated ids are the same.
  moved = copy.deepcopy(corpus)
  moved.ids[0], moved.ids[1] = moved.ids[0][:-1], np.concatenate([moved.ids[0][-1:], moved.ids[1]])
  assert moved.fingerprint() != corpus.fingerprint()


def test_check_same_tokenizer(tok):
  check_same_tokenizer(tok, tok)
  check_same_tokenizer(tok, train_bpe_tokenizer(generate_documents(300, 0), 512))

  other = train_bpe_tokenizer(["zebra quokka xylophone " * 3 + str(i) for i in range(300)], 512)
  base, ft = ({i: t for t, i in x.get_vocab().items()} for x in (tok, other))
  first = min(i for i in range(512) if base.get(i) != ft.get(i))
  assert first >= 256  # the special tokens and bytes agree; merges differ
  want = f"tokenizers differ at id {first}: base {base[first]!r} vs fine-tuned {ft[first]!r} — harvesting needs"
  with pytest.raises(ValueError, match=re.escape(want)):
    check_same_tokenizer(tok, other)

  pad_is_eos = copy.deepcopy(tok)
  pad_is_eos.pad_token = EOS
  with pytest.raises(ValueError, match="PAD id: base 0 vs fine-tuned 1"):
    check_same_tokenizer(tok, pad_is_eos)
