"""The served dashboard in a real headless Chromium (Playwright): a latent page renders, the Live page generates,
the URL follows the sidebar, an unknown name in the URL is refused on the page, the documented paths open.

The server is `python -m launch.dashboard` on the smoke demo's results root (`demo_root`), on a free port.
Chromium is Debian's (`shutil.which("chromium")`, via `executable_path`; never `playwright install`). In CI
(`$CI` set) a missing or unstartable Chromium fails these tests with the reason; elsewhere it skips them with
the reason printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120
PAGE_TIMEOUT_MS = 240_000  # first Live run loads both models and compiles their forwards


def _unavailable(reason: str) -> None:
  """Fail in CI (the browser test must run there), skip elsewhere; the reason is printed either way."""
  print(f"browser test: {reason}", file=sys.stderr)
  if os.environ.get("CI"):
    pytest.fail(f"browser test cannot run in CI: {reason}")
  pytest.skip(reason)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_root, tmp_path_factory):
  """The dashboard served by launch.dashboard on a free port: (base URL, results root); killed at teardown."""
  port = _free_port()
  log_path = tmp_path_factory.mktemp("dashboard") / "server.log"
  log = open(log_path, "w")  # noqa: SIM115  the server writes to it until teardown
  proc = subprocess.Popen([sys.executable, "-m", "launch.dashboard", f"--config.results={demo_root}",
                           f"--config.port={port}"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + START_TIMEOUT_S
    while True:
      if proc.poll() is not None:
        raise AssertionError(f"launch.dashboard exited with {proc.returncode} before serving: "
                             f"{log_path.read_text()[-2000:]}")
      try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        raise AssertionError(f"the dashboard did not answer on {url} within {START_TIMEOUT_S} s")
      time.sleep(0.5)
    yield url, Path(demo_root)
  finally:
    os.killpg(proc.pid, 15)  # launch.dashboard and its streamlit child
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser():
  """Headless Debian Chromium through Playwright's sync API."""
  exe = shutil.which("chromium")
  if exe is None:
    _unavailable("no `chromium` on PATH (Debian: apt-get install chromium)")
  try:
    from playwright.sync_api import sync_playwright
  except ImportError as e:
    _unavailable(f"playwright is not installed ({e}); pip install playwright")
  pw = sync_playwright().start()
  try:
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    try:
      b = pw.chromium.launch(executable_path=exe, headless=True, args=args + ["--disable-dev-shm-usage"])
    except Exception as e:  # noqa: BLE001  any launch failure is the reason to report
      _unavailable(f"chromium at {exe} did not start: {e}")
    yield b
    b.close()
  finally:
    pw.stop()


def _shown(token: str) -> str:
  """A token as the latent page draws it (newlines and tabs as symbols)."""
  return token.replace("\n", "↵").replace("\t", "⇥")


def _known_latent(root: Path, last: bool = False) -> tuple[str, int, pd.Series]:
  """(run name, latent, its rank-0 top example) of the first (`last`: last) analysed run with examples."""
  for run in sorted((root / "runs").iterdir(), reverse=last):
    path = run / "analysis" / "examples.parquet"
    if path.is_file():
      ex = pd.read_parquet(path)
      top = ex[ex["group"].astype(str) == "top"].sort_values(["latent", "rank"])
      if len(top):
        return run.name, int(top["latent"].iloc[0]), top.iloc[0]
  raise AssertionError(f"no run under {root}/runs has analysis/examples.parquet")


@pytest.mark.slow
def test_latent_page_renders_its_top_context_and_firing_token(server, browser):
  url, root = server
  run, latent, first = _known_latent(root)
  page = browser.new_page()
  try:
    page.goto(f"{url}/?page=latents&run={run}&latent={latent}", timeout=PAGE_TIMEOUT_MS)
    page.get_by_text(f"Latent {latent}", exact=True).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    firing = page.locator(".example .firing").first
    firing.wait_for(timeout=PAGE_TIMEOUT_MS)
    want = _shown(first["context_tokens"][first["context_index"]])
    assert firing.text_content() == want
    context = page.locator(".example").first.text_content()
    for tok in list(first["context_tokens"])[max(0, first["context_index"] - 3):first["context_index"]]:
      assert _shown(tok) in context
    style = firing.get_attribute("style") or ""
    assert "border" in style  # the firing token is boxed, not just coloured
  finally:
    page.close()


@pytest.mark.slow
def test_live_page_shows_both_models_generations(server, browser):
  url, root = server
  from neurodiff_jax.dashboard.live import LiveSession
  from neurodiff_jax.dashboard.views.live import model_pairs
  from neurodiff_jax.dashboard.results import discover

  prompt_text = "Tell me about the river."
  base, ft, _ = next(iter(model_pairs(discover(root)).values()))  # the page's default pair
  want = LiveSession(base, ft).generate(prompt_text, 32)  # the page's default: 32 new tokens, chat template if any
  page = browser.new_page()
  try:
    page.goto(f"{url}/?page=live", timeout=PAGE_TIMEOUT_MS)
    prompt = page.locator(".st-key-live_prompt textarea")
    prompt.wait_for(timeout=PAGE_TIMEOUT_MS)
    prompt.fill(prompt_text)
    page.locator(".st-key-live_submit button").click()
    for key, name, text in (("live_gen_base", "base", want.base), ("live_gen_ft", "ft", want.ft)):
      box = page.locator(f".st-key-{key}")
      box.wait_for(timeout=PAGE_TIMEOUT_MS)
      # The prompt as the models read it, then the continuation, then where generation stopped.
      shown = box.locator('[data-testid="stText"]').inner_text().strip()
      assert text.strip() and shown == text.strip(), (key, shown, text)
      assert prompt_text in box.locator(".live-prompt").inner_text()
      assert want.stop_text(name) in box.inner_text()
    page.get_by_text("Base model", exact=True).wait_for(timeout=10_000)
    page.get_by_text("Fine-tuned model", exact=True).wait_for(timeout=10_000)
    page.get_by_text("Next token", exact=True).wait_for(timeout=10_000)
  finally:
    page.close()


def _wait_url(page, ok: Callable[[str, dict[str, str]], bool], what: str, timeout_s: float = 60) -> tuple[str, dict]:
  """Polls the page's URL until `ok(path, query)`; (path, query). The app changes it with history.pushState.

  Read from the page itself: the sync API's `page.url` is only brought up to date while a Playwright call runs.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    href = page.evaluate("() => window.location.href")
    url = urllib.parse.urlsplit(href)
    query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    if ok(url.path, query):
      return url.path, query
    if time.monotonic() > deadline:
      raise AssertionError(f"{what}: the URL is still {href} after {timeout_s} s")
    page.wait_for_timeout(200)


def _sidebar_link(page, title: str):
  return page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True)


@pytest.mark.slow
def test_an_unknown_run_in_the_url_is_named_with_the_runs(server, browser):
  from neurodiff_jax.dashboard.results import discover

  url, root = server
  runs = [r.name for r in discover(root).runs]
  page = browser.new_page()
  try:
    page.goto(f"{url}/?page=overview&run=nosuchrun", timeout=PAGE_TIMEOUT_MS)
    page.get_by_text(f"run 'nosuchrun' not found; runs in this root: {', '.join(runs)}.").wait_for(
        timeout=PAGE_TIMEOUT_MS)
    assert page.get_by_test_id("stMetric").count() == 0  # no run's numbers in its place
    _wait_url(page, lambda path, q: path == "/run-overview" and q == {"page": "overview", "run": "nosuchrun"},
              "the refused run stays in the URL")
  finally:
    page.close()


@pytest.mark.slow
def test_sidebar_navigation_writes_the_url_and_keeps_the_run(server, browser):
  url, root = server
  run, latent, _ = _known_latent(root, last=True)  # not the first run, which a page falls back to
  page = browser.new_page()
  try:
    page.goto(f"{url}/?page=latents&run={run}&latent={latent}", timeout=PAGE_TIMEOUT_MS)
    page.get_by_text(f"Latent {latent}", exact=True).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    want = {"page": "latents", "run": run, "latent": str(latent)}
    _wait_url(page, lambda path, q: path == "/latent-browser" and q == want, "opening the latents page")
    overview = {"page": "overview", "run": run}  # the run carried over, the latent (not shown there) dropped
    _sidebar_link(page, "Overview").click()
    _wait_url(page, lambda path, q: path == "/run-overview" and q == overview, "after clicking Overview")
    page.get_by_role("heading", name="Overview").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    _sidebar_link(page, "Latents").click()  # the same run and latent as before, not the first run's
    page.get_by_text(f"Latent {latent}", exact=True).first.wait_for(timeout=PAGE_TIMEOUT_MS)
    _wait_url(page, lambda path, q: path == "/latent-browser" and q == want, "after clicking Latents again")
    _sidebar_link(page, "Overview").click()
    _wait_url(page, lambda path, q: path == "/run-overview" and q == overview, "after clicking Overview again")
    page.reload(timeout=PAGE_TIMEOUT_MS)  # a reload shows what the URL names: the overview, not the latents page
    page.get_by_role("heading", name="Overview").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    assert page.get_by_text(f"Latent {latent}", exact=True).count() == 0
    _wait_url(page, lambda path, q: path == "/run-overview" and q == overview, "after the reload")
  finally:
    page.close()


@pytest.mark.slow
def test_the_documented_path_opens_its_page_without_a_deploy_button(server, browser):
  url, _ = server
  page = browser.new_page()
  try:
    page.goto(f"{url}/run-overview", timeout=PAGE_TIMEOUT_MS)
    page.get_by_role("heading", name="Overview").first.wait_for(timeout=PAGE_TIMEOUT_MS)
    page.wait_for_timeout(5000)  # the "Page not found" dialog came a moment after the page had drawn
    assert page.get_by_text("Page not found").count() == 0
    _wait_url(page, lambda path, q: path == "/run-overview" and q.get("page") == "overview", "the overview's URL")
    assert page.get_by_role("button", name="Deploy").count() == 0
  finally:
    page.close()
