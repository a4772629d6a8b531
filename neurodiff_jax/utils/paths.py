"""Where neurodiff-jax caches what it builds (model organisms, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def neurodiff_home() -> Path:
  """`$NEURODIFF_HOME`, default `~/.cache/neurodiff_jax`."""
  return Path(os.environ.get("NEURODIFF_HOME", "~/.cache/neurodiff_jax")).expanduser()
