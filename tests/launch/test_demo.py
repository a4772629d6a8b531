"""The main job end to end: `python -m launch.demo` on the embedded default, and its flag errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, home):
  env = {**os.environ, "NEURODIFF_HOME": str(home), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.demo", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_demo_prints_residual_norms_that_match_transformers(tmp_path):
  proc = _run(home=tmp_path)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  table = lines[lines.index(next(l for l in lines if l.lstrip().startswith("layer"))) + 1:]
  printed = np.array([float(row.split()[1]) for row in table])  # mean ‖x‖ per layer

  ckpt = tmp_path / "random_gemma2_seed0"
  assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
  tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
  ids = torch.tensor([tok("The river runs past the old mill, and the miller counts his sacks of grain at dawn.")["input_ids"]])
  with torch.no_grad():
    hidden = hf(ids, output_hidden_states=True).hidden_states
  # Blocks 0..n-2 are hidden_states[1..n-1]; the last printed row is the un-normed final residual.
  expected = [h[0].norm(dim=-1).mean().item() for h in hidden[1:-1]]
  assert len(printed) == hf.config.num_hidden_layers
  np.testing.assert_allclose(printed[:-1], expected, atol=2e-3)


def test_unknown_config_name_lists_known_configs(tmp_path):
  proc = _run("--config=no_such_config", home=tmp_path)
  assert proc.returncode != 0
  assert "unknown config 'no_such_config'" in proc.stderr and "demo" in proc.stderr


def test_misspelt_override_is_refused(tmp_path):
  proc = _run("--config.layrs=3", home=tmp_path)
  assert proc.returncode != 0
  assert 'Did you mean "layers"' in proc.stderr
