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

from configs import _crosscoder, analyze, diff, harvest_tiny
from configs.organisms import get_config as organisms_config

SCALES = ("default", "small")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; `arg` is the organism scale (default | small)."""
  scale = arg or "default"
  if scale not in SCALES:
    raise ValueError(f"unknown demo scale {scale!r}; known: {', '.join(SCALES)} (small is the fast smoke run).")
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
      a.logit_lens.num_latents = 64
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
  return c
