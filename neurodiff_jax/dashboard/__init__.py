"""The Streamlit dashboard: reads a results root (runs, diffs) and adds live interaction with both models.

`streamlit run neurodiff_jax/dashboard/app.py -- --results DIR` (or `python -m launch.dashboard`).
"""

from __future__ import annotations

__all__: list[str] = []
