"""The docs stay true to the code: the config reference is current, and every relative link in docs/ resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GEN = DOCS / "gen_config_reference.py"
STALE = "docs/config_reference.md is out of date; run python docs/gen_config_reference.py"

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]", lambda m: "_" if m.group(0) == "_" else "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(path: Path) -> list[str]:
  """The relative links of a Markdown file whose target file (or in-page anchor) does not exist."""
  text = _FENCE.sub("", path.read_text())  # links inside code blocks are not links
  anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)}
  bad = []
  for target in _LINK.findall(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    if not file:
      if anchor not in anchors:
        bad.append(f"{path.name}: #{anchor} names no heading in the page")
      continue
    if not (path.parent / file).exists():
      bad.append(f"{path.name}: {target} -> {(path.parent / file).resolve()} does not exist")
  return bad


def _run_generator(*args: str) -> subprocess.CompletedProcess:
  """docs/gen_config_reference.py in a fresh interpreter (as CI and a developer run it)."""
  return subprocess.run([sys.executable, str(GEN), *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                        check=False)


def test_config_reference_is_current():
  """A config changed without regenerating the reference fails here, with the command that fixes it."""
  result = _run_generator("--check")
  assert result.returncode == 0, result.stderr + result.stdout


def test_config_reference_check_fails_on_a_stale_copy(tmp_path):
  """--check exits non-zero with the fixing command on a stale file, and zero once regenerated."""
  copy = tmp_path / "config_reference.md"
  current = (DOCS / "config_reference.md").read_text()
  stale_text = current.replace("| `k` | `16` |", "| `k` | `8` |", 1)  # as if tiny_config's k had changed
  assert stale_text != current
  copy.write_text(stale_text)
  stale = _run_generator("--check", "--out", str(copy))
  assert stale.returncode == 1 and STALE in stale.stderr
  assert _run_generator("--out", str(copy)).returncode == 0
  assert _run_generator("--check", "--out", str(copy)).returncode == 0
  assert copy.read_text() == (DOCS / "config_reference.md").read_text()


def test_config_reference_lists_every_config_and_field():
  """Each configs/*.py run config has a section, and a known field appears with its default and comment."""
  text = (DOCS / "config_reference.md").read_text()
  names = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))
  for name in names:
    assert f"\n## {name}\n" in text, name
  section = text.split("\n## tiny_batchtopk\n")[1].split("\n## ")[0]
  assert "| `sparsity` | `'batchtopk'` | batchtopk \\| topk \\| l1 |" in section
  assert "| `k` | `16` |" in section  # tiny_config's value, not base_config's 100


def test_every_relative_link_in_docs_resolves():
  """Links between the docs and to files of the repository point at files that exist."""
  bad = [b for md in sorted(DOCS.glob("*.md")) for b in broken_links(md)]
  assert not bad, "broken links:\n" + "\n".join(bad)


def test_link_check_finds_a_broken_link(tmp_path):
  """The checker itself: a missing file and a missing anchor are reported; good links and code blocks are not."""
  (tmp_path / "there.md").write_text("# There\n")
  page = tmp_path / "page.md"
  page.write_text("# A title\n[ok](there.md) [ok](#a-title) [web](https://example.com) [gone](missing.md)\n"
                  "[nowhere](#no-such-heading)\n```\n[in code](also_missing.md)\n```\n")
  bad = broken_links(page)
  assert len(bad) == 2 and "missing.md" in bad[0] and "no-such-heading" in bad[1]


__all__ = ["broken_links"]
