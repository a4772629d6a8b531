"""Real English text for the real-model organisms, harvest and diffing: the fortune-cookie files of Debian's `fortunes`.

Why this source: no model or data set can be downloaded here, so real text must come from a
package. Debian's `fortunes` (BSD fortune-mod's data files; BSD licence, much of it public domain
quotation) holds about 14,000 short English texts by thousands of authors across topics (science,
politics, literature, law, food, education, computers, people, songs and poems, definitions, ...):
varied, human-written English unrelated to any organism's fine-tuning data, which is what the
Activation Difference Lens and the KL measures need. It is small (~2.3 MB, ~0.6M Gemma 3 tokens),
which suits a 2-core machine. Categories of offensive or non-prose entries are left out
(`EXCLUDED`). Credit: Ken Arnold's BSD fortune, the fortune-mod maintainers, Debian's `fortunes`
package; see /usr/share/doc/fortunes/copyright.

The files are read from /usr/share/games/fortunes (`apt-get install fortunes`); when they are not
installed the package is fetched with `apt-get download` and unpacked under `$NEURODIFF_HOME/text/`
(no root needed). Documents are split into train and held-out parts by a hash of their text, so
the split never depends on the order or the number of files read.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from neurodiff_jax.utils.paths import neurodiff_home

SYSTEM_DIR = Path("/usr/share/games/fortunes")
PACKAGE = "fortunes"
# Offensive, nonsense or machine-specific collections, and ASCII art: not general prose.
EXCLUDED = ("ethnic", "men-women", "drugs", "zippy", "ascii-art", "translate-me", "disclaimer", "linuxcookie",
            "debian", "perl", "knghtbrd", "startrek", "pratchett", "paradoxum", "linux")
LICENCE = "BSD (fortune-mod) and public-domain quotations; /usr/share/doc/fortunes/copyright"
HELD_OUT_SHARE = 0.1


class RealTextError(RuntimeError):
  """The real-text source is not installed and could not be fetched."""


def fortunes_dir() -> Path:
  """The directory of the fortune files: the installed package's, else one unpacked from `apt-get download`."""
  if any(SYSTEM_DIR.glob("literature")):
    return SYSTEM_DIR
  local = neurodiff_home() / "text" / "fortunes" / "usr" / "share" / "games" / "fortunes"
  if (local / "literature").is_file():
    return local
  root = local.parents[3]
  root.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".fortunes-"))
  try:
    subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True, capture_output=True, timeout=300)
    deb = next(tmp.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True, capture_output=True, timeout=300)
    if root.exists():
      shutil.rmtree(root)
    os.replace(tmp / "x", root)
  except (OSError, subprocess.SubprocessError, StopIteration) as e:
    raise RealTextError(
        f"the real-text source (Debian package {PACKAGE!r}) is not installed and `apt-get download {PACKAGE}` "
        f"failed ({e}); install it: sudo apt-get install {PACKAGE}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return local


def _clean(entry: str) -> str:
  """One fortune as plain text: lines stripped of their indentation, blank runs collapsed."""
  lines = [re.sub(r"[ \t]+", " ", line).strip() for line in entry.splitlines()]
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def fortunes_documents() -> list[str]:
  """Every fortune of the kept collections, cleaned, in a fixed order (collection name, then file order)."""
  directory = fortunes_dir()
  docs: list[str] = []
  for path in sorted(directory.iterdir()):
    if path.suffix or path.name in EXCLUDED or not path.is_file():
      continue
    text = path.read_text(encoding="latin-1")
    docs += [d for d in (_clean(e) for e in re.split(r"^%$", text, flags=re.M)) if len(d.split()) >= 4]
  if not docs:
    raise RealTextError(f"no fortune texts found in {directory}; reinstall the package: sudo apt-get install {PACKAGE}")
  return docs


def is_held_out(doc: str) -> bool:
  """Whether a document belongs to the held-out tenth (a hash of its text, independent of any order)."""
  return int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < HELD_OUT_SHARE


def real_text(split: str) -> list[str]:
  """The `train` or `held_out` documents of the real-text source."""
  if split not in ("train", "held_out"):
    raise ValueError(f"split {split!r}: choose train or held_out")
  want = split == "held_out"
  return [d for d in fortunes_documents() if is_held_out(d) == want]


__all__ = ["EXCLUDED", "LICENCE", "RealTextError", "fortunes_dir", "fortunes_documents", "is_held_out", "real_text"]
