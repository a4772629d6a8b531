"""Weight difference: values against numpy on the tiny pair, one tensor pair at a time, errors, outputs."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file, save_file

from neurodiff_jax.diffing import weights
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import U64, assert_close, rounding


class _Pair:
  def __init__(self, base, ft):
    self.base_path, self.ft_path = base, ft


class _Ctx:
  def __init__(self, base, ft):
    self.pair = _Pair(base, ft)
    self.log = lambda msg: None


def _cfg(enabled=True):
  import ml_collections

  return ml_collections.ConfigDict({"enabled": enabled})


def test_table_equals_numpy(tiny_pair_dirs, tmp_path):
  base, ft, _ = tiny_pair_dirs
  summary = weights.run(_Ctx(base, ft), _cfg(), tmp_path)
  table = pd.read_parquet(tmp_path / "weights.parquet")
  wb, wf = load_file(str(Path(base) / "model.safetensors")), load_file(str(Path(ft) / "model.safetensors"))
  assert sorted(table.tensor) == sorted(wb)
  plus_one = json.loads((Path(base) / "config.json").read_text())["model_type"].startswith("gemma")
  for r in table.itertuples():
    b, f = wb[r.tensor].astype(np.float64), wf[r.tensor].astype(np.float64)
    ref_b = b + 1.0 if plus_one and r.tensor.endswith("norm.weight") else b
    # Float64 sums of squares over the tensor, in row blocks here and in one sum in numpy (then sqrt and a ratio).
    c = rounding(n=b.size, depth=2, u=U64)
    assert_close(r.norm_base, np.linalg.norm(ref_b), c=c, what="‖W_base‖ of each tensor equals numpy",
                 err_msg=r.tensor)
    assert_close(r.norm_diff, np.linalg.norm(f - b), c=c, what="‖W_ft − W_base‖ of each tensor equals numpy",
                 err_msg=r.tensor)
    assert_close(r.rel_diff, np.linalg.norm(f - b) / np.linalg.norm(ref_b), c=c,
                 what="relative weight difference of each tensor equals numpy", err_msg=r.tensor)
    assert r.shape == "x".join(map(str, b.shape))
  q = table.set_index("tensor").loc["model.layers.2.self_attn.q_proj.weight"]
  assert (q.layer, q.module) == (2, "q_proj")
  emb = table.set_index("tensor").loc["model.embed_tokens.weight"]
  assert (emb.layer, emb.module) == (-1, "embed_tokens")
  # Different seeds: every projection changed by a random-sized amount, so the ranking is by value.
  top = table.sort_values("rel_diff", ascending=False).head(5)
  assert [t["tensor"] for t in summary["top_tensors"]] == list(top.tensor)
  q_rel = table[table.module == "q_proj"].rel_diff
  assert_close(summary["mean_by_module"]["q_proj"], q_rel.mean(), c=rounding(n=len(q_rel), u=U64),
               what="mean relative difference of q_proj equals the table's")
  assert set(table.module) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "input_layernorm", "embed_tokens", "final_norm"}
  assert (tmp_path / "weights_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  section = (tmp_path / "section.html").read_text()
  assert section.startswith("<h2>") and "data:image/png;base64," in section and "<html" not in section


def test_same_checkpoint_is_zero(tiny_pair_dirs):
  base, _, _ = tiny_pair_dirs
  table = weights.weight_table(base, base)
  assert (table.norm_diff == 0).all() and (table.rel_diff == 0).all()


def test_block_reading_equals_whole(tiny_pair_dirs):
  base, ft, _ = tiny_pair_dirs
  wb, wf = load_file(str(Path(base) / "model.safetensors")), load_file(str(Path(ft) / "model.safetensors"))
  name = "model.embed_tokens.weight"
  whole = weights.tensor_norms(wb[name], wf[name], rows=10**9)
  blocks = weights.tensor_norms(wb[name], wf[name], rows=7)  # 512 rows in uneven blocks
  assert_close(blocks, whole, c=rounding(n=wb[name].size, u=U64),
               what="norms summed in uneven row blocks equal one sum")  # float64 sums over the whole tensor


def test_reads_one_tensor_pair_at_a_time(tiny_pair_dirs, monkeypatch):
  base, ft, _ = tiny_pair_dirs
  alive: list[weakref.ref] = []
  most = [0]
  original = weights.SafetensorsFile.get

  def tracked_get(self, name):
    # CPython frees an array when its last reference goes (no cycles here), so no gc.collect needed.
    most[0] = max(most[0], sum(r() is not None for r in alive) + 1)
    out = original(self, name)
    alive.append(weakref.ref(out))
    return out

  monkeypatch.setattr(weights.SafetensorsFile, "get", tracked_get)
  table = weights.weight_table(base, ft)
  assert len(alive) == 2 * len(table)  # each tensor read once from each checkpoint
  assert most[0] == 2  # the base and ft copies of one tensor, never more


def _altered_copy(src: str, dst: Path, change) -> str:
  shutil.copytree(src, dst)
  tensors = load_file(str(dst / "model.safetensors"))
  change(tensors)
  save_file(tensors, str(dst / "model.safetensors"))
  return str(dst)


def test_missing_tensor_named(tiny_pair_dirs, tmp_path):
  base, ft, _ = tiny_pair_dirs
  name = "model.layers.1.mlp.up_proj.weight"
  broken = _altered_copy(ft, tmp_path / "ft", lambda t: t.pop(name))
  with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*not in"):
    weights.weight_table(base, broken)


def test_shape_mismatch_named(tiny_pair_dirs, tmp_path):
  base, ft, _ = tiny_pair_dirs
  name = "model.layers.0.self_attn.o_proj.weight"
  broken = _altered_copy(ft, tmp_path / "ft", lambda t: t.__setitem__(name, t[name][:, :8].copy()))
  with pytest.raises(ConfigError, match=r"o_proj\.weight.*shape"):
    weights.weight_table(base, broken)


def test_disabled(tiny_pair_dirs, tmp_path):
  base, ft, _ = tiny_pair_dirs
  assert weights.run(_Ctx(base, ft), _cfg(False), tmp_path) == {"enabled": False}
  assert not (tmp_path / "weights.parquet").exists()
