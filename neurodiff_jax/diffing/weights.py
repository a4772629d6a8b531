"""Weight difference: ‖W_ft − W_base‖_F / ‖W_base‖_F for every tensor, by layer and module.

Read straight from the two checkpoints' safetensors files (memory maps), one tensor pair at a
time and in blocks of rows, so a 9B pair is never in memory at once and the loaded models are not
needed. Tensor names are the Hugging Face names (multimodal prefixes rewritten as the loader does);
each is grouped by its layer index (-1 for embeddings, final norm and head) and its module (q_proj,
k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, the norms, embed_tokens, lm_head).

Families whose RMSNorm scales by (1 + w) (Gemma) store w ≈ 0; their norms are compared as the
weights they apply, (1 + w), else a tiny ‖w_base‖ would make every norm look rewritten.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import pandas as pd

from neurodiff_jax.models.hf_mapping import tensor_group
from neurodiff_jax.models.loading import IGNORED_TENSORS, canonical_name, config_from_hf, read_hf_config, weight_files
from neurodiff_jax.models.safetensors_io import SafetensorsFile
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.plots import figure, png_html, save_png

# Heat map columns in reading order (attention, MLP, norms); other modules follow alphabetically.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_norm", "k_norm",
                 "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
ROWS_PER_BLOCK = 8192  # rows of a tensor converted to float at once (a 256k-token embedding in ~32 blocks)


def _tensor_index(directory: str) -> dict[str, tuple[SafetensorsFile, str]]:
  """Canonical tensor name -> (its file, its stored name), from the headers only."""
  out = {}
  for path in weight_files(directory):
    f = SafetensorsFile(path)
    for raw in f.keys():  # noqa: SIM118 (a SafetensorsFile, not a dict)
      if not IGNORED_TENSORS.search(raw):
        out[canonical_name(raw)] = (f, raw)
  return out


def _is_norm(module: str) -> bool:
  return module.endswith(("norm", "layernorm"))


def tensor_pairs(base_path: str, ft_path: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields (name, base tensor, ft tensor) as memory-mapped views, one pair at a time; errors name the tensor."""
  base, ft = _tensor_index(base_path), _tensor_index(ft_path)
  ties = [config_from_hf(read_hf_config(p)).tie_embeddings for p in (base_path, ft_path)]
  for name in sorted(set(base) | set(ft)):
    if name not in base or name not in ft:
      have, lack = (ft_path, base_path) if name not in base else (base_path, ft_path)
      if name == "lm_head.weight" and all(ties):
        continue  # a stored copy of the tied embedding in one checkpoint: the embedding is compared already
      raise ConfigError(f"tensor {name!r} is in {have} but not in {lack}: the weight difference needs two "
                        "checkpoints of one architecture (a model and its own fine-tune).")
    (fb, rb), (ff, rf) = base[name], ft[name]
    if fb.shape(rb) != ff.shape(rf):
      raise ConfigError(f"tensor {name!r} has shape {fb.shape(rb)} in {base_path} but {ff.shape(rf)} in {ft_path}: "
                        "the weight difference needs a model and its own fine-tune (same shapes).")
    yield name, fb.get(rb), ff.get(rf)


def tensor_norms(w_base: np.ndarray, w_ft: np.ndarray, offset: float = 0.0,
                 rows: int = ROWS_PER_BLOCK) -> tuple[float, float]:
  """(‖W_base + offset‖_F, ‖W_ft − W_base‖_F), read in blocks of rows and summed in float64."""
  b2 = d2 = 0.0
  flat_b = w_base.reshape(w_base.shape[0] if w_base.ndim else 1, -1)
  flat_f = w_ft.reshape(flat_b.shape)
  for lo in range(0, flat_b.shape[0], rows):
    b = flat_b[lo:lo + rows].astype(np.float64)
    d = flat_f[lo:lo + rows].astype(np.float64) - b
    b2 += float(np.sum(np.square(b + offset)))
    d2 += float(np.sum(np.square(d)))
  return float(np.sqrt(b2)), float(np.sqrt(d2))


def weight_table(base_path: str, ft_path: str, log=None) -> pd.DataFrame:
  """One row per tensor: tensor, layer, module, rel_diff, norm_base, norm_diff, shape."""
  plus_one = config_from_hf(read_hf_config(base_path)).norm_plus_one
  rows = []
  for name, wb, wf in tensor_pairs(base_path, ft_path):
    layer, module = tensor_group(name)
    offset = 1.0 if plus_one and _is_norm(module) else 0.0
    nb, nd = tensor_norms(wb, wf, offset)
    rows.append({"tensor": name, "layer": layer, "module": module,
                 "rel_diff": nd / nb if nb > 0 else (0.0 if nd == 0 else float("inf")),
                 "norm_base": nb, "norm_diff": nd, "shape": "x".join(map(str, wb.shape))})
    del wb, wf  # drop the maps' views before the next pair
  if not rows:
    raise ConfigError(f"no tensors found in {base_path} and {ft_path}; are they safetensors checkpoints?")
  if log is not None:
    log(f"weights: {len(rows)} tensors compared")
  return pd.DataFrame(rows)


def _modules_in_order(modules: list[str]) -> list[str]:
  known = [m for m in _MODULE_ORDER if m in modules]
  return known + sorted(m for m in modules if m not in _MODULE_ORDER)


def heatmap_png(table: pd.DataFrame, path: Path) -> None:
  """Layers × modules heat map of rel_diff (blank where a layer has no such module)."""
  per_layer = table[table.layer >= 0]
  modules = _modules_in_order(sorted(set(per_layer.module)))
  layers = sorted(set(per_layer.layer))
  grid = np.full((len(layers), len(modules)), np.nan)
  for r in per_layer.itertuples():
    grid[layers.index(r.layer), modules.index(r.module)] = r.rel_diff
  fig = figure((1.0 + 0.6 * max(len(modules), 1), 1.5 + 0.25 * max(len(layers), 1)))
  ax = fig.add_subplot()
  im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
  ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
  ax.set_ylabel("layer")
  ax.set_title("‖W_ft − W_base‖ / ‖W_base‖")
  fig.colorbar(im, ax=ax)
  save_png(fig, path)


def section_html(table: pd.DataFrame, summary: dict[str, Any], png: Path) -> str:
  """The report fragment: heat map, top tensors, mean by module."""
  esc = html.escape
  top = "".join(f"<tr><td>{esc(t['tensor'])}</td><td>{t['rel_diff']:.4g}</td></tr>" for t in summary["top_tensors"])
  mean = "".join(f"<tr><td>{esc(m)}</td><td>{v:.4g}</td></tr>" for m, v in summary["mean_by_module"].items())
  global_rows = table[table.layer < 0]
  glob = "".join(f"<tr><td>{esc(r.tensor)}</td><td>{r.rel_diff:.4g}</td></tr>" for r in global_rows.itertuples())
  return (f"<h2>Weight difference</h2>\n<p>{esc(str(summary['num_tensors']))} tensors; relative Frobenius difference "
          "‖W_ft − W_base‖ / ‖W_base‖ per tensor (norms of (1 + w) families as (1 + w)).</p>\n"
          f"{png_html(png, 'relative weight difference by layer and module')}\n"
          f"<h3>Largest changes</h3>\n<table><tr><th>tensor</th><th>relative difference</th></tr>{top}</table>\n"
          f"<h3>Mean by module</h3>\n<table><tr><th>module</th><th>mean relative difference</th></tr>{mean}</table>\n"
          f"<h3>Embeddings, final norm, head</h3>\n<table><tr><th>tensor</th><th>relative difference</th></tr>{glob}"
          "</table>\n")


def run(ctx, cfg: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
  """Per-tensor relative weight differences of the pair's checkpoints: weights.parquet, heat map, section.html."""
  out = Path(out)
  if not cfg.get("enabled", True):
    (out / "section.html").write_text("<h2>Weight difference</h2>\n<p>Disabled (weights.enabled=False).</p>\n")
    return {"enabled": False}
  table = weight_table(ctx.pair.base_path, ctx.pair.ft_path, log=ctx.log)
  table.to_parquet(out / "weights.parquet", index=False)
  png = out / "weights_heatmap.png"
  heatmap_png(table, png)
  top = table.sort_values("rel_diff", ascending=False, kind="stable").head(5)
  by_module = table.groupby("module", sort=False).rel_diff.mean()
  summary = {"num_tensors": len(table),
             "top_tensors": [{"tensor": r.tensor, "rel_diff": float(r.rel_diff)} for r in top.itertuples()],
             "mean_by_module": {m: float(by_module[m]) for m in _modules_in_order(list(by_module.index))},
             "mean_rel_diff": float(table.rel_diff.mean())}
  (out / "section.html").write_text(section_html(table, summary, png))
  return summary


__all__ = ["ROWS_PER_BLOCK", "heatmap_png", "run", "section_html", "tensor_group", "tensor_norms", "tensor_pairs",
           "weight_table"]
