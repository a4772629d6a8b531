"""Training metrics: Δnorm of the decoder (docs/methods.md §3), TensorBoard events and a JSONL log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def delta_norm(norms: np.ndarray, base: int = 0, chat: int = 1) -> np.ndarray:
  """Δnorm_j = ½((‖d_j^chat‖ − ‖d_j^base‖) / max(‖d_j^chat‖, ‖d_j^base‖) + 1) ∈ [0, 1] from norms [m, M]."""
  b, c = norms[:, base].astype(np.float64), norms[:, chat].astype(np.float64)
  return 0.5 * ((c - b) / np.maximum(np.maximum(b, c), 1e-30) + 1.0)


def delta_norm_classes(dn: np.ndarray) -> dict[str, int]:
  """Counts of base-only (≤ 0.1), shared ([0.4, 0.6]), chat-only (≥ 0.9) and other latents."""
  base, chat, shared = dn <= 0.1, dn >= 0.9, (dn >= 0.4) & (dn <= 0.6)
  return {"base_only": int(base.sum()), "shared": int(shared.sum()), "chat_only": int(chat.sum()),
          "other": int((~(base | chat | shared)).sum())}


def live_delta_norm_classes(dn: np.ndarray, live: np.ndarray) -> dict[str, int]:
  """`delta_norm_classes` of the live latents only, with the count of dead ones beside them (`dead`)."""
  return delta_norm_classes(dn[live]) | {"dead": int((~live).sum())}


class MetricWriter:
  """Scalars and histograms to TensorBoard event files and `metrics.jsonl` in the run directory (process 0)."""

  def __init__(self, logdir: str | Path, enabled: bool = True):
    self.logdir = Path(logdir)
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      self.logdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.logdir))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """Logs scalar metrics."""
    if not self.enabled:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    with open(self.logdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")

  def histogram(self, step: int, name: str, values: np.ndarray) -> None:
    """Logs a histogram (Δnorm)."""
    if self.enabled:
      self._tb.add_histogram(name, values, step, bins=np.linspace(0.0, 1.0, 51))

  def close(self) -> None:
    """Flushes the event files."""
    if self._tb is not None:
      self._tb.close()


__all__ = ["MetricWriter", "delta_norm", "delta_norm_classes", "live_delta_norm_classes"]
