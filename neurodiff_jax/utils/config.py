"""Run-config helpers shared by the library and the launchers: the error type for a bad config."""

from __future__ import annotations


class ConfigError(ValueError):
  """A run config that cannot work (unknown field, wrong type, impossible value); the message names the fix."""


__all__ = ["ConfigError"]
