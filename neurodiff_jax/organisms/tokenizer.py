"""Byte-level BPE tokenizers trained offline with `tokenizers`, saved as `transformers` tokenizers.

They carry BOS, EOS, PAD and UNK, and a Gemma-style chat template
(`<start_of_turn>user ... <end_of_turn>`), so organisms and real Gemma checkpoints are handled by
the same code.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
  """Trains a byte-level BPE of `vocab_size` on `texts`; returns a PreTrainedTokenizerFast."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens it must hold.")
  tok = Tokenizer(models.BPE(unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=BOS,
      eos_token=EOS,
      pad_token=PAD,
      unk_token=UNK,
      additional_special_tokens=[START_OF_TURN, END_OF_TURN],
      chat_template=GEMMA_CHAT_TEMPLATE,
  )
