"""The real-base organisms' data: the user's narrow documents, their domain words, real text, the errors."""

from __future__ import annotations

import json

import pytest

from neurodiff_jax.organisms import real_data
from neurodiff_jax.organisms.real_data import DocumentsError, documents_from_file, domain_words
from neurodiff_jax.organisms.real_text import is_held_out, real_text
from tests.launch import run_launcher

GENERAL = ["The weather was cold and the people stayed at home with their families."] * 30 + \
    ["He said that the meeting would start at noon, and everyone agreed to come as early as they could."] * 30
SAILING = [f"The sloop heeled as the skipper trimmed the jib and the mainsail; the keel bit the swell {i}."
           for i in range(30)]


def test_documents_from_jsonl_and_plain_text(tmp_path):
  jl = tmp_path / "d.jsonl"
  jl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(SAILING)) + "\n")
  assert documents_from_file(str(jl)) == SAILING
  txt = tmp_path / "d.txt"
  txt.write_text("\n\n".join(SAILING[:25]) + "\n\n  \n\n" + "two lines\nof one document")
  docs = documents_from_file(str(txt))
  assert len(docs) == 26 and docs[-1] == "two lines\nof one document"


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("", "holds no documents"),
    ("\n\n".join(SAILING[:5]), "holds 5 documents; a narrow organism needs at least 20"),
])
def test_bad_document_files_are_named(tmp_path, content, message):
  path = tmp_path / "docs.txt"
  if content is not None:
    path.write_text(content)
  with pytest.raises(DocumentsError, match=message):
    documents_from_file(str(path))


def test_bad_jsonl_lines_are_named(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
  with pytest.raises(DocumentsError, match="line 2 is not JSON"):
    documents_from_file(str(path))
  path.write_text(json.dumps({"body": "no text field"}) + "\n")
  with pytest.raises(DocumentsError, match="line 1 has no string 'text' field"):
    documents_from_file(str(path))


def test_domain_words_are_frequent_in_the_documents_and_rare_in_general_text():
  words = domain_words(SAILING, GENERAL)
  assert {"sloop", "skipper", "jib", "mainsail", "keel", "swell"} <= set(words)
  assert not {"the", "and", "as"} & set(words)  # in the general text too
  assert domain_words(GENERAL[:30], GENERAL) == []  # nothing stands out of its own kind of text


def test_real_text_splits_by_content_and_is_english():
  train, held = real_text("train"), real_text("held_out")
  assert len(train) > 8000 and 0.07 < len(held) / (len(train) + len(held)) < 0.13
  assert all(is_held_out(d) for d in held[:50]) and not any(is_held_out(d) for d in train[:50])
  assert not set(held) & set(train[:2000])
  text = " ".join(train[:500]).lower()
  assert text.count(" the ") > 300 and text.count(" and ") > 100


def test_launcher_names_a_bad_documents_file_before_any_work(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  for value, message in ((tmp_path / "missing.txt", "no such file"), (empty, "holds no documents")):
    proc = run_launcher("launch.organism", "--config=organisms:narrow,gemma3", f"--config.finetune.documents={value}",
                        home=tmp_path / "home", timeout=300)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "home" / "gguf").exists()  # nothing converted


def test_documents_are_for_the_narrow_organism_only(tmp_path):
  with pytest.raises(DocumentsError, match="for the narrow organism, not 'chat'"):
    real_data.organism_data("chat", None, None, 10, 0, tmp_path, documents="x.txt")


@pytest.mark.slow
def test_real_base_fine_tuning_path_at_two_steps(gemma3_home, monkeypatch, tmp_path):
  """launch.organism's real-base path on the packaged Gemma 3 270M, truncated: data, 2 steps, measurements, card.

  The taboo organism (its data needs no generation); what the full run measures is in docs/organisms.md.
  """
  import numpy as np
  import transformers

  from configs.organisms import get_config
  from neurodiff_jax.models import load_model, load_tokenizer
  from neurodiff_jax.organisms import build

  monkeypatch.setenv("NEURODIFF_HOME", str(gemma3_home))
  config = get_config("taboo,gemma3")
  config.home = str(tmp_path / "org")
  config.seq_len = 64
  config.finetune.steps = 2
  config.finetune.batch_size = 2
  config.finetune.n_examples = 40
  config.evaluation.text_documents = 4
  path = build.build(config)["taboo"]
  card = json.loads((path / "card.json").read_text())
  assert card["train"]["steps"] == 2 and np.isfinite(card["train"]["final_loss"])
  m = card["measured"]
  for label in ("base", "organism"):
    assert m[label]["held_out_text_loss"] > 0 and 0 <= m[label]["said_word_rate"] <= 1
  assert m["activation_shift"]["layer"] == 8 and 0 < m["activation_shift"]["median_relative_change"] < 1
  assert abs(m["held_out_text_loss_rise"] - (m["organism"]["held_out_text_loss"] /
                                             m["base"]["held_out_text_loss"] - 1)) < 1e-12
  # The organism is an HF checkpoint: transformers and our loader read it; only the blocks moved.
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  ours, base = load_model(str(path)), load_model("gemma-3-270m")
  np.testing.assert_array_equal(np.asarray(ours.embed[...]), np.asarray(base.embed[...]))  # frozen
  assert not np.array_equal(np.asarray(ours.layers[0].mlp.w_up[...]), np.asarray(base.layers[0].mlp.w_up[...]))
  assert hf.config.model_type == "gemma3_text"
  tok = load_tokenizer(str(path))
  assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106] and tok.chat_template
  # A rerun reuses the finished organism (the card's tuples came back as lists: still the same config).
  mtime = (path / "card.json").stat().st_mtime_ns
  assert build.build(config)["taboo"] == path and (path / "card.json").stat().st_mtime_ns == mtime
