"""Writes docs/config_reference.md from configs/: every run config's docstring and a table of its fields.

  python docs/gen_config_reference.py            # (re)write docs/config_reference.md
  python docs/gen_config_reference.py --check    # exit 1 when the file differs from what configs/ gives

Each `configs/NAME.py` not starting with `_` is imported and `get_config()` called with its default
arg; the table lists every field (dotted path), its default and the comment its source line (or the
shared `configs/_*.py` it imports) gives it, as `--config.show` does. The variants a docstring shows
(`--config=NAME:ARG`) are called too and listed by the fields they change. The output holds no
date and no machine-dependent path, so it only changes when a config does.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config_reference.md"
STALE = "docs/config_reference.md is out of date; run python docs/gen_config_reference.py"
# A sentinel home so that defaults derived from $NEURODIFF_HOME or ~ print the same on every machine.
_HOME_SENTINEL = "/__neurodiff_home__"

sys.path.insert(0, str(ROOT))

import ml_collections

from launch.flags import CONFIG_DIR, config_sources, known_configs
from neurodiff_jax.utils.config import field_paths, get_field, source_comments


def _load(name: str) -> Any:
  """The module configs/NAME.py, imported from its file (as the launchers do)."""
  path = CONFIG_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_config_ref_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _portable(text: str) -> str:
  """`text` with machine-dependent paths (the sentinel home, $HOME, the checkout) replaced by names."""
  text = text.replace(_HOME_SENTINEL, "$NEURODIFF_HOME").replace(str(ROOT), "<repo>")
  home = os.path.expanduser("~")
  return text.replace(home, "~") if home not in ("", "/") else text


def _cell(text: str) -> str:
  """`text` safe inside a Markdown table cell."""
  return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_DICT_GROUP = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=\s*ml_collections\.ConfigDict\(\{")
_DICT_KEY = re.compile(r"^\s*[\"']([A-Za-z_]\w*)[\"']\s*:")


def _file_comments(path: Path) -> dict[str, str]:
  """{dotted field: comment} of one config file: `c.X = ...  # ...` lines and `"key": ...  # ...` dict entries."""
  found = source_comments([path])
  group = None
  for line in path.read_text().splitlines():
    m = _DICT_GROUP.match(line)
    if m:
      group = None if "})" in line else m.group(1)
      continue
    if group is None:
      continue
    k = _DICT_KEY.match(line)
    if k and "#" in line:
      found.setdefault(f"{group}.{k.group(1)}", line.split("#", 1)[1].strip())
    if "})" in line:
      group = None
  return found


def _module_comments(name: str) -> dict[str, str]:
  """The comments of configs/NAME.py and the configs/ modules it imports (the file itself wins)."""
  out: dict[str, str] = {}
  for path in config_sources(CONFIG_DIR / f"{name}.py"):
    for key, comment in _file_comments(path).items():
      out.setdefault(key, comment)
  return out


def _leafset(config: ml_collections.ConfigDict) -> frozenset[str]:
  """The dotted paths of a config's non-group fields (what identifies which config built a nested group)."""
  return frozenset(p for p in field_paths(config) if not isinstance(get_field(config, p), ml_collections.ConfigDict))


def _resolve(config: ml_collections.ConfigDict, name: str, signatures: dict[frozenset[str], str]) -> dict[str, str]:
  """{leaf path: comment}: a field's own line in configs/NAME.py (or its imports), else, for a group built by
  another config's get_config (the same fields), that config's comment (never a same-named field elsewhere)."""
  own = _module_comments(name)
  subs: dict[str, dict[str, str]] = {}
  for path in field_paths(config):
    value = get_field(config, path)
    if not isinstance(value, ml_collections.ConfigDict) or any(path.startswith(s + ".") for s in subs):
      continue
    match = signatures.get(_leafset(value))
    if match and match != name:
      subs[path] = _resolve(value, match, signatures)
  out = {}
  for path in _leafset(config):
    if path in own:
      out[path] = own[path]
      continue
    for group, comments in subs.items():
      if path.startswith(group + "."):
        out[path] = comments.get(path[len(group) + 1:], "")
  return out


def _leaves(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{dotted path: repr of the value} for every non-group field, in definition order."""
  out = {}
  for path in field_paths(config):
    value = get_field(config, path)
    if not isinstance(value, ml_collections.ConfigDict):
      out[path] = _portable(repr(value))
  return out


def _summarise(changed: list[tuple[str, str]], limit: int = 4) -> str:
  """`path=value` for each changed field; a group with more than `limit` changes as `group.*` and its count."""
  by_group: dict[str, list[tuple[str, str]]] = {}
  for path, value in changed:
    by_group.setdefault(path.split(".")[0] if "." in path else "", []).append((path, value))
  parts = []
  for group, rows in by_group.items():
    if group and len(rows) > limit:
      parts.append(f"`{group}.*` ({len(rows)} fields)")
    else:
      parts += [f"`{p}={_cell(v)}`" for p, v in rows]
  return ", ".join(parts)


def _docstring_md(doc: str) -> list[str]:
  """A config module's docstring as Markdown: indented lines (its example commands) become a bash block."""
  lines, block = [], []
  for raw in (doc or "").strip("\n").splitlines():
    if raw.startswith("  ") and raw.strip():
      block.append(raw[2:])
      continue
    if block:
      lines += ["```bash", *block, "```"]
      block = []
    lines.append(raw.strip())
  if block:
    lines += ["```bash", *block, "```"]
  return [_portable(line) for line in lines]


def _documented_args(name: str, doc: str) -> list[str]:
  """The `NAME:ARG` variants the docstring's examples use, in order of first mention."""
  args = []
  for m in re.finditer(rf"--config={re.escape(name)}:([\w,]+)", doc or ""):
    if m.group(1) not in args:
      args.append(m.group(1))
  return args


def render() -> str:
  """The whole of docs/config_reference.md."""
  previous = os.environ.get("NEURODIFF_HOME")
  os.environ["NEURODIFF_HOME"] = _HOME_SENTINEL
  try:
    return _render()
  finally:
    if previous is None:
      os.environ.pop("NEURODIFF_HOME")
    else:
      os.environ["NEURODIFF_HOME"] = previous


_INTRO = ("Generated by `python docs/gen_config_reference.py` from `configs/` (do not edit by hand; CI checks it is "
          "current with `--check`). Every launcher takes `--config=NAME[:ARG]` and `--config.FIELD=VALUE` overrides "
          "(`launch/flags.py`); `--config.show` prints the same table for a command's own config. Defaults below are "
          "`get_config()` with no ARG; `$NEURODIFF_HOME` defaults to `~/.cache/neurodiff_jax`.")


def _render() -> str:
  """The reference, with $NEURODIFF_HOME already pointing at the sentinel."""
  names = known_configs()
  out = ["# Config reference", "", _INTRO, "",
         "| config | launcher default of | what |", "|---|---|---|"]
  launchers = {"tiny_batchtopk": "launch.train, launch.sweep", "harvest_tiny": "launch.harvest",
               "organisms": "launch.organism", "analyze": "launch.analyze", "diff": "launch.diff",
               "demo": "launch.demo", "dashboard": "launch.dashboard"}
  modules = {n: _load(n) for n in names}
  defaults = {n: modules[n].get_config() for n in names}
  signatures: dict[frozenset[str], str] = {}
  for n in names:
    signatures.setdefault(_leafset(defaults[n]), n)
  for n in names:
    first = ((modules[n].__doc__ or "").strip().splitlines() or [""])[0]
    out.append(f"| [`{n}`](#{n}) | {launchers.get(n, '')} | {_cell(_portable(first))} |")
  for n in names:
    module = modules[n]
    config = defaults[n]
    comments = _resolve(config, n, signatures)
    out += ["", f"## {n}", "", f"`configs/{n}.py`", "", *_docstring_md(module.__doc__ or ""), "",
            "| field | default | comment |", "|---|---|---|"]
    for path, value in _leaves(config).items():
      out.append(f"| `{path}` | `{_cell(value)}` | {_cell(_portable(comments.get(path, '')))} |")
    base = _leaves(config)
    for arg in _documented_args(n, module.__doc__ or ""):
      try:
        variant = _leaves(module.get_config(arg))
      except Exception as e:  # a documented example that no longer works is a bug in the config's docstring
        raise SystemExit(f"configs/{n}.py documents --config={n}:{arg} but get_config({arg!r}) fails: {e}; "
                         "fix the config or its docstring, then rerun python docs/gen_config_reference.py") from e
      changed = [(p, v) for p, v in variant.items() if base.get(p) != v]
      changed += [(p, "(absent)") for p in base if p not in variant]
      text = _summarise(changed) or "no field differs"
      out += ["", f"`--config={n}:{arg}` changes: {text}"]
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
  """Writes the reference, or with `--check` returns 1 (and says so) when the checked-in file is stale."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if docs/config_reference.md is out of date")
  parser.add_argument("--out", type=Path, default=OUT, help=argparse.SUPPRESS)  # tests point it at a copy
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    if not args.out.is_file() or args.out.read_text() != text:
      print(STALE, file=sys.stderr)
      return 1
    return 0
  args.out.write_text(text)
  print(f"wrote {args.out} ({len(text.splitlines())} lines)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

__all__ = ["STALE", "main", "render"]
