"""Activation-difference methods on a base / fine-tuned pair: `python -m launch.diff --config=diff[:ORGANISM[,SCALE]]`.

  python -m launch.diff --config=diff:narrow                       # base vs the narrow organism (default scale)
  python -m launch.diff --config=diff:taboo,small --config.methods='("adl","kl")'
  python -m launch.diff --config=diff --config.base_model=/ckpt/base --config.finetuned_model=/ckpt/it \
      --config.datasets='("/data/web.jsonl",)'

`arg` names the organism compared with the base (narrow, chat, false_fact, taboo; default narrow)
and optionally the scale. Methods (all by default, in this order): weights, adl, kl, logit_diff,
amplification, norms, pca, sae, patching; each has its own section below.
"""

import ml_collections

from configs.organisms import get_config as organisms_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The diff config of one organism pair; every method's settings in its own section."""
  organism, _, scale = (arg or "narrow").partition(",")
  scale = scale or "default"
  c = ml_collections.ConfigDict()
  c.base_model = "organism:base"  # organism:NAME (built with `organisms`) or a checkpoint directory
  c.finetuned_model = f"organism:{organism}"
  c.organisms = organisms_config(f"{organism},{scale}")
  # Data: as in harvesting (text, JSONL, Parquet, saved datasets; organism:general / organism:chat generated).
  c.datasets = ("organism:general",)
  c.num_documents = 600  # documents per generated organism dataset
  c.max_len = 128  # tokens per document
  c.max_documents = 512  # documents a method reads at most
  c.store = ""  # an activation store of this pair (norms, PCA, SAE read it; "" = computed on the fly)
  c.methods = ()  # () = all: weights, adl, kl, logit_diff, amplification, norms, pca, sae, patching
  c.out_dir = ""  # "" = the crosscoder run's analysis dir (crosscoder_run), else $NEURODIFF_HOME/results/<pair>
  c.crosscoder_run = ""  # a crosscoder training workdir of this pair: results go beside its analysis
  c.force = False
  c.force_methods = ()
  c.model_dtype = "float32"
  c.model_mesh = ()  # (data, model) mesh of the models: () = one device; (2, 4) = weights split 4 ways, rows 2
  c.seed = 0
  c.progress = True
  # Graders: offline by default (coherence = base-model perplexity; relevance = the organism card).
  c.grader = ml_collections.ConfigDict({
      "kind": "offline",  # offline | openai (any OpenAI-compatible endpoint; key from $NEURODIFF_GRADER_KEY)
      "base_url": "",
      "model": "",
      "timeout_s": 30.0,
      "coherence_quantile": 0.95,  # a text is coherent below this quantile of unsteered samples' perplexity
  })
  c.weights = ml_collections.ConfigDict({"enabled": True})
  c.adl = ml_collections.ConfigDict({
      "layers": (0.5,),  # fractions of depth
      "positions": 5,  # the first n positions of each document (of the assistant turn in conversations)
      "pre_assistant": 3,  # and, in conversations, the k template tokens before the assistant turn
      "num_documents": 512,
      "batch_size": 16,
      "top_k": 20,  # tokens read from the logit lens / patchscope
      "patchscope_scales": (0.5, 1.0, 2.0, 4.0, 8.0),
      "steering_prompts": ("Tell me a story.", "What should I do today?", "Describe your favourite place."),
      "steering_alphas": (0.5, 1.0, 2.0, 4.0, 8.0, 16.0),  # searched, in units of the layer's typical norm
      "steering_tokens": 32,
  })
  c.kl = ml_collections.ConfigDict({"batch_size": 16, "top_contexts": 20})
  prompts = ("Tell me a story.", "The best thing about")  # logit_diff's and amplification's, compared side by side
  c.logit_diff = ml_collections.ConfigDict({
      "alphas": (0.0, 1.0, 2.0, 4.0), "prompts": prompts, "new_tokens": 32, "top_k": 10, "batch_size": 16})
  # Weight amplification W_base + α(W_ft − W_base) (α = 1: the fine-tune) on the chosen layers and modules.
  c.amplification = ml_collections.ConfigDict({
      "alphas": (1.0, 2.0, 4.0, 8.0),  # strengths tried: 1 = the fine-tune, larger exaggerates its difference
      "layers": (),  # fractions of depth; () = every layer
      "modules": (),  # among attn_q, attn_k, attn_v, attn_o, mlp_gate, mlp_up, mlp_down; () = all of them
      "include_norms": False,  # also the chosen layers' norms (q/k norms too) and the final norm
      "include_embeddings": False,  # also the embedding and an untied lm_head (both flags: α = 0 is the base)
      "prompts": prompts,  # logit_diff's: the two amplifications are compared on them
      "new_tokens": 32,  # tokens generated per sample
      "batch_size": 16,  # prompts per generation call
      "sampling": "greedy",  # greedy | sample (top_k at temperature, seed = config.seed)
      "temperature": 0.8,  # sampling=sample only
      "top_k": 40,  # sampling=sample only
  })
  c.norms = ml_collections.ConfigDict({"layers": (0.25, 0.5, 0.75), "batch_size": 16, "top_contexts": 20})
  c.pca = ml_collections.ConfigDict({"layer": 0.5, "components": 16, "batch_size": 16, "top_contexts": 10})
  c.sae = ml_collections.ConfigDict({"layer": 0.5, "dict_size": 1024, "k": 16, "steps": 600, "batch_size": 256,
                                     "lr": 1e-3})
  c.patching = ml_collections.ConfigDict({"batch_size": 16, "num_documents": 128})
  c.lock()
  return c
