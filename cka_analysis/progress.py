"""Progress reporting and cooperative cancellation shared by every long-running function.

A progress callback has the signature ``progress(done, total, message)``; ``total`` may be None when unknown.
The CLI turns it into a bar on stderr, the dashboard into ``st.progress``. A :class:`CancelToken` is checked
between steps: long work stops at the next safe point and returns (or raises :class:`Cancelled`) with what it
finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Cancelled

ProgressFn = Callable[[int, "int | None", str], None]


def no_progress(done: int, total: int | None, message: str) -> None:
    """The default callback: report nothing."""


class CancelToken:
    """A thread-safe flag that a UI sets and a worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "work") -> None:
        if self._event.is_set():
            raise Cancelled(f"{what} was cancelled")


def check_cancel(token: CancelToken | None, what: str = "work") -> None:
    """Raise Cancelled when a token is given and set."""
    if token is not None:
        token.raise_if_cancelled(what)


@dataclass
class Pace:
    """The pace of one count (a training loop's steps) since its first report, for the time left.

    A count that starts part-way (a run resumed from its checkpoint) is paced from there, not from zero; a new
    count (another total, or one that went back: the next of several recoveries) starts afresh. Reports without
    a total are ignored. Used by the dashboard's jobs and the benchmarks' logs.
    """

    start: float | None = None
    done0: int = 0
    total: int | None = None
    last: int = 0

    def observe(self, done: int, total: int | None, now: float) -> None:
        """Take one report at time ``now`` (seconds, any monotonic clock)."""
        if total and (self.start is None or total != self.total or done < self.last):
            self.start, self.done0, self.total = now, int(done), int(total)
        if total:
            self.last = int(done)

    def seconds_left(self, done: int, now: float, *, min_share: float = 0.0, min_seconds: float = 0.0
                     ) -> float | None:
        """Seconds to the end of the count at the pace since its start; None before any progress, or before
        ``min_share`` of the count and ``min_seconds`` have passed since it started."""
        if self.start is None or not self.total:
            return None
        gained, elapsed = done - self.done0, now - self.start
        if gained <= 0 or gained / self.total < min_share or elapsed < min_seconds:
            return None
        return elapsed * max(0, self.total - done) / gained
