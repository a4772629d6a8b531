"""Launcher tests: each runs `python -m launch.X` as a new user would, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_launcher(module: str, *args: str, home, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root on one CPU device, with `$NEURODIFF_HOME=home`."""
  env = {**os.environ, "NEURODIFF_HOME": str(home), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
