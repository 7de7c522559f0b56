"""Atomic output files: a crash or a failing writer never leaves a half-written mask under its final name.

Outputs are first written to a hidden temporary file in the destination folder (same file system, so
``os.replace`` is atomic) whose name keeps the real extension, because SimpleITK, tifffile and Pillow
pick the output format from it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Extensions made of two suffixes that writers only recognise whole.
_DOUBLE_EXTENSIONS = (".nii.gz", ".ome.tif", ".ome.tiff")


def split_extension(name: str) -> tuple[str, str]:
    """Split ``name`` into stem and extension, treating ``.nii.gz`` and ``.ome.tif`` as one extension."""
    lower = name.lower()
    for ext in _DOUBLE_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


def partial_name(final: Path) -> str:
    """A hidden name that cannot be mistaken for a final output but keeps the real extension."""
    stem, ext = split_extension(final.name)
    return f".{stem}.partial-{os.getpid()}-{secrets.token_hex(4)}{ext}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable; not every platform or file system allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success move it into place, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / partial_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced no file at {tmp}")
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


class OutputLock:
    """An advisory lock beside an output (``.NAME.lock``), so two processes never compute the same mask.

    ``acquire()`` never waits: False means another process holds it (the input is skipped). The lock
    file is removed on ``release()``. Usable as a context manager.
    """

    def __init__(self, final: Path) -> None:
        self.path = Path(final).with_name(f".{Path(final).name}.lock")
        self._fh: Any = None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is None:
            return
        import fcntl

        try:
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still held: a waiting process then locks a fresh file
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        finally:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
