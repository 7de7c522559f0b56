"""Tiles of a large array, created where written and spilled to an unlinked file behind an LRU cache.

:class:`TileStore` holds fusion stores (segcli.fusion) and the levels of a pyramid being written (segcli.io.bigtiff)
in bounded memory: only touched tiles exist, and the rest of a gigapixel image costs nothing.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np


class TileStore:
    """A ``(kc, H, W)`` array kept as ``tile``² tiles, created on first write, optionally spilled to disk.

    With ``spill_dir`` tiles live in an unlinked temporary file read and written with
    ``pread``/``pwrite`` behind a small LRU cache: unlike ``np.memmap``, page-cache pages then never
    count as the process's resident memory, so peak RSS stays flat however large the image.

    The cache is at most two rows of tiles (windows come in row order, each over two tile rows at most, so none is
    read back; an 8000² blend cycled its rows through 32 MiB: 0.7-1.1 s of spill I/O), within ``cache_bytes``. What
    ``cache_bytes`` holds beyond that lets evicted tiles be written by a thread while the caller goes on (a 16000²
    slide's blend wrote 0.28 s of finished tiles on the fine pass's thread); a failed write is raised by the next
    read or write of the store, so a lost tile is never read as empty.
    """

    def __init__(self, shape: tuple[int, int], kc: int, dtype: np.dtype | type, empty: float, *, tile: int = 512,
                 spill_dir: str | os.PathLike | None = None, cache_bytes: int = 64 * 2**20) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.kc = int(kc)
        self.dtype = np.dtype(dtype)
        self.empty = empty
        self.tile = int(tile)
        self.tile_bytes = self.kc * self.tile * self.tile * self.dtype.itemsize
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._dirty: set[tuple[int, int]] = set()
        self._slots: dict[tuple[int, int], int] = {}
        self._lock = threading.RLock()
        self._fd: int | None = None
        share = max(4, cache_bytes // self.tile_bytes)
        band = 2 * -(-self.shape[1] // self.tile) + 2
        # tiles being written, at least a quarter of the share (up to 8): a 32000² blend whose two rows took the whole
        # share wrote every evicted tile on the fine pass's thread (fuse stage 2.0 s)
        self._spare = max(share - band, min(8, share // 4) if share >= 8 else 0) if spill_dir is not None else 0
        self.cache_tiles = share - self._spare if spill_dir is not None else None
        self._pending: dict[tuple[int, int], np.ndarray] = {}  # evicted, maybe not on disk yet
        self._writes: deque[tuple[tuple[int, int], np.ndarray, Future]] = deque()
        self._writer: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        if spill_dir is not None:
            fd, name = tempfile.mkstemp(prefix=".segcli-tiles-", suffix=".bin", dir=spill_dir)
            os.unlink(name)  # gone from the folder at once; the space is freed when the fd closes
            self._fd = fd

    def _tiles(self, box: tuple[int, int, int, int]) -> Iterator[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        y0, x0, y1, x1 = box
        T = self.tile
        for ty in range(y0 // T, (y1 - 1) // T + 1):
            for tx in range(x0 // T, (x1 - 1) // T + 1):
                yield (ty, tx), (max(y0, ty * T), max(x0, tx * T), min(y1, (ty + 1) * T), min(x1, (tx + 1) * T))

    def _get(self, key: tuple[int, int], create: bool) -> np.ndarray | None:
        if self._error is not None:
            raise self._error
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
            return arr
        arr = self._pending.pop(key, None)
        if arr is not None:
            self._dirty.add(key)  # its write may still be running: written again when evicted again
        elif self._fd is not None and key in self._slots:
            arr = np.empty((self.kc, self.tile, self.tile), self.dtype)
            if os.preadv(self._fd, [arr], self._slots[key] * self.tile_bytes) != self.tile_bytes:
                raise OSError(f"short read of a spilled tile {key}")  # pragma: no cover - a truncated temp file
        elif create:
            arr = np.full((self.kc, self.tile, self.tile), self.empty, dtype=self.dtype)
        else:
            return None
        self._cache[key] = arr
        self._evict()
        return arr

    def _evict(self) -> None:
        if self.cache_tiles is None or self._fd is None:
            return
        while len(self._cache) > self.cache_tiles:
            key, arr = self._cache.popitem(last=False)
            if key not in self._dirty:
                continue
            self._dirty.discard(key)
            slot = self._slots.setdefault(key, len(self._slots))
            if not self._spare:
                self._write(arr, slot)
                continue
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="segcli-spill")
            self._pending[key] = arr
            self._writes.append((key, arr, self._writer.submit(self._write, arr, slot)))
        while self._writes and (len(self._pending) > self._spare or self._writes[0][2].done()):
            self._reap()

    def _write(self, arr: np.ndarray, slot: int) -> None:
        """The tile's own buffer to its slot (no copy); a thread's failure is kept for the caller."""
        try:
            if os.pwrite(self._fd, arr, slot * self.tile_bytes) != self.tile_bytes:  # type: ignore[arg-type]
                raise OSError("short write of a spilled tile")
        except BaseException as exc:
            self._error = exc
            if self._writer is None:
                raise

    def _reap(self) -> None:
        """Wait for the oldest write; its tile leaves the pending set unless it was taken back since, or written
        again after it (the file holds it only once its last write is done)."""
        key, arr, fut = self._writes.popleft()
        fut.result()
        if self._pending.get(key) is arr and all(k != key for k, _, _ in self._writes):
            del self._pending[key]
        if self._error is not None:
            raise self._error

    @property
    def touched_tiles(self) -> int:
        return len(set(self._slots) | set(self._cache))

    def _combine(self, box: np.ndarray | tuple[int, ...], values: np.ndarray, op: Any) -> None:
        """``op(store[:, box], values, out=store[:, box])`` tile by tile, for ``values`` of shape ``(kc, h, w)``."""
        y0, x0, y1, x1 = (int(v) for v in box)
        T = self.tile
        with self._lock:
            for key, (a0, b0, a1, b1) in self._tiles((y0, x0, y1, x1)):
                arr = self._get(key, create=True)
                assert arr is not None
                dst = arr[:, a0 - key[0] * T : a1 - key[0] * T, b0 - key[1] * T : b1 - key[1] * T]
                op(dst, values[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0], out=dst)
                self._dirty.add(key)

    def maximum(self, box: np.ndarray | tuple[int, ...], values: np.ndarray) -> None:
        """``store[:, box] = max(store[:, box], values)`` for ``values`` of shape ``(kc, h, w)``."""
        self._combine(box, values, np.maximum)

    def add(self, box: np.ndarray | tuple[int, ...], values: np.ndarray) -> None:
        """``store[:, box] += values`` for ``values`` of shape ``(kc, h, w)``."""
        self._combine(box, values, np.add)

    def touches(self, box: np.ndarray | tuple[int, ...]) -> bool:
        """Whether anything was written to a tile of the box (glass, most of a slide, reads as ``empty``)."""
        y0, x0, y1, x1 = (int(v) for v in box)
        with self._lock:
            return any(key in self._cache or key in self._slots for key, _ in self._tiles((y0, x0, y1, x1)))

    def _untouched_labels(self, box: np.ndarray | tuple[int, ...], fill: Any) -> np.ndarray:
        """The labels of a box no window reached: the rough map's (``fill``) or background."""
        if fill is not None:
            return fill.labels(box)
        y0, x0, y1, x1 = (int(v) for v in box)
        return np.zeros((y1 - y0, x1 - x0), np.uint8)

    def read(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        """Stored values ``(kc, h, w)`` for a box (``empty`` where nothing was written)."""
        y0, x0, y1, x1 = (int(v) for v in box)
        out = np.full((self.kc, y1 - y0, x1 - x0), self.empty, dtype=self.dtype)
        T = self.tile
        with self._lock:
            for key, (a0, b0, a1, b1) in self._tiles((y0, x0, y1, x1)):
                arr = self._get(key, create=False)
                if arr is not None:
                    out[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = \
                        arr[:, a0 - key[0] * T : a1 - key[0] * T, b0 - key[1] * T : b1 - key[1] * T]
        return out

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()
        self._pending.clear()
        self._writes.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with suppress(Exception):
            self.close()
