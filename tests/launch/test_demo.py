"""The main job end to end: `python -m launch.demo` on its embedded default and on the base organism; flag errors."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The river runs past the old mill, and the miller counts his sacks of grain at dawn."


def _env(home):
  env = {**os.environ, "NEURODIFF_HOME": str(home), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return env


def _run(*args, home):
  return subprocess.run([sys.executable, "-m", "launch.demo", *args], cwd=ROOT, env=_env(home),
                        capture_output=True, text=True, timeout=300)


def _table(stdout):
  """The printed mean ‖x‖ per layer: the rows between the table's header and the first blank line."""
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.lstrip().startswith("layer")) + 1
  rows = lines[start:lines.index("", start)]
  return np.array([float(row.split()[1]) for row in rows]), [ast.literal_eval(row.split(None, 6)[6]) for row in rows]


def _hf_norms(ckpt):
  """Mean residual norm after each block but the last (HF hidden_states[1..n-1]) and the last position's argmax."""
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
  ids = torch.tensor([tok(TEXT)["input_ids"]])
  with torch.no_grad():
    out = hf(ids, output_hidden_states=True)
  # The last printed row is the un-normed final residual (HF's last hidden state is after the final norm).
  norms = [h[0].norm(dim=-1).mean().item() for h in out.hidden_states[1:-1]]
  return norms, hf.config.num_hidden_layers, tok.decode([int(out.logits[0, -1].argmax())])


def test_demo_prints_residual_norms_that_match_transformers_and_explains_them(tmp_path):
  proc = _run(home=tmp_path)
  assert proc.returncode == 0, proc.stderr
  printed, _ = _table(proc.stdout)
  ckpt = tmp_path / "random_gemma2_seed0"
  assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
  expected, layers, _ = _hf_norms(ckpt)
  assert len(printed) == layers
  np.testing.assert_allclose(printed[:-1], expected, atol=2e-3)
  for column in ("mean‖x‖", "std‖x‖", "max|x|", "lens top token"):  # every column is explained
    assert sum(column in l for l in proc.stdout.splitlines()) == 2, column
  assert "(random weights)" in proc.stdout and "--config=demo:organism" in proc.stdout


def test_demo_without_torch_prints_no_pytorch_warning(tmp_path):
  hide_torch = "import sys; sys.modules['torch'] = None; "
  # Control: with torch hidden this way, importing transformers does print the notice.
  control = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"], cwd=ROOT, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=120)
  assert "PyTorch was not found" in control.stderr
  proc = subprocess.run([sys.executable, "-c", hide_torch + "import runpy; sys.argv = ['launch.demo']; "
                         "runpy.run_module('launch.demo', run_name='__main__', alter_sys=True)"],
                        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "PyTorch was not found" not in proc.stderr + proc.stdout and "lens top token" in proc.stdout


def test_demo_on_the_base_organism(organisms):
  config, paths = organisms
  proc = _run("--config=demo:organism,small", home=config.home)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"model: {paths['base']}\n" in proc.stdout and "random weights" not in proc.stdout
  assert "organisms: using the small-scale base model" in proc.stdout  # reused, not rebuilt
  printed, lens = _table(proc.stdout)
  expected, layers, next_token = _hf_norms(paths["base"])
  assert len(printed) == layers
  np.testing.assert_allclose(printed[:-1], expected, rtol=1e-3)
  assert lens[-1] == next_token  # the last layer's lens is the trained model's own prediction


def test_unknown_config_name_lists_known_configs(tmp_path):
  proc = _run("--config=no_such_config", home=tmp_path)
  assert proc.returncode == 2
  assert "unknown config 'no_such_config'" in proc.stderr and "demo" in proc.stderr


def test_misspelt_override_is_refused(tmp_path):
  proc = _run("--config.layrs=3", home=tmp_path)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "no field 'layrs' (did you mean layers?)" in proc.stderr
