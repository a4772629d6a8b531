"""Run-config helpers shared by the library and the launchers: the error for a bad config, field look-up with
suggestions, and a listing of a config with the comments its source files give each field."""

from __future__ import annotations

import difflib
import io
import re
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A run config that cannot work (unknown field, wrong type, impossible value); the message names the fix."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
  """The `n` names in `choices` closest to `name` (difflib), best first; several when the name is a prefix or part."""
  choices = list(choices)
  close = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
  # A fragment ("dead" for dead_frac, dead_tokens, ...) is a closer hint than a far edit.
  close += [c for c in choices if name and name in c and c not in close]
  return close[:n]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
  """' (did you mean a, b?)' for the names closest to `name`, or '' when none is close."""
  close = closest(name, choices)
  return f" (did you mean {' or '.join(close)}?)" if close else ""


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a tuple",
          list: "a list"}


def kind_of(value: Any) -> str:
  """What a field holding `value` takes, in words ('an integer', 'a number', ...)."""
  return _KINDS.get(type(value), f"a {type(value).__name__}")


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted paths of every field of `config`, nested ConfigDicts' fields included, in definition order."""
  out = []
  # Definition order (ConfigDict.items() sorts): a config file groups related fields together.
  for key in getattr(config, "_fields", None) or config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    out.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      out += field_paths(value, path + ".")
  return out


def get_field(config: ml_collections.ConfigDict, path: str, *, name: str = "the config") -> Any:
  """The value at dotted `path`; `ConfigError` naming the closest fields when there is none."""
  node: Any = config
  for i, part in enumerate(path.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(path.split(".")[:i])
      fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if not fields:
        raise ConfigError(f"{name} has no field {path!r}: {where!r} is a {type(node).__name__}, not a group of fields.")
      close = [f"{where}.{f}" if where else f for f in closest(part, fields)]
      hint = f" (did you mean {' or '.join(close)}?)" if close else ""
      raise ConfigError(f"{name} has no field {path!r}{hint}; --config.show lists every field.")
    node = node[part]
  return node


_ASSIGN = re.compile(r"^\s*c\.([A-Za-z_][\w.]*)\s*=(?!=)")


def source_comments(paths: Sequence[str | Path]) -> dict[str, str]:
  """{dotted field: comment} from `c.FIELD = ...  # comment` lines of config source files (first file first).

  A field set without a comment on its line takes the comment block right above it, unless that
  block is a one-line section heading ("# Model."); the first comment found for a field wins.
  """
  found: dict[str, str] = {}
  for path in paths:
    text = Path(path).read_text()
    comments: dict[int, str] = {}
    try:
      for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
          comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
      continue
    lines = text.splitlines()
    for n, line in enumerate(lines, start=1):
      m = _ASSIGN.match(line)
      if not m or m.group(1) in found:
        continue
      comment = comments.get(n, "")
      if not comment:
        above, j = [], n - 1
        while j >= 1 and lines[j - 1].strip().startswith("#"):
          above.insert(0, comments.get(j, ""))
          j -= 1
        if len(above) > 1 or (above and len(above[0].split()) > 3):
          comment = " ".join(above)
      if comment:
        found[m.group(1)] = comment
  return found


def _comment_for(path: str, comments: dict[str, str]) -> str:
  """The comment of dotted `path`: its own, else that of its longest suffix (a nested config's own file says `c.x`)."""
  parts = path.split(".")
  for i in range(len(parts)):
    key = ".".join(parts[i:])
    if key in comments:
      return comments[key]
  return ""


def describe(config: ml_collections.ConfigDict, comments: dict[str, str], *, title: str = "") -> str:
  """One line per field, `path = value  # comment`, nested groups' fields under their dotted path."""
  rows = []  # (path, value repr, comment); value None: a group of fields, shown as a comment line above them
  for path in field_paths(config):
    value = get_field(config, path)
    group = isinstance(value, ml_collections.ConfigDict)
    rows.append((path, None if group else repr(value), _comment_for(path, comments)))
  width = min(max((len(p) + len(v) + 3 for p, v, _ in rows if v is not None), default=0), 48)
  lines = [title] if title else []
  for path, value, comment in rows:
    if value is None:
      if comment:
        lines.append(f"# {path}.*: {comment}")
      continue
    head = f"{path} = {value}"
    lines.append(f"{head:<{width}}  # {comment}" if comment else head)
  return "\n".join(lines)


__all__ = ["ConfigError", "closest", "describe", "did_you_mean", "field_paths", "get_field", "kind_of",
           "source_comments"]
