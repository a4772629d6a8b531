"""What every activation-difference method gets: the model pair, its ground truth, the data, a grader.

`load_pair` resolves `organism:NAME` references (built once, like harvesting does) or two
checkpoint directories, loads both models with the ports, checks that they read the same tokens
(one tokenizer) and have one width, and reads the fine-tuned organism's ground-truth card
(`card.json` beside its weights) when there is one. `DiffContext.batches` tokenizes the configured
datasets (text, JSONL, Parquet, chat conversations, as in harvesting) into padded batches with each
token's kind (text / special / chat-template).

Methods are functions `run(ctx, cfg, out) -> dict` (registry in `methods.py`): they write their
tables (Parquet), plots (PNG) and an HTML fragment `section.html` into `out` and return a
JSON-able summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from jax.sharding import Mesh

from neurodiff_jax.activations.datasets import DatasetSpec, TokenizedCorpus, check_same_tokenizer, tokenize_corpus
from neurodiff_jax.models import Transformer, load_model, load_tokenizer
from neurodiff_jax.models.sharding import mesh_of, put_batch
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.paths import neurodiff_home

ORGANISM_PREFIX = "organism:"


@dataclasses.dataclass
class ModelPair:
  """A base model and its fine-tune, loaded, with one tokenizer and the fine-tune's ground-truth card."""

  base: Transformer
  ft: Transformer
  tokenizer: Any
  base_path: str
  ft_path: str
  card: dict | None  # the organism card's `ground_truth` (None for a checkpoint without a card)
  key: str  # names the pair's results directory

  @property
  def num_layers(self) -> int:
    """Layers of the (equally deep) models."""
    return self.base.cfg.num_layers

  @property
  def mesh(self) -> Mesh | None:
    """The model mesh both models live on (`load_pair(..., mesh=)`), or None for one device."""
    return mesh_of(self.base)

  def put(self, *arrays: Any) -> tuple[Any, ...]:
    """A jitted step's inputs with a leading batch axis, placed for the models: rows on the mesh's data axis."""
    return put_batch(self.mesh, *arrays)


def resolve_model(ref: str, organisms: ml_collections.ConfigDict | None) -> str:
  """A checkpoint directory for `ref`: `organism:NAME` built (or reused) with the `organisms` config, else `ref`."""
  if not str(ref).startswith(ORGANISM_PREFIX):
    return str(ref)
  from neurodiff_jax.organisms import build

  if organisms is None:
    raise ConfigError(f"{ref!r} names an organism but the config has no `organisms` build config.")
  name = str(ref)[len(ORGANISM_PREFIX):]
  return str(build.build_base(organisms) if name == "base" else build.build_organism(organisms, name))


def resolve_datasets(datasets: Sequence[Any], organisms: ml_collections.ConfigDict | None,
                     num_documents: int) -> list[Any]:
  """Dataset specs with `organism:general` / `organism:chat` replaced by their generated JSONL files."""
  from neurodiff_jax.organisms import build

  out = []
  for d in datasets:
    if isinstance(d, str) and d.startswith(ORGANISM_PREFIX):
      if organisms is None:
        raise ConfigError(f"dataset {d!r} names an organism dataset but the config has no `organisms` config.")
      out.append(str(build.write_organism_dataset(d[len(ORGANISM_PREFIX):], build.scale_dir(organisms) / "datasets",
                                                  num_documents)))
    else:
      out.append(d)
  return out


def read_card(path: str) -> dict | None:
  """The `ground_truth` of the organism card beside a checkpoint, or None."""
  card = Path(path) / "card.json"
  return json.loads(card.read_text()).get("ground_truth") if card.is_file() else None


def load_pair(base: str, ft: str, *, dtype: str = "float32", mesh: Mesh | None = None) -> ModelPair:
  """Both models (ports), their shared tokenizer and the fine-tune's card; clear errors for a mismatched pair.

  With a model `mesh` (`models.sharding.model_mesh`) each weight is placed straight onto its shard as it is
  read: neither model is ever whole on one device.
  """
  tokenizers = [load_tokenizer(base), load_tokenizer(ft)]
  try:
    check_same_tokenizer(*tokenizers)
  except ValueError as e:
    raise ConfigError(f"base {base} and fine-tuned {ft}: {e}") from None
  b, f = load_model(base, dtype=dtype, mesh=mesh), load_model(ft, dtype=dtype, mesh=mesh)
  if b.cfg.hidden_size != f.cfg.hidden_size or b.cfg.num_layers != f.cfg.num_layers:
    raise ConfigError(f"base {base} (d={b.cfg.hidden_size}, {b.cfg.num_layers} layers) and fine-tuned {ft} "
                      f"(d={f.cfg.hidden_size}, {f.cfg.num_layers} layers) differ in shape: activation differences "
                      "need a model and its own fine-tune.")
  fps = [b.checkpoint.fingerprint, f.checkpoint.fingerprint]  # computed by load_model already
  key = f"{Path(base).name}__{Path(ft).name}-{hashlib.sha256('|'.join(fps).encode()).hexdigest()[:8]}"
  return ModelPair(b, f, tokenizers[1], str(base), str(ft), read_card(ft), key)


def results_dir(config: ml_collections.ConfigDict, pair_key: str) -> Path:
  """`out_dir`, else the crosscoder run's analysis directory (`crosscoder_run`), else one per model pair."""
  if config.out_dir:
    return Path(config.out_dir).expanduser()
  if config.crosscoder_run:
    return Path(config.crosscoder_run).expanduser() / "analysis"
  return neurodiff_home() / "results" / pair_key


def layers_of(fractions: Sequence[float], num_layers: int) -> list[int]:
  """Layers at fractions of the depth (0.5 = the middle layer); a fraction outside [0, 1] is an error."""
  out = []
  for f in fractions:
    if isinstance(f, int) and not isinstance(f, bool) and f >= 1:
      raise ConfigError(f"layer fraction {f} is an integer ≥ 1; give fractions of depth in [0, 1] (0.5 = middle).")
    if not 0.0 <= float(f) <= 1.0:
      raise ConfigError(f"layer fraction {f} is outside [0, 1]; give fractions of depth (0.5 = the middle layer of "
                        f"{num_layers}).")
    out.append(min(int(round(float(f) * (num_layers - 1))), num_layers - 1))
  return sorted(set(out))


@dataclasses.dataclass
class TokenBatch:
  """Padded documents: ids and masks [B, T], token kinds [B, T], which document each row is (-1: filler), and
  where each row's first assistant turn starts (-1: plain text or no assistant turn)."""

  ids: np.ndarray
  mask: np.ndarray
  kinds: np.ndarray
  docs: np.ndarray
  assistant_start: np.ndarray | None = None


@dataclasses.dataclass
class DiffContext:
  """Everything a method reads: the pair, the data, the grader, where to log; no global state."""

  pair: ModelPair
  datasets: list[Any]  # dataset specs as in harvesting (paths or dicts), organism refs resolved
  max_len: int = 128
  max_documents: int = 512
  grader: Any = None  # diffing.graders.Grader
  store: Any = None  # an ActivationStore of this pair (norm difference, PCA, SAE), or None
  log: Callable[[str], None] = print
  progress: bool = True
  seed: int = 0
  _corpus: TokenizedCorpus | None = None

  def corpus(self) -> TokenizedCorpus:
    """The datasets tokenized with the pair's tokenizer (cut to max_len tokens), read once."""
    if self._corpus is None:
      if not self.datasets:
        raise ConfigError("config.datasets is empty; name at least one dataset (text, JSONL, Parquet, conversations).")
      specs = [DatasetSpec.from_config(d) for d in self.datasets]
      self._corpus = tokenize_corpus(self.pair.tokenizer, specs, max_length=self.max_len, skip_short=True)
    return self._corpus

  def batches(self, batch_size: int, min_len: int = 1, max_documents: int | None = None) -> Iterator[TokenBatch]:
    """Right-padded batches of the first documents with at least `min_len` tokens (error if none is that long)."""
    corpus = self.corpus()
    limit = self.max_documents if max_documents is None else max_documents
    docs = [i for i, d in enumerate(corpus.ids) if len(d) >= min_len][:limit]
    if not docs:
      longest = max(len(d) for d in corpus.ids)
      raise ConfigError(f"no document of the datasets has {min_len} tokens (the longest has {longest} after cutting "
                        f"to max_len={self.max_len}); lower the positions asked for or use longer documents.")
    pad = self.pair.tokenizer.pad_token_id or 0
    starts = corpus.assistant_start if corpus.assistant_start is not None else np.full(len(corpus.ids), -1, np.int32)
    for s in range(0, len(docs), batch_size):
      part = docs[s:s + batch_size]
      t = max(len(corpus.ids[i]) for i in part)
      ids = np.full((batch_size, t), pad, np.int32)
      mask = np.zeros((batch_size, t), bool)
      kinds = np.zeros((batch_size, t), np.uint8)
      for r, i in enumerate(part):
        n = len(corpus.ids[i])
        ids[r, :n], mask[r, :n], kinds[r, :n] = corpus.ids[i], True, corpus.kinds[i]
      # Rows past the last document repeat the first one (an all-padding row would attend to
      # nothing): one batch shape, one compilation; `docs` = -1 marks them to be ignored.
      ids[len(part):], mask[len(part):], kinds[len(part):] = ids[0], mask[0], kinds[0]
      start = np.full(batch_size, -1, np.int32)
      start[:len(part)] = starts[part]
      yield TokenBatch(ids, mask, kinds, np.asarray(part + [-1] * (batch_size - len(part)), np.int64), start)


__all__ = ["ORGANISM_PREFIX", "DiffContext", "ModelPair", "TokenBatch", "layers_of", "load_pair", "read_card",
           "resolve_datasets", "resolve_model", "results_dir"]
