"""A small LM training job for the crash-and-resume test: `python resume_job.py WORKDIR OUT.npz`."""

import sys

import numpy as np
from flax import nnx

from neurodiff_jax.models import Transformer, config_from_hf
from neurodiff_jax.organisms.corpus import generate_documents
from neurodiff_jax.organisms.lm_training import LMTrainConfig, pack_documents, train_lm
from neurodiff_jax.organisms.random_model import hf_config_for
from neurodiff_jax.organisms.tokenizer import train_bpe_tokenizer


def main(workdir: str, out: str) -> None:
  docs = generate_documents(200, 0)
  tok = train_bpe_tokenizer(docs, 400)
  model = Transformer(config_from_hf(hf_config_for("llama", len(tok), num_hidden_layers=2)), rngs=nnx.Rngs(0))
  rows = pack_documents(docs, tok, 32)
  cfg = LMTrainConfig(steps=60, batch_size=8, seq_len=32, checkpoint_every=10, log_every=5, warmup_steps=5)
  train_lm(model, rows, cfg, workdir)
  np.savez(out, **{"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
