"""`ensure_store`: a named store is opened, finished or harvested in place, never swapped; bad out_dirs are named."""

import numpy as np
import pytest

from neurodiff_jax.activations.harvest import check_out_dir, ensure_store, harvest
from neurodiff_jax.activations.store import ActivationStore
from neurodiff_jax.utils.config import ConfigError


def _contents(store):
  """Every stored array of a store, by name."""
  out = {f"layer{l}": store.read(l, 0, store.layout.num_tokens) for l in store.layout.layers}
  out |= {n: store.metadata(n) for n in ("token_id", "token_kind", "position", "doc_index")}
  return out


def test_missing_store_is_harvested_there_and_a_half_written_one_is_finished(harvest_config, tmp_path):
  c = harvest_config
  named = tmp_path / "named" / "store"
  with pytest.raises(ConfigError, match=f"no activation store at {named} .*launch.harvest .*--config.out_dir={named}"):
    ensure_store(str(named), None)
  assert not named.exists()

  whole = ensure_store(str(named), c)  # c.out_dir points elsewhere: the named directory wins
  assert whole.root == named and whole.manifest["complete"] and not (tmp_path / "store").exists()
  assert whole.layout.num_units >= 4

  # A harvest killed half-way, as process 0 of 2 leaves it: only the even units are written.
  half_dir = tmp_path / "half"
  c.out_dir, c.process_count, c.process_index = str(half_dir), 2, 0
  harvest(c)
  half = ActivationStore.open(half_dir, require_complete=False)
  done = len(half.finished_units())
  assert not half.manifest["complete"] and 0 < done < half.layout.num_units
  with pytest.raises(ConfigError, match=rf"store {half_dir} is half-written \({done}/{half.layout.num_units} units\)"):
    ensure_store(str(half_dir), None)
  c.process_count, c.process_index = 0, 0
  c.out_dir = str(tmp_path / "elsewhere")
  finished = ensure_store(str(half_dir), c)
  assert finished.root == half_dir and finished.manifest["complete"] and not (tmp_path / "elsewhere").exists()
  assert len(finished.finished_units()) == finished.layout.num_units
  a, b = _contents(whole), _contents(finished)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_complete_store_is_opened_as_is(harvest_config, tmp_path, monkeypatch):
  from neurodiff_jax.activations import harvest as harvest_lib

  store = harvest(harvest_config)
  manifest = (store.root / "manifest.json").read_text()
  monkeypatch.setattr(harvest_lib, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
  other = harvest_config.copy_and_resolve_references()
  other.layers = (0,)
  other.out_dir = str(tmp_path / "other")  # another harvest config: a store named by its directory is used as is
  opened = ensure_store(str(store.root), other)
  assert opened.root == store.root and opened.layout.layers == (0, 1)
  assert (store.root / "manifest.json").read_text() == manifest
  assert ensure_store(str(store.root), None).layout.num_tokens == store.layout.num_tokens
  # At the config's own out_dir the store must be the config's: checked without running a model.
  assert ensure_store("", harvest_config).layout.num_tokens == store.layout.num_tokens
  assert ensure_store(str(store.root), harvest_config).root == store.root


def test_another_configs_store_at_the_configs_own_out_dir_is_refused(harvest_config, model_pair, tmp_path):
  """The store at a harvest config's out_dir made from another fine-tune (another organism seed, say) is an error
  naming the difference, not a silent reuse; the store is left as it was."""
  from neurodiff_jax.activations.store import StoreError

  store = harvest(harvest_config)
  manifest = (store.root / "manifest.json").read_text()
  other = harvest_config.copy_and_resolve_references()
  other.finetuned_model = other.base_model  # another model pair, the same out_dir
  with pytest.raises(StoreError, match=rf"{store.root} holds a store made with another config \(differs in: models"):
    ensure_store("", other)
  other = harvest_config.copy_and_resolve_references()
  other.layers = (0,)
  with pytest.raises(StoreError, match="differs in: layers"):
    ensure_store(str(store.root), other)
  assert (store.root / "manifest.json").read_text() == manifest


def test_out_dir_that_is_a_file_is_named_before_any_work(harvest_config, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("not a store")
  harvest_config.out_dir = str(f)
  harvest_config.base_model = str(tmp_path / "no_such_model")  # would fail later, if the check came later
  with pytest.raises(ConfigError, match=f"out_dir {f} is an existing file, but a store is a directory"):
    harvest(harvest_config)
  with pytest.raises(ConfigError, match=f"out_dir {f}/sub cannot be created: {f} is a file"):
    check_out_dir(f / "sub")
  assert f.read_text() == "not a store"
  with pytest.raises(ConfigError, match=f"no activation store at {f} \\(it is a file\\)"):
    ensure_store(str(f), None)
  assert check_out_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir" and not (tmp_path / "new").exists()
