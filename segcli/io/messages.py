"""One-line, printable error text out of third-party exceptions raised on untrusted files."""

from __future__ import annotations

import logging

log = logging.getLogger("segcli")


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line: control characters escaped, whitespace collapsed, length capped.

    Corrupt headers end up inside library messages (tifffile quotes the ImageDescription), so the
    text may hold newlines or raw bytes that would break the one-line error contract.
    """
    text = " ".join(str(exc).split())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_reader_failure(path: object, exc: BaseException) -> None:
    """Keep the traceback of a library failure on a corrupt file in the debug log."""
    log.debug("reader failed on %s", path, exc_info=(type(exc), exc, exc.__traceback__))
