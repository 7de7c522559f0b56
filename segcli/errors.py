"""One error family: every failure a user can cause is a SegcliError with a one-line message.

The CLI turns a SegcliError into ``segcli: error: <message>`` and an exit code; anything else is
treated as a bug (short message plus the path of a log holding the traceback).
"""

from __future__ import annotations

from pathlib import Path


class SegcliError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputError(SegcliError):
    """An input image is missing, unreadable, corrupt or of an unsupported shape."""


class EmptyImageError(InputError):
    """The image holds a single constant value: nothing to segment (a warning, not a failure)."""


class OutputError(SegcliError):
    """An output cannot be written (disk full, permission denied, read-only file system, ...)."""


class BundleError(SegcliError):
    """A model bundle is missing, malformed, of an unknown version or fails its checks."""


class UsageError(SegcliError):
    """Bad flags or a bad combination of options (exit code 2)."""

    exit_code = 2


class DeviceError(UsageError):
    """A device or backend was asked for that this machine cannot provide."""


class DatasetError(SegcliError):
    """A training dataset is malformed (missing mask, size mismatch, label out of range)."""


def crash_log(exc: BaseException) -> str:
    """Record a bug's traceback in the debug log file, or in a temporary file when there is none.

    Returns the words that end the user's one-line message ("this is a bug, traceback in PATH"); the
    CLI, the pipeline and batch workers all report bugs through this one function.
    """
    # lazy: only a crash needs them, and segcli.errors loads with `segcli --help`
    import logging
    import os
    import tempfile
    import traceback

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    log = logging.getLogger("segcli")
    files = [h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)]
    if files:
        log.error("internal error\n%s", tb)
        return f"this is a bug, traceback in {files[0]}"
    fd, name = tempfile.mkstemp(prefix="segcli-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(tb)
    return f"this is a bug, traceback in {name}"


def bug_message(exc: BaseException, path: object = None) -> str:
    """The one line for an unexpected exception: what happened, and where the traceback went."""
    where = f"{path}: " if path is not None else ""
    return f"{where}internal error ({type(exc).__name__}: {exc}); {crash_log(exc)}"
