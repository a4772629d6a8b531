"""Analyse a trained crosscoder: latent table, latent scaling, causal test, examples, steering, report.

  python -m launch.analyze                                   # the tiny_batchtopk run on the default organisms
  python -m launch.analyze --config=analyze:tiny_l1          # another training config's run ($NEURODIFF_HOME/runs/)
  python -m launch.analyze --config=analyze --config.workdir=/path/to/run --config.causal.enabled=False

`arg` is the name of the training run (its config's `name`, e.g. tiny_batchtopk-default) or of a
tiny training config (tiny_batchtopk, tiny_l1, tiny_topk, with an optional `,small`).
"""

from configs._analyze import base_config

_TINY = ("tiny_batchtopk", "tiny_l1", "tiny_topk")


def get_config(arg: str | None = None):
  """Analysis of a tiny organism run (workdir from `arg`, overridable with --config.workdir)."""
  name, _, scale = (arg or "tiny_batchtopk").partition(",")
  c = base_config()
  c.run = f"{name}-{scale or 'default'}" if name in _TINY else name
  c.batch_size = 2048
  c.causal.num_conversations = 128
  c.causal.n_boot = 500
  c.lock()
  return c
