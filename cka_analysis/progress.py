"""Progress reporting and cooperative cancellation shared by every long-running function.

A progress callback has the signature ``progress(done, total, message)``; ``total`` may be None when unknown.
The CLI turns it into a bar on stderr, the dashboard into ``st.progress``. A :class:`CancelToken` is checked
between steps: long work stops at the next safe point and returns (or raises :class:`Cancelled`) with what it
finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

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
