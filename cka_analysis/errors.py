"""Exceptions that carry a message meant for the user.

Every error a user can cause (a bad argument, a missing folder, a checkpoint that does not fit) is raised as a
subclass of :class:`CKAPruneError`, so the CLI and the dashboard can show its message as one readable line and
carry on, while programming errors keep their tracebacks.
"""

from __future__ import annotations


class CKAPruneError(Exception):
    """Base class of every user-facing error raised by cka_analysis."""


class ConfigError(CKAPruneError, ValueError):
    """An argument or option has a value that cannot work; the message names it and the fix."""


class DataError(CKAPruneError):
    """A data source is missing, empty or unreadable; the message names the path and what was expected."""


class CheckpointError(CKAPruneError):
    """A weights file is unsafe, corrupt, or does not fit the chosen architecture."""


class BlockError(CKAPruneError, ValueError):
    """A block name is unknown, or a block cannot be removed."""


class DeviceError(CKAPruneError, RuntimeError):
    """The requested device is not available on this machine."""


class TargetError(CKAPruneError, ValueError):
    """A pruning target cannot be met with the removable blocks."""


class Cancelled(CKAPruneError):
    """Long work was stopped by the user; whatever finished before is kept by the caller."""


class DivergedError(CKAPruneError, RuntimeError):
    """Training's loss (or gradient) became NaN or infinite: the weights are no longer usable. The message names
    the step and the learning rate and what to change; nothing is returned as if it had worked."""
