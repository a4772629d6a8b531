"""Test setup: 8 forced host devices (set before JAX starts), checked jaxtyping annotations, tiny HF checkpoints."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jaxtyping  # noqa: E402
import pytest  # noqa: E402

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
