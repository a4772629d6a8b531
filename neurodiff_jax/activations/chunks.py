"""Whole inner chunks of a store array, read straight from its zarr3 shard files.

TensorStore decodes each chunk into a freshly allocated array and the caller copies it again; at
the reader's window sizes that costs more than the disk (~0.9 GB/s on 2 cores, against ~2.6 GB/s
for plain `preadv` of the same bytes, `benchmarks/reader.py`). The store's arrays use one fixed
layout (`store._zarr3_spec`): sharding_indexed over uncompressed little-endian inner chunks, each
followed by its CRC32C, and the shard index (offset, length per chunk; CRC32C) at the end of the
shard file (zarr v3 sharding spec). For exactly that layout `ChunkFiles` reads runs of whole
chunks with one `preadv` each, straight into the caller's buffer, and checks every chunk's
CRC32C. Any other layout gets `None` from `ChunkFiles.open`, and callers read through TensorStore.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

import crc32c
import numpy as np

_PLAIN_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_MISSING = np.uint64(2**64 - 1)


class ChunkError(OSError):
  """A chunk that cannot be read as stored (missing, short, or failing its CRC32C)."""

  def __init__(self, chunk: int, reason: str):
    super().__init__(f"chunk {chunk}: {reason}")
    self.chunk = chunk


class ChunkFiles:
  """Chunk-granular direct reads of one zarr3 array `[n, ...]` sharded and chunked along axis 0 only."""

  def __init__(self, path: Path, shape: tuple[int, ...], shard_rows: int, chunk_rows: int, itemsize: int):
    self.path = path
    self.shape = shape
    self.chunk_rows = chunk_rows
    self.chunks_per_shard = shard_rows // chunk_rows
    self.chunk_bytes = chunk_rows * int(np.prod(shape[1:])) * itemsize
    self._index: dict[int, np.ndarray] = {}
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  @classmethod
  def open(cls, path: str | os.PathLike) -> "ChunkFiles | None":
    """The direct reader of the array at `path`, or None when its layout is not the store's plain one."""
    path = Path(path)
    try:
      meta = json.loads((path / "zarr.json").read_text())
      shape = tuple(meta["shape"])
      shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
      (codec,) = meta["codecs"]
      conf = codec["configuration"]
      chunk = conf["chunk_shape"]
      plain = (codec["name"] == "sharding_indexed" and conf["codecs"] == _PLAIN_CODECS
               and conf["index_codecs"] == _PLAIN_CODECS and conf.get("index_location", "end") == "end"
               and meta["chunk_key_encoding"] == {"name": "default"} and meta["data_type"] in _ITEMSIZE
               and list(shard[1:]) == list(shape[1:]) == list(chunk[1:]) and shard[0] % chunk[0] == 0)
    except (OSError, ValueError, KeyError, TypeError):
      return None
    if not plain:
      return None
    return cls(path, shape, shard[0], chunk[0], _ITEMSIZE[meta["data_type"]])

  def shard_of(self, chunk: int) -> tuple[int, int]:
    """(shard, position in the shard) of a chunk."""
    return divmod(chunk, self.chunks_per_shard)

  def _shard(self, shard: int) -> tuple[int, np.ndarray]:
    """The shard file's descriptor and its index [chunks, 2] (offset, length), read and checked once."""
    with self._lock:
      if shard in self._fds:
        return self._fds[shard], self._index[shard]
      name = self.path / "c" / "/".join([str(shard)] + ["0"] * (len(self.shape) - 1))
      try:
        fd = os.open(name, os.O_RDONLY)
      except FileNotFoundError:
        raise ChunkError(shard * self.chunks_per_shard, f"shard file {name} is missing") from None
      nbytes = self.chunks_per_shard * 16 + 4
      size = os.fstat(fd).st_size
      raw = os.pread(fd, nbytes, size - nbytes) if size >= nbytes else b""
      if len(raw) != nbytes or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        os.close(fd)
        raise ChunkError(shard * self.chunks_per_shard, f"the shard index of {name} is truncated or fails its CRC32C")
      self._fds[shard], self._index[shard] = fd, np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
      return fd, self._index[shard]

  def read_run(self, first: int, count: int, out: np.ndarray) -> None:
    """Reads chunks [first, first + count) of one shard into `out` (C-contiguous, count chunks' bytes)."""
    shard, pos = self.shard_of(first)
    if pos + count > self.chunks_per_shard:
      raise ValueError(f"chunks [{first}, {first + count}) cross a shard boundary")
    fd, index = self._shard(shard)
    flat = out.reshape(-1).view(np.uint8)
    if flat.nbytes != count * self.chunk_bytes:
      raise ValueError(f"buffer of {flat.nbytes} bytes for {count} chunks of {self.chunk_bytes}")
    crcs = np.empty(count, "<u4")
    i = 0
    while i < count:
      off, size = index[pos + i]
      if off == _MISSING or size != self.chunk_bytes + 4:
        raise ChunkError(first + i, "missing from its shard or of the wrong size")
      # Chunks that lie back to back in the file are one preadv: data into `out`, checksums aside.
      j = i + 1
      while j < count and index[pos + j, 0] == index[pos + j - 1, 0] + self.chunk_bytes + 4:
        j += 1
      iov = []
      for q in range(i, j):
        iov += [flat[q * self.chunk_bytes:(q + 1) * self.chunk_bytes], crcs[q:q + 1]]
      want = (j - i) * (self.chunk_bytes + 4)
      if os.preadv(fd, iov, int(off)) != want:
        raise ChunkError(first + i, "shard file is shorter than its index says")
      i = j
    for q in range(count):
      if crc32c.crc32c(flat[q * self.chunk_bytes:(q + 1) * self.chunk_bytes]) != crcs[q]:
        raise ChunkError(first + q, "data fails its CRC32C")

  def close(self) -> None:
    """Closes the shard files."""
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()
      self._index.clear()

  def __del__(self) -> None:
    try:
      self.close()
    except Exception:  # interpreter shutdown
      pass


_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int32": 4, "uint8": 1}


def read_runs(files: ChunkFiles, runs: list[tuple[int, int]], out: np.ndarray, submit: Callable) -> list:
  """Starts reading `runs` [(first chunk, count)] one after another into `out`; returns the futures."""
  futures, row = [], 0
  for first, count in runs:
    rows = count * files.chunk_rows
    futures.append(submit(files.read_run, first, count, out[row:row + rows]))
    row += rows
  return futures


__all__ = ["ChunkError", "ChunkFiles", "read_runs"]
