"""Builds the small-scale base model and all four organisms once per test session."""

import pytest


@pytest.fixture(scope="session")
def organisms(tmp_path_factory):
  """{name: checkpoint dir} of the small-scale base and organisms, built through the library."""
  from configs.organisms import get_config
  from neurodiff_jax.organisms import build

  config = get_config("all,small")
  config.home = str(tmp_path_factory.mktemp("neurodiff_home"))
  # The chat organism does not yet reach 90% refusals at this scale (issue 3 stays open): not built here.
  paths = {"base": build.build_base(config)}
  for name in ("narrow", "false_fact", "taboo"):
    paths[name] = build.build_organism(config, name)
  return config, paths
