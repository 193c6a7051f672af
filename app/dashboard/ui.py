"""Small rendering helpers shared by the pages: job-backed results, numbers, notes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from cka_analysis.errors import CKAPruneError
from cka_analysis.figures import format_count
from cka_analysis.metrics import Estimate

from . import estimate, jobs, state
from .estimate import Work

MACS_NOTE = (
    "MACs = multiply-accumulate operations of one forward pass for one image (= FLOPs / 2; this is the number "
    "the pruning literature, the CKA paper included, calls “FLOPs”)."
)


def count(n: float | None) -> str:
    return format_count(n)


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f} %"


def job_result(kind: str, key: Any, label: str, make: Callable[[], Callable[..., Any]], *,
               button: str, auto: bool = False, help: str | None = None, work: Work | None = None,
               more: str = "", seconds: float | None = None) -> Any:
    """The stored result of ``kind`` for ``key``, or the controls to compute it in a background job.

    Shows, in order: the stored result (returned); a finished job's outcome (stored and returned when it
    succeeded, else its error with a retry button); the running job with progress, time left and Cancel; the
    estimated time of ``work`` when it may exceed ~10 s (``more`` says which setting trades time for
    precision) and a button (or, with ``auto``, the job starts by itself — never when the estimate says it is
    long). ``seconds`` is an estimate made elsewhere (``workflow.estimate_run``), shown by the page itself, when
    there is no ``work``. ``make()`` returns the callable the job runs. A finished job's estimate and actual time
    are kept in the session's timing log (:func:`dashboard.state.log_timing`).
    """
    res = state.result(kind, key)
    if res is not None:
        return res
    job = jobs.take(kind, key)
    if job is not None and job.status == "done":
        state.store(kind, key, job.result)
        state.log_timing(kind, job.label, job.estimate, job.seconds)
        return job.result
    if jobs.show_running(kind):
        return None
    failed = job is not None
    if failed:
        jobs.show_outcome(job)
    busy = jobs.busy()
    if busy:
        jobs.show_busy_note(kind)
    if work is not None and not busy:
        est = _estimate(work)
        if est is not None:
            seconds = est.seconds
            estimate.show(est, work, more=more)
            auto = auto and est.seconds < estimate.LONG_SECONDS
    clicked = st.button("Retry" if failed else button, key=f"run_{kind}", type="primary", disabled=busy,
                        help=help)
    if (clicked or (auto and not failed)) and not busy:
        jobs.start(kind, key, label, make(), estimate=seconds)
        if not jobs.show_running(kind):  # it finished already (a cached result): show it now, not at the next click
            st.rerun()
    return None


def _estimate(work: Work) -> Estimate | None:
    """The estimate of ``work`` on the session's device; None (and nothing shown) when the probe itself fails."""
    try:
        with st.spinner("Timing a short probe of this model for the estimate (once per model and device) …"):
            return estimate.estimate(work, state.device())
    except (CKAPruneError, RuntimeError) as exc:  # e.g. the device is out of memory: the job will say so
        st.caption(f"No time estimate: the probe failed ({str(exc).splitlines()[0][:120]}).")
        return None


def plotly(fig: Any, key: str, *, own_size: bool = False) -> None:
    """Show a plotly figure: stretched to the page width, or at its own size with ``own_size`` (the CKA heatmap,
    whose width and height are set so that its cells are square and its colour bar sits beside it)."""
    st.plotly_chart(fig, key=key, config={"displaylogo": False}, width="content" if own_size else "stretch")


DEFAULT_ACTION_SECONDS = 45.0  # default sample sizes keep a default action under about a minute


COMPARE_ACTION_SECONDS = 10.0  # the Compare page's default measurement (every model): a click, not a wait


def fit_samples(a: state.Active, device: str, passes: float, *, low: int, high: int, step: int,
                overhead_images: int = 0, seconds: float = DEFAULT_ACTION_SECONDS) -> int:
    """The most images (a multiple of ``step`` within [``low``, ``high``]) whose work of ``passes`` forward-pass
    equivalents each, after ``overhead_images`` single forward passes of fixed work (e.g. latency timing), fits in
    ``seconds`` on ``device`` (``high`` when the probe fails)."""
    try:
        rate = estimate.seconds_per_image(a.model, a.model_key, device)
    except (CKAPruneError, RuntimeError):
        return high
    budget = max(0.0, seconds - rate * overhead_images)
    fits = int(budget / max(rate * passes, 1e-12))
    return high if fits >= high else min(high, max(low, fits // step * step))


def default_test_samples(a: state.Active, device: str) -> int:
    """How many test images the default accuracy uses: all of them when that fits in about 45 s on this
    device, else the most that do (a multiple of 100, at least 500) — ResNet-56 on a 2-core CPU gets a few
    thousand of CIFAR-10's 10,000."""
    return fit_samples(a, device, estimate.EVALUATE_PASSES, low=min(500, len(a.test)), high=len(a.test), step=100)


def accuracy_key(a: state.Active, device: str, samples: int) -> dict:
    """The result key of the test accuracy over ``samples`` test images (also read by the Compare page)."""
    return {"model": a.model_key, "data": a.test_key, "device": device, "samples": int(samples)}


def test_images(record: dict, split_size: int) -> tuple[int, int]:
    """(N, seed) of the test images a pruning record's accuracies were measured on (``workflow.eval_subset``)."""
    req = record["request"]
    n = req.get("eval_samples") or split_size
    return min(int(n), split_size), int(req.get("eval_seed", req.get("seed", 0)) or 0)


def test_samples(a: state.Active) -> int:
    """The number of test images the Model & data page's accuracy uses (its widget, or the default)."""
    return int(st.session_state.get("md_test_samples") or len(a.test))
