"""Plots over positions have ticks at whole positions only (a position 0.5 does not exist)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurodiff_jax.diffing import adl, kl


def _ticks(monkeypatch, module, draw) -> np.ndarray:
  """The x ticks inside the axis limits of the first axes of the figure `draw()` saves through `module.save_png`."""
  figs = []
  monkeypatch.setattr(module, "save_png", lambda fig, path: figs.append(fig) or path)
  draw()
  ax = figs[0].axes[0]
  figs[0].canvas.draw()
  lo, hi = ax.get_xlim()
  ticks = np.asarray(ax.get_xticks())
  return ticks[(ticks >= lo) & (ticks <= hi)]


def test_adl_delta_norms_and_kl_profile_have_integer_position_ticks(monkeypatch, tmp_path):
  means = {"delta": np.random.default_rng(0).normal(size=(1, 5, 8)), "typical_norm_ft": np.array([3.0]),
           "layers": np.array([0]), "positions": np.arange(5)}
  ticks = _ticks(monkeypatch, adl, lambda: adl.plot_delta_norms(means, tmp_path / "d.png"))
  assert len(ticks) >= 3 and np.all(ticks == np.round(ticks)), ticks
  profile = pd.DataFrame({"position": np.arange(6), "mean_kl": np.linspace(0.1, 1.0, 6), "n_tokens": 10})
  ticks = _ticks(monkeypatch, kl, lambda: kl.plot_by_position(profile, tmp_path / "k.png"))
  assert len(ticks) >= 3 and np.all(ticks == np.round(ticks)), ticks
