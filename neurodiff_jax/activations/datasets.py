"""Token ids of the datasets a user names, read from local files, for harvesting two models on the same tokens.

A dataset is a `.txt`, `.jsonl` or `.parquet` file, or a directory written by `datasets`'
`save_to_disk`. A document is plain text or a chat conversation; conversations are rendered with the
tokenizer's chat template, and every token is labelled as text, special token or template
scaffolding, so analyses can tell what the user wrote from what the template added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FORMATS = ("auto", "text", "jsonl", "parquet", "hf_disk")
_SUFFIX_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}

KIND_TEXT = 0  # a token of the document's own text or of a message's content
KIND_SPECIAL = 1  # an id in `tokenizer.all_special_ids` (BOS, turn markers, ...)
KIND_TEMPLATE = 2  # chat-template scaffolding outside every message's content (role names, newlines)

# Documents per tokenizer call: large enough for the fast tokenizer's parallelism to pay off,
# small enough that one call's Python lists stay a few MB.
_BATCH = 1024

Document = str | list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset to harvest."""

  path: str  # .txt, .jsonl, .parquet file, or a `save_to_disk` directory
  format: str = "auto"  # auto | text | jsonl | parquet | hf_disk; auto decides by suffix / directory
  text_field: str = "text"  # field holding plain text
  messages_field: str = "messages"  # field holding a conversation: list of {"role", "content"} dicts
  split: str = "train"  # split of a DatasetDict directory
  max_documents: int = 0  # 0 = all

  def __post_init__(self):
    object.__setattr__(self, "path", os.fspath(self.path))
    if self.format not in FORMATS:
      raise ValueError(f"dataset {self.path}: unknown format {self.format!r}; the formats are {', '.join(FORMATS)}.")
    if self.max_documents < 0:
      raise ValueError(f"dataset {self.path}: max_documents={self.max_documents} must be >= 0 (0 = all).")

  @classmethod
  def from_config(cls, value: Any) -> DatasetSpec:
    """A spec from a path, a dict or an `ml_collections.ConfigDict` holding this class's fields."""
    if isinstance(value, cls):
      return value
    if isinstance(value, (str, os.PathLike)):
      return cls(path=os.fspath(value))
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
      value = value.to_dict()
    if not isinstance(value, Mapping):
      raise TypeError(f"a dataset spec is a path, a dict or a ConfigDict, not {type(value).__name__}: {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
      raise ValueError(f"dataset spec {dict(value)!r} has unknown field(s) {unknown}; the fields are {names}.")
    if "path" not in value:
      raise ValueError(f"dataset spec {dict(value)!r} has no 'path'.")
    return cls(**value)


def _resolve_format(spec: DatasetSpec) -> str:
  """The format `spec` is read as, once its path is known to exist."""
  if not os.path.exists(spec.path):
    raise FileNotFoundError(f"dataset {spec.path} does not exist; fix the path.")
  if spec.format == "hf_disk" and not os.path.isdir(spec.path):
    raise ValueError(f"dataset {spec.path}: format hf_disk needs a directory written by save_to_disk, not a file.")
  if spec.format not in ("auto", "hf_disk") and os.path.isdir(spec.path):
    raise ValueError(
        f"dataset {spec.path} is a directory; format {spec.format} needs a file (use hf_disk for save_to_disk directories)."
    )
  if spec.format != "auto":
    return spec.format
  if os.path.isdir(spec.path):
    return "hf_disk"
  suffix = os.path.splitext(spec.path)[1].lower()
  if suffix not in _SUFFIX_FORMATS:
    raise ValueError(
        f"dataset {spec.path}: can't tell its format from the suffix {suffix!r} (known: {', '.join(_SUFFIX_FORMATS)}); "
        f"set format to one of {', '.join(FORMATS[1:])}."
    )
  return _SUFFIX_FORMATS[suffix]


def _require(module: str, package: str, fmt: str) -> Any:
  """`module`, imported on first use so the package is needed only by those who read `fmt` datasets."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"reading {fmt} datasets needs the `{package}` package: pip install {package}") from e


def _conversation(value: Any, spec: DatasetSpec, where: str) -> list[dict[str, str]]:
  """`value` checked to be a list of {"role", "content"} string dicts."""
  if not isinstance(value, (list, tuple)) or not value:
    raise ValueError(
        f"{where}: field {spec.messages_field!r} must be a non-empty list of {{'role', 'content'}} dicts, got {value!r:.200}."
    )
  messages = []
  for i, message in enumerate(value):
    if not (isinstance(message, Mapping) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
      raise ValueError(
          f"{where}: message {i} of field {spec.messages_field!r} must be a dict with string 'role' and 'content', "
          f"got {message!r:.200}."
      )
    messages.append({"role": message["role"], "content": message["content"]})
  return messages


def _row_document(text: Any, messages: Any, spec: DatasetSpec, where: str, fields: Sequence[str]) -> Document:
  """The document of one row: its text field, else its conversation; text wins when a row has both."""
  if isinstance(text, str):
    return text
  if messages is not None:
    return _conversation(messages, spec, where)
  raise ValueError(
      f"{where} has neither a string field {spec.text_field!r} nor a conversation field {spec.messages_field!r} "
      f"(its fields: {list(fields)}); set text_field / messages_field of the dataset spec to the fields that hold the documents."
  )


def _read_text(spec: DatasetSpec) -> list[Document]:
  with open(spec.path, encoding="utf-8") as f:
    blocks = re.split(r"\n\s*\n", f.read())  # a "blank" line may hold spaces
  return [b for b in (block.strip() for block in blocks) if b]


def _read_jsonl(spec: DatasetSpec) -> list[Document]:
  docs = []
  with open(spec.path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"dataset {spec.path} line {line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}); each line must hold one JSON object.") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where} holds a {type(row).__name__}, not a JSON object.")
      docs.append(_row_document(row.get(spec.text_field), row.get(spec.messages_field), spec, where, list(row)))
      if len(docs) == spec.max_documents:
        break  # don't parse what will be dropped
  return docs


def _rows_to_documents(
    columns: dict[str, list[Any]], n_rows: int, spec: DatasetSpec, all_fields: Sequence[str]
) -> list[Document]:
  """Documents of a columnar table (parquet, `datasets`), one per row."""
  none = [None] * n_rows
  texts, messages = columns.get(spec.text_field, none), columns.get(spec.messages_field, none)
  return [
      _row_document(t, m, spec, f"dataset {spec.path} row {i}", all_fields)
      for i, (t, m) in enumerate(zip(texts, messages, strict=True))
  ]


def _check_columns(spec: DatasetSpec, names: Sequence[str]) -> list[str]:
  """The document columns among `names`; an error when there are none."""
  columns = [c for c in dict.fromkeys((spec.text_field, spec.messages_field)) if c in names]
  if not columns:
    raise ValueError(
        f"dataset {spec.path} has no column {spec.text_field!r} or {spec.messages_field!r} (its columns: {list(names)}); "
        "set text_field / messages_field of the dataset spec to the fields that hold the documents."
    )
  return columns


def _read_parquet(spec: DatasetSpec) -> list[Document]:
  pq = _require("pyarrow.parquet", "pyarrow", "parquet")
  names = pq.read_schema(spec.path).names
  columns = _check_columns(spec, names)
  table = pq.read_table(spec.path, columns=columns)
  if spec.max_documents:
    table = table.slice(0, spec.max_documents)
  return _rows_to_documents({c: table.column(c).to_pylist() for c in columns}, table.num_rows, spec, names)


def _read_hf_disk(spec: DatasetSpec) -> list[Document]:
  datasets = _require("datasets", "datasets", "hf_disk")
  ds = datasets.load_from_disk(spec.path)
  if isinstance(ds, datasets.DatasetDict):
    if spec.split not in ds:
      raise ValueError(f"dataset {spec.path} has no split {spec.split!r}; its splits are {sorted(ds)}; set split to one of them.")
    ds = ds[spec.split]
  columns = _check_columns(spec, ds.column_names)
  if spec.max_documents:
    ds = ds.select(range(min(spec.max_documents, len(ds))))
  # to_dict goes through the indices mapping, so a saved `select`/`shuffle` is honoured.
  return _rows_to_documents(ds.select_columns(columns).to_dict(), len(ds), spec, ds.column_names)


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf_disk": _read_hf_disk}


def read_documents(spec: DatasetSpec) -> list[Document]:
  """The documents of `spec` in file order: plain strings, or conversations as lists of role/content dicts."""
  docs = _READERS[_resolve_format(spec)](spec)
  if spec.max_documents:
    docs = docs[: spec.max_documents]
  if not docs:
    raise ValueError(f"dataset {spec.path} is empty (no documents); fill it or remove it from the datasets to harvest.")
  return docs


def _sha256(docs: Sequence[np.ndarray]) -> str:
  """Hex sha256 of documents' token ids; each is length-prefixed so moving a document boundary changes it."""
  h = hashlib.sha256()
  for doc in docs:
    h.update(np.asarray(len(doc), "<i8").tobytes())
    h.update(np.ascontiguousarray(doc, "<i4").tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class TokenizedCorpus:
  """Token ids of every document of every dataset, in harvest order."""

  ids: list[np.ndarray]  # int32 [n_i] per document, BOS included where the tokenizer / template adds one
  kinds: list[np.ndarray]  # uint8 [n_i]: KIND_TEXT, KIND_SPECIAL or KIND_TEMPLATE per token
  dataset_of_doc: np.ndarray  # int32 [n_docs]: index into the specs
  truncated: int  # documents cut to max_length
  datasets: list[dict]  # per spec: {"path", "format", "documents", "tokens", "sha256"}
  skipped_short: int = 0  # documents dropped for having fewer than min_tokens tokens (skip_short=True)
  # int32 [n_docs]: index of the first token of a conversation's first assistant turn (the template's
  # generation prompt comes just before it); -1 for plain text or a conversation without one.
  assistant_start: np.ndarray | None = None

  @property
  def num_tokens(self) -> int:
    """Tokens over all documents."""
    return int(sum(len(doc) for doc in self.ids))

  def fingerprint(self) -> str:
    """Hex sha256 over all token ids in order, document boundaries included."""
    return _sha256(self.ids)


_Encoded = tuple[np.ndarray, np.ndarray, int]  # ids, kinds, assistant start (-1: none)


def _encode_texts(tokenizer: Any, texts: Sequence[str], special: np.ndarray) -> list[_Encoded]:
  """(ids, kinds, -1) of plain-text documents, with the tokenizer's own BOS."""
  out = []
  for start in range(0, len(texts), _BATCH):
    for ids in tokenizer(list(texts[start : start + _BATCH]), add_special_tokens=True)["input_ids"]:
      ids = np.asarray(ids, np.int32)
      out.append((ids, np.where(np.isin(ids, special), KIND_SPECIAL, KIND_TEXT).astype(np.uint8), -1))
  return out


def _assistant_prefix(tokenizer: Any, rendered: str, messages: list[dict[str, str]]) -> int:
  """Characters of `rendered` before the first assistant message's content (-1: no such turn, or a template
  whose generation prompt does not prefix the full rendering)."""
  turn = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
  if not turn:
    return -1
  prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
  return len(prompt) if rendered.startswith(prompt) else -1


def _first_token_at(offsets: Any, chars: int) -> int:
  """Index of the first token starting at or after character `chars` (-1 for chars < 0 or past the end)."""
  if chars < 0:
    return -1
  starts = np.asarray(offsets, np.int64).reshape(-1, 2)[:, 0]
  i = int(np.searchsorted(starts, chars, side="left"))
  return i if i < len(starts) else -1


def _content_spans(rendered: str, messages: list[dict[str, str]], where: str) -> np.ndarray:
  """int64 [m, 2] character spans of the messages' contents in `rendered`, in order."""
  spans, cursor = [], 0
  for i, message in enumerate(messages):
    content = message["content"]
    if not content.strip():
      continue  # no content tokens to mark
    start = rendered.find(content, cursor)
    if start < 0:  # templates often trim content (Gemma's `| trim`)
      content = content.strip()
      start = rendered.find(content, cursor)
    if start < 0:
      raise ValueError(
          f"{where}: the chat template does not render message {i}'s content verbatim, so its tokens can't be told from "
          "the template's; store the conversation pre-rendered as plain text (text_field) instead."
      )
    spans.append((start, start + len(content)))
    cursor = start + len(content)
  return np.asarray(spans, np.int64).reshape(-1, 2)


def _conversation_kinds(ids: np.ndarray, offsets: Any, spans: np.ndarray, special: np.ndarray) -> np.ndarray:
  """uint8 [n] kinds of a rendered conversation's tokens, given their character offsets."""
  offsets = np.asarray(offsets, np.int64).reshape(-1, 2)  # [n, 2]
  kinds = np.full(len(ids), KIND_TEMPLATE, np.uint8)
  if len(spans):
    # Spans are disjoint and sorted, so the only one a token can lie in is the last starting at or before it.
    k = np.searchsorted(spans[:, 0], offsets[:, 0], side="right") - 1  # [n]
    inside = (k >= 0) & (offsets[:, 1] <= spans[np.maximum(k, 0), 1])
    kinds[inside] = KIND_TEXT
  kinds[np.isin(ids, special)] = KIND_SPECIAL
  return kinds


def _encode_conversations(
    tokenizer: Any, conversations: Sequence[list[dict[str, str]]], rows: Sequence[int], spec: DatasetSpec, special: np.ndarray
) -> list[_Encoded]:
  """(ids, kinds, assistant start) of conversations rendered with the chat template (which renders BOS itself)."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        f"dataset {spec.path} holds conversations but the tokenizer has no chat template; use the tokenizer of the chat "
        "model, set tokenizer.chat_template, or store the documents as plain text (text_field)."
    )
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(
        f"dataset {spec.path} holds conversations, whose template tokens are found by character offsets: that needs a "
        "fast tokenizer (use_fast=True)."
    )
  rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
  spans = [
      _content_spans(r, c, f"dataset {spec.path} row {row}") for r, c, row in zip(rendered, conversations, rows, strict=True)
  ]
  prefixes = [_assistant_prefix(tokenizer, r, c) for r, c in zip(rendered, conversations, strict=True)]
  out = []
  for start in range(0, len(rendered), _BATCH):
    enc = tokenizer(rendered[start : start + _BATCH], add_special_tokens=False, return_offsets_mapping=True)
    for ids, offsets, doc_spans, prefix in zip(enc["input_ids"], enc["offset_mapping"], spans[start : start + _BATCH],
                                               prefixes[start : start + _BATCH], strict=True):
      ids = np.asarray(ids, np.int32)
      out.append((ids, _conversation_kinds(ids, offsets, doc_spans, special), _first_token_at(offsets, prefix)))
  return out


def _encode(
    tokenizer: Any, docs: Sequence[Document], spec: DatasetSpec, special: np.ndarray
) -> list[_Encoded]:
  """(ids, kinds, assistant start) of every document of one dataset, in order; texts and conversations batched apart."""
  text_rows = [i for i, d in enumerate(docs) if isinstance(d, str)]
  chat_rows = [i for i, d in enumerate(docs) if not isinstance(d, str)]
  encoded: list[Any] = [None] * len(docs)
  if text_rows:
    for row, enc in zip(text_rows, _encode_texts(tokenizer, [docs[i] for i in text_rows], special), strict=True):
      encoded[row] = enc
  if chat_rows:
    convs = [docs[i] for i in chat_rows]
    for row, enc in zip(chat_rows, _encode_conversations(tokenizer, convs, chat_rows, spec, special), strict=True):
      encoded[row] = enc
  return encoded


def tokenize_corpus(
    tokenizer: Any, specs: Sequence[DatasetSpec], max_length: int, min_tokens: int = 2, skip_short: bool = False
) -> TokenizedCorpus:
  """Reads and tokenizes every dataset of `specs`, cutting documents to `max_length` tokens."""
  if not specs:
    raise ValueError("no datasets to tokenize; name at least one.")
  if not 1 <= min_tokens <= max_length:
    raise ValueError(f"need 1 <= min_tokens ({min_tokens}) <= max_length ({max_length}).")
  special = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int32)
  ids, kinds, dataset_of_doc, infos, starts = [], [], [], [], []
  truncated = skipped_short = 0
  for d, spec in enumerate(specs):
    docs = read_documents(spec)
    kept = []
    for row, (doc_ids, doc_kinds, doc_start) in enumerate(_encode(tokenizer, docs, spec, special)):
      if len(doc_ids) < min_tokens:
        if not skip_short:
          raise ValueError(
              f"dataset {spec.path} row {row} has {len(doc_ids)} token(s), fewer than min_tokens={min_tokens}; "
              "pass skip_short=True to drop such documents, or remove them from the dataset."
          )
        skipped_short += 1
        continue
      if len(doc_ids) > max_length:
        doc_ids, doc_kinds = doc_ids[:max_length], doc_kinds[:max_length]
        truncated += 1
      kept.append(doc_ids)
      kinds.append(doc_kinds)
      starts.append(doc_start if doc_start < len(doc_ids) else -1)  # a cut may leave no assistant token
    ids.extend(kept)
    dataset_of_doc.extend([d] * len(kept))
    infos.append({
        "path": spec.path,
        "format": _resolve_format(spec),
        "documents": len(kept),
        "tokens": int(sum(len(x) for x in kept)),
        "sha256": _sha256(kept),
    })
  if not ids:
    raise ValueError(f"no documents left to harvest: all {skipped_short} have fewer than min_tokens={min_tokens} tokens.")
  return TokenizedCorpus(
      ids=ids,
      kinds=kinds,
      dataset_of_doc=np.asarray(dataset_of_doc, np.int32),
      truncated=truncated,
      datasets=infos,
      skipped_short=skipped_short,
      assistant_start=np.asarray(starts, np.int32),
  )


def _id_to_token(tokenizer: Any) -> dict[int, str]:
  return {i: t for t, i in tokenizer.get_vocab().items()}


def check_same_tokenizer(base_tokenizer: Any, ft_tokenizer: Any) -> None:
  """Raises ValueError unless both tokenizers give every token the same id and agree on BOS, EOS and PAD."""
  fix = (
      "harvesting needs both models to read the same token ids; give both the same tokenizer (e.g. the fine-tuned "
      "model's, when it only adds tokens the data never uses) or choose a model pair that shares a tokenizer."
  )
  base, ft = _id_to_token(base_tokenizer), _id_to_token(ft_tokenizer)
  if base != ft:
    first = next(i for i in range(max(max(base, default=-1), max(ft, default=-1)) + 1) if base.get(i) != ft.get(i))
    show = lambda token: "(no token)" if token is None else repr(token)  # noqa: E731
    raise ValueError(f"tokenizers differ at id {first}: base {show(base.get(first))} vs fine-tuned {show(ft.get(first))} — {fix}")
  if len(base_tokenizer) != len(ft_tokenizer):
    raise ValueError(f"tokenizers differ in size: base {len(base_tokenizer)} vs fine-tuned {len(ft_tokenizer)} — {fix}")
  for name in ("bos", "eos", "pad"):
    base_id, ft_id = getattr(base_tokenizer, f"{name}_token_id", None), getattr(ft_tokenizer, f"{name}_token_id", None)
    if base_id != ft_id:
      raise ValueError(f"tokenizers differ in their {name.upper()} id: base {base_id} vs fine-tuned {ft_id} — {fix}")
