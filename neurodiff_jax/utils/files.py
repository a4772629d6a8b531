"""Durable file writes shared by the store, the training loop and the launchers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
  """Writes JSON durably: temp file, fsync, rename, fsync of the directory (a reader never sees half a file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(value, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  dirfd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(dirfd)
  finally:
    os.close(dirfd)


__all__ = ["atomic_write_json"]
