"""`python -m launch.diff` end to end on a tiny random pair: every method, the report, reuse, errors."""

from __future__ import annotations

import json

import pytest

from tests.diffing.conftest import tiny_pair_dirs  # noqa: F401,F811  (the fixture)
from tests.launch import run_launcher

FAST = ("--config.max_len=32", "--config.max_documents=32", "--config.adl.num_documents=32",
        "--config.adl.steering_tokens=8", "--config.logit_diff.new_tokens=8", "--config.amplification.new_tokens=8",
        "--config.sae.steps=40", "--config.sae.dict_size=128", "--config.sae.batch_size=128",
        "--config.patching.num_documents=16")


@pytest.mark.slow
def test_diff_runs_every_method_and_reuses_them(tiny_pair_dirs, tmp_path):
  base, ft, data = tiny_pair_dirs
  out = tmp_path / "res"
  args = ("--config=diff", f"--config.base_model={base}", f"--config.finetuned_model={ft}",
          f"--config.datasets=('{data}',)", f"--config.out_dir={out}", *FAST)
  proc = run_launcher("launch.diff", *args, home=tmp_path / "home", timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads((out / "diff" / "summary.json").read_text())
  assert set(summary) == {"weights", "adl", "kl", "logit_diff", "amplification", "norms", "pca", "sae", "patching"}
  page = (out / "report.html").read_text()
  assert page.count("<h2") >= 9 and "data:image/png;base64," in page and 'src="http' not in page
  for name in summary:
    assert (out / "diff" / name / "section.html").is_file() and (out / "diff" / name / "done.json").is_file()
  again = run_launcher("launch.diff", *args, home=tmp_path / "home", timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("reusing") == 9


def test_diff_errors_are_one_line(tiny_pair_dirs, tmp_path):
  base, ft, data = tiny_pair_dirs
  common = (f"--config.base_model={base}", f"--config.finetuned_model={ft}", f"--config.datasets=('{data}',)",
            f"--config.out_dir={tmp_path / 'res'}")
  proc = run_launcher("launch.diff", "--config=diff", *common, "--config.methods=('adl',)", "--config.adl.layers=(1.5,)",
                      home=tmp_path / "home", timeout=300)
  assert proc.returncode == 2 and "outside [0, 1]" in proc.stderr, proc.stderr[-2000:]
  proc = run_launcher("launch.diff", "--config=diff", *common, "--config.methods=('adl',)", "--config.adl.positions=500",
                      home=tmp_path / "home", timeout=300)
  assert proc.returncode == 2 and "500" in proc.stderr, proc.stderr[-2000:]


def test_a_model_that_is_not_a_checkpoint_or_organism_is_one_line(tmp_path):
  """Named before any model work: an unknown organism (with the valid ones), a directory that is no HF checkpoint."""
  proc = run_launcher("launch.diff", "--config=diff:nosuch", home=tmp_path / "home", timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = proc.stderr.strip().splitlines()[-1]
  assert "no organism 'nosuch'" in line and "organism:narrow" in line and "Traceback" not in proc.stderr
  plain = tmp_path / "plain"
  plain.mkdir()
  (plain / "notes.txt").write_text("not a model")
  proc = run_launcher("launch.diff", "--config=diff", f"--config.base_model={plain}",
                      f"--config.finetuned_model={plain}", home=tmp_path / "home", timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "is not a Hugging Face checkpoint directory (it has no config.json)" in proc.stderr
