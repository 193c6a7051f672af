"""The dashboard in a real browser: `streamlit run` on a free localhost port, driven by Playwright on Chromium.

Uses Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``); never downloads a browser. Skipped with
the reason when Chromium or Playwright is missing. Set ``CKA_PRUNE_SCREENSHOTS=DIR`` to also save a screenshot
of the heatmap page there (``scripts/screenshots.py`` takes the full set).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[1]
# Upper bounds for events (nothing here sleeps a fixed time): generous, because a busy 2-core machine can be
# slow to import torch and streamlit; a healthy run takes a few seconds for each.
START_TIMEOUT = 240
PAGE_TIMEOUT = 180_000  # ms
READY_MARK = "URL:"  # streamlit prints "Local URL: http://localhost:PORT" once it serves

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerLog:
    """Reads the server's output in a thread (a full pipe would block the server) and signals its ready line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            if READY_MARK in line:
                self.ready.set()
        self.ended.set()

    def text(self) -> str:
        return "\n".join(self.lines[-60:])


def wait_ready(url: str, proc: subprocess.Popen, log: ServerLog, timeout: float) -> None:
    """Wait for the ready line (or the process ending), then check the health endpoint once."""
    threading.Thread(target=lambda: (proc.wait(), log.ready.set()), daemon=True).start()
    if not log.ready.wait(timeout):
        raise TimeoutError(f"streamlit printed no ready line within {timeout} s; its output:\n{log.text()}")
    if proc.poll() is not None:
        log.ended.wait(5)
        raise RuntimeError(f"streamlit exited with {proc.returncode}; its output:\n{log.text()}")
    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=30) as r:
        assert r.status == 200, f"health check answered {r.status}; server output:\n{log.text()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, ServerLog]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "localhost", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # runs keep checkpoint folders under the cache until they finish: a folder of this test's own
        env={**os.environ, "PYTHONUNBUFFERED": "1", "CKA_PRUNE_CACHE": str(tmp_path_factory.mktemp("cache"))},
    )
    url = f"http://localhost:{port}"
    log = ServerLog(proc)
    try:
        wait_ready(url, proc, log, START_TIMEOUT)
        yield url, log
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


def test_heatmap_renders_in_chromium(server: tuple[str, ServerLog], browser) -> None:
    url, log = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(url, wait_until="domcontentloaded")
        # the first page loads the digits demo and shows its blocks
        page.get_by_role("heading", name="Model & data").wait_for()
        page.get_by_text("Active: digits_resnet").wait_for()
        sidebar = page.get_by_test_id("stSidebar")
        assert "digits_resnet" in sidebar.inner_text()
        # to the heatmap page through the sidebar navigation; the heatmap is computed and drawn by plotly
        sidebar.get_by_role("link", name="CKA heatmap").click()
        page.get_by_role("heading", name="CKA heatmap").wait_for()
        plot = page.locator(".js-plotly-plot").first
        plot.wait_for(state="visible")
        plot.locator(".colorbar").first.wait_for(state="attached")
        assert plot.locator(".heatmaplayer, .hm").count() > 0 or plot.locator("image").count() > 0
        # square cells filling most of the page width, the colour bar right beside the matrix
        area = plot.locator(".nsewdrag").first.bounding_box()
        bar = plot.locator(".colorbar").first.bounding_box()
        main = page.get_by_test_id("stMainBlockContainer").bounding_box()
        assert area is not None and bar is not None and main is not None
        assert abs(area["width"] - area["height"]) <= 2, area
        assert area["width"] >= 0.5 * main["width"], (area, main)
        gap = bar["x"] - (area["x"] + area["width"])
        assert 0 <= gap <= 40, (area, bar)
        assert page.locator("[data-testid='stException']").count() == 0
        assert not errors, errors
        shots = os.environ.get("CKA_PRUNE_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(shots) / "heatmap.png"), full_page=False)
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- streamlit output ---\n{log.text()}") from exc
    finally:
        page.close()


def test_default_demo_flow_end_to_end(server: tuple[str, ServerLog], browser) -> None:
    """Issue 22: a new user's first minutes, each page's main action with its defaults — the demo loads, its
    accuracy, the heatmap and the scores appear by themselves, Prune (≥ 30 % fewer MACs, quick recovery), Compare
    ("Measure latency and robustness"), Export (every format) — with no exception shown or thrown in the page.
    The time of each step is printed (under a minute in all on an idle 2-core machine)."""
    url, log = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(PAGE_TIMEOUT)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()

    def step(name: str) -> None:
        marks.append((name, time.perf_counter() - start))
        assert page.locator("[data-testid='stException']").count() == 0, f"an exception is shown after {name}"
        assert not errors, f"{name}: {errors}"

    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("Test accuracy (top-1)").wait_for()
        step("model & data")
        sidebar = page.get_by_test_id("stSidebar")
        sidebar.get_by_role("link", name="CKA heatmap").click()
        page.get_by_role("heading", name="CKA heatmap").wait_for()
        page.locator(".js-plotly-plot").first.wait_for(state="visible")
        step("heatmap")
        sidebar.get_by_role("link", name="Removal scores").click()
        page.get_by_role("heading", name="Removal scores").wait_for()
        page.get_by_text(re.compile(r"calibration images, [0-9.]+ s\.")).wait_for()  # under the ranking
        step("scores")
        sidebar.get_by_role("link", name="Prune").click()
        page.get_by_text("The run: about").wait_for()  # the request and its estimate are ready
        page.get_by_role("button", name="Prune", exact=True).click()
        page.get_by_role("heading", name="Result").wait_for()
        step("prune")
        sidebar.get_by_role("link", name="Compare").click()
        page.get_by_role("button", name="Measure latency and robustness").click()
        page.get_by_text(re.compile(r"Robustness on \d+ test images, the seeded")).wait_for()  # under the plots
        step("compare")
        sidebar.get_by_role("link", name="Export").click()
        page.get_by_role("button", name="Prepare the files").click()
        page.get_by_role("button", name=re.compile(r"Download .*\.onnx")).wait_for()
        step("export")
    except Exception as exc:
        raise AssertionError(f"{exc}\nsteps done: {marks}\n--- streamlit output ---\n{log.text()}") from exc
    finally:
        page.close()
    print("demo flow (s since the page opened): " + ", ".join(f"{n} {t:.1f}" for n, t in marks))
