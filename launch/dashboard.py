"""Serve the dashboard: `python -m launch.dashboard --config.results=DIR` (Streamlit, http://127.0.0.1:8501).

Before starting it checks what a newcomer meets first: a results directory that is missing or holds no run
or diff (the message names `python -m launch.demo`) and a port already in use (the message names the port
and `--config.port=N`). Then it runs `python -m streamlit run neurodiff_jax/dashboard/app.py
--server.headless true --server.port PORT --server.address HOST -- --results DIR` in a subprocess (a
subprocess rather than Streamlit's bootstrap API: the CLI is Streamlit's stable interface, and Ctrl-C
reaches the server as usual) and waits for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from launch import flags
from neurodiff_jax.dashboard.results import NoResults, discover
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.paths import neurodiff_home

APP = Path(__file__).resolve().parent.parent / "neurodiff_jax" / "dashboard" / "app.py"


def results_root(config: Any) -> Path:
  """The results root the config names ("" = launch.demo's default root)."""
  return Path(config.results).expanduser() if config.results else neurodiff_home() / "demo" / "default"


def check_results(path: Path) -> str:
  """A one-line description of what `path` holds; ConfigError naming `python -m launch.demo` when nothing."""
  try:
    root = discover(path)
  except NoResults as e:
    raise ConfigError(f"{e} (--config.results={path})") from None
  return f"{len(root.runs)} crosscoder run(s), {len(root.diffs)} diff result(s) in {root.path}"


def check_port(host: str, port: int) -> None:
  """ConfigError naming the port and `--config.port=N` when something already listens on host:port."""
  if not 0 < int(port) < 65536:
    raise ConfigError(f"--config.port={port} is not a TCP port; give one in 1..65535, e.g. --config.port=8501.")
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind((host, int(port)))
    except OSError as e:
      raise ConfigError(f"port {port} on {host} is in use ({e.strerror}): another dashboard or program is serving "
                        f"there. Pick a free one with --config.port=N (e.g. --config.port={int(port) + 1}), or stop "
                        "the other server.") from None


def command(config: Any, results: Path) -> list[str]:
  """The Streamlit command line that serves the app on `results`."""
  return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
          "--server.port", str(int(config.port)), "--server.address", str(config.host),
          "--browser.gatherUsageStats", "false", "--", "--results", str(results)]


def main(config: Any) -> None:
  """Checks the results root and the port, then serves the dashboard until interrupted."""
  results = results_root(config)
  found = check_results(results)
  check_port(config.host, config.port)
  cmd = command(config, results)
  print(f"dashboard: {found}", flush=True)
  print(f"dashboard: serving on http://{config.host}:{config.port} ({' '.join(cmd[1:])})", flush=True)
  if config.check_only:
    return
  proc = subprocess.Popen(cmd, env={**os.environ, "NEURODIFF_RESULTS": str(results)})
  try:
    sys.exit(proc.wait())
  except KeyboardInterrupt:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()


__all__ = ["APP", "check_port", "check_results", "command", "main", "results_root"]


if __name__ == "__main__":
  flags.run(main, default_config="dashboard")
