"""launch.dashboard: the errors a newcomer meets first (no results, a port in use) end it with one line; a stop
signal stops the server it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from launch.dashboard import check_port

REPO = Path(__file__).resolve().parents[2]


def _launch(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "launch.dashboard", *args], cwd=REPO, capture_output=True, text=True, check=False,
                        timeout=120)


def _tiny_results(root: Path) -> Path:
  """A results root with one diff result (pair.json is all discovery needs)."""
  d = root / "diffs" / "x" / "diff"
  d.mkdir(parents=True)
  (d / "pair.json").write_text(json.dumps({"format_version": 1, "base": "b", "finetuned": "f"}))
  return root


def test_missing_and_empty_results_name_the_demo(tmp_path):
  for path in (tmp_path / "missing", tmp_path):
    out = _launch(f"--config.results={path}")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "python -m launch.demo" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in out.stderr


def test_port_in_use_names_the_port_and_the_flag(tmp_path):
  root = _tiny_results(tmp_path / "root")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    out = _launch(f"--config.results={root}", f"--config.port={port}")
  assert out.returncode == 2, out.stderr
  assert f"port {port}" in out.stderr and "--config.port=N" in out.stderr and "Traceback" not in out.stderr


def test_check_only_prints_the_streamlit_command(tmp_path):
  root = _tiny_results(tmp_path / "root")
  with socket.socket() as s:  # a port free now
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = _launch(f"--config.results={root}", f"--config.port={port}", "--config.check_only=True")
  assert out.returncode == 0, out.stderr
  assert "0 crosscoder run(s), 1 diff result(s)" in out.stdout
  assert f"--server.port {port} --server.address 127.0.0.1" in out.stdout and f"-- --results {root}" in out.stdout
  assert "--client.toolbarMode minimal" in out.stdout  # no "Deploy" button


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _refused(port: int) -> bool:
  """Whether a connection to 127.0.0.1:port is refused (nothing listens)."""
  with socket.socket() as s:
    s.settimeout(1)
    try:
      s.connect(("127.0.0.1", port))
    except ConnectionRefusedError:
      return True
    except OSError:
      return False
  return False


def _children(pid: int) -> list[int]:
  """The processes whose parent is `pid` (Linux /proc), for the server's pid."""
  out = []
  for d in Path("/proc").iterdir():
    if d.name.isdigit():
      try:
        if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
          out.append(int(d.name))
      except (OSError, IndexError, ValueError):
        continue
  return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_the_server_and_frees_the_port(tmp_path, sig):
  """`kill PID` (SIGTERM) or Ctrl-C (SIGINT) to the launcher: it and its Streamlit server are gone and the port
  is free within 5 s (a new dashboard could start there)."""
  root = _tiny_results(tmp_path / "root")
  port = _free_port()
  log = open(tmp_path / "server.log", "w")  # noqa: SIM115  written by the launcher until it exits
  proc = subprocess.Popen([sys.executable, "-m", "launch.dashboard", f"--config.results={root}",
                           f"--config.port={port}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  server = []
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, (tmp_path / "server.log").read_text()
      try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      assert time.monotonic() < deadline, f"no answer on port {port}: {(tmp_path / 'server.log').read_text()}"
      time.sleep(0.5)
    server = _children(proc.pid)
    assert server, "the launcher serves through a child process"
    sent = time.monotonic()
    proc.send_signal(sig)
    while not (proc.poll() is not None and _refused(port)) and time.monotonic() - sent < 5:
      time.sleep(0.05)
    took = time.monotonic() - sent
    assert proc.poll() is not None, f"the launcher still runs {took:.1f} s after {sig.name}"
    assert _refused(port), f"port {port} still answers {took:.1f} s after {sig.name}"
    check_port("127.0.0.1", port)  # what a new launch.dashboard on this port checks first: no ConfigError
    alive = [p for p in server if Path(f"/proc/{p}").exists() and "Z" not in
             Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:1]]
    assert not alive, f"server process(es) {alive} outlived the launcher"
    assert proc.returncode == 128 + sig, (proc.returncode, (tmp_path / "server.log").read_text())
    assert f"dashboard: stopped ({sig.name})" in (tmp_path / "server.log").read_text()
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    for p in server:  # never leave a server behind, whatever failed
      try:
        os.kill(p, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    log.close()
