"""What every engine shares: the image source protocol, the result type and the rough pass."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

from segcli.geometry import fit_aspect
from segcli.resize import letterbox, resize, resize_rows

if TYPE_CHECKING:
    from scipy import sparse

ProgressFn = Callable[[str, int, int], None]


class Plane(Protocol):
    """A 2D image the engines can read by region or as a downscaled view, never as a whole.

    Values are already normalised float32, channel-first. Lazy implementations (tiled TIFF) make
    huge slides possible: engines never ask for the full-resolution array.
    """

    shape: tuple[int, int]
    channels: int

    def region(self, box: np.ndarray) -> np.ndarray:
        """``(C, y1-y0, x1-x0)`` float32 for the box ``(y0, x0, y1, x1)`` inside the image."""
        ...

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        """``(C, h, w)`` float32, area-averaged view of the whole image."""
        ...


class ArrayPlane:
    """A Plane over an in-memory ``(C, H, W)`` float32 array."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 3:
            raise ValueError(f"ArrayPlane wants (C, H, W), got {array.shape}")
        self.array = np.asarray(array, dtype=np.float32)
        self.channels = int(array.shape[0])
        self.shape = (int(array.shape[1]), int(array.shape[2]))

    def region(self, box: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        return self.array[:, y0:y1, x0:x1]

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        h, w = self.shape
        if max(h, w) <= 2048:
            return resize(self.array, out_hw, "area")
        # Large images: the same weights as sparse matrices. Dense, 8192² → 2048² is about 1 TFLOP of
        # matmul (7.05 s); sparse gives the identical result in 0.52 s (benchmarks/README.md).
        ry = resize_weights(h, int(out_hw[0]), "area")
        rx = resize_weights(w, int(out_hw[1]), "area")
        return np.stack([np.asarray((rx @ (ry @ c).T).T, dtype=np.float32) for c in self.array])


@dataclass
class Result:
    """Engine output: uint8 labels at full resolution, optional probabilities, and what happened."""

    labels: np.ndarray
    probs: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)


class Timer:
    """Accumulates seconds per named stage."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def rough_shape(shape: tuple[int, int], size: int, keep_aspect: bool) -> tuple[int, int]:
    """The grid of the rough pass: long side S with aspect kept, or S×S (the reference's squash)."""
    return fit_aspect(shape, size) if keep_aspect else (size, size)


def rough_input(plane: Plane, size: int, keep_aspect: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """The downscaled image padded to S×S (edge values) and the valid (h, w) inside it."""
    hw = rough_shape(plane.shape, size, keep_aspect)
    x = plane.downscaled(hw)
    x, _ = letterbox(x, size)
    return x, hw


def foreground(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Binary foreground from ``(K, ...)`` probabilities: p₁ > t for K = 2, argmax ≠ 0 otherwise."""
    if probs.shape[0] == 2:
        return probs[1] > threshold
    return probs.argmax(axis=0) != 0


def labels_from_probs(probs: np.ndarray, threshold: float) -> np.ndarray:
    if probs.shape[0] == 2:
        return (probs[1] > threshold).astype(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


def upsample_labels(
    probs_low: np.ndarray, full_hw: tuple[int, int], threshold: float, want_probs: bool = False, strip: int = 512
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally probabilities) at full resolution from a low-res probability map.

    Works in strips of rows so that no full-resolution float map of all classes is ever held
    unless the caller asked for probabilities.
    """
    H, W = full_hw
    labels = np.zeros((H, W), dtype=np.uint8)
    probs = np.zeros((probs_low.shape[0], H, W), dtype=np.float32) if want_probs else None
    for r0 in range(0, H, strip):
        r1 = min(H, r0 + strip)
        p = resize_rows(probs_low, full_hw, (r0, r1), "bilinear")
        labels[r0:r1] = labels_from_probs(p, threshold)
        if probs is not None:
            probs[:, r0:r1] = p
    return labels, probs


def batched(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, n)):
        yield items[i : i + max(1, n)]


# -- windowed resizing: the weights of resize(), for a window of the output, without dense matrices ---------


@lru_cache(maxsize=32)
def resize_weights(n_in: int, n_out: int, mode: str = "bilinear") -> sparse.csr_matrix:
    """The same ``(n_out, n_in)`` weights as :func:`segcli.resize.resize_matrix`, as a sparse matrix.

    ``resize_matrix(2500, 40000)`` is 400 MB dense; a 40k-pixel slide needs its rows and columns
    only a window at a time, and the band of non-zeros is 2 (bilinear) or ⌈n_in/n_out⌉+1 (area) wide.
    """
    from scipy import sparse

    scale = n_in / n_out
    if mode == "bilinear" or (mode == "area" and n_out >= n_in):
        c = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = c - i0
        rows = np.concatenate([np.arange(n_out), np.arange(n_out)])
        cols = np.concatenate([i0, i1])
        vals = np.concatenate([1.0 - f, f])
    elif mode == "area":
        edges = np.arange(n_out + 1) * scale
        a, b = edges[:-1], edges[1:]
        j0 = np.floor(a).astype(np.int64)
        j1 = np.minimum(np.ceil(b).astype(np.int64), n_in)
        width = int((j1 - j0).max())
        j = j0[:, None] + np.arange(width)[None]
        w = np.minimum(b[:, None], j + 1) - np.maximum(a[:, None], j)
        ok = (j < j1[:, None]) & (w > 0)
        w = np.where(ok, w, 0.0)
        w /= w.sum(axis=1, keepdims=True)
        rows = np.repeat(np.arange(n_out), width)[ok.ravel()]
        cols, vals = j.ravel()[ok.ravel()], w.ravel()[ok.ravel()]
    else:
        raise ValueError(f"windowed resize supports bilinear and area, not {mode!r}")
    m = sparse.coo_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float64).tocsr()
    m.sum_duplicates()
    return m.astype(np.float32)


def resize_window(img: np.ndarray, out_hw: tuple[int, int], box: np.ndarray | tuple[int, int, int, int],
                  mode: str = "bilinear") -> np.ndarray:
    """``resize(img, out_hw, mode)[..., y0:y1, x0:x1]`` computed for the window only."""
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = img.shape[-2:]
    ry = resize_weights(h, int(out_hw[0]), mode)[y0:y1]
    rx = resize_weights(w, int(out_hw[1]), mode)[x0:x1]
    # Only the input rows/columns the window touches take part: a small dense product.
    r_lo, r_hi = int(ry.indices.min()), int(ry.indices.max()) + 1
    c_lo, c_hi = int(rx.indices.min()), int(rx.indices.max()) + 1
    ryd = ry[:, r_lo:r_hi].toarray()
    rxd = rx[:, c_lo:c_hi].toarray()
    x = np.asarray(img[..., r_lo:r_hi, c_lo:c_hi], dtype=np.float32)
    return np.matmul(np.matmul(ryd, x), rxd.T)


class CoarseFill:
    """Labels and probabilities of the upsampled rough map, for any window, on demand.

    Pixels no crop reached take these values under ``keep_coarse``; computing them per window means
    the full-resolution float map (K×H×W×4 bytes, 12.8 GB at 40k² and K = 2) never exists.
    """

    def __init__(self, rough: np.ndarray, full_hw: tuple[int, int], threshold: float) -> None:
        self.rough = np.asarray(rough, dtype=np.float32)
        self.full_hw = (int(full_hw[0]), int(full_hw[1]))
        self.threshold = threshold

    def probs(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        return resize_window(self.rough, self.full_hw, box, "bilinear")

    def labels(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        return labels_from_probs(self.probs(box), self.threshold)


# -- bounded fusion of crop probabilities ------------------------------------------------------------------


class Quantizer:
    """uint8 codes for a foreground probability that keep ``p > t`` exact: ``q ≥ 128 ⇔ p > t``.

    The code is monotone in p, so max-fusion of codes equals the code of the max-fused probability:
    binary OR-fusion through 1 byte per pixel gives exactly the labels of float fusion, and
    probabilities good to ~1/127 of their side of the threshold. 0 means "no crop reached here".
    """

    def __init__(self, threshold: float) -> None:
        self.t = float(min(max(threshold, 1e-6), 1.0))

    def encode(self, p: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
        t = self.t
        lo = 1.0 + np.floor(p / t * 126.999)
        hi = 128.0 + np.floor((p - t) / max(1.0 - t, 1e-6) * 127.999)
        return np.where(p > t, hi, lo).astype(np.uint8)

    def decode(self, q: np.ndarray) -> np.ndarray:
        q = q.astype(np.float32)
        t = self.t
        return np.where(q >= 128, t + (q - 127.5) / 128.0 * (1.0 - t), (q - 0.5) / 127.0 * t).astype(np.float32)


class TileStore:
    """A ``(kc, H, W)`` array kept as ``tile``² tiles, created on first write, optionally spilled to disk.

    With ``spill_dir`` tiles live in an unlinked temporary file read and written with
    ``pread``/``pwrite`` behind a small LRU cache: unlike ``np.memmap``, page-cache pages then never
    count as the process's resident memory, so peak RSS stays flat however large the image.
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
        self.cache_tiles = max(4, cache_bytes // self.tile_bytes) if spill_dir is not None else None
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
        arr = self._cache.get(key)
        if arr is not None:
            self._cache.move_to_end(key)
            return arr
        if self._fd is not None and key in self._slots:
            raw = os.pread(self._fd, self.tile_bytes, self._slots[key] * self.tile_bytes)
            arr = np.frombuffer(raw, dtype=self.dtype).reshape(self.kc, self.tile, self.tile).copy()
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
            if key in self._dirty:
                slot = self._slots.setdefault(key, len(self._slots))
                os.pwrite(self._fd, arr.tobytes(), slot * self.tile_bytes)
                self._dirty.discard(key)

    @property
    def touched_tiles(self) -> int:
        return len(set(self._slots) | set(self._cache))

    def maximum(self, box: np.ndarray | tuple[int, ...], values: np.ndarray) -> None:
        """``store[:, box] = max(store[:, box], values)`` for ``values`` of shape ``(kc, h, w)``."""
        y0, x0, y1, x1 = (int(v) for v in box)
        T = self.tile
        with self._lock:
            for key, (a0, b0, a1, b1) in self._tiles((y0, x0, y1, x1)):
                arr = self._get(key, create=True)
                assert arr is not None
                dst = arr[:, a0 - key[0] * T : a1 - key[0] * T, b0 - key[1] * T : b1 - key[1] * T]
                np.maximum(dst, values[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0], out=dst)
                self._dirty.add(key)

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
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._cache.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with suppress(Exception):
            self.close()


class FuseStore(TileStore):
    """Per-class maximum of crop probabilities, only where crops reached (a :class:`TileStore`).

    Binary tasks store the foreground channel as :class:`Quantizer` codes (1 byte/pixel, exact
    labels); multi-class tasks, or callers wanting exact probabilities (``exact=True``), store
    float32 with -1 meaning "no crop". Untouched tiles cost nothing.
    """

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float, *, exact: bool = False,
                 tile: int = 512, spill_dir: str | os.PathLike | None = None, cache_bytes: int = 64 * 2**20) -> None:
        self.n_classes = n_classes
        self.binary = n_classes == 2
        self.quant = Quantizer(threshold) if (self.binary and not exact) else None
        self.threshold = threshold
        super().__init__(shape, 1 if self.binary else n_classes, np.uint8 if self.quant else np.float32,
                         0 if self.quant else -1.0, tile=tile, spill_dir=spill_dir, cache_bytes=cache_bytes)

    # fusion and reads ---------------------------------------------------------------------------------
    def fuse(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray) -> None:
        """Max-fuse ``probs`` — ``(K, h, w)`` for the box ``(y0, x0, y1, x1)`` — into the store."""
        p = probs[1:2] if self.binary else probs
        self.maximum(box, self.quant.encode(p) if self.quant else np.asarray(p, dtype=np.float32))

    def covered(self, stored: np.ndarray) -> np.ndarray:
        return stored[0] != self.empty if self.quant else stored[0] >= 0

    def labels(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """uint8 labels of a box: fused crops where they reached, else the rough labels or background."""
        v = self.read(box)
        if self.quant:
            lab = (v[0] >= 128).astype(np.uint8)
        elif self.binary:
            lab = (v[0] > self.threshold).astype(np.uint8)
        else:
            lab = v.argmax(axis=0).astype(np.uint8)
        if fill is not None:
            cov = self.covered(v)
            if not cov.all():
                lab = np.where(cov, lab, fill.labels(box)).astype(np.uint8)
        return lab

    def probs(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """float32 ``(K, h, w)``: fused probabilities; rough ones (``fill``) or background elsewhere."""
        v = self.read(box)
        cov = self.covered(v)
        if self.binary:
            p1 = self.quant.decode(v[0]) if self.quant else v[0]
            p = np.stack([1.0 - p1, p1]).astype(np.float32)
        else:
            p = v.astype(np.float32)
        if not cov.all():
            if fill is not None:
                other = fill.probs(box)
            else:
                other = np.zeros_like(p)
                other[0] = 1.0
            p = np.where(cov[None], p, other).astype(np.float32)
        return p


class LazyLabels:
    """A label image that exists only as a :class:`FuseStore` plus a rough map, read window by window.

    It is what stts returns for inputs too large to hold (``Result.labels``); the streamed TIFF
    writer asks it for one output tile at a time. ``np.asarray`` materialises it (small images only).
    """

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, store: FuseStore, fill: CoarseFill | None, probs_fill: CoarseFill | None = None) -> None:
        self.store = store
        self.fill = fill
        self.probs_fill = probs_fill
        self.shape = store.shape

    def read(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self.store.labels(box, self.fill)

    def read_probs(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self.store.probs(box, self.probs_fill)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        T = self.store.tile
        for y in range(0, self.shape[0], T):
            for x in range(0, self.shape[1], T):
                box = (y, x, min(y + T, self.shape[0]), min(x + T, self.shape[1]))
                out[box[0] : box[2], box[1] : box[3]] = self.read(box)
        return out if dtype is None else out.astype(dtype)
