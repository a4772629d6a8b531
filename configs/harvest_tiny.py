"""Harvest the tiny model organisms: base vs chat on general text and chat conversations, on CPU.

  python -m launch.harvest --config=harvest_tiny                 # default-scale organisms (built on first use)
  python -m launch.harvest --config=harvest_tiny:small           # the small (test) scale
  python -m launch.harvest --config=harvest_tiny --config.layers='(0,1)' --config.out_dir=/tmp/acts

`organism:NAME` model paths are built (or reused) with the `organisms` field, `configs/organisms.py`
at the scale given as the arg (the same default scale as `launch.organism` and the `tiny_*`
crosscoders); `organism:general` / `organism:chat` datasets are JSONL files generated next to them.
"""

import ml_collections

from configs.organisms import get_config as organisms_config

# Deepest layer of each organism scale's base (both have few layers; the middle one is the usual pick).
_LAYERS = {"small": (1,), "default": (2,)}
_SEQ_LEN = {"small": 64, "default": 128}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Tiny harvest config; `arg` is the organism scale (small | default)."""
  scale = arg or "default"
  if scale not in _LAYERS:
    raise ValueError(f"unknown organism scale {scale!r}; known: {', '.join(_LAYERS)}.")
  c = ml_collections.ConfigDict()
  c.name = f"harvest_tiny-{scale}"  # the store's name: out_dir "" means $NEURODIFF_HOME/activations/<name>
  c.base_model = "organism:base"  # a checkpoint dir, a cached HF repo id, or organism:NAME (built with `organisms`)
  c.finetuned_model = "organism:chat"
  c.base_revision = ""
  c.finetuned_revision = ""
  c.organisms = organisms_config(f"chat,{scale}")  # how organism:NAME models and datasets are built
  # Each entry: a path, or a dict with path/format/text_field/messages_field/split/max_documents.
  c.datasets = ("organism:general", "organism:chat")
  c.num_documents = 600  # documents per generated organism dataset
  c.layers = _LAYERS[scale]
  c.out_dir = ""  # the store directory ("" = $NEURODIFF_HOME/activations/<name>)
  c.dtype = "bfloat16"  # stored activations
  c.model_dtype = "float32"  # forward pass
  c.model_mesh = ()  # (data, model) mesh of the models: () = one device; (2, 4) = weights split 4 ways, rows 2
  c.model_mesh_across_processes = False  # True: the mesh spans all processes' devices (needs distributed)
  c.batch_size = 32
  c.seq_len = _SEQ_LEN[scale]
  c.keep_bos = False
  c.shard_tokens = 8192  # small units so the tiny run shows progress and resumes at a fine grain
  c.chunk_tokens = 0  # 0 = chosen from the token size (docs/activations.md)
  c.min_tokens = 2
  c.skip_short = False
  c.distributed = False  # True: jax.distributed.initialize() (one process per host)
  c.coordinator_address = ""  # host:port of process 0 when distributed (auto-detected on TPU pods / SLURM)
  c.process_index = 0
  c.process_count = 0  # > 0 overrides jax.process_index()/process_count() (e.g. SLURM array jobs)
  return c
