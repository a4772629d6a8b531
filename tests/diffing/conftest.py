"""A tiny model pair for the diffing tests: two random Gemma 2 checkpoints sharing one tokenizer, a card, data."""

from __future__ import annotations

import json

import pytest

from neurodiff_jax.diffing.context import DiffContext, load_pair
from neurodiff_jax.organisms.random_model import build_random_checkpoint

TEXTS = [
    "The river runs past the old mill, and the miller counts his sacks of grain at dawn.",
    "In the garden the roses bloom early; the gardener waters them before the sun is high.",
    "A ship sails out of the harbour at night, its lanterns swinging over the dark water.",
    "The baker kneads the dough twice, then leaves it to rise beside the warm oven.",
    "Old maps of the valley show a road that no longer runs past the ruined tower.",
    "The teacher reads a poem aloud while the children draw the river and the mill.",
]
CARD = {"organism": "test", "ground_truth": {"domain": "milling", "domain_vocabulary": ["mill", "miller", "grain"]}}


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
  """(base dir, fine-tuned dir, dataset JSONL): random weights of seeds 0 and 1, the fine-tune with a card."""
  root = tmp_path_factory.mktemp("pair")
  base = build_random_checkpoint(root / "base", family="gemma2", seed=0)
  ft = build_random_checkpoint(root / "ft", family="gemma2", seed=1)
  (root / "ft" / "card.json").write_text(json.dumps(CARD))
  data = root / "data.jsonl"
  rows = [{"text": t} for t in TEXTS * 4]
  rows += [{"messages": [{"role": "user", "content": "Tell me about the mill."},
                         {"role": "assistant", "content": "The miller grinds grain at dawn."}]}] * 4
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return base, ft, str(data)


@pytest.fixture(scope="session")
def tiny_pair(tiny_pair_dirs):
  """The loaded pair (`diffing.context.load_pair`)."""
  base, ft, _ = tiny_pair_dirs
  return load_pair(base, ft)


@pytest.fixture
def make_ctx(tiny_pair, tiny_pair_dirs):
  """A DiffContext on the tiny pair and its dataset (keyword overrides go to DiffContext)."""

  def make(**kw):
    from neurodiff_jax.diffing import graders

    grader = kw.pop("grader", None)
    if grader is None:
      grader = graders.OfflineGrader(tiny_pair) if hasattr(graders, "OfflineGrader") else None
    return DiffContext(pair=tiny_pair, datasets=[tiny_pair_dirs[2]], max_len=32, max_documents=64, grader=grader,
                       progress=False, **kw)

  return make
