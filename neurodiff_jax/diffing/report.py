"""The activation-difference methods' part of a results directory's `report.html`.

Each method writes an HTML fragment, `<results>/diff/<method>/section.html` (its plots inlined).
`diff_sections` joins them in the order of `run.METHODS`; `write_report` writes a self-contained
`report.html` of those sections when the directory holds no crosscoder analysis (otherwise the
analysis report, `neurodiff_jax/analysis/report.py`, appends the same fragments to its own page).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3}img{max-width:100%}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em}
.tok{padding:0 1px;border-radius:2px}.fire{outline:2px solid #c00}"""


def diff_sections(results_dir: str | Path) -> str:
  """The methods' `section.html` fragments of `results_dir/diff`, in run order ("" when there are none)."""
  from neurodiff_jax.diffing.run import METHODS

  root = Path(results_dir) / "diff"
  parts = [(root / name / "section.html").read_text(encoding="utf-8") for name in METHODS
           if (root / name / "section.html").is_file()]
  return "\n".join(parts)


def write_report(results_dir: str | Path, title: str = "") -> Path:
  """Writes `results_dir/report.html` from the methods' sections (self-contained); returns its path."""
  root = Path(results_dir)
  summary = root / "diff" / "summary.json"
  methods = ", ".join(json.loads(summary.read_text())) if summary.is_file() else ""
  title = title or f"Activation differences: {root.name}"
  body = diff_sections(root) or "<p>No method has finished yet.</p>"
  page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
          f"<p>Methods: {html.escape(methods)}. Each section reads h_ft − h_base (or the two models' outputs) "
          f"directly; docs/diffing.md describes them.</p>{body}</body></html>")
  path = root / "report.html"
  tmp = path.with_name("report.html.tmp")
  tmp.write_text(page, encoding="utf-8")
  tmp.replace(path)
  return path


__all__ = ["diff_sections", "write_report"]
