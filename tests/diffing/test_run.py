"""The launch.diff runner: method selection, per-method reuse, a killed run, the results directory and report."""

from __future__ import annotations

import json

import ml_collections
import pytest

from neurodiff_jax.diffing import context, report, run
from neurodiff_jax.utils.config import ConfigError
from tests.diffing import fake_method


def _config(dirs, tmp_path, **over):
  from configs.diff import get_config

  base, ft, data = dirs
  c = get_config("narrow,small")
  c.unlock()
  c.base_model, c.finetuned_model, c.datasets = base, ft, (data,)
  c.out_dir = str(tmp_path / "res")
  c.max_len = 32
  c.progress = False
  for k, v in over.items():
    c[k] = v
  return c


@pytest.fixture
def fake(monkeypatch):
  monkeypatch.setattr(run, "METHODS", {"weights": "tests.diffing.fake_method", "adl": "tests.diffing.fake_method"})
  fake_method.CALLS.clear()
  return fake_method.CALLS


def test_methods_run_once_and_are_reused(tiny_pair_dirs, tmp_path, fake):
  cfg = _config(tiny_pair_dirs, tmp_path)
  out = run.diff(cfg, log=lambda m: None)
  assert sorted(out["methods"]) == ["adl", "weights"] and len(fake) == 2
  assert out["methods"]["adl"]["tokens"] > 100
  again = run.diff(cfg, log=lambda m: None)
  assert len(fake) == 2 and again["methods"] == out["methods"]  # reused
  cfg.force_methods = ("adl",)
  run.diff(cfg, log=lambda m: None)
  assert len(fake) == 3
  cfg.force_methods = ()
  cfg.adl.top_k = 7  # a changed setting reruns that method only
  run.diff(cfg, log=lambda m: None)
  assert len(fake) == 4 and fake[-1].endswith("adl")
  page = report.write_report(tmp_path / "res").read_text()
  assert page.count("<h2>fake</h2>") == 2


def test_a_killed_run_finishes_the_rest(tiny_pair_dirs, tmp_path, fake):
  cfg = _config(tiny_pair_dirs, tmp_path)
  cfg.adl = ml_collections.ConfigDict(dict(cfg.adl.to_dict(), fail=True))
  with pytest.raises(KeyboardInterrupt):
    run.diff(cfg, log=lambda m: None)
  assert (tmp_path / "res" / "diff" / "weights" / "done.json").is_file()
  assert not (tmp_path / "res" / "diff" / "adl" / "done.json").exists()
  cfg.adl = ml_collections.ConfigDict({k: v for k, v in cfg.adl.to_dict().items() if k != "fail"})
  fake.clear()
  run.diff(cfg, log=lambda m: None)
  assert [c.rsplit("/", 1)[1] for c in fake] == ["adl"]  # weights was not redone
  summary = json.loads((tmp_path / "res" / "diff" / "summary.json").read_text())
  assert set(summary) == {"weights", "adl"}


def test_config_errors_name_the_fix(tiny_pair_dirs, tmp_path):
  with pytest.raises(ConfigError, match="unknown method 'kll' \\(did you mean kl\\?\\)"):
    run.check_config(_config(tiny_pair_dirs, tmp_path, methods=("kll",)))
  with pytest.raises(ConfigError, match="outside \\[0, 1\\]"):
    context.layers_of((1.5,), 4)
  with pytest.raises(ConfigError, match="integer ≥ 1"):
    context.layers_of((2,), 4)
  assert context.layers_of((0.0, 0.5, 1.0), 4) == [0, 2, 3]


def test_batches_skip_short_documents_and_mark_fillers(make_ctx):
  ctx = make_ctx()
  rows = [b for b in ctx.batches(5, min_len=10)]
  corpus = ctx.corpus()
  long_docs = [i for i, d in enumerate(corpus.ids) if len(d) >= 10]
  got = [int(d) for b in rows for d in b.docs if d >= 0]
  assert got == long_docs[: ctx.max_documents]
  for b in rows:
    for r, d in enumerate(b.docs):
      if d >= 0:
        n = len(corpus.ids[d])
        assert b.mask[r].sum() == n and (b.ids[r, :n] == corpus.ids[d]).all()
  with pytest.raises(ConfigError, match="no document of the datasets has 500 tokens"):
    next(iter(ctx.batches(4, min_len=500)))


def test_mismatched_pair_is_refused(tiny_pair_dirs, tmp_path):
  from neurodiff_jax.organisms.random_model import build_random_checkpoint

  other = build_random_checkpoint(tmp_path / "llama", family="llama", seed=0, vocab_size=300)
  with pytest.raises(ConfigError, match="tokenizers differ|differ in shape"):
    context.load_pair(tiny_pair_dirs[0], other)
