"""Reading a store: a Grain random-access source of tokens and a shuffled batch pipeline.

Reading single random tokens costs one TensorStore chunk lookup each (~30 µs here), far too slow
to feed a crosscoder. The batch pipeline therefore shuffles in two levels that together are a
permutation of all tokens each epoch:

1. the store's chunks (`chunk_tokens` consecutive tokens) are shuffled, and consecutive runs of
   them form *windows* of about `window_tokens` tokens, read with one `ts.Batch` of chunk reads
   (large sequential reads), the next window prefetched asynchronously;
2. inside a window the tokens are shuffled and cut into batches.

A batch thus mixes tokens from hundreds of chunks of different documents. Batch e is a pure
function of (seed, e), so a Grain iterator's state restores the stream exactly. With several
processes, windows are dealt round-robin: each process reads only its own windows.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Sequence

import grain.python as grain
import jax
import numpy as np
import tensorstore as ts

from neurodiff_jax.activations.store import ActivationStore, StoreError, layer_name


class ActivationSource:
  """A Grain `RandomAccessDataSource` of one layer's paired activations: record i is token i, [M, d]."""

  def __init__(self, store: ActivationStore | str | os.PathLike, layer: int, dtype: Any = np.float32):
    self.store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    self.layer = layer
    self.dtype = np.dtype(dtype)
    self._array = self.store.layer(layer)
    self._name = layer_name(layer)

  def __len__(self) -> int:
    return self.store.layout.num_tokens

  def __getitem__(self, index: int) -> np.ndarray:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"token {index} out of range for a store of {n} tokens")
    i = int(index) % n
    return self.store.check_read(self._array[i].read(), self._name, i, i + 1).astype(self.dtype)

  def __getitems__(self, indices: Sequence[int]) -> np.ndarray:
    """Tokens `indices` as one array [len(indices), M, d]: one batched read of all their chunks."""
    idx = np.asarray(indices, np.int64)
    order = np.argsort(idx, kind="stable")
    with ts.Batch() as batch:
      fut = self._array[idx[order]].read(batch=batch)
    data = self.store.check_read(fut, self._name, int(idx.min(initial=0)), int(idx.max(initial=-1)) + 1)
    out = np.empty((len(idx),) + data.shape[1:], self.dtype)
    out[order] = data
    return out

  def read_range(self, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) as one contiguous read."""
    return self.store.check_read(self._array[lo:hi].read(), self._name, lo, hi).astype(self.dtype)

  def __repr__(self) -> str:
    return f"ActivationSource({str(self.store.root)!r}, layer={self.layer}, tokens={len(self)})"


@dataclasses.dataclass(frozen=True)
class _Window:
  chunks: np.ndarray  # store chunk indices, in read order
  num_batches: int


class WindowedBatches:
  """Batch e of one process's shuffled stream (see module docstring); thread-safe and deterministic."""

  def __init__(self, source: ActivationSource, batch_size: int, seed: int, window_tokens: int,
               process_index: int, process_count: int, normalize: bool):
    lay = source.store.layout
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.proc, self.nproc = process_index, process_count
    self.chunk = lay.chunk_tokens
    # Whole chunks only (a partial last chunk, < chunk_tokens tokens, is left out), so every epoch's
    # windows hold the same numbers of tokens and every process the same number of batches.
    self.num_chunks = lay.num_tokens // self.chunk
    self.chunks_per_window = max(1, min(window_tokens // self.chunk, self.num_chunks))
    if self.chunks_per_window * self.chunk < batch_size:
      raise ValueError(f"window of {self.chunks_per_window * self.chunk} tokens is smaller than batch_size={batch_size}; "
                       "raise window_tokens.")
    self.scale = source.store.norm_scale(source.layer)[None, :, None] if normalize else None
    self._epochs: dict[int, tuple[list[_Window], np.ndarray]] = {}
    self._cache: dict[tuple[int, int], Any] = {}
    self._lock = threading.RLock()
    self.batches_per_epoch = min(self._epoch_windows(0, p)[1][-1] for p in range(process_count))
    if self.batches_per_epoch == 0:
      raise ValueError(f"store of {lay.num_tokens} tokens gives no batch of {batch_size} per process "
                       f"({process_count} processes); lower batch_size.")

  def _epoch_windows(self, epoch: int, proc: int) -> tuple[list[_Window], np.ndarray]:
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
    windows = []
    for w, start in enumerate(range(0, self.num_chunks, self.chunks_per_window)):
      if w % self.nproc != proc:
        continue
      chunks = perm[start:start + self.chunks_per_window]
      windows.append(_Window(chunks, len(chunks) * self.chunk // self.batch_size))
    return windows, np.cumsum([0] + [w.num_batches for w in windows])

  def _windows(self, epoch: int) -> tuple[list[_Window], np.ndarray]:
    with self._lock:
      if epoch not in self._epochs:
        self._epochs = {epoch: self._epoch_windows(epoch, self.proc)} | {k: v for k, v in self._epochs.items()
                                                                          if k == epoch - 1}
      return self._epochs[epoch]

  def _start_read(self, window: _Window) -> list[ts.Future]:
    """Issues the chunk reads of a window (asynchronous)."""
    arr = self.source._array
    with ts.Batch() as batch:
      futures = [arr[c * self.chunk:(c + 1) * self.chunk].read(batch=batch) for c in window.chunks]
    return futures

  def _window_data(self, epoch: int, w: int) -> np.ndarray:
    windows, _ = self._windows(epoch)
    key = (epoch, w)
    with self._lock:
      entry = self._cache.get(key)
      if entry is None:
        entry = self._cache[key] = {"futures": self._start_read(windows[w]), "lock": threading.Lock()}
      nxt = (epoch, w + 1) if w + 1 < len(windows) else (epoch + 1, 0)
      if nxt not in self._cache:  # prefetch the next window while this one is consumed
        nwin = self._windows(nxt[0])[0] if nxt[0] != epoch else windows
        self._cache[nxt] = {"futures": self._start_read(nwin[nxt[1]]), "lock": threading.Lock()}
      for k in [k for k in self._cache if k < key]:
        del self._cache[k]
    with entry["lock"]:
      if "data" not in entry:
        name = layer_name(self.source.layer)
        futures = entry.pop("futures")
        data = np.empty((len(futures) * self.chunk,) + self.source._array.shape[1:], self.source._array.dtype.numpy_dtype)
        for i, (f, c) in enumerate(zip(futures, windows[w].chunks)):
          data[i * self.chunk:(i + 1) * self.chunk] = self.source.store.check_read(f, name, c * self.chunk,
                                                                                   (c + 1) * self.chunk)
        # The window stays in read order; each batch gathers its rows of the permutation (one copy, not two).
        entry["data"] = data
        entry["perm"] = np.random.default_rng([self.seed, epoch, w, 1]).permutation(len(data))
    return entry["data"], entry["perm"]

  def __call__(self, index: int) -> np.ndarray:
    epoch, j = divmod(int(index), self.batches_per_epoch)
    _, bounds = self._windows(epoch)
    w = int(np.searchsorted(bounds, j, side="right")) - 1
    k = j - int(bounds[w])
    data, perm = self._window_data(epoch, w)
    x = to_dtype(data[perm[k * self.batch_size:(k + 1) * self.batch_size]], self.source.dtype)
    if self.scale is not None:
      x *= self.scale.astype(x.dtype)
    return x


def to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`x.astype(dtype)`, with a fast exact path for bfloat16 -> float32 (ml_dtypes' cast is ~10x slower)."""
  if x.dtype == ts.bfloat16.numpy_dtype and np.dtype(dtype) == np.float32:
    out = np.empty(x.shape, np.uint32)  # a bf16's bits are the top half of the equal float32's
    np.left_shift(x.view(np.uint16), 16, out=out, dtype=np.uint32)
    return out.view(np.float32)
  return x.astype(dtype)


def batch_dataset(store: ActivationStore | str | os.PathLike, layer: int, batch_size: int, *, seed: int = 0,
                  dtype: Any = np.float32, window_tokens: int | None = None, window_bytes: int = 512 << 20,
                  num_epochs: int | None = None, normalize: bool = False, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """A Grain MapDataset whose element e is this process's shuffled batch e, [batch_size, M, d].

  `batch_size` is per process. A shuffle window holds `window_tokens` tokens (default: as many as
  fit in `window_bytes` of stored activations; two windows are in memory at a time). `normalize`
  multiplies each model's activations by the scalar that brings its mean norm to √d (from the
  manifest). `num_epochs=None` repeats without end.
  """
  source = ActivationSource(store, layer, dtype)
  if window_tokens is None:
    window_tokens = max(window_bytes // source.store.layout.token_bytes, batch_size)
  proc = jax.process_index() if process_index is None else process_index
  nproc = jax.process_count() if process_count is None else process_count
  fn = WindowedBatches(source, batch_size, seed, window_tokens, proc, nproc, normalize)
  ds = grain.MapDataset.range(fn.batches_per_epoch)
  # repeat() keeps element indices global, so batch e of a later epoch reshuffles via its epoch.
  ds = ds.repeat(num_epochs, reseed_each_epoch=False) if num_epochs != 1 else ds
  return ds.map_with_index(lambda i, _: fn(i))


def batch_iterator(dataset: grain.MapDataset, *, prefetch: int = 4, num_threads: int = 2) -> grain.DatasetIterator:
  """A prefetching iterator over `batch_dataset(...)`; `get_state()`/`set_state()` resume it exactly."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


__all__ = ["ActivationSource", "StoreError", "WindowedBatches", "batch_dataset", "batch_iterator"]
