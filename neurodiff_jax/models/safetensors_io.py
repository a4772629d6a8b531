"""Minimal safetensors reader and writer over numpy memory maps, bf16 included.

`safetensors.safe_open(framework="numpy")` cannot return bf16 tensors and the "flax" framework
materialises each tensor on one device; a memory map lets the loader slice exactly the part of
a tensor that each device shard needs.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class CorruptCheckpointError(ValueError):
  """A safetensors file whose header or sizes are inconsistent."""


def read_header(path: str) -> tuple[dict, int]:
  """Returns the tensor table of a safetensors file and the byte offset of its data."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CorruptCheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header.")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CorruptCheckpointError(f"{path}: header length {n} exceeds the file size {size}; the file is truncated.")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}); re-download the file.") from e
  header.pop("__metadata__", None)
  data_len = size - 8 - n
  for name, info in header.items():
    start, end = info["data_offsets"]
    if end > data_len:
      raise CorruptCheckpointError(f"{path}: tensor {name} ends at byte {end} past the data ({data_len} bytes); truncated file.")
    if info["dtype"] not in _DTYPES:
      raise CorruptCheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
  return header, 8 + n


class SafetensorsFile:
  """Lazily memory-mapped tensors of one safetensors file."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._offset = read_header(path)
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    """Tensor names in the file."""
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    """Shape of tensor `name` without reading it."""
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view of tensor `name`."""
    info = self.header[name]
    start, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    buf = self._mmap[self._offset + start : self._offset + end]
    return buf.view(dtype).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to a safetensors file (atomically: a temp file renamed into place)."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors.")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
