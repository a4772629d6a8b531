"""A training run in its own process: `python tests/crosscoder/train_job.py STORE WORKDIR [OVERRIDES_JSON]`.

The last stdout line is JSON: {"metrics": ...} when the run finishes, {"error": ..., "message": ...}
(exit 3) when it stops on a bad batch or divergence.
"""

import json
import os
import sys

os.environ.pop("XLA_FLAGS", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from neurodiff_jax.crosscoder import train  # noqa: E402
from tests.crosscoder.conftest import train_config  # noqa: E402

if __name__ == "__main__":
  overrides = dict(steps=150, dict_size=1024, checkpoint_every=20, log_every=25, keep_checkpoints=2)
  if len(sys.argv) > 3:
    overrides |= {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()}
  try:
    metrics = train.train(train_config(sys.argv[1], sys.argv[2], **overrides))
  except (train.NonFiniteBatchError, train.DivergedError) as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
    sys.exit(3)
  print(json.dumps({"metrics": metrics}, default=str), flush=True)
