"""The flag helper every launcher shares: `--config=NAME[:arg]` plus `--config.field=value`.

A bare NAME means `configs/NAME.py`; a path to a .py file is used as is. Configs are locked,
so an override of a field that does not exist is an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def known_configs() -> list[str]:
  """Names of the configs in configs/."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config(value: str) -> str:
  """`NAME[:arg]` → `configs/NAME.py[:arg]`; exits with the list of known configs if NAME is unknown."""
  name, sep, arg = value.partition(":")
  path = Path(name) if ("/" in name or name.endswith(".py")) else CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    sys.exit(f"error: unknown config {name!r} (no file {path}). Known configs: {', '.join(known_configs())}.")
  return f"{path}{sep}{arg}"


def _rewrite_argv(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config="):
      out.append("--config=" + resolve_config(a.split("=", 1)[1]))
    elif a == "--config" and i + 1 < len(argv):
      out += ["--config", resolve_config(argv[i + 1])]
      i += 1
    else:
      out.append(a)
    i += 1
  return out


def run(main: Callable[[object], None], default_config: str) -> None:
  """Defines `--config` (default `default_config`) and runs `main(config)` under absl."""
  holder = config_flags.DEFINE_config_file("config", resolve_config(default_config), "config NAME[:arg] or path.py[:arg]")

  def parse(argv: list[str]) -> list[str]:
    rest = flags.FLAGS(_rewrite_argv(argv))
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every checkpoint step at INFO.
    return rest

  app.run(lambda argv: main(holder.value), flags_parser=parse)


def load_config(value: str):
  """The ConfigDict of `NAME[:arg]` (as `--config` would give it), for a launcher that needs a second config."""
  import importlib.util

  path, _, arg = resolve_config(value).partition(":")
  spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)
