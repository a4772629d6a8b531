"""The flag helper every launcher shares: `--config=NAME[:arg]`, `--config.field=value` and `--config.show`.

A bare NAME means `configs/NAME.py`; a path to a .py file is used as is. Configs are locked: every
override must name an existing field. A bad config (unknown name or field, a value of the wrong
type, a value the library's `check` refuses) ends the run before any work with one line on stderr
that names the field, the closest valid names and the fix, and exit status 2. `--config.show`
prints the resolved config, each field with the comment of the line that sets it in `configs/`,
and exits.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from neurodiff_jax.utils.config import ConfigError, describe, did_you_mean, get_field, kind_of, source_comments

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHOW = "--config.show"
EXIT_CONFIG = 2  # the status of a config error (as for a usage error)


def known_configs() -> list[str]:
  """Names of the configs in configs/."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config(value: str) -> str:
  """`NAME[:arg]` → `configs/NAME.py[:arg]`; `ConfigError` naming the closest known configs if NAME is unknown."""
  name, sep, arg = value.partition(":")
  path = Path(name) if ("/" in name or name.endswith(".py")) else CONFIG_DIR / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"unknown config {name!r}{did_you_mean(name, known_configs())} (no file {path}). "
                      f"Known configs: {', '.join(known_configs())}.")
  return f"{path}{sep}{arg}"


def load_config(value: str) -> Any:
  """The ConfigDict of `NAME[:arg]` (as `--config` would give it), for a launcher that needs a second config."""
  path, _, arg = resolve_config(value).partition(":")
  spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (ValueError, KeyError) as e:  # a config refusing its arg, e.g. an unknown scale
    raise ConfigError(f"--config={value}: {e}") from None


def config_sources(path: str | Path) -> list[Path]:
  """A config file and the configs/ modules it imports (recursively), the file itself first."""
  out, todo = [], [Path(path)]
  while todo:
    p = todo.pop(0)
    if p in out or not p.is_file():
      continue
    out.append(p)
    for m in re.finditer(r"^\s*(?:from\s+configs(?:\.(\w+))?\s+import\s+([\w, ]+)|import\s+configs\.(\w+))",
                         p.read_text(), re.M):
      names = [m.group(1) or m.group(3)] if (m.group(1) or m.group(3)) else [n.strip() for n in m.group(2).split(",")]
      todo += [CONFIG_DIR / f"{n}.py" for n in names if n]
  return out


def show(config: Any, spec: str) -> str:
  """The `--config.show` listing: every field with its value and the comment its source line gives it."""
  path = spec.partition(":")[0]
  title = (f"# --config={spec.replace(str(CONFIG_DIR) + '/', '').replace('.py', '')} ({path}) with this command's "
           "overrides; override a field with --config.FIELD=VALUE")
  return describe(config, source_comments(config_sources(path)), title=title)


def fail(error: BaseException | str) -> NoReturn:
  """Ends the run with one line on stderr and exit status 2 (a config error: nothing was done)."""
  print(f"error: {error}".replace("\n", " "), file=sys.stderr, flush=True)
  sys.exit(EXIT_CONFIG)


def _config_arg(argv: list[str]) -> tuple[int, str] | None:
  """(index, value) of the `--config` flag in argv, or None."""
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return i, a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return i, argv[i + 1]
  return None


_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(=.*)?$")


def prepare_argv(argv: list[str], default_config: str) -> tuple[list[str], str, Any, bool]:
  """Resolves `--config`, checks every override names a field, strips `--config.show`.

  Returns (argv for absl with an explicit `--config=path` first, resolved spec, the config as
  loaded without overrides, whether to show it). Raises `ConfigError` before any work.
  """
  argv = list(argv)
  found = _config_arg(argv)
  value = found[1] if found else default_config
  spec = resolve_config(value)
  config = load_config(value)
  if found:  # absl needs the config before its overrides: move it to the front, resolved
    i = found[0]
    del argv[i:i + (1 if "=" in argv[i] else 2)]
  argv.insert(1, f"--config={spec}")
  show_it = False
  out = []
  for a in argv:
    m = _OVERRIDE.match(a)
    if m and m.group(2) == "show" and "show" not in config:
      show_it = not m.group(1) and (m.group(3) or "=true").lower() in ("=true", "=1")
      continue
    if m:
      field = m.group(2)
      try:
        get_field(config, field, name=f"config {value!r}")
      except ConfigError as e:
        raise ConfigError(f"{a.split('=', 1)[0]}: {e}") from None
    out.append(a)
  return out, spec, config, show_it


_ABSL_VALUE = re.compile(r"flag --(?:no)?config\.([\w.]+)=(.*?): (.*)", re.S)


def _value_error(error: Exception, config: Any) -> str:
  """absl's 'flag --config.k=abc: invalid literal ...' as one line naming the field, its type and current value."""
  m = _ABSL_VALUE.search(str(error))
  if not m:
    return str(error)
  field, value, why = m.groups()
  try:
    current = get_field(config, field)
  except ConfigError:
    return str(error)
  kind = kind_of(current)
  return (f"--config.{field}={value}: config.{field} takes {kind} (it is {current!r}): {why.strip()}; "
          f"e.g. --config.{field}={current!r}")


def run(main: Callable[[Any], None], default_config: str, check: Callable[[Any], None] | None = None) -> None:
  """Defines `--config` (default `default_config`) and runs `check(config)` then `main(config)` under absl.

  Config errors (unknown config or field, wrong type, a `ConfigError` from `check` or `main`) end
  the run with one line on stderr and exit status 2; `--config.show` prints the config and exits 0.
  """
  try:
    argv, spec, plain, show_it = prepare_argv(sys.argv, default_config)
  except ConfigError as e:
    fail(e)
  sys.argv[:] = argv  # config_flags reads the overrides from sys.argv
  holder = config_flags.DEFINE_config_file(
      "config", spec, "config NAME[:arg] (configs/NAME.py) or path.py[:arg]; --config.FIELD=VALUE overrides a "
      "field; --config.show prints every field with its value and comment, then exits")

  def parse(args: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(args)
    except flags.IllegalFlagValueError as e:
      fail(_value_error(e, plain))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      fail(f"command line: {e}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every checkpoint step at INFO.
    return rest

  def run_main(_: list[str]) -> None:
    config = holder.value
    if show_it:
      print(show(config, spec))
      return
    try:
      if check is not None:
        check(config)
      main(config)
    except ConfigError as e:
      fail(e)

  app.run(run_main, flags_parser=parse)


__all__ = ["CONFIG_DIR", "config_sources", "fail", "known_configs", "load_config", "prepare_argv", "resolve_config",
           "run", "show"]
