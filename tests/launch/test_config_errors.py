"""What a new user types wrong: each is one line on stderr naming the field and the fix, exit 2, before any work."""

import re
from pathlib import Path

import pytest

from neurodiff_jax.crosscoder import synthetic

from tests.launch import ROOT, run_launcher


def _run(module, *args, home):
  return run_launcher(module, *args, home=home, timeout=300)


def _one_line_error(proc, home, *needles):
  """The run ended with status 2 and exactly one stderr line holding every needle, having written nothing."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert not Path(home).exists() or not any(Path(home).iterdir()), list(Path(home).rglob("*"))[:5]
  return lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--config.kk=3"], ["--config.kk", "no field 'kk'", "did you mean k?"]),
    (["--config.lrr=3"], ["no field 'lrr'", "did you mean lr?"]),
    (["--config.dead=3"], ["no field 'dead'", "dead_tokens", "dead_frac"]),
    (["--config.k=abc"], ["--config.k=abc", "config.k takes an integer (it is 16)", "'abc'"]),
    (["--config.lr=fast"], ["config.lr takes a number (it is 0.001)"]),
    (["--config=tiny_batchtop"], ["unknown config 'tiny_batchtop'", "did you mean tiny_batchtopk", "tiny_l1"]),
    (["--config=tiny_batchtopk:huge"], ["--config=tiny_batchtopk:huge", "unknown organism scale 'huge'"]),
    (["--config.k=5000"], ["config.k=5000 must be in [1, dict_size=1024]", "lower k or raise dict_size"]),
    (["--config.sparsity=batchtop"], ["config.sparsity='batchtop' is not one of", "did you mean 'batchtopk'"]),
    (["--config.harvest=harvest_tin"], ["unknown config 'harvest_tin'", "did you mean harvest_tiny"]),
    (["--config.store=/no/such/store", "--config.harvest="],
     ["no activation store at /no/such/store", "--config.out_dir=/no/such/store", "--config.harvest=NAME"]),
])
def test_train_config_errors(tmp_path, args, needles):
  home = tmp_path / "home"
  line = _one_line_error(_run("launch.train", *args, home=home), home, *needles)
  assert "Traceback" not in line and "\\n" not in line


def test_harvest_into_a_file_names_out_dir(tmp_path):
  f = tmp_path / "acts"
  f.write_text("")
  home = tmp_path / "home"
  _one_line_error(_run("launch.harvest", f"--config.out_dir={f}", home=home), home,
                  f"out_dir {f} is an existing file, but a store is a directory", "choose another out_dir")
  _one_line_error(_run("launch.harvest", f"--config.out_dir={f}/store", home=home), home,
                  f"out_dir {f}/store cannot be created: {f} is a file")
  _one_line_error(_run("launch.organism", "--config=organisms:chatt", home=home), home,
                  "config.organism='chatt' is not an organism (did you mean chat?)")


def test_sweep_checks_every_combination_before_training(tmp_path):
  truth = synthetic.plant_features(16, {"shared": 8}, seed=0)
  store = synthetic.write_planted_store(tmp_path / "store", truth, 1024)
  home = tmp_path / "home"
  base = ["--config=tiny_batchtopk", f"--config.store={store.root}", "--config.harvest=", "--config.layer=0"]
  _one_line_error(_run("launch.sweep", *base, "--sweep=k=8,5000", home=home), home,
                  "sweep run {'k': 5000}: config.k=5000 must be in [1, dict_size=1024]")
  _one_line_error(_run("launch.sweep", *base, "--sweep=kk=1,2", home=home), home,
                  "--sweep=kk=1,2: the config has no field 'kk' (did you mean k?)")
  _one_line_error(_run("launch.sweep", *base, "--sweep=k=8,eight", home=home), home,
                  "'eight' is not an integer, which config.k takes (it is 16)")


def test_show_prints_every_field_with_its_value_and_source_comment(tmp_path):
  home = tmp_path / "home"
  proc = _run("launch.train", "--config.show", "--config.k=8", "--config=tiny_batchtopk:small", home=home)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not home.exists()  # nothing was built, harvested or trained
  shown = {m.group(1): (m.group(2), m.group(3)) for m in
           re.finditer(r"^(\w+) = (.*?)(?:\s+# (.*))?$", proc.stdout, re.M)}
  from configs.tiny_batchtopk import get_config

  config = get_config("small")
  assert sorted(shown) == sorted(config.keys())
  assert shown["k"][0] == "8" and shown["dict_size"][0] == "512" and shown["name"][0] == "'tiny_batchtopk-small'"
  # Each field's comment is the one on the line that sets it in configs/_crosscoder.py.
  source = (ROOT / "configs" / "_crosscoder.py").read_text()
  for field in ("sparsity", "store", "nan_policy", "mesh"):
    line = next(l for l in source.splitlines() if l.strip().startswith(f"c.{field} = "))
    assert shown[field][1] == line.split("#", 1)[1].strip(), field
  organisms = _run("launch.organism", "--config=organisms:taboo,small", "--config.show", home=home)
  assert organisms.returncode == 0 and "organism = 'taboo'" in organisms.stdout
  assert "model.hidden_size = 64" in organisms.stdout and not home.exists()


@pytest.mark.parametrize("args, needles", [
    (["--config=agent:tabo"], ["unknown organism 'tabo'", "narrow, chat, false_fact, taboo, all"]),
    (["--config=agent:taboo,huge"], ["unknown demo scale 'huge'"]),
    (["--config.kind=lm"], ["config.kind='lm'", "did you mean llm", "offline"]),
    (["--config.kind=llm"], ["config.kind=llm needs --config.llm.base_url=URL", "NEURODIFF_AGENT_KEY"]),
    (["--config.agents=('diff','whitebox')"], ["config.agents has 'whitebox'", "blackbox, diff"]),
    (["--config.seeds=()"], ["config.seeds=() must be a non-empty tuple of integers"]),
    (["--config.budget.model_queries=0"], ["model_queries=0", "must both be at least 1"]),
    (["--config.grader.kind=llm"], ["config.grader.kind=llm needs an endpoint"]),
])
def test_agent_config_errors(tmp_path, args, needles):
  home = tmp_path / "home"
  _one_line_error(_run("launch.agent", *args, home=home), home, *needles)
