"""demo.story: the demo's report.html rebuilt from a results root — links that resolve, verdicts from the intervals,
words instead of placeholder counts, and a closing summary of what each method found."""

from __future__ import annotations

import html
import json
import re
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest

from neurodiff_jax.demo.story import write_story
from tests.causal_verdicts import check_verdict


class _Page(HTMLParser):
  """Every href and src of a page, the text of each table cell, and the text of each `<p class="verdict">`."""

  def __init__(self):
    super().__init__()
    self.refs: list[str] = []
    self.cells: list[str] = []
    self.verdicts: dict[str, str] = {}
    self._cell: list[str] | None = None
    self._verdict: tuple[str, list[str]] | None = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.refs += [a[k] for k in ("href", "src") if k in a]
    if tag == "td":
      self._cell = []
    if tag == "p" and a.get("class") == "verdict" and "data-run" in a:
      self._verdict = (a["data-run"], [])

  def handle_endtag(self, tag):
    if tag == "td" and self._cell is not None:
      self.cells.append("".join(self._cell).strip())
      self._cell = None
    if tag == "p" and self._verdict is not None:
      self.verdicts[self._verdict[0]] = "".join(self._verdict[1]).strip()
      self._verdict = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell.append(data)
    if self._verdict is not None:
      self._verdict[1].append(data)


@pytest.fixture(scope="module")
def story(demo_root, tmp_path_factory):
  """The story rebuilt by this code on a copy of the demo root: (root, page text, parsed page)."""
  root = tmp_path_factory.mktemp("story") / "results"
  shutil.copytree(demo_root, root, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "pass.npz"))
  manifest = json.loads((root / "demo.json").read_text())
  text = write_story(root, manifest).read_text(encoding="utf-8")
  page = _Page()
  page.feed(text)
  return root, text, page


def test_every_link_and_image_resolves(story):
  root, _, page = story
  assert page.refs
  relative = [r for r in page.refs if not r.startswith(("data:", "#"))]
  assert not [r for r in relative if "://" in r], "the report links outside itself"
  missing = [r for r in relative if not (root / r).is_file()]
  assert not missing, missing
  assert any(r.endswith("diffs/narrow/report.html") for r in relative)  # written for the link, not dropped
  assert all(r.startswith("data:image/png;base64,") for r in page.refs if r.startswith("data:"))


def test_no_placeholder_counts_and_the_dead_latents_are_named_apart(story):
  _, text, page = story
  assert not [c for c in page.cells if re.fullmatch(r"[-−]1", c)], "a placeholder count (-1) in a table"
  assert not re.search(r"latents\s*[-−]1\b", html.unescape(re.sub(r"<[^>]+>", " ", text)))
  assert "none: chat activations on template tokens" in page.cells
  assert "dead fraction" not in text
  assert "dead in the last training window (share)" in text and "never fired (analysis; not a class)" in text


def test_causal_verdicts_follow_from_the_intervals(story):
  root, _, page = story
  runs = json.loads((root / "demo.json").read_text())["runs"]
  judged = 0
  for name, rel in runs.items():
    frame = pd.read_parquet(root / rel / "analysis" / "causal.parquet")
    rows = {r.group: r for r in frame[frame.region == "reply"].itertuples()}
    verdict = page.verdicts[name]
    assert verdict.startswith("Verdict. On the assistant's reply")
    judged += check_verdict(verdict, rows)
  assert judged, "no run has chat-only halves: the comparison was never checked"


def test_a_closing_summary_of_each_method(story):
  root, text, _ = story
  tail = text[text.index("What each method found"):]
  runs = json.loads((root / "demo.json").read_text())["runs"]
  for name, rel in runs.items():
    lat = pd.read_parquet(root / rel / "analysis" / "latents.parquet")
    chat = int((lat.tag == "chat_only").sum())
    assert f"Crosscoder {name}</b> (Δnorm): {chat:,} chat-only" in tail
    assert f"Latent scaling, {name}" in tail and f"Causal test, {name}" in tail
  kl = json.loads((root / "diffs" / "narrow" / "diff" / "kl" / "done.json").read_text())["summary"]
  assert f"mean {kl['mean']:.3g} nats" in tail
  rel = pd.read_parquet(root / "diffs" / "narrow" / "diff" / "adl" / "relevance.parquet")
  best = rel[rel.source != "baseline"].share.max()
  assert f"ADL on base vs narrow: at best {best:.3g} of the top tokens" in tail
