"""The main job: the whole story on the model organisms, on CPU, in one command.

  python -m launch.demo                              # default organism scale: 626 s on 2 CPU cores from nothing
  python -m launch.demo --config=demo:small          # the small (smoke / test) scale: 445 s from nothing
  python -m launch.demo --config.root=/tmp/story     # results root elsewhere
  python -m launch.demo --config.force_stages='("report",)'

Stages (each reuses what it finds finished, so a killed demo rerun finishes the rest): build the
base, `chat` and `narrow` organisms; harvest base vs chat; train a BatchTopK and an L1 crosscoder;
analyse both (latent scaling, causal test, examples); run ADL (and per-token KL) on base vs narrow;
write `report.html` in the results root (`$NEURODIFF_HOME/demo/<scale>` by default), which the
dashboard reads: `python -m launch.dashboard --config.results=ROOT`.
"""

import ml_collections

from configs import _crosscoder, analyze, diff, harvest_gemma3, harvest_tiny
from configs.organisms import get_config as organisms_config

SCALES = ("default", "small", "gemma3")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; `arg` is the organism scale (default | small | gemma3)."""
  scale = arg or "default"
  if scale not in SCALES:
    raise ValueError(f"unknown demo scale {scale!r}; known: {', '.join(SCALES)} (small is the fast smoke run, "
                     "gemma3 the real pretrained model).")
  if scale == "gemma3":
    return _gemma3_config()
  smoke = scale == "small"
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.root = ""  # the results root ("" = $NEURODIFF_HOME/demo/<scale>)
  c.force_stages = ()  # redo these stages: organisms, harvest, train, analyze, adl, report
  c.organisms = organisms_config(f"chat,{scale}")
  c.harvest = harvest_tiny.get_config(scale)

  c.crosscoders = ml_collections.ConfigDict()
  for name in ("batchtopk", "l1"):
    cc = _crosscoder.tiny_config(name, scale)
    with cc.unlocked():
      cc.workdir = ""  # set to <root>/runs/<name> by the demo
      if smoke:
        cc.steps = 300
        cc.log_every = 25
        cc.checkpoint_every = 100
    c.crosscoders[name] = cc

  a = analyze.get_config()
  with a.unlocked():
    a.run = ""
    a.workdir = ""  # each run's workdir, set by the demo
    if smoke:
      a.causal.num_conversations = 32
      a.causal.n_boot = 200
      a.steering.num_latents = 2
      a.steering.max_new_tokens = 16
      a.examples.context_latents = 256
  c.analyze = a

  d = diff.get_config(f"narrow,{scale}")
  d.methods = ("adl", "kl")  # the demo's story; `launch.diff` runs every method
  d.out_dir = ""  # <root>/diffs/narrow, set by the demo
  if smoke:
    d.num_documents = 200
    d.max_documents = 128
    d.adl.num_documents = 128
    d.adl.steering_prompts = ("Tell me a story.", "What should I do today?")
    d.adl.steering_alphas = (1.0, 4.0, 16.0)
    d.adl.steering_tokens = 16
    d.adl.patchscope_scales = (0.5, 2.0, 8.0)
  c.diff = d
  c.diff_organisms = ("narrow",)  # each compared with the base by `diff` (its finetuned_model and out dir replaced)
  return c


def _gemma3_config() -> ml_collections.ConfigDict:
  """The story on Gemma 3 270M: four organisms fine-tuned from it, its crosscoders, ADL on three organisms."""
  c = ml_collections.ConfigDict()
  c.scale = "gemma3"
  c.root = ""  # the results root ("" = $NEURODIFF_HOME/demo/gemma3)
  c.force_stages = ()  # redo these stages: analyze, adl, report
  c.organisms = organisms_config("chat,gemma3")
  c.harvest = harvest_gemma3.get_config()
  c.crosscoders = ml_collections.ConfigDict()
  for name in ("batchtopk", "l1"):
    cc = _crosscoder.gemma3_config(name)
    with cc.unlocked():
      cc.workdir = ""
    c.crosscoders[name] = cc
  a = analyze.get_config()
  with a.unlocked():
    a.run = ""
    a.workdir = ""
    a.batch_size = 1024
    a.causal.num_conversations = 64  # each a forward of both models through all 18 blocks and the 262k head
    a.causal.batch_size = 8
    a.steering.num_latents = 4
    a.steering.max_new_tokens = 24
    a.examples.context_latents = 512
  c.analyze = a
  d = diff.get_config("narrow,gemma3")
  d.methods = ("adl", "kl")
  d.out_dir = ""
  d.num_documents = 1000
  d.max_documents = 256
  d.adl.layers = (0.5,)
  d.adl.num_documents = 1000
  d.adl.batch_size = 16
  d.adl.steering_alphas = (0.5, 1.0, 2.0, 4.0, 8.0)
  d.adl.steering_tokens = 24
  c.diff = d
  c.diff_organisms = ("narrow", "false_fact", "taboo")
  return c
