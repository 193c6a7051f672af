"""Small rendering helpers shared by the pages: job-backed results, numbers, notes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from cka_analysis.figures import format_count

from . import jobs, state

MACS_NOTE = (
    "MACs = multiply-accumulate operations of one forward pass for one image (= FLOPs / 2; this is the number "
    "the pruning literature, the CKA paper included, calls “FLOPs”)."
)


def count(n: float | None) -> str:
    return format_count(n)


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f} %"


def job_result(kind: str, key: Any, label: str, make: Callable[[], Callable[..., Any]], *,
               button: str, auto: bool = False, help: str | None = None) -> Any:
    """The stored result of ``kind`` for ``key``, or the controls to compute it in a background job.

    Shows, in order: the stored result (returned); a finished job's outcome (stored and returned when it
    succeeded, else its error with a retry button); the running job with progress and Cancel; a button (or,
    with ``auto``, the job starts by itself). ``make()`` returns the callable the job runs.
    """
    res = state.result(kind, key)
    if res is not None:
        return res
    job = jobs.take(kind, key)
    if job is not None and job.status == "done":
        state.store(kind, key, job.result)
        return job.result
    if jobs.show_running(kind):
        return None
    failed = job is not None
    if failed:
        jobs.show_outcome(job)
    busy = jobs.busy()
    if busy:
        jobs.show_busy_note(kind)
    clicked = st.button("Retry" if failed else button, key=f"run_{kind}", type="primary", disabled=busy,
                        help=help)
    if (clicked or (auto and not failed)) and not busy:
        jobs.start(kind, key, label, make())
        jobs.show_running(kind)
    return None


def plotly(fig: Any, key: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
