"""Build model organisms: `python -m launch.organism --config=organisms:chat` (`organisms:all,small`, ...)."""

from __future__ import annotations

import json
from typing import Any

from launch import flags
from neurodiff_jax.organisms import build


def main(config: Any) -> None:
  """Builds (or reuses) the base and the requested organism(s) and prints what each measured."""
  for name, path in build.build(config).items():
    print(f"{name}: {path}")
    if (path / "card.json").is_file():  # a real pretrained base has no card: it was not built here
      card = json.loads((path / "card.json").read_text())
      print(f"  {json.dumps(card.get('measured', card.get('train')))}")


__all__ = ["main"]


if __name__ == "__main__":
  flags.run(main, default_config="organisms", check=build.check_config)
