"""Error types raised by more than one package."""

from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: missing, incomplete, from another run config, or at odds with its config.

  Raised by `models` (HF checkpoints) and `crosscoder` (Orbax checkpoints) alike; both packages
  re-export it, so `from neurodiff_jax.models import CheckpointError` and
  `from neurodiff_jax.crosscoder.checkpoint import CheckpointError` name this one class.
  """


__all__ = ["CheckpointError"]
