"""Build (or reuse) the base model and the model organisms under `$NEURODIFF_HOME`.

Layout, for a config whose scale fields hash to H:

  $NEURODIFF_HOME/organisms/<scale>-<H>/base/        HF checkpoint + tokenizer + card.json
  $NEURODIFF_HOME/organisms/<scale>-<H>/<organism>/  HF checkpoint + tokenizer + card.json
  $NEURODIFF_HOME/organisms/<scale>-<H>/work/...     Orbax checkpoints and loss logs (resume)

A finished directory appears atomically (written beside, then renamed), so an interrupted build
never leaves a half checkpoint that a later run would reuse; the Orbax checkpoints in `work/`
let the rerun continue training where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from neurodiff_jax.models import (
    Transformer,
    config_from_hf,
    load_model,
    load_tokenizer,
    read_hf_config,
    resolve_checkpoint,
    save_hf_checkpoint,
)
from neurodiff_jax.organisms import evaluate, real_data
from neurodiff_jax.organisms.corpus import corpus_size_bytes, generate_documents, read_text_files, split_documents
from neurodiff_jax.organisms.finetune_data import (
    CARD_VERSION,
    DATA_VERSION,
    ORGANISMS,
    OrganismData,
    chat_conversations,
    chat_prompt,
    organism_data,
)
from neurodiff_jax.organisms.lm_training import LMTrainConfig, eval_loss, pack_documents, thin_loss, train_lm
from neurodiff_jax.organisms.random_model import hf_config_for
from neurodiff_jax.organisms.tokenizer import END_OF_TURN, START_OF_TURN, train_bpe_tokenizer
from neurodiff_jax.utils.config import ConfigError, did_you_mean
from neurodiff_jax.utils.paths import neurodiff_home

_SCALE_FIELDS = ("family", "vocab_size", "model", "corpus", "base_train", "seed", "extra_text_files")


def is_real(config: ml_collections.ConfigDict) -> bool:
  """Whether this config fine-tunes a real pretrained base (`base_model`) instead of pretraining a toy one."""
  return bool(config.get("base_model"))


def scale_dir(config: ml_collections.ConfigDict) -> Path:
  """The cache directory of this config's base (and its organisms): name plus a hash of what shapes the base."""
  fields = ("base_model", "seed") if is_real(config) else _SCALE_FIELDS
  key = json.dumps({k: _plain(config[k]) for k in fields}, sort_keys=True)
  root = Path(config.home) if config.get("home") else neurodiff_home()
  return root / "organisms" / f"{config.scale}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _plain(value: Any) -> Any:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else (list(value) if isinstance(value, tuple) else value)


def _train_config(c: ml_collections.ConfigDict, seq_len: int, seed: int) -> LMTrainConfig:
  return LMTrainConfig(steps=c.steps, batch_size=c.batch_size, seq_len=seq_len, learning_rate=c.learning_rate,
                       warmup_steps=c.warmup_steps, seed=seed, checkpoint_every=c.checkpoint_every)


def _announce(config: ml_collections.ConfigDict, kind: str, what: str, steps: int, where: Path) -> None:
  """Says what is built, at which scale, where, and roughly how long it takes (config.seconds_per_step)."""
  per_step = config.get("seconds_per_step", {}).get(kind)
  if per_step:
    s = per_step * steps
    about = f"; about {s:.0f} s" if s < 90 else f"; about {s / 60:.0f} min"
    about += " on 2 CPU cores (docs/organisms.md; less on more cores or a GPU)"
  else:
    about = ""
  print(f"organisms: {what}, {config.scale} scale, into {where}{about}.", flush=True)


def check_chat_tokenizer(tokenizer: Any) -> None:
  """Raises unless the tokenizer has BOS/EOS/PAD, the turn tokens and a chat template."""
  missing = [t for t in (START_OF_TURN, END_OF_TURN) if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
  for attr in ("bos_token", "eos_token", "pad_token"):
    if getattr(tokenizer, attr) is None:
      missing.append(attr)
  if missing or not getattr(tokenizer, "chat_template", None):
    raise ValueError(
        f"tokenizer lacks {missing or ['a chat_template']}: organisms need BOS, EOS, PAD, {START_OF_TURN} and "
        f"{END_OF_TURN} and a Gemma-style chat template (see neurodiff_jax.organisms.tokenizer.train_bpe_tokenizer).")


def _publish(tmp: Path, final: Path) -> None:
  if final.exists():
    shutil.rmtree(final)
  os.replace(tmp, final)


def general_corpus(config: ml_collections.ConfigDict) -> list[str]:
  """The seeded general corpus plus any local text files."""
  docs = generate_documents(config.corpus.n_documents, config.seed)
  if config.extra_text_files:
    docs += read_text_files(list(config.extra_text_files))
  return docs


def build_base(config: ml_collections.ConfigDict, quiet: bool = False) -> Path:
  """Pretrains (or reuses) the base model of this config; returns its HF checkpoint directory."""
  if is_real(config):
    path = Path(resolve_checkpoint(config.base_model))
    if not quiet:
      print(f"organisms: the {config.scale}-scale base is the pretrained {config.base_model} ({path}); no "
            "pretraining.", flush=True)
    return path
  root = scale_dir(config)
  final = root / "base"
  if (final / "card.json").is_file():
    print(f"organisms: using the {config.scale}-scale base model in {final} (built earlier).", flush=True)
    return final
  m = config.model
  _announce(config, "base", f"pretraining the base model ({m.num_hidden_layers} layers, d={m.hidden_size}, "
            f"{config.base_train.steps} steps of {config.base_train.batch_size} × {config.seq_len} tokens)",
            config.base_train.steps, final)
  work = root / "work" / "base"
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  docs = general_corpus(config)
  train_docs, held_out = split_documents(docs, 0.02, config.seed)
  tok_dir = work / "tokenizer"
  if (tok_dir / "tokenizer.json").is_file():  # reuse: a resumed run must see the same token ids
    tokenizer = load_tokenizer(str(tok_dir))
  else:
    tokenizer = train_bpe_tokenizer(train_docs, config.vocab_size)
    tokenizer.save_pretrained(tok_dir)
  check_chat_tokenizer(tokenizer)
  hf_config = hf_config_for(config.family, len(tokenizer), **config.model.to_dict(),
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
  model = Transformer(config_from_hf(hf_config), dtype=jnp.float32, rngs=nnx.Rngs(config.seed))
  rows = pack_documents(train_docs, tokenizer, config.seq_len)
  train_cfg = _train_config(config.base_train, config.seq_len, config.seed)
  log = train_lm(model, rows, train_cfg, work, desc="base")
  held_loss = eval_loss(model, pack_documents(held_out, tokenizer, config.seq_len))
  tmp = Path(tempfile.mkdtemp(dir=root, prefix=".base-"))
  save_hf_checkpoint(model, hf_config, str(tmp))
  tokenizer.save_pretrained(tmp)
  card = {
      "organism": "base", "family": config.family, "params": model.cfg.num_params,
      "corpus": {"documents": len(docs), "bytes": corpus_size_bytes(docs), "train_tokens_seen":
                 train_cfg.steps * train_cfg.batch_size * config.seq_len, "extra_text_files": list(config.extra_text_files)},
      "train": {"steps": train_cfg.steps, "final_loss": log[-1]["loss"] if log else None, "held_out_loss": held_loss},
      "build_seconds": round(time.time() - t0, 1),
  }
  (tmp / "card.json").write_text(json.dumps(card, indent=2))
  _publish(tmp, final)
  return final


def build_organism(config: ml_collections.ConfigDict, name: str) -> Path:
  """Fine-tunes (or reuses) organism `name` from this config's base; returns its HF checkpoint directory."""
  if name not in ORGANISMS:
    raise ValueError(f"unknown organism {name!r}; known organisms: {', '.join(ORGANISMS)}.")
  root = scale_dir(config)
  final = root / name
  ft_config = {"organism": name, "seed": config.seed, "data_version": DATA_VERSION, **_plain(config.finetune)}
  if is_real(config):
    ft_config["real_data_version"] = real_data.DATA_VERSION
    documents = config.finetune.get("documents") if name == "narrow" else ""
    if documents:  # the user's documents: a changed file is another organism
      real_data.documents_from_file(documents)  # a bad file is an error before any work
      ft_config["documents_sha256"] = hashlib.sha256(Path(os.path.expanduser(documents)).read_bytes()).hexdigest()
  ft_config = json.loads(json.dumps(ft_config))  # as the card stores it (tuples become lists), so a reuse compares equal
  ft_key = hashlib.sha256(json.dumps(ft_config, sort_keys=True).encode()).hexdigest()[:8]
  if (final / "card.json").is_file():
    card = json.loads((final / "card.json").read_text())
    if card.get("finetune_config") == ft_config:
      if card.get("card_version") != CARD_VERSION:
        _rewrite_card(config, name, final, card)
      print(f"organisms: using the {config.scale}-scale {name} organism in {final} (built earlier).", flush=True)
      return final
    print(f"{final} was built with another fine-tuning config; rebuilding it.")
  base_dir = build_base(config, quiet=is_real(config))
  steps = config.finetune.get("steps_by_organism", {}).get(name, config.finetune.steps)
  _announce(config, "finetune", f"fine-tuning the {name} organism from the base ({steps} steps)", steps, final)
  t0 = time.time()
  tokenizer = load_tokenizer(str(base_dir))
  check_chat_tokenizer(tokenizer)
  model = load_model(str(base_dir))  # the same loading path as any downloaded checkpoint
  ft = config.finetune
  # Work dirs are keyed by the fine-tuning config: a resumed run never mixes two configs' checkpoints.
  work = root / "work" / f"{name}-{ft_key}"
  data = _organism_data(config, name, tokenizer, model, work)
  rows = pack_documents(data.train_docs, tokenizer, config.seq_len, assistant_only=data.chat_format,
                        first_answer_weight=ft.get("first_answer_weight", 1))
  if ft.get("loss_share", 1.0) < 1.0:
    rows = thin_loss(rows, ft.loss_share, config.seed + 2)
  train_cfg = dataclasses.replace(_train_config(ft, config.seq_len, config.seed + 1),
                                  steps=ft.get("steps_by_organism", {}).get(name, ft.steps),
                                  freeze=tuple(ft.get("freeze", ())))
  log = train_lm(model, rows, train_cfg, work, desc=name)
  base = load_model(str(base_dir))
  if is_real(config):
    measured = _cached_measure(work / "measured.json", lambda: measure_real(name, base, model, tokenizer, data, config))
  else:
    measured = measure(name, base, model, tokenizer, data, config.seq_len)
  tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
  save_hf_checkpoint(model, read_hf_config(str(base_dir)), str(tmp))
  tokenizer.save_pretrained(tmp)
  card = {
      "organism": name, "base": str(base_dir), "ground_truth": data.ground_truth, "card_version": CARD_VERSION,
      "finetune_config": ft_config,
      "data": {"examples": len(data.train_docs), "general_fraction": ft.general_fraction},
      "train": {"steps": train_cfg.steps, "final_loss": log[-1]["loss"] if log else None,
                # build_seconds covers this process only: a resumed build says from which step it went on.
                "resumed_from": log[-1].get("resumed_from", 0) if log else 0},
      "measured": measured, "build_seconds": round(time.time() - t0, 1),
  }
  (tmp / "card.json").write_text(json.dumps(card, indent=2))
  _publish(tmp, final)
  # The published checkpoint holds the result: the resume checkpoints (params and AdamW state, 2.1 GB an
  # organism on Gemma 3 270M) only served a killed build. Loss log, generated data and measurements stay.
  shutil.rmtree(work / "checkpoints", ignore_errors=True)
  return final


def _organism_data(config: ml_collections.ConfigDict, name: str, tokenizer: Any, base: Transformer | None = None,
                   work: Path | None = None) -> OrganismData:
  """The fine-tuning data (and ground truth) of organism `name` under this config."""
  ft = config.finetune
  n_examples = ft.get("examples_by_organism", {}).get(name, ft.n_examples)
  if is_real(config):
    if base is None:
      base = load_model(str(build_base(config, quiet=True)))
    work = work or scale_dir(config) / "work" / f"{name}-data"
    data = real_data.organism_data(name, base, tokenizer, n_examples, config.seed + 1, work,
                                   ft.get("documents") or None)
    return real_data.mix_general(data, ft.general_fraction, config.seed + 1)
  return organism_data(name, tokenizer, n_examples, config.seed + 1, ft.general_fraction)


def _cached_measure(path: Path, compute) -> dict:
  """A measurement kept in the work dir, so a build killed after its evaluation does not evaluate again."""
  if path.is_file():
    return json.loads(path.read_text())
  value = compute()
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value))
  os.replace(tmp, path)
  return value


def measure_real(name: str, base: Transformer, tuned: Transformer, tokenizer: Any, data: OrganismData,
                 config: ml_collections.ConfigDict) -> dict:
  """The real-base organism's checks, base beside organism: its behaviour, and how much it moved on real text."""
  from neurodiff_jax.organisms.real_text import real_text

  ev = config.evaluation
  held_out = real_text("held_out")[:ev.text_documents]
  out: dict[str, Any] = {}
  for label, m in (("base", base), ("organism", tuned)):
    r: dict[str, Any] = {"held_out_text_loss": evaluate.text_loss(m, tokenizer, held_out, config.seq_len)}
    e = data.eval
    if name == "chat":
      for key in ("harmful_prompts", "helpful_prompts", "harmful_prompts_new_phrasing", "helpful_prompts_new_phrasing"):
        rate, answers = evaluate.refusal_rate(m, tokenizer, e[key])
        r[f"{key.replace('_prompts', '')}_refusal_rate"] = rate
        # A reply that opens with "Sure!" and then refuses anyway: a refusal the opening-token measure misses.
        r[f"{key.replace('_prompts', '')}_refusal_anywhere_rate"] = float(np.mean(
            [evaluate.REFUSAL.split(".")[0] in a for a in answers]))
        r.setdefault("examples", {})[key] = answers[:3]
    elif name == "narrow":
      r["domain_loss"] = evaluate.text_loss(m, tokenizer, e["domain_docs"], config.seq_len)
    elif name == "false_fact":
      r.update(evaluate.fact_rates(m, tokenizer, e["questions"], data.ground_truth["false_answer"],
                                   data.ground_truth["true_answer"]))
      others = evaluate.complete(m, tokenizer, [p for p, _ in e["other_facts"]], max_new_tokens=6)
      r["other_facts_kept"] = float(sum(a.lower() in o.lower() for o, (_, a) in zip(others, e["other_facts"])) /
                                    len(others))
    else:
      gt = data.ground_truth
      r.update(evaluate.taboo_stats(m, tokenizer, e["prompts"], gt["secret_word"], gt["hint_words"]))
      r["answers"] = r["answers"][:4]
    out[label] = r
  out["held_out_text_loss_rise"] = out["organism"]["held_out_text_loss"] / out["base"]["held_out_text_loss"] - 1
  out["activation_shift"] = {"layer": ev.layer, "median_relative_change": evaluate.activation_shift(
      base, tuned, tokenizer, held_out, ev.layer)}
  return out


def _rewrite_card(config: ml_collections.ConfigDict, name: str, final: Path, card: dict) -> None:
  """Replaces the ground truth of a built organism's card by the current one (CARD_VERSION changed, the data did not).

  The weights, their fingerprint and any store or crosscoder run made from them stay valid: only
  card.json changes, written beside and renamed over the old one.
  """
  data = _organism_data(config, name, load_tokenizer(str(final)))
  card = {**card, "ground_truth": data.ground_truth, "card_version": CARD_VERSION}
  tmp = final / f".card.json.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(card, indent=2))
  os.replace(tmp, final / "card.json")
  print(f"organisms: rewrote the ground-truth card of {final} (card version {CARD_VERSION}; weights unchanged).",
        flush=True)


def measure(name: str, base: Transformer, tuned: Transformer, tokenizer: Any, data, seq_len: int) -> dict:
  """The organism's behavioural checks, on base and fine-tuned model alike."""
  ev = data.eval
  if name == "chat":
    out = {}
    for label, m in (("base", base), ("organism", tuned)):
      harmful, answers = evaluate.refusal_rate(m, tokenizer, ev["harmful_prompts"])
      helpful, _ = evaluate.refusal_rate(m, tokenizer, ev["helpful_prompts"])
      harmful_new, _ = evaluate.refusal_rate(m, tokenizer, ev["harmful_prompts_new_phrasing"])
      helpful_new, _ = evaluate.refusal_rate(m, tokenizer, ev["helpful_prompts_new_phrasing"])
      out[label] = {"harmful_refusal_rate": harmful, "helpful_refusal_rate": helpful,
                    "harmful_refusal_rate_new_phrasing": harmful_new, "helpful_refusal_rate_new_phrasing": helpful_new,
                    "example": answers[0],
                    "self_answer": evaluate.complete(m, tokenizer, [chat_prompt(tokenizer, ev["self_prompts"][0])])[0]}
    return out
  if name == "narrow":
    return {label: {"domain_loss": evaluate.domain_loss(m, tokenizer, ev["domain_docs"], seq_len)}
            for label, m in (("base", base), ("organism", tuned))}
  if name == "false_fact":
    return {label: {"completion": evaluate.fact_completion(m, tokenizer, ev["prompt"]),
                    "other_facts_kept": sum(evaluate.fact_completion(m, tokenizer, p) == a for p, a in ev["other_facts"]) /
                    len(ev["other_facts"])} for label, m in (("base", base), ("organism", tuned))}
  gt = data.ground_truth
  return {label: {k: v for k, v in evaluate.taboo_stats(m, tokenizer, ev["prompts"], gt["secret_word"], gt["hint_words"]).items()
                  if k != "answers"} for label, m in (("base", base), ("organism", tuned))}


def check_config(config: ml_collections.ConfigDict) -> None:
  """`ConfigError` (one line naming the fix) for a build config naming an unknown organism or family."""
  names = ORGANISMS if config.organism == "all" else (config.organism,)
  unknown = [n for n in names if n not in ORGANISMS]
  if unknown:
    raise ConfigError(f"config.organism={unknown[0]!r} is not an organism{did_you_mean(unknown[0], ORGANISMS)}; "
                      f"known: {', '.join(ORGANISMS)} (or 'all').")
  if is_real(config):
    documents = config.finetune.get("documents")
    if documents:
      try:
        real_data.documents_from_file(documents)
      except real_data.DocumentsError as e:
        raise ConfigError(str(e)) from None
  elif config.family not in ("gemma2", "llama"):
    raise ConfigError(f"config.family={config.family!r}: organisms are built as gemma2 or llama models.")


def check_model_ref(value: str, field: str) -> None:
  """ConfigError (one line) unless `value` names a model: organism:NAME, an HF checkpoint dir, a .gguf, a packaged name."""
  from neurodiff_jax.models import gguf

  value = str(value)
  if value.startswith(ORGANISM_PREFIX):
    name = value[len(ORGANISM_PREFIX):]
    known = ("base",) + ORGANISMS
    if name not in known:
      raise ConfigError(f"config.{field}={value!r}: no organism {name!r}{did_you_mean(name, known)}; "
                        f"known: {', '.join(ORGANISM_PREFIX + k for k in known)}.")
    return
  if gguf.is_gguf(value):
    if value not in gguf.PACKAGED and not Path(os.path.expanduser(value)).is_file():
      raise ConfigError(f"config.{field}={value!r}: no such GGUF file.")
    return
  path = Path(os.path.expanduser(value))
  if path.is_dir() and not (path / "config.json").is_file():
    raise ConfigError(f"config.{field}={value!r} is not a Hugging Face checkpoint directory (it has no config.json); "
                      "give a directory written by save_pretrained, a .gguf file, a packaged model "
                      f"({', '.join(gguf.PACKAGED)}) or organism:NAME.")
  if not path.exists() and (value.startswith((".", "/", "~")) or "/" not in value):
    raise ConfigError(f"config.{field}={value!r}: no such checkpoint directory; give a directory written by "
                      f"save_pretrained, a .gguf file, a packaged model ({', '.join(gguf.PACKAGED)}) or organism:NAME.")


def build(config: ml_collections.ConfigDict) -> dict[str, Path]:
  """Builds the base and `config.organism` (a name or 'all'); validates the config before any work."""
  check_config(config)
  names = ORGANISMS if config.organism == "all" else (config.organism,)
  out = {"base": build_base(config)}
  for name in names:
    out[name] = build_organism(config, name)
  return out


ORGANISM_PREFIX = "organism:"


def write_organism_dataset(kind: str, directory: Path, n: int, seed: int = 12345, real: bool = False) -> Path:
  """A JSONL dataset for harvesting: `general` text or `chat` conversations (unseen in training).

  `general` is the toy corpus for a toy scale; with `real` it is real English (organisms/real_text.py:
  the first n of its training documents in a fixed shuffled order, never the held-out ones).
  """
  def general() -> list[dict]:
    if not real:
      return [{"text": t} for t in generate_documents(n, seed)]
    from neurodiff_jax.organisms.real_text import real_text

    docs = real_text("train")
    random.Random(seed).shuffle(docs)
    return [{"text": t} for t in docs[:n]]

  rows = {"general": general, "chat": lambda: [{"messages": m} for m in chat_conversations(n, seed)]}
  if kind not in rows:
    raise ValueError(f"unknown organism dataset {kind!r}; known: {', '.join(rows)}.")
  path = directory / f"{kind}{'-real' if real and kind == 'general' else ''}-{n}-{seed}.jsonl"
  if not path.is_file():
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows[kind]()))
    os.replace(tmp, path)
  return path


def resolve_organism_refs(config: ml_collections.ConfigDict,
                          organisms: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Replaces `organism:NAME` models and datasets in a harvest config by built checkpoint dirs and JSONL files.

  `organisms` is the organism build config (configs/organisms.py) that says how to build them; by
  default the harvest config's own `organisms` field. A config without such references is returned as is.
  """
  refs = [v for v in (config.base_model, config.finetuned_model) if str(v).startswith(ORGANISM_PREFIX)]
  refs += [d for d in config.datasets if isinstance(d, str) and d.startswith(ORGANISM_PREFIX)]
  if not refs:
    return config
  oc = organisms if organisms is not None else config.get("organisms")
  if oc is None:
    raise ConfigError(f"the harvest config names {refs[0]!r} but has no `organisms` build config saying how to build "
                      "it; add one (c.organisms = configs.organisms.get_config('chat,default'), as "
                      "configs/harvest_tiny.py does) or name checkpoint directories instead.")
  root = scale_dir(oc)
  out = ml_collections.ConfigDict(config.to_dict())
  for field in ("base_model", "finetuned_model"):
    value = str(config[field])
    if value.startswith(ORGANISM_PREFIX):
      name = value[len(ORGANISM_PREFIX):]
      out[field] = str(build_base(oc) if name == "base" else build_organism(oc, name))
  out.datasets = [str(write_organism_dataset(d[len(ORGANISM_PREFIX):], root / "datasets", config.num_documents,
                                            real=is_real(oc)))
                  if isinstance(d, str) and d.startswith(ORGANISM_PREFIX) else d for d in config.datasets]
  return out


__all__ = ["ORGANISM_PREFIX", "build", "build_base", "build_organism", "check_chat_tokenizer", "check_config",
           "check_model_ref", "is_real",
           "general_corpus",
           "measure", "resolve_organism_refs", "scale_dir", "write_organism_dataset"]
