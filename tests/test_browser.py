"""The dashboard in a real browser: `streamlit run` on a free localhost port, driven by Playwright on Chromium.

Uses Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``); never downloads a browser. Skipped with
the reason when Chromium or Playwright is missing. Set ``CKA_PRUNE_SCREENSHOTS=DIR`` to also save a screenshot
of the heatmap page there (``scripts/screenshots.py`` takes the full set).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{out}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout} s")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "localhost", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://localhost:{port}"
    try:
        wait_healthy(url, proc, START_TIMEOUT)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def test_heatmap_renders_in_chromium(server: str, browser) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server, wait_until="domcontentloaded")
    # the first page loads the digits demo and shows its blocks
    page.get_by_role("heading", name="Model & data").wait_for(timeout=60_000)
    page.get_by_text("Active: digits_resnet").wait_for(timeout=60_000)
    sidebar = page.get_by_test_id("stSidebar")
    assert "digits_resnet" in sidebar.inner_text()
    # to the heatmap page through the sidebar navigation; the heatmap is computed and drawn by plotly
    sidebar.get_by_role("link", name="CKA heatmap").click()
    page.get_by_role("heading", name="CKA heatmap").wait_for(timeout=30_000)
    plot = page.locator(".js-plotly-plot").first
    plot.wait_for(state="visible", timeout=60_000)
    assert plot.locator(".heatmaplayer, .hm").count() > 0 or plot.locator("image").count() > 0
    assert page.locator("[data-testid='stException']").count() == 0
    assert not errors, errors
    shots = os.environ.get("CKA_PRUNE_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(Path(shots) / "heatmap.png"), full_page=False)
    page.close()
