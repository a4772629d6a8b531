"""Serve the dashboard: `python -m launch.dashboard --config.results=DIR` (Streamlit, http://127.0.0.1:8501).

Before starting it checks what a newcomer meets first: a results directory that is missing or holds no run
or diff (the message names `python -m launch.demo`) and a port already in use (the message names the port
and `--config.port=N`). Then it runs `python -m streamlit run neurodiff_jax/dashboard/app.py
--server.headless true --server.port PORT --server.address HOST --client.toolbarMode minimal -- --results DIR`
(and `--model-mesh DATA,MODEL` when `--config.model_mesh` is set: the Live page's models on a mesh) in a
subprocess (a subprocess rather than Streamlit's bootstrap API: the CLI is Streamlit's stable interface) and
waits for it. The toolbar is minimal: no "Deploy" button, which would offer to publish the results.

The server runs in its own process group. SIGTERM, SIGINT (Ctrl-C) or SIGHUP to the launcher stops it: the
signal is passed on to the group, and a server still running after STOP_GRACE_S is killed, so the port is free
within a few seconds and `kill PID` never leaves a server behind. On Linux the server also gets SIGTERM when the
launcher dies without a word (SIGKILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch import flags
from neurodiff_jax.dashboard.results import NoResults, discover
from neurodiff_jax.utils.config import ConfigError
from neurodiff_jax.utils.paths import neurodiff_home

APP = Path(__file__).resolve().parent.parent / "neurodiff_jax" / "dashboard" / "app.py"
STOP_GRACE_S = 3.0  # how long the server may take to stop after the signal before it is killed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


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
    if os.name == "posix":
      # As the server binds (Tornado sets it): the connections a stopped dashboard leaves in TIME_WAIT do not
      # count as in use, a listening program still does. (On Windows the option would let two servers share.)
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, int(port)))
    except OSError as e:
      raise ConfigError(f"port {port} on {host} is in use ({e.strerror}): another dashboard or program is serving "
                        f"there. Pick a free one with --config.port=N (e.g. --config.port={int(port) + 1}), or stop "
                        "the other server.") from None


def command(config: Any, results: Path) -> list[str]:
  """The Streamlit command line that serves the app on `results`."""
  mesh = tuple(config.get("model_mesh", ()))
  return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
          "--server.port", str(int(config.port)), "--server.address", str(config.host),
          "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal", "--", "--results", str(results)
          ] + (["--model-mesh", ",".join(str(int(v)) for v in mesh)] if mesh else [])


class _Stop(Exception):
  """A stop signal arrived (its number in `signum`)."""

  def __init__(self, signum: int) -> None:
    super().__init__(signum)
    self.signum = signum


def _death_signal() -> Callable[[], None] | None:
  """For the server's process, before exec: SIGTERM when the launcher dies (Linux's PR_SET_PDEATHSIG); else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
  except (OSError, AttributeError):  # no prctl: the signal handlers in `serve` still stop the server
    return None
  return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, signum: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> int:
  """Sends `signum` to the server's process group, waits up to `grace_s`, then kills the group; its exit code."""
  if proc.poll() is not None:
    return proc.returncode
  try:
    os.killpg(proc.pid, signum)
  except ProcessLookupError:
    pass
  try:
    return proc.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    return proc.wait()


def serve(cmd: list[str], env: dict[str, str]) -> int:
  """Runs the server `cmd` in its own process group until it exits or a stop signal arrives; an exit code."""
  # The launcher starts no threads, so running a function between fork and exec is safe here.
  proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_death_signal())  # noqa: PLW1509

  def on_signal(signum: int, frame: object) -> None:
    raise _Stop(signum)

  previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
  try:
    return proc.wait()
  except _Stop as e:
    for s in STOP_SIGNALS:  # a second Ctrl-C must not cut the stop short: the server is killed after the grace
      signal.signal(s, signal.SIG_IGN)
    # SIGTERM to the server for every stop signal: Streamlit stops on either, and the exit code says which came.
    stop(proc)
    print(f"dashboard: stopped ({signal.Signals(e.signum).name})", flush=True)
    return 128 + e.signum
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    stop(proc)  # never leave a server behind, whatever ended the wait


def main(config: Any) -> None:
  """Checks the results root and the port, then serves the dashboard until interrupted."""
  results = results_root(config)
  found = check_results(results)
  if tuple(config.get("model_mesh", ())):
    from neurodiff_jax.models.sharding import check_mesh_shape  # deferred: imports JAX, which the launcher needs not

    check_mesh_shape(tuple(config.model_mesh))
  check_port(config.host, config.port)
  cmd = command(config, results)
  print(f"dashboard: {found}", flush=True)
  print(f"dashboard: serving on http://{config.host}:{config.port} ({' '.join(cmd[1:])})", flush=True)
  if config.check_only:
    return
  sys.exit(serve(cmd, {**os.environ, "NEURODIFF_RESULTS": str(results)}))


__all__ = ["APP", "STOP_GRACE_S", "STOP_SIGNALS", "check_port", "check_results", "command", "main", "results_root",
           "serve", "stop"]


if __name__ == "__main__":
  flags.run(main, default_config="dashboard")
