"""Reading a store: a Grain random-access source of tokens and a shuffled batch pipeline.

Reading single random tokens costs one TensorStore chunk lookup each (~30 µs here), far too slow
to feed a crosscoder. The batch pipeline therefore shuffles in two levels that together are a
permutation of all tokens each epoch:

1. the store is cut into *runs* of consecutive chunks (~8 MiB, within one shard); the runs are
   shuffled, and consecutive groups of them form *windows* of about `window_tokens` tokens. A
   window's runs are read on a pool of threads, one `preadv` per run straight into a reused
   window buffer with each chunk's CRC32C checked (`chunks.py`; through TensorStore with
   `ts.Batch` when the store's layout is not the plain one), the next window prefetched while
   the current one is consumed;
2. inside a window the tokens are shuffled and cut into batches.

A 512 MiB window at Gemma 2 2B size holds ~113 runs of 512 tokens, so a batch of 2048 mixes ~18
tokens from each of ~113 places in the store. Batch e is a pure
function of (seed, e), so a Grain iterator's state restores the stream exactly. With several
processes, windows are dealt round-robin: each process reads only its own windows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from typing import Any, Sequence

import grain.python as grain
import jax
import numpy as np
import tensorstore as ts
from numpy.typing import DTypeLike

from neurodiff_jax.activations.chunks import ChunkError, ChunkFiles, read_runs
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
  runs: np.ndarray  # store run indices, in read order
  num_batches: int


class _Slot:
  """One window buffer: which window it holds, whether its reads are done, and how many batches use it."""

  def __init__(self, buf: np.ndarray):
    self.buf, self.key, self.users = buf, (-1, -1), 0
    self.futures: list = []
    self.ready = threading.Event()
    self.finish_lock = threading.Lock()
    self.perm: np.ndarray | None = None
    self.rows = 0


class WindowedBatches:
  """Batch e of one process's shuffled stream (see module docstring); thread-safe and deterministic."""

  def __init__(self, source: ActivationSource, batch_size: int, seed: int, window_tokens: int, run_tokens: int,
               process_index: int, process_count: int, normalize: bool, io_threads: int = 8,
               direct: bool = True, ahead: int = 1):
    lay = source.store.layout
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.proc, self.nproc = process_index, process_count
    self.chunk = lay.chunk_tokens
    num_chunks = lay.num_tokens // self.chunk
    # A run is `run` consecutive chunks of one shard, read with one request; runs (not chunks) are
    # shuffled into windows, so reads are long enough for the disk to stream them. At least 8 runs
    # per store, so that small stores still shuffle.
    per_shard = lay.shard_tokens // self.chunk
    self.run = 1
    while (self.run * 2 * self.chunk <= run_tokens and per_shard % (self.run * 2) == 0
           and num_chunks // (self.run * 2) >= 8):
      self.run *= 2
    self.run_rows = self.run * self.chunk
    # Whole runs only (the tail, < run_rows + chunk_tokens tokens, is left out), so every epoch's
    # windows hold the same numbers of tokens and every process the same number of batches.
    self.num_runs = num_chunks // self.run
    self.runs_per_window = max(1, min(window_tokens // self.run_rows, self.num_runs))
    if self.runs_per_window * self.run_rows < batch_size:
      raise ValueError(f"window of {self.runs_per_window * self.run_rows} tokens is smaller than "
                       f"batch_size={batch_size}; raise window_tokens.")
    # Normalised batches are in the crosscoder's training units: `Crosscoder.encode(x, normalized=True)`.
    self.normalized = normalize
    self.scale = source.store.norm_scale(source.layer)[None, :, None] if normalize else None
    arr = source._array
    self.files = ChunkFiles.open(source.store.root / layer_name(source.layer)) if direct else None
    self._row_shape = tuple(arr.shape[1:])
    self._store_dtype = arr.dtype.numpy_dtype
    self._pool = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="window-read")
    # Buffers for the window being consumed, the `ahead` windows being read, and one for a batch of
    # an older window that a Grain thread is still gathering.
    self.ahead = ahead
    self._slots: list[_Slot] = []
    self._max_slots = ahead + 2
    self._epochs: dict[int, tuple[list[_Window], np.ndarray]] = {}
    self._cond = threading.Condition()
    self.batches_per_epoch = int(min(self._epoch_windows(0, p)[1][-1] for p in range(process_count)))
    if self.batches_per_epoch == 0:
      raise ValueError(f"store of {lay.num_tokens} tokens gives no batch of {batch_size} per process "
                       f"({process_count} processes); lower batch_size.")

  def _epoch_windows(self, epoch: int, proc: int) -> tuple[list[_Window], np.ndarray]:
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_runs)
    windows = []
    for w, start in enumerate(range(0, self.num_runs, self.runs_per_window)):
      if w % self.nproc != proc:
        continue
      runs = perm[start:start + self.runs_per_window]
      windows.append(_Window(runs, len(runs) * self.run_rows // self.batch_size))
    return windows, np.cumsum([0] + [w.num_batches for w in windows])

  def _windows(self, epoch: int) -> tuple[list[_Window], np.ndarray]:
    with self._cond:
      if epoch not in self._epochs:
        self._epochs = {epoch: self._epoch_windows(epoch, self.proc)} | {k: v for k, v in self._epochs.items()
                                                                          if k == epoch - 1}
      return self._epochs[epoch]

  def _start_read(self, slot: _Slot, key: tuple[int, int], window: _Window) -> None:
    """Points `slot` at window `key` and issues its reads (asynchronous); call with the lock held."""
    slot.key, slot.ready = key, threading.Event()
    slot.rows = len(window.runs) * self.run_rows
    data = slot.buf[:slot.rows]
    if self.files is not None:
      slot.futures = read_runs(self.files, [(int(r) * self.run, self.run) for r in window.runs], data,
                               self._pool.submit)
    else:
      arr = self.source._array
      with ts.Batch() as batch:
        slot.futures = [arr[r * self.run_rows:(r + 1) * self.run_rows].read(batch=batch) for r in window.runs]
    slot.perm = self._permutation(key[0], key[1], slot.rows)

  def _slot_for(self, key: tuple[int, int], current: tuple[int, int], wait: bool) -> _Slot | None:
    """The slot holding window `key`, else one claimed to read it into; call with the lock held.

    A free slot of a window before `current` (the one being consumed) is reused first, then a new
    buffer, then the slot of a window farther ahead than `key` (after an iterator was restored to
    an earlier position).
    """
    while True:
      for slot in self._slots:
        if slot.key == key:
          return slot
      # A slot can be reused once no batch gathers from it and no read still writes into it.
      free = [s for s in self._slots if s.users == 0 and all(f.done() for f in s.futures)]
      old = [s for s in free if s.key < current]
      if old:
        slot = min(old, key=lambda s: s.key)
      elif len(self._slots) < self._max_slots:
        slot = _Slot(np.empty((self.runs_per_window * self.run_rows,) + self._row_shape, self._store_dtype))
        self._slots.append(slot)
      elif ahead := [s for s in free if s.key > key]:
        slot = max(ahead, key=lambda s: s.key)
      elif wait:
        self._cond.wait(timeout=0.05)  # reads finishing do not notify; poll
        continue
      else:
        return None
      epoch, w = key
      self._start_read(slot, key, self._windows(epoch)[0][w])
      return slot

  def _finish(self, slot: _Slot) -> None:
    """Waits for a slot's reads; a failed read is an error naming the units to redo."""
    if slot.ready.is_set():
      return
    name = layer_name(self.source.layer)
    epoch, w = slot.key
    runs = self._windows(epoch)[0][w].runs
    for i, (f, run) in enumerate(zip(slot.futures, runs)):
      lo, hi = int(run) * self.run_rows, (int(run) + 1) * self.run_rows
      if self.files is None:
        slot.buf[i * self.run_rows:(i + 1) * self.run_rows] = self.source.store.check_read(f, name, lo, hi)
        continue
      try:
        f.result()
      except OSError as e:
        if isinstance(e, ChunkError):
          lo, hi = e.chunk * self.chunk, (e.chunk + 1) * self.chunk
        self.source.store.check_read(_Failed(e), name, lo, hi)
    slot.futures = []
    slot.ready.set()

  def _locate(self, index: int) -> tuple[int, int, int]:
    """(epoch, window, batch within the window) of batch `index`."""
    epoch, j = divmod(int(index), self.batches_per_epoch)
    bounds = self._windows(epoch)[1]
    w = int(np.searchsorted(bounds, j, side="right")) - 1
    return epoch, w, j - int(bounds[w])

  def _permutation(self, epoch: int, w: int, rows: int) -> np.ndarray:
    """The in-window shuffle of window w of `epoch`."""
    return np.random.default_rng([self.seed, epoch, w, 1]).permutation(rows)

  def __call__(self, index: int) -> np.ndarray:
    epoch, w, k = self._locate(index)
    key = (epoch, w)
    with self._cond:
      slot = self._slot_for(key, key, wait=True)
      slot.users += 1
      nxt = key
      for _ in range(self.ahead):  # prefetch the next windows while this one is consumed
        e, v = nxt
        nxt = (e, v + 1) if v + 1 < len(self._windows(e)[0]) else (e + 1, 0)
        if self._slot_for(nxt, key, wait=False) is None:
          break
    try:
      with slot.finish_lock:
        self._finish(slot)
      rows = slot.perm[k * self.batch_size:(k + 1) * self.batch_size]
      return gather(slot.buf, rows, self.source.dtype, self.scale)
    finally:
      with self._cond:
        slot.users -= 1
        self._cond.notify_all()

  def tokens(self, index: int) -> np.ndarray:
    """The store token index of each row of batch `index` (to name the source of a bad batch)."""
    epoch, w, k = self._locate(index)
    runs = self._windows(epoch)[0][w].runs
    pos = self._permutation(epoch, w, len(runs) * self.run_rows)[k * self.batch_size:(k + 1) * self.batch_size]
    return runs[pos // self.run_rows].astype(np.int64) * self.run_rows + pos % self.run_rows

  def close(self) -> None:
    """Stops the read threads and closes the shard files."""
    self._pool.shutdown(wait=True, cancel_futures=True)
    if self.files is not None:
      self.files.close()


class _Failed:
  """A finished read that raised: lets `ActivationStore.check_read` name the units to redo."""

  def __init__(self, error: Exception):
    self.error = error

  def result(self) -> None:
    raise ValueError(str(self.error)) from self.error


def gather(window: np.ndarray, rows: np.ndarray, dtype: DTypeLike, scale: np.ndarray | None = None,
           block: int = 256) -> np.ndarray:
  """`window[rows]` as `dtype` (times `scale`), in blocks of rows so that each block's cast runs in cache."""
  out = np.empty((len(rows),) + window.shape[1:], dtype)
  for i in range(0, len(rows), block):
    part = to_dtype(np.take(window, rows[i:i + block], axis=0), dtype, out=out[i:i + block])
    if scale is not None:
      part *= scale.astype(dtype)
  return out


def to_dtype(x: np.ndarray, dtype: DTypeLike, out: np.ndarray | None = None) -> np.ndarray:
  """`x.astype(dtype)` (into `out` if given); bfloat16 -> float32 by an exact bit shift (ml_dtypes' is ~10x slower)."""
  dtype = np.dtype(dtype)
  out = np.empty(x.shape, dtype) if out is None else out
  if x.dtype == ts.bfloat16.numpy_dtype and dtype == np.float32:
    # A bf16's bits are the top half of the equal float32's.
    np.left_shift(x.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
  else:
    out[...] = x
  return out


def windowed_batches(store: ActivationStore | str | os.PathLike, layer: int, batch_size: int, *, seed: int = 0,
                     dtype: Any = np.float32, window_tokens: int | None = None, window_bytes: int = 512 << 20,
                     run_bytes: int = 8 << 20, normalize: bool = False, process_index: int | None = None,
                     process_count: int | None = None, io_threads: int = 8, prefetch_windows: int = 2,
                     direct: bool = True) -> WindowedBatches:
  """The function e -> this process's shuffled batch e, [batch_size, M, d] (see `batch_dataset`).

  `batch_size` is per process. A shuffle window holds `window_tokens` tokens (default: as many as
  fit in `window_bytes` of stored activations; `prefetch_windows` + 2 windows at most are in
  memory), made of runs of consecutive chunks of about `run_bytes`, each read with one request on one of
  `io_threads` threads (`direct=False` reads through TensorStore instead of straight from the shard
  files, see `chunks.py`). `normalize` multiplies each model's activations by the scalar that
  brings its mean norm to √d (`ActivationStore.norm_scale`, the crosscoder's `norm_scale` when it
  was trained with `normalize=True`): such batches go to `Crosscoder.encode(x, normalized=True)`;
  plain `Crosscoder.encode(x)` takes original units and normalises them itself.
  """
  source = ActivationSource(store, layer, dtype)
  if window_tokens is None:
    window_tokens = max(window_bytes // source.store.layout.token_bytes, batch_size)
  proc = jax.process_index() if process_index is None else process_index
  nproc = jax.process_count() if process_count is None else process_count
  run_tokens = max(run_bytes // source.store.layout.token_bytes, 1)
  return WindowedBatches(source, batch_size, seed, window_tokens, run_tokens, proc, nproc, normalize, io_threads,
                         direct, prefetch_windows)


def dataset_of(batches: WindowedBatches, num_epochs: int | None = None) -> grain.MapDataset:
  """A Grain MapDataset whose element e is `batches(e)`; `num_epochs=None` repeats without end."""
  ds = grain.MapDataset.range(batches.batches_per_epoch)
  # repeat() keeps element indices global, so batch e of a later epoch reshuffles via its epoch.
  ds = ds.repeat(num_epochs, reseed_each_epoch=False) if num_epochs != 1 else ds
  return ds.map_with_index(lambda i, _: batches(i))


def batch_dataset(store: ActivationStore | str | os.PathLike, layer: int, batch_size: int, *,
                  num_epochs: int | None = None, **kwargs: Any) -> grain.MapDataset:
  """A Grain MapDataset whose element e is this process's shuffled batch e, [batch_size, M, d].

  `kwargs` are those of `windowed_batches`; `num_epochs=None` repeats without end.
  """
  return dataset_of(windowed_batches(store, layer, batch_size, **kwargs), num_epochs)


def batch_iterator(dataset: grain.MapDataset, *, prefetch: int = 4, num_threads: int = 2) -> grain.DatasetIterator:
  """A prefetching iterator over `batch_dataset(...)`; `get_state()`/`set_state()` resume it exactly."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


__all__ = ["ActivationSource", "StoreError", "WindowedBatches", "batch_dataset", "batch_iterator", "dataset_of",
           "windowed_batches"]
