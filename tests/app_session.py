"""Driving a dashboard session in Streamlit's AppTest: run the script, then let its background job finish.

Shared by the dashboard tests (test_app.py, test_latency.py); not a test module itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

TIMEOUT = 240  # seconds one script run or one background job may take on a busy machine


def settle(at: AppTest, timeout: float = TIMEOUT) -> AppTest:
    """Run the script, then wait for the session's background job (if any) and rerun until it has finished."""
    t = time.perf_counter()
    try:
        return _settle(at, timeout)
    finally:
        print(f"settle {time.perf_counter() - t:.1f} s")


def _settle(at: AppTest, timeout: float) -> AppTest:
    at.run(timeout=timeout)
    for _ in range(50):
        job = at.session_state.get("_job")
        if job is None or (not job.running and job.collected):
            return at
        # a job that is running, or that finished before the page could show it (the run that started it ended
        # with a rerun request): wait, then run once more so that the page collects and renders the result
        assert job.wait(timeout), f"job {job.name} did not finish within {timeout} s"
        at.run(timeout=timeout)
    raise AssertionError("the app kept starting jobs")
