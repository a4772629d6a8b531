"""Prints how far each organism's residual stream moved from its base's, toy and real side by side.

  PYTHONPATH=. .venv/bin/python docs/activation_shift.py default        # builds the toy organisms if missing
  PYTHONPATH=. .venv/bin/python docs/activation_shift.py gemma3         # reads the real organisms' cards

The measure is `organisms.evaluate.activation_shift`: the median over tokens (BOS left out) of
‖x_ft − x_base‖ / ‖x_base‖ at the harvest layer, on held-out general text of each scale (the toy
corpus's held-out 2 % at layer 2; the `fortunes` held-out split at layer 8, computed when the real
organism's card is written). Toy organisms are built here when missing (~6 min on 2 cores).
"""

from __future__ import annotations

import json
import sys

from configs.harvest_tiny import _LAYERS
from configs.organisms import get_config as organisms_config
from neurodiff_jax.models import load_model, load_tokenizer
from neurodiff_jax.organisms import build as B
from neurodiff_jax.organisms.corpus import split_documents
from neurodiff_jax.organisms.evaluate import activation_shift

NAMES = ("chat", "narrow", "false_fact", "taboo")


def toy(scale: str, n_docs: int = 200) -> dict[str, float]:
  """Builds (or reuses) the toy organisms of `scale` and measures each one's shift at the harvest layer."""
  config = organisms_config(f"all,{scale}")
  paths = B.build(config)
  _, held_out = split_documents(B.general_corpus(config), 0.02, config.seed)
  base = load_model(str(paths["base"]))
  tokenizer = load_tokenizer(str(paths["base"]))
  layer = _LAYERS[scale][0]
  return {n: activation_shift(base, load_model(str(paths[n])), tokenizer, held_out[:n_docs], layer) for n in NAMES}


def real(scale: str) -> dict[str, float]:
  """The shifts the real organisms' cards recorded (the same function, when each was built)."""
  root = B.scale_dir(organisms_config(f"all,{scale}"))
  out = {}
  for n in NAMES:
    card = root / n / "card.json"
    if card.is_file():
      out[n] = json.loads(card.read_text())["measured"]["activation_shift"]["median_relative_change"]
  return out


if __name__ == "__main__":
  scale = sys.argv[1] if len(sys.argv) > 1 else "default"
  shifts = real(scale) if B.is_real(organisms_config(f"all,{scale}")) else toy(scale)
  print(f"| scale | {' | '.join(NAMES)} |\n|---|{'---|' * len(NAMES)}")
  print(f"| {scale} | " + " | ".join(f"{shifts[n]:.3f}" if n in shifts else "n/a" for n in NAMES) + " |")
