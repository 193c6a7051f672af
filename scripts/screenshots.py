"""Take the README's screenshots of the dashboard on the digits demo: ``python scripts/screenshots.py``.

Starts ``streamlit run app/streamlit_app.py`` on a free localhost port, drives it with Playwright on Debian's
Chromium (``/usr/bin/chromium``; no browser is downloaded) through Model & data → CKA heatmap → Removal scores →
Prune (the default: ≥ 30 % fewer MACs, ``quick`` recovery) → Compare (its defaults) → Export, and writes one PNG per
page to ``assets/screenshots/`` (or ``--out``). Runs offline on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ("model_data", "heatmap", "scores", "prune", "compare", "export")
CHROMIUM = "/usr/bin/chromium"
LONG = 600_000  # ms: pruning and robustness on a busy CPU


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "localhost", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("streamlit did not start within 90 s")


def _settle(page) -> None:
    """Wait until no background job is shown and the page stopped changing."""
    page.wait_for_timeout(800)
    deadline = time.monotonic() + LONG / 1000
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:  # three quiet checks in a row
        busy = page.get_by_role("button", name="Cancel").count() + page.get_by_text("Busy:").count()
        quiet = 0 if busy else quiet + 1
        page.wait_for_timeout(500)
    page.wait_for_timeout(1000)


def _go(page, title: str) -> None:
    page.get_by_test_id("stSidebar").get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
    _settle(page)


def _number(page, label: str, value: str) -> None:
    box = page.get_by_label(label)
    box.fill(value)
    box.press("Enter")
    page.wait_for_timeout(1000)


def _shot(page, out: Path, name: str, locator=None, height: int | None = None) -> None:
    """Screenshot the window (Streamlit scrolls inside its main block, so a taller page needs a taller window)."""
    path = out / f"{name}.png"
    size = page.viewport_size
    if height is not None:
        page.set_viewport_size({"width": size["width"], "height": height})
        page.wait_for_timeout(1500)
    if locator is not None:  # that element at the top of the window
        locator.first.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(800)
    page.screenshot(path=str(path), type="png")
    if height is not None:
        page.set_viewport_size(size)
    print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size // 1024} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets" / "screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    parser.add_argument("--only", default=",".join(PAGES), metavar="PAGES",
                        help=f"comma-separated pages to shoot (default all: {','.join(PAGES)}); the pages before "
                             "one still run, without screenshots, when it needs their results (compare/export "
                             "need a pruning run)")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(PAGES)
    if unknown:
        raise SystemExit(f"--only: unknown page(s) {', '.join(sorted(unknown))}; choose from {', '.join(PAGES)}")
    last = max(PAGES.index(x) for x in only)
    needs_prune = last >= PAGES.index("compare")
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = _start(port)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://localhost:{port}", wait_until="domcontentloaded")
            page.get_by_text("Active: digits_resnet").wait_for(timeout=120_000)
            page.get_by_text("Test accuracy (top-1)").wait_for(timeout=LONG)
            _settle(page)
            if "model_data" in only:
                _shot(page, args.out, "model_data", height=1640)

            if "heatmap" in only:
                _go(page, "CKA heatmap")
                page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=LONG)
                _shot(page, args.out, "heatmap", page.get_by_role("heading", name="CKA heatmap"))
            if last < PAGES.index("scores"):
                return

            _go(page, "Removal scores")
            page.locator(".js-plotly-plot").first.wait_for(state="visible", timeout=LONG)
            if "scores" in only:  # the scores and the criteria comparison of the same page
                _shot(page, args.out, "scores", page.get_by_role("heading", name="Removal scores"))
                page.get_by_role("button", name="Compare the criteria").click()
                _settle(page)
                page.get_by_text("Kendall τ-b").first.wait_for(timeout=LONG)
                _shot(page, args.out, "criteria", page.get_by_role("heading", name="Compare criteria"))
            if last < PAGES.index("prune") and not needs_prune:
                return

            _go(page, "Prune")  # the default recovery (quick: 3 epochs of the demo's training split) takes seconds
            _settle(page)
            page.get_by_role("button", name="Prune", exact=True).click()
            page.get_by_role("heading", name="Result").wait_for(timeout=LONG)
            _settle(page)
            if "prune" in only:
                _shot(page, args.out, "prune", page.get_by_role("heading", name="Result"))
            if last < PAGES.index("compare"):
                return

            _go(page, "Compare")
            page.get_by_role("button", name="Measure latency and robustness").click()
            page.wait_for_timeout(1000)
            _settle(page)
            page.locator(".js-plotly-plot").nth(1).wait_for(state="visible", timeout=LONG)
            page.wait_for_timeout(1500)
            if "compare" in only:
                _shot(page, args.out, "compare", page.get_by_role("heading", name="Compare"))
                _shot(page, args.out, "robustness", page.locator(".js-plotly-plot").nth(1))
            if last < PAGES.index("export"):
                return

            _go(page, "Export")
            page.get_by_role("button", name="Prepare the files").click()
            page.get_by_role("button", name=re.compile(r"Download .*\.onnx")).wait_for(timeout=LONG)
            _settle(page)
            _shot(page, args.out, "export", page.get_by_role("heading", name="Export"))
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
