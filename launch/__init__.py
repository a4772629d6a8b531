"""Thin absl entry points: they parse flags and call the library."""

import logging as _logging


class _NoTorchNotice(_logging.Filter):
  """Drops transformers' "PyTorch was not found" notice: the launchers use it for tokenizers only, never torch."""

  def filter(self, record: _logging.LogRecord) -> bool:
    return "PyTorch was not found" not in record.getMessage()


# Installed before anything imports transformers (a launcher module imports this package first).
_logging.getLogger("transformers").addFilter(_NoTorchNotice())
