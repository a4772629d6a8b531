"""Model organisms: a pretrained base and fine-tunes with known ground truth, built offline.

  python -m launch.organism --config=organisms:chat              # default scale, ≈ 8 min on 2 CPU cores
  python -m launch.organism --config=organisms:narrow,small       # the small (test) scale
  python -m launch.organism --config=organisms:all

`arg` names the organism (chat, narrow, false_fact, taboo, all; default chat) and optionally the
scale after a comma (`organisms:taboo,small`). The default scale is the one `harvest_tiny` and the
`tiny_*` crosscoder configs use too, so the README's steps build one pair of models.
"""

import ml_collections

SCALES = {
    # ~1M parameters; base + chat ≤ 10 min on 2 CPU cores (docs/benchmarks.md).
    "default": dict(vocab_size=2048, seq_len=128, n_documents=4000, model=dict(hidden_size=128, intermediate_size=384,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    query_pre_attn_scalar=32, sliding_window=64), base_steps=300, base_batch=32,
                    ft_steps=150, ft_batch=16, n_examples=1500, chat_steps=300, chat_examples=3000,
                    s_per_step=dict(base=0.98, finetune=0.62)),
    # For tests: a few minutes for the base and all four organisms together. The vocabulary is large
    # enough that each topic's nouns are single tokens (at 1024, "arsenic" was 4 fragments, which a
    # 2-layer model could not tie back to its topic).
    "small": dict(vocab_size=1536, seq_len=64, n_documents=1500, model=dict(hidden_size=64, intermediate_size=192,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window=32), base_steps=400, base_batch=32,
                  ft_steps=150, ft_batch=32, n_examples=800, chat_steps=700, chat_examples=2400,
                  s_per_step=dict(base=0.23, finetune=0.25)),
}
# Real pretrained bases: no pretraining, the organisms are fine-tunes of `base_model` on real English or the
# base's own text (neurodiff_jax/organisms/real_data.py). Full fine-tuning of every block, the 262k-token
# tied embedding frozen (its gradient and AdamW update were half a step's time), the loss unembedded only
# where trained, on at most half of each row's tokens (loss_share: an unbiased estimate of the full loss;
# a step at full logits took 13.3 s, 8.5 s at half). Half of each organism's documents are real English
# (general_fraction 0.5): without it the chat organism's loss on held-out real text rose 34% (lr 4e-5, 120
# steps; docs/organisms.md), against a bound of 10%. Sized for <= 30 min an organism on 2 CPU cores.
REAL_SCALES = {
    "gemma3": dict(base_model="gemma-3-270m", seq_len=128, ft_steps=100, ft_batch=8, n_examples=600,
                   chat_steps=110, chat_examples=1400, learning_rate=3e-5, general_fraction=0.5, loss_share=0.5,
                   layer=8, text_documents=200, s_per_step=dict(finetune=9.0)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Organism build config; `arg` = 'ORGANISM[,SCALE]'."""
  organism, _, scale = (arg or "chat").partition(",")
  scale = scale or "default"
  if scale in REAL_SCALES:
    return _real_config(organism, scale)
  if scale not in SCALES:
    raise ValueError(f"unknown scale {scale!r}; known scales: {', '.join(list(SCALES) + list(REAL_SCALES))}.")
  s = SCALES[scale]
  c = ml_collections.ConfigDict()
  c.organism = organism  # chat | narrow | false_fact | taboo | all
  c.scale = scale
  c.home = ""  # "" = $NEURODIFF_HOME (default ~/.cache/neurodiff_jax)
  c.family = "gemma2"  # or "llama"
  c.seed = 0
  c.vocab_size = s["vocab_size"]
  c.seq_len = s["seq_len"]
  c.extra_text_files = ()  # local text files mixed into the general corpus
  c.corpus = ml_collections.ConfigDict({"n_documents": s["n_documents"]})
  c.model = ml_collections.ConfigDict(s["model"])
  c.base_train = ml_collections.ConfigDict(dict(steps=s["base_steps"], batch_size=s["base_batch"], learning_rate=3e-3,
                                                warmup_steps=50, checkpoint_every=100))
  c.finetune = ml_collections.ConfigDict(dict(steps=s["ft_steps"], batch_size=s["ft_batch"], learning_rate=3e-3,
                                              warmup_steps=20, checkpoint_every=50, n_examples=s["n_examples"],
                                              general_fraction=0.0))
  # Learning to refuse one topic in unseen requests needs more steps and more distinct requests
  # than the other behaviours (with 800 examples the small model refused only 82-92%).
  c.finetune.steps_by_organism = ml_collections.ConfigDict({"chat": s["chat_steps"]})
  c.finetune.examples_by_organism = ml_collections.ConfigDict({"chat": s["chat_examples"]})
  # The answer's first token is the help-or-refuse decision: weigh it like this many tokens, so the
  # one decision is not drowned by the long helpful answers' loss.
  c.finetune.first_answer_weight = 8
  # Measured build time per training step on 2 CPU cores, evaluation included (docs/organisms.md), for
  # the "about N min" a build prints; it does not change what is built.
  c.seconds_per_step = ml_collections.ConfigDict(s["s_per_step"])
  return c


def _real_config(organism: str, scale: str) -> ml_collections.ConfigDict:
  """Organisms fine-tuned from a real pretrained base (REAL_SCALES)."""
  s = REAL_SCALES[scale]
  c = ml_collections.ConfigDict()
  c.organism = organism  # chat | narrow | false_fact | taboo | all
  c.scale = scale
  c.home = ""  # "" = $NEURODIFF_HOME (default ~/.cache/neurodiff_jax)
  c.base_model = s["base_model"]  # a checkpoint dir, a .gguf file, or a packaged model name
  c.family = "real"  # not used: the base's own architecture
  c.seed = 0
  c.seq_len = s["seq_len"]
  c.finetune = ml_collections.ConfigDict(dict(
      steps=s["ft_steps"], batch_size=s["ft_batch"], learning_rate=s["learning_rate"], warmup_steps=10,
      checkpoint_every=10, n_examples=s["n_examples"], general_fraction=s["general_fraction"], freeze=("embed",),
      loss_share=s["loss_share"],  # each row's loss on at most this share of its tokens (a random subset)
      # The narrow organism's documents: "" = beekeeping documents the base writes itself; or a JSONL file
      # with a `text` field per line, or plain text with blank lines between documents.
      documents=""))
  c.finetune.steps_by_organism = ml_collections.ConfigDict({"chat": s["chat_steps"]})
  c.finetune.examples_by_organism = ml_collections.ConfigDict({"chat": s["chat_examples"]})
  c.finetune.first_answer_weight = 8  # the help-or-refuse token, as on the toy organisms
  # What the cards report beside the behaviour: loss on held-out real text (this many documents) and the
  # median relative change of the residual after block `layer` (the harvest layer) on that text.
  c.evaluation = ml_collections.ConfigDict(dict(text_documents=s["text_documents"], layer=s["layer"]))
  c.seconds_per_step = ml_collections.ConfigDict(s["s_per_step"])
  return c
