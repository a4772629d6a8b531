"""launch.dashboard: the errors a newcomer meets first (no results, a port in use) end it with one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

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
