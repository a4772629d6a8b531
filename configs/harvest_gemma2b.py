"""Harvest Gemma 2 2B base vs -it at layer 13 (Minder et al. 2025), one GPU/TPU host per process.

  python -m launch.harvest --config=harvest_gemma2b \
      --config.datasets='["/data/fineweb_sample.parquet", "/data/lmsys_chat.jsonl"]' \
      --config.out_dir=/data/acts/gemma2b_l13

Models come from a local directory or the local HF cache (no download at run time: fetch them
once with `huggingface-cli download google/gemma-2-2b` and `google/gemma-2-2b-it`). Datasets are
local files: text, JSONL (`text` or `messages` rows), Parquet, or a `datasets.save_to_disk` dir.
On a pod set `--config.distributed=True`; each host harvests its own units into the shared store.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Gemma 2 2B harvest config."""
  del arg
  c = ml_collections.ConfigDict()
  c.name = "harvest_gemma2b"  # the store's name: out_dir "" means $NEURODIFF_HOME/activations/<name>
  c.base_model = "google/gemma-2-2b"
  c.finetuned_model = "google/gemma-2-2b-it"
  c.base_revision = ""
  c.finetuned_revision = ""
  c.datasets = ("fineweb_sample.parquet", "lmsys_chat.jsonl")  # override: --config.datasets='("/data/a.parquet",)'
  c.num_documents = 0
  c.layers = (13,)
  c.out_dir = "gemma2b_l13_acts"  # the store directory ("" = $NEURODIFF_HOME/activations/<name>)
  c.dtype = "bfloat16"
  c.model_dtype = "bfloat16"
  c.model_mesh = ()  # (data, model) mesh of the models: () = one device; (2, 4) = weights split 4 ways, rows 2
  c.model_mesh_across_processes = False  # True: the mesh spans all processes' devices (needs distributed)
  c.batch_size = 32
  c.seq_len = 1024
  c.keep_bos = False
  c.shard_tokens = 0  # auto: ≈ 256 MiB shards (16,384 tokens of 2 × 2304 bf16)
  c.chunk_tokens = 0  # auto: ≈ 512 KiB chunks (32 tokens)
  c.min_tokens = 2
  c.skip_short = True  # web text has empty rows; they are counted in the manifest
  c.distributed = False
  c.coordinator_address = ""  # host:port of process 0 when distributed (auto-detected on TPU pods / SLURM)
  c.process_index = 0
  c.process_count = 0
  return c
