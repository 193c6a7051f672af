"""Long work in a background thread, so that the page stays usable and the work can be cancelled.

Streamlit reruns the whole script on every click, so work that takes more than a moment cannot live inside the
script run: a click on "Cancel" would only be seen after the work finished. Instead a :class:`Job` runs the
library call in a daemon thread with a :class:`~cka_analysis.progress.CancelToken` and a progress callback that
only writes plain attributes. The page shows the job with :func:`show_job`: an ``st.status`` box with a progress
bar and a Cancel button, inside an ``st.fragment(run_every=...)`` that polls the job and reruns the page once the
job has finished. One job runs at a time per session; its outcome (result, user error, unexpected exception) is
kept on the job until the page collects it.

Sessions share one machine, so jobs also wait in one **process-wide queue** (:data:`QUEUE`): at most
``CKA_PRUNE_DASHBOARD_JOBS`` jobs (default 1: a CPU has no room for two, and one job at a time keeps timings and
estimates honest) run at once, the others wait in order and see their position. A job waiting in the queue is
``queued`` (it counts as running for its session, and Cancel takes it out of the queue).

Nothing here runs in the thread except the library call itself: the thread never touches ``st.*``.

When the process exits (the server stops, a test ends) while a job still runs, :func:`stop_all` cancels every
live job and waits for its thread: a daemon thread still inside native torch code when the interpreter finalises
is torn down mid-call, and the process aborts ("terminate called without an active exception", exit 134).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch
from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx

from cka_analysis.device import is_out_of_memory
from cka_analysis.errors import Cancelled, CKAPruneError
from cka_analysis.metrics import format_duration
from cka_analysis.progress import CancelToken, Pace

JOB_KEY = "_job"
POLL_SECONDS = 0.5
SLOTS_ENV = "CKA_PRUNE_DASHBOARD_JOBS"
#: The progress messages that open a run's phases (``cka_analysis.workflow``'s ``_Runner``); the messages in
#: between (the trainer's steps, the evaluations) belong to the phase opened last.
PHASE_MARKERS = {"recovery": ("recovering",), "latency": ("timing the original",)}
#: The phase before the first marker: scoring, the evaluations, the removals.
FIRST_PHASE = "before recovery"


def run_phases(phases: dict[str, float]) -> list[tuple[str, float]]:
    """A run estimate's phases (``RunEstimate.phases``) in the order a run goes through them, for
    :attr:`Job.phases`: everything before the recovery, the recovery, the latency timing (those present)."""
    later = [(name, float(phases[name])) for name in PHASE_MARKERS if phases.get(name)]
    first = sum(phases.values()) - sum(sec for _, sec in later)
    return [(FIRST_PHASE, max(0.0, first)), *later]


#: True for CUDA (or any accelerator) out-of-memory errors: the library's one detector, shared with the CLI.
is_oom = is_out_of_memory


OOM_HINT = (
    "the device ran out of memory{what}. Lower the number of calibration images or evaluation samples, "
    "or pick the CPU in the sidebar, and try again"
)


@dataclass
class Job:
    """One piece of long work and what became of it.

    ``status`` is ``queued`` (waiting for a slot of the process-wide queue) → ``running`` → ``done`` |
    ``cancelled`` | ``error`` (a CKAPruneError or out of memory: ``error`` holds the message for the user) |
    ``crashed`` (an unexpected exception: ``exception`` holds it). ``estimate`` is the seconds the work was
    expected to take when it started (None when unknown); the progress bar counts down from it. ``phases`` (a
    run's: :func:`run_phases`) splits the estimate by phase, so that the time left follows the phase the work is
    in (progress fractions restart with every phase): see :meth:`seconds_left`.
    """

    name: str
    key: Any
    label: str
    token: CancelToken = field(default_factory=CancelToken)
    done: int = 0
    total: int | None = None
    message: str = ""
    status: str = "queued"
    estimate: float | None = None
    result: Any = None
    error: str | None = None
    exception: BaseException | None = None
    trace: str | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    thread: threading.Thread | None = None
    collected: bool = False
    phases: list[tuple[str, float]] | None = None
    phase: int = 0
    phase_started: float | None = None
    #: the pace of the current phase's count (a phase can start part-way: a recovery resumed from its checkpoint)
    pace: Pace = field(default_factory=Pace)

    @property
    def running(self) -> bool:
        """True until the job has an outcome (also while it waits in the queue)."""
        return self.status in ("queued", "running")

    @property
    def seconds(self) -> float:
        """Seconds since the job was submitted while it is queued, then since its work started."""
        return (self.finished or time.perf_counter()) - self.started

    def seconds_left(self) -> float | None:
        """Time left (None: unknown).

        Without phases: from the progress so far once there is some, else from the estimate. With phases: the
        phase the work is in, from its own progress (a marked phase: the recovery is one training loop) or its
        estimate, plus the estimates of the phases still to come, scaled by how much longer than estimated the
        finished phases (or the current one, once past its estimate) took. So the time left goes to zero with
        the work whichever way the estimate was wrong, instead of counting down a wrong total.
        """
        if self.status != "running":
            return None
        frac = self.fraction()
        elapsed = self.seconds
        if not self.phases:
            if frac and frac >= 0.02 and elapsed >= 1.0:
                return max(0.0, elapsed * (1.0 - frac) / frac)
            if self.estimate is not None:
                return max(0.0, self.estimate - elapsed)
            return None
        now = time.perf_counter()
        since = self.phase_started if self.phase_started is not None else self.started
        in_phase = now - since
        before = sum(sec for _, sec in self.phases[:self.phase])
        current = self.phases[self.phase][1]
        after = sum(sec for _, sec in self.phases[self.phase + 1:])
        scale = (since - self.started) / before if before > 0.5 else 1.0
        if current > 0 and in_phase > scale * current:
            scale = in_phase / current  # the current phase overran its scaled estimate already
        scale = min(10.0, max(0.1, scale))
        paced = self.pace.seconds_left(self.done, now, min_share=0.02, min_seconds=1.0) if self.phase > 0 else None
        left_here = paced if paced is not None else max(0.0, scale * current - in_phase)
        return left_here + scale * after

    def progress(self, done: int, total: int | None, message: str) -> None:
        """The progress callback handed to the library (called from the worker thread)."""
        if self.phases:
            self._follow_phase(str(message))
            self.pace.observe(done, total, time.perf_counter())
        self.done, self.total, self.message = int(done), total, str(message)

    def _follow_phase(self, message: str) -> None:
        """Move to the later phase whose marker opens ``message`` (phases are never revisited)."""
        text = message.lower()
        names = [name for name, _ in self.phases or []]
        for i in range(self.phase + 1, len(names)):
            if any(text.startswith(m) for m in PHASE_MARKERS.get(names[i], ())):
                self.phase, self.phase_started, self.pace = i, time.perf_counter(), Pace()
                return

    def fraction(self) -> float | None:
        if self.total:
            return max(0.0, min(1.0, self.done / self.total))
        return None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the thread ends (tests and scripts); True when it has ended."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running


class JobQueue:
    """A process-wide first-come, first-served queue: at most ``slots`` jobs run at once.

    Every session's worker thread calls :meth:`enter` before its work and :meth:`leave` after it; a job that is
    cancelled while it waits leaves the queue without running.
    """

    def __init__(self, slots: int = 1) -> None:
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots={slots!r} must be a positive integer ({SLOTS_ENV})")
        self.slots = slots
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[Job] = []

    def add(self, job: Job) -> None:
        """Put ``job`` at the end of the waiting line (``submit`` does, before its thread starts: the job's
        place is taken in submission order and its position is known as soon as ``submit`` returns)."""
        with self._cond:
            if job not in self._waiting:
                self._waiting.append(job)

    def enter(self, job: Job) -> bool:
        """Wait for a slot (joining the line unless :meth:`add` put ``job`` there); True when ``job`` may run
        now, False when it was cancelled while waiting."""
        with self._cond:
            if job not in self._waiting:
                self._waiting.append(job)
            try:
                while not (self._waiting[0] is job and len(self._running) < self.slots):
                    if job.token.cancelled:
                        return False
                    self._cond.wait(timeout=POLL_SECONDS)
                self._running.append(job)
                return True
            finally:
                self._waiting.remove(job)
                self._cond.notify_all()

    def leave(self, job: Job) -> None:
        """Free ``job``'s slot (a no-op when it never got one)."""
        with self._cond:
            if job in self._running:
                self._running.remove(job)
            self._cond.notify_all()

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None when ``job`` is not waiting."""
        with self._cond:
            return self._waiting.index(job) + 1 if job in self._waiting else None

    def running_labels(self) -> list[str]:
        """What the jobs holding the slots are doing (for the note a waiting session sees)."""
        with self._cond:
            return [j.label for j in self._running]


def _slots_from_env() -> int:
    raw = os.environ.get(SLOTS_ENV, "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"{SLOTS_ENV}={raw!r} must be a positive integer (jobs that may run at once)") from None


QUEUE = JobQueue(_slots_from_env())
#: Jobs whose thread may still run (see :func:`stop_all`); a finished job drops out when it is collected.
_LIVE: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()
#: How long :func:`stop_all` waits for a cancelled job to reach its next cancel check.
EXIT_WAIT_SECONDS = 60.0


def stop_all(timeout: float = EXIT_WAIT_SECONDS) -> list[str]:
    """Cancel every job that still runs and wait (up to ``timeout`` s in all) for its thread to end; returns the
    labels of the jobs still running after that. Registered with :mod:`atexit`: it runs before the interpreter
    tears down daemon threads, so none is left inside torch."""
    live = [job for job in list(_LIVE.values()) if job.thread is not None and job.thread.is_alive()]
    for job in live:
        job.token.cancel()
    deadline = time.monotonic() + timeout
    for job in live:
        job.thread.join(max(0.0, deadline - time.monotonic()))
    return [job.label for job in live if job.thread.is_alive()]


atexit.register(stop_all)


def _run(job: Job, fn: Callable[..., Any], args: tuple, kwargs: dict, queue: JobQueue) -> None:
    if not queue.enter(job):
        job.status, job.finished = "cancelled", time.perf_counter()
        return
    job.status, job.started = "running", time.perf_counter()
    try:
        job.result = fn(*args, progress=job.progress, cancel=job.token, **kwargs)
        job.status = "cancelled" if getattr(job.result, "cancelled", False) else "done"
    except Cancelled:
        job.status = "cancelled"
    except CKAPruneError as exc:
        job.status, job.error = "error", str(exc)
    except Exception as exc:
        if is_oom(exc):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            job.status, job.error = "error", OOM_HINT.format(what=f" while {job.label}")
        else:
            job.status, job.exception, job.trace = "crashed", exc, traceback.format_exc()
    finally:
        job.finished = time.perf_counter()
        queue.leave(job)


def current() -> Job | None:
    """The session's job (running or finished and not yet collected), if any."""
    return st.session_state.get(JOB_KEY)


def busy() -> bool:
    """True while a job of this session is running."""
    job = current()
    return job is not None and job.running


def submit(name: str, key: Any, label: str, fn: Callable[..., Any], *args: Any, estimate: float | None = None,
           queue: JobQueue | None = None, phases: list[tuple[str, float]] | None = None, **kwargs: Any) -> Job:
    """Queue ``fn(*args, progress=..., cancel=..., **kwargs)`` as job ``name`` in a background thread.

    The thread waits for a slot of ``queue`` (default: the process-wide :data:`QUEUE`), then runs. This does not
    touch the session state (:func:`start` does): scripts and tests use it directly.
    """
    job = Job(name=name, key=key, label=label, estimate=estimate, phases=phases)
    queue = queue or QUEUE
    queue.add(job)  # in line now, in submission order: the page that submitted it can show its position at once
    thread = threading.Thread(target=_run, args=(job, fn, args, kwargs, queue), name=f"cka-prune-{name}",
                              daemon=True)
    if get_script_run_ctx(suppress_warning=True) is not None:
        add_script_run_ctx(thread)  # lets st.cache_data inside fn use this session's runtime
    job.thread = thread
    _LIVE[id(job)] = job
    thread.start()
    return job


def start(name: str, key: Any, label: str, fn: Callable[..., Any], *args: Any, estimate: float | None = None,
          phases: list[tuple[str, float]] | None = None, **kwargs: Any) -> Job:
    """Run ``fn(*args, progress=..., cancel=..., **kwargs)`` in a background thread as this session's job ``name``.

    ``key`` identifies the inputs, so that a page shows a finished job's result only for the inputs it was
    started with; ``estimate`` (seconds, see ``dashboard.estimate``) lets the progress bar show the time left
    before the work reports progress; ``phases`` (:func:`run_phases`) lets the time left follow a run's phases.
    Refuses (RuntimeError) while another job of the session is running or
    queued: pages disable their buttons then.
    """
    if busy():
        raise RuntimeError("another job is running")
    job = submit(name, key, label, fn, *args, estimate=estimate, phases=phases, **kwargs)
    st.session_state[JOB_KEY] = job
    return job


def take(name: str, key: Any) -> Job | None:
    """The finished job ``name`` started for ``key``, marked as collected (None when there is none)."""
    job = current()
    if job is None or job.name != name or job.key != key or job.running:
        return None
    job.collected = True
    return job


def clear() -> None:
    """Forget the session's finished job (after its result was stored)."""
    job = current()
    if job is not None and not job.running:
        st.session_state[JOB_KEY] = None


def cancel() -> None:
    job = current()
    if job is not None and job.running:
        job.token.cancel()


def show_outcome(job: Job) -> None:
    """Show a finished job's error, crash or cancellation (nothing for success)."""
    if job.status == "error":
        st.error(job.error)
    elif job.status == "cancelled":
        st.warning(f"Cancelled: {job.label} (after {job.seconds:.1f} s).")
    elif job.status == "crashed":
        st.error(f"Unexpected error while {job.label}: {type(job.exception).__name__}: {job.exception}. "
                 "The session is still usable; the details below help to report it.")
        with st.expander("Error details"):
            st.exception(job.exception)


def show_running(name: str | None = None) -> bool:
    """Show the running job (``name``'s only, when given) with progress and Cancel; True when one is shown.

    The box is an ``st.fragment`` that reruns itself every POLL_SECONDS and reruns the whole page once the job
    has ended, so that the page renders the result.
    """
    job = current()
    if job is None or not job.running or (name is not None and job.name != name):
        return False
    _poller(job)
    return True


@st.fragment(run_every=POLL_SECONDS)
def _poller(job: Job) -> None:
    if not job.running:
        st.rerun(scope="app")
    with st.status(f"{job.label[:1].upper()}{job.label[1:]} …", state="running", expanded=True):
        _queue_note(job)
        _progress_bar(job)
        if job.token.cancelled:
            st.caption("Cancelling: the work stops at the next safe point …")
        elif st.button("Cancel", key=f"cancel_{job.name}", help="Stop at the next safe point; finished work is kept"):
            job.token.cancel()
            st.caption("Cancelling: the work stops at the next safe point …")


def _queue_note(job: Job) -> None:
    """For a queued job: its place in the process-wide queue and what is running meanwhile."""
    position = QUEUE.position(job) if job.status == "queued" else None
    if position is None:
        return
    others = QUEUE.running_labels()
    doing = f" ({'; '.join(others)})" if others else ""
    st.caption(f"Queued: position {position} — jobs run one at a time on this server; another session's job is "
               f"running{doing}. It starts by itself when its turn comes; Cancel takes it out of the queue.")


def progress_text(job: Job) -> str:
    """The progress line: message, elapsed time and, when known, the time left."""
    if job.status == "queued":
        return "waiting in the queue"
    left = job.seconds_left()
    tail = f" · about {format_duration(left)} left" if left is not None and left >= 1 else ""
    return f"{job.message or 'working'} — {job.seconds:.0f} s{tail}"


def _progress_bar(job: Job) -> None:
    frac = job.fraction()
    text = progress_text(job)
    if frac is None:
        if job.estimate and job.status == "running":  # no progress reported yet: the clock against the estimate
            st.progress(min(0.99, job.seconds / job.estimate), text=text)
        else:
            st.progress(0.0 if job.done == 0 else 0.5, text=text)
    else:
        st.progress(frac, text=f"{job.done}/{job.total} · {text}")


@st.fragment(run_every=POLL_SECONDS)
def _waiter(job: Job) -> None:
    if not job.running:
        st.rerun(scope="app")
    _progress_bar(job)


def show_busy_note(name: str) -> None:
    """A note where a run button is disabled because another job is running (progress, no second Cancel)."""
    job = current()
    if job is not None and job.running and job.name != name:
        st.info(f"Busy: {job.label} is running. Wait for it or cancel it where it was started.")
        _waiter(job)
