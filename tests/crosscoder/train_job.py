"""A training run in its own process (for the SIGKILL test): `python tests/crosscoder/train_job.py STORE WORKDIR`."""

import os
import sys

os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from neurodiff_jax.crosscoder import train  # noqa: E402
from tests.crosscoder.conftest import train_config  # noqa: E402

if __name__ == "__main__":
  train.train(train_config(sys.argv[1], sys.argv[2], steps=300, dict_size=2048, checkpoint_every=25, log_every=25,
                           keep_checkpoints=2))
