"""agents.report: the agents' section of the demo's report.html, from a hand-written agents directory — the mean
grades and verdicts as written, a typical answer per agent type, the plot embedded (no link), and the command
named where a file is missing; and the sentence of `analysis.verdicts.agent_verdict` for each kind of interval."""

from __future__ import annotations

import base64
import html
import math
import re
from html.parser import HTMLParser

import pytest

from neurodiff_jax.agents.report import section_html
from neurodiff_jax.analysis.verdicts import agent_verdict, sampler_warning
from neurodiff_jax.demo.story import write_story
from tests.agent_results import MEANS, SENTENCES, answer_text, write_agents, write_root


class _Section(HTMLParser):
  """Every href and src, the rows of each table (cell texts), the verdict texts by outcome, the example cards' text."""

  def __init__(self):
    super().__init__()
    self.refs: list[str] = []
    self.rows: list[list[str]] = []
    self.verdicts: dict[str, str] = {}
    self.examples: dict[str, str] = {}
    self._cell: list[str] | None = None
    self._into: list[tuple[dict, str, list[str], str]] = []  # (target, key, text, closing tag)

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.refs += [a[k] for k in ("href", "src") if k in a]
    if tag == "tr":
      self.rows.append([])
    if tag == "td":
      self._cell = []
    if tag == "p" and a.get("class") == "verdict":
      self._into.append((self.verdicts, a["data-outcome"], [], "p"))
    if tag == "div" and "agent-example" in (a.get("class") or ""):
      self._into.append((self.examples, a["data-agent"], [], "div"))

  def handle_endtag(self, tag):
    if tag == "td" and self._cell is not None:
      self.rows[-1].append("".join(self._cell).strip())
      self._cell = None
    if self._into and tag == self._into[-1][3]:
      target, key, text, _ = self._into.pop()
      target[key] = " ".join("".join(text).split())

  def handle_data(self, data):
    if self._cell is not None:
      self._cell.append(data)
    for _, _, text, _ in self._into:
      text.append(data)


def _text(fragment: str) -> str:
  """An HTML fragment's text as a reader sees it (tags dropped, entities decoded)."""
  return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _parse(text: str) -> _Section:
  page = _Section()
  page.feed(text)
  return page


def test_the_section_shows_the_grades_the_verdicts_and_a_typical_answer(tmp_path):
  agents = write_agents(tmp_path / "agents")
  text = section_html(agents, number="7")
  assert text.startswith("<h2>7. Interpretability agents")
  page = _parse(text)
  assert page.verdicts == {"objective": f"Broad objective. {SENTENCES['objective']}",
                           "details": f"Specific details. {SENTENCES['details']}"}
  means = {(r[0], r[1]): (float(r[3]), float(r[4])) for r in page.rows if len(r) == 6}
  assert {k: v for k, v in means.items() if k[0] != "all organisms"} == MEANS
  # Over every organism: the mean of the per-organism means (two answers each).
  for agent in ("blackbox", "diff"):
    want = [sum(MEANS[(o, agent)][k] for o in ("narrow", "taboo")) / 2 for k in (0, 1)]
    assert means[("all organisms", agent)] == pytest.approx(tuple(want), abs=0.005)
  stops = {(r[0], r[1]): r[5] for r in page.rows if len(r) == 6}
  assert stops[("taboo", "diff")] == "answered 1, budget 1"
  # The typical answer: total grade closest to the agent type's mean, ties to the first organism and seed.
  assert answer_text("narrow", "blackbox", 0) in page.examples["blackbox"]
  assert "blackbox agent on narrow (seed 0): broad objective 3/5, specific details 1/5" in page.examples["blackbox"]
  assert answer_text("narrow", "diff", 0) in page.examples["diff"]
  # Self-contained: the plot inlined as the file's bytes, no link to anything.
  (src,) = page.refs
  assert src == "data:image/png;base64," + base64.b64encode((agents / "comparison.png").read_bytes()).decode()
  assert "href" not in text and "Caution" not in text


def test_missing_files_name_the_command(tmp_path):
  page = _text(section_html(tmp_path / "agents"))
  assert "No agent results yet: python -m launch.agent --config=agent:ORGANISM[,SCALE]" in page
  assert "python -m launch.agent --config=agent:all,SCALE" in page
  agents = write_agents(tmp_path / "agents", comparison=False)
  text = section_html(agents)
  page = _text(text)
  assert "No comparison of the agent types yet (comparison.parquet is missing): with several seeds per agent type, " \
         "python -m launch.agent --config=agent:all,SCALE fits it." in page
  assert "<img" not in text and "Mean grades" in page


def test_the_demo_report_has_the_agents_section(tmp_path):
  root = write_root(tmp_path / "results")
  manifest = {"scale": "small"}
  text = write_story(root, manifest).read_text(encoding="utf-8")
  assert "<h2>7. Interpretability agents: does diffing help?</h2>" in text
  assert "No agent results yet: python -m launch.agent --config=agent:ORGANISM[,SCALE]" in _text(text)
  assert "<h2>8. What each method found</h2>" in text
  write_agents(root / "agents")
  text = write_story(root, manifest).read_text(encoding="utf-8")
  assert text.index("7. Interpretability agents") < text.index("8. What each method found")
  assert _parse(text).verdicts["details"] == f"Specific details. {SENTENCES['details']}"
  assert not [r for r in _parse(text).refs if not r.startswith("data:") and not (root / r).is_file()]


@pytest.mark.parametrize("mean, lo, hi, sentence, shown", [
    (1.9, 1.2, 2.6, "diff agents score 1.9 grades higher than blackbox agents on specific details (90 % CI 1.2–2.6).",
     True),
    (-0.8, -1.5, -0.2, "diff agents score 0.8 grades lower than blackbox agents on specific details (90 % CI "
                       "0.2–1.5).", True),
    (0.3, -0.4, 1.0, "diff agents score 0.3 grades higher than blackbox agents on specific details (90 % CI −0.4 to "
                     "1.0): the interval includes 0: no difference shown.", False),
    (0.5, 0.0, 1.0, "diff agents score 0.5 grades higher than blackbox agents on specific details (90 % CI 0.0–1.0): "
                    "the interval includes 0: no difference shown.", False),  # touching 0 is not excluding it
    (0.06, 0.01, 0.12, "diff agents score 0.06 grades higher than blackbox agents on specific details (90 % CI "
                       "0.01–0.12).", True),  # a difference that is not 0 never prints as 0.0
    (math.nan, math.nan, math.nan, "No grade difference on specific details: the comparison holds no finite interval "
                                   "for it.", False),
])
def test_the_verdict_follows_the_interval(mean, lo, hi, sentence, shown):
  verdict = agent_verdict("details", mean, lo, hi)
  assert (verdict.sentence, verdict.shown) == (sentence, shown)


def test_a_fit_that_did_not_converge_is_named():
  assert sampler_warning({"max_r_hat": 1.004, "min_ess_bulk": 800.0, "divergences": 0, "n": 8}) is None
  warning = sampler_warning({"diagnostics": {"max_r_hat": 1.3, "min_ess_bulk": 12.0, "divergences": 3}})
  assert warning == ("the sampler did not converge (max R̂ 1.3 > 1.01; min bulk ESS 12 < 100; 3 divergent "
                     "transitions): do not read this interval")
