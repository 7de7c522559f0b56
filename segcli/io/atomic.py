"""Atomic output files: a crash or a failing writer never leaves a half-written mask under its final name.

Outputs are first written to a hidden temporary file in the destination folder (same file system, so
``os.replace`` is atomic) whose name keeps the real extension, because SimpleITK, tifffile and Pillow
pick the output format from it.
"""

from __future__ import annotations

import contextlib
import errno
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


#: Most file systems allow 255 bytes per name; the temporary name must fit whenever the final one does.
NAME_MAX = 255


def partial_name(final: Path) -> str:
    """A hidden name that cannot be mistaken for a final output but keeps the real extension.

    The stem is shortened when needed, so a long but valid output name never fails because of the
    temporary name's extra characters.
    """
    stem, ext = split_extension(final.name)
    tag = f".partial-{os.getpid()}-{secrets.token_hex(4)}{ext}"
    room = NAME_MAX - 1 - len(tag.encode())
    while len(os.fsencode(stem)) > room:  # the file system's bytes: a non-UTF-8 name holds surrogates
        stem = stem[:-1]
    return f".{stem}{tag}"


#: errno → words for a user: operating-system failures are the user's situation, not segcli bugs.
OS_ERRORS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large (a file-size limit is in force)",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EIO: "input/output error",
    errno.ENXIO: "no such device",
    errno.ETXTBSY: "file busy",
}


def os_error_words(exc: BaseException) -> str | None:
    """The user's words for an OSError segcli cannot fix (None for anything else)."""
    if isinstance(exc, OSError) and exc.errno in OS_ERRORS:
        return OS_ERRORS[exc.errno]
    return None


def write_failure_reason(final: Path) -> str | None:
    """Why writing ``final`` probably failed when a library (ITK, Pillow) hid the errno: the folder's state."""
    folder = Path(final).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return OS_ERRORS[errno.EROFS]
    if not os.access(folder, os.W_OK):
        return OS_ERRORS[errno.EACCES]
    if st.f_bavail == 0:
        return OS_ERRORS[errno.ENOSPC]
    if len(os.fsencode(Path(final).name)) > NAME_MAX:
        return OS_ERRORS[errno.ENAMETOOLONG]
    return None


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
def atomic_path(final: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success move it into place, on error delete it.

    ``durable=False`` skips the fsyncs (still all-or-nothing under its final name): for pictures that can be
    drawn again (previews), whose flush to disk cost as much as drawing them on a busy file system."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / partial_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced no file at {tmp}")
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
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
        # lazy: Unix-only
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
        # lazy: Unix-only
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


class StreamedText:
    """A text file written under a hidden partial name beside ``path``, renamed into place (fsynced) by
    :meth:`_finish`; :meth:`abort` deletes it. The base of the streamed GeoJSON and CSV writers."""

    def __init__(self, path: Path | str, newline: str = "") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / partial_name(self.path)
        self._fh: Any = open(self._tmp, "w", encoding="utf-8", newline=newline, buffering=1 << 20)  # noqa: SIM115
        self._closed = False

    def _finish(self, tail: str = "") -> None:
        if self._closed:
            raise ValueError(f"{self.path.name} is already closed")
        try:
            self._fh.write(tail)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the partial file (after an error); the final path is left untouched."""
        if self._closed:
            return
        self._closed = True
        try:
            self._fh.close()
        finally:
            with contextlib.suppress(OSError):
                self._tmp.unlink()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()  # type: ignore[attr-defined]
        else:
            self.abort()
