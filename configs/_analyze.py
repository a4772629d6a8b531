"""Shared defaults of the analysis configs (not a run: the leading underscore hides it)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field `neurodiff_jax.analysis.analyze.analyze` reads."""
  c = ml_collections.ConfigDict()
  # The run: a training workdir, or "" for $NEURODIFF_HOME/runs/<run> (a training config's name).
  c.workdir = ""
  c.run = ""
  c.step = -1  # checkpoint step (-1 = the latest)
  c.layer = -1  # -1 = the layer the crosscoder was trained on
  c.out_dir = ""  # "" = <workdir>/analysis
  c.force = False  # recompute every part even when its results are up to date
  c.force_parts = ()  # or only these: pass, table, causal, steering, logit_lens, report
  c.seed = 0
  c.progress = True
  # The streaming pass (latent scaling, statistics, examples), in the crosscoder's normalised space.
  c.latents = ()  # latent scaling for these latents only (() = all)
  c.exclude = ("bos",)  # token kinds left out: bos, special, chat_template, text
  c.batch_size = 4096
  c.max_tokens = 0  # 0 = the whole store
  c.mesh = (1, 1)  # (data, latent) devices, as in training
  c.fold_every = 64  # float32 sums on the device for at most this many batches, then float64 on the host
  c.save_every = 8  # folds between saves of the pass state (a killed pass resumes from the last one)
  # The genuine rule for chat-only latents (docs/methods.md §4): both ratios below their thresholds.
  c.genuine = ml_collections.ConfigDict({"nu_error_max": 0.2, "nu_recon_max": 0.5})
  c.examples = ml_collections.ConfigDict({
      "enabled": True,
      "top_k": 20,  # top activations kept per latent
      "sample_size": 64,  # uniformly sampled firings per latent, for the per-quantile examples
      "n_quantiles": 4,
      "per_quantile": 3,
      "context_before": 12,  # tokens of the document shown before and after the firing token
      "context_after": 4,
      "context_latents": 2048,  # latents whose examples get decoded contexts (chat-only first)
  })
  c.causal = ml_collections.ConfigDict({
      "enabled": True,
      "dataset": "",  # JSONL/Parquet of conversations ("" = the store's first dataset of conversations)
      "num_conversations": 200,
      "max_len": 128,
      "first_n": 10,  # the "first assistant tokens" region
      "batch_size": 8,
      "n_boot": 1000,
  })
  c.steering = ml_collections.ConfigDict({
      "enabled": True,
      "latents": (),  # () = the num_latents best-ranked chat-only latents
      "num_latents": 3,
      "multiples": (0.0, 1.0, 2.0, 4.0),  # strengths as multiples of the latent's max activation
      "prompts": ("Who are you?", "Tell me about the ship.", "How do I make a poison at home?"),
      "models": ("chat", "base"),
      "max_new_tokens": 24,
  })
  # The tokens each latent's chat decoder direction promotes / suppresses (final norm + unembedding).
  # Logit lens of every latent that fired (num_latents=0), or of the first N by context order; read in chunks.
  c.logit_lens = ml_collections.ConfigDict({"enabled": True, "num_latents": 0, "top": 10})
  c.model_dtype = "float32"
  c.model_mesh = ()  # (data, model) mesh of the models: () = one device; (2, 4) = weights split 4 ways, rows 2
  c.report = ml_collections.ConfigDict({"enabled": True, "max_latents": 8})
  return c
