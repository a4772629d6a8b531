"""PNG plots for results directories: a bare matplotlib Figure, an atomic PNG write, and the PNG inlined in HTML.

A bare `Figure` renders with Agg and touches no global pyplot state (no backend to set, safe in
threads). PNGs are written beside their name and renamed, so a killed run never leaves half a
PNG under the real name. Reports embed them as base64 data URIs, so a page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def figure(size: tuple[float, float] = (6.4, 4.0), dpi: int = 110) -> Any:
  """A matplotlib Figure of `size` inches (Agg, no pyplot)."""
  from matplotlib.figure import Figure

  return Figure(figsize=size, dpi=dpi)


def integer_ticks(axis: Any) -> None:
  """Ticks at whole numbers only on `axis` (ax.xaxis): positions, layers and components have no fractional ones."""
  from matplotlib.ticker import MaxNLocator

  axis.set_major_locator(MaxNLocator(integer=True))


def save_png(fig: Any, path: str | Path) -> Path:
  """Lays the figure out and writes it as PNG atomically; returns the path."""
  path = Path(path)
  fig.tight_layout()
  tmp = path.with_name(path.name + ".tmp")
  fig.savefig(tmp, format="png")
  tmp.replace(path)
  return path


def png_html(path: str | Path, alt: str) -> str:
  """A PNG file inlined as a base64 data URI in a <figure> (alt text escaped)."""
  data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
  return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


__all__ = ["figure", "integer_ticks", "png_html", "save_png"]
