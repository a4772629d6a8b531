"""Crosscoders: one shared dictionary, one decoder per model (docs/methods.md §2)."""

from neurodiff_jax.crosscoder.checkpoint import load
from neurodiff_jax.crosscoder.model import Crosscoder, CrosscoderConfig

__all__ = ["Crosscoder", "CrosscoderConfig", "load"]
