"""Test setup: 8 forced host devices (set before JAX starts), checked jaxtyping annotations, tiny HF checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jaxtyping  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("NEURODIFF_TEST_TORCH_THREADS"):  # the reference's reduction order (tests/reduction_orders.py)
  import torch

  torch.set_num_threads(int(os.environ["NEURODIFF_TEST_TORCH_THREADS"]))

# Every jaxtyping annotation (dtype and shape) in these packages is checked at call time in the
# tests, by beartype. The hook must be in place before any test imports them.
import tests.typecheck  # noqa: E402,F401  (the hook looks the decorator up by name)

jaxtyping.install_import_hook(["neurodiff_jax.crosscoder", "neurodiff_jax.activations", "neurodiff_jax.analysis"],
                              "tests.typecheck.check")


@pytest.fixture
def hf_checkpoint(tmp_path):
  """Builds a random-weight `transformers` model from a config and saves it with save_pretrained."""
  import torch
  import transformers

  def build(config, name="model", seed=0, dtype=None):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if dtype is not None:
      model = model.to(dtype)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, str(path)

  return build


@pytest.fixture(scope="session")
def random_gemma2(tmp_path_factory):
  """A random-weight tiny Gemma 2 checkpoint (seed 0) with its trained BPE tokenizer, built once per session."""
  from neurodiff_jax.organisms.random_model import build_random_checkpoint

  return build_random_checkpoint(tmp_path_factory.mktemp("random_gemma2") / "gemma2", family="gemma2", seed=0)


@pytest.fixture(scope="session")
def random_gemma2_model(random_gemma2):
  """`random_gemma2` loaded (shared: tests only read it)."""
  from neurodiff_jax.models import load_model

  return load_model(random_gemma2)


@pytest.fixture(scope="session")
def organisms(tmp_path_factory):
  """{name: checkpoint dir} of the small-scale base and organisms, built through the library."""
  from configs.organisms import get_config
  from neurodiff_jax.organisms import build

  config = get_config("all,small")
  config.home = str(tmp_path_factory.mktemp("neurodiff_home"))
  paths = {"base": build.build_base(config)}
  for name in ("chat", "narrow", "false_fact", "taboo"):
    paths[name] = build.build_organism(config, name)
  return config, paths


def demo_overrides(home: str, root: str, store: str) -> dict[str, str]:
  """The smoke demo's config fields that put it in the test session's organism home, `root` and `store`."""
  return {"root": root, "organisms.home": home, "harvest.organisms.home": home, "diff.organisms.home": home,
          "harvest.out_dir": store}


@pytest.fixture(scope="session")
def demo_run(request, tmp_path_factory):
  """The smoke demo (`demo:small`) run once on the session's small organisms: (results root, config overrides).

  $NEURODIFF_TEST_DEMO_ROOT, when set, names an existing root instead (a quick loop on the dashboard); its
  overrides are then empty.
  """
  from pathlib import Path

  from configs.demo import get_config
  from neurodiff_jax.demo.pipeline import run_demo

  given = os.environ.get("NEURODIFF_TEST_DEMO_ROOT")
  if given:
    return Path(given), {}
  org_config, _ = request.getfixturevalue("organisms")  # only when built here: it trains the small organisms
  tmp = tmp_path_factory.mktemp("demo")
  overrides = demo_overrides(org_config.home, str(tmp / "results"), str(tmp / "store"))
  config = get_config("small")
  for field, value in overrides.items():
    *path, last = field.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = value
  run_demo(config, log=lambda m: None)
  return Path(overrides["root"]), overrides


@pytest.fixture(scope="session")
def demo_root(demo_run):
  """The smoke demo's results root (runs/, diffs/, report.html, demo.json)."""
  return demo_run[0]


@pytest.fixture(scope="session")
def gemma3_home(tmp_path_factory):
  """A $NEURODIFF_HOME shared by the real-model tests: the packaged Gemma 3 270M is converted into it once."""
  home = tmp_path_factory.mktemp("gemma3_home")
  old = os.environ.get("NEURODIFF_HOME")
  os.environ["NEURODIFF_HOME"] = str(home)
  try:
    from neurodiff_jax.models import resolve_checkpoint

    resolve_checkpoint("gemma-3-270m")
  finally:
    if old is None:
      os.environ.pop("NEURODIFF_HOME", None)
    else:
      os.environ["NEURODIFF_HOME"] = old
  return home
