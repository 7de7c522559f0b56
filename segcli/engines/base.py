"""What every engine shares: the image source protocol, the result type and the rough pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from segcli.fusion import labels_from_probs
from segcli.geometry import fit_aspect
from segcli.resize import letterbox, resize, resize_rows, resize_weights

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
        self._low: tuple[tuple[int, int], np.ndarray] | None = None  # the last downscaled view

    def region(self, box: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        return self.array[:, y0:y1, x0:x1]

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        """The area-averaged view; the last one is kept, so a batch's reader thread can make it in advance."""
        key = (int(out_hw[0]), int(out_hw[1]))
        if self._low is not None and self._low[0] == key:
            return self._low[1]
        low = self._downscale(key)
        low.flags.writeable = False  # shared between callers
        self._low = (key, low)
        return low

    def _downscale(self, out_hw: tuple[int, int]) -> np.ndarray:
        h, w = self.shape
        if max(h, w) <= 2048:
            return resize(self.array, out_hw, "area")
        # Large images: the same weights as sparse matrices. Dense, 8192² → 2048² is about 1 TFLOP of
        # matmul (7.05 s); sparse gives the identical result in 0.52 s (benchmarks/README.md).
        ry = resize_weights(h, int(out_hw[0]), "area")
        rx = resize_weights(w, int(out_hw[1]), "area")
        return np.stack([np.asarray((rx @ (ry @ c).T).T, dtype=np.float32) for c in self.array])


class ScaledPlane:
    """A Plane seen at another pixel size: ``factor`` source pixels per plane pixel (2.0 halves the image).

    It lets a network trained at one physical pixel size (a bundle's ``training_mpp``) see a slide scanned at
    another one at its own scale. Regions are read from the source (one pixel of margin for the
    interpolation) and resized; nothing is held whole.
    """

    def __init__(self, source: Plane, factor: float) -> None:
        self.source = source
        self.factor = float(factor)
        self.channels = source.channels
        H, W = source.shape
        self.shape = (max(1, round(H / self.factor)), max(1, round(W / self.factor)))

    def region(self, box: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        H, W = self.source.shape
        f = self.factor
        sy0, sx0 = max(0, int(np.floor(y0 * f)) - 1), max(0, int(np.floor(x0 * f)) - 1)
        sy1, sx1 = min(H, int(np.ceil(y1 * f)) + 1), min(W, int(np.ceil(x1 * f)) + 1)
        src = np.asarray(self.source.region(np.array([sy0, sx0, sy1, sx1])), dtype=np.float32)
        # the plane box in source pixels, relative to the block read: resize the block, then cut exactly
        scale_h, scale_w = (sy1 - sy0) / f, (sx1 - sx0) / f
        big = resize(src, (max(1, round(scale_h)), max(1, round(scale_w))), "area" if f > 1 else "bilinear")
        oy, ox = round(y0 - sy0 / f), round(x0 - sx0 / f)
        out = big[:, oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
        if out.shape[1:] != (y1 - y0, x1 - x0):  # rounding at the image edge: pad by repeating the border
            out = np.pad(out, ((0, 0), (0, y1 - y0 - out.shape[1]), (0, x1 - x0 - out.shape[2])), mode="edge")
        return out

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        return self.source.downscaled(out_hw)


class ScaledLabels:
    """Labels computed on a :class:`ScaledPlane`, read back on the source grid window by window (nearest)."""

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, labels: object, factor: float, shape: tuple[int, int]) -> None:
        self.labels = labels  # an array or LazyLabels on the scaled grid
        self.factor = float(factor)
        self.shape = (int(shape[0]), int(shape[1]))
        self.store = getattr(labels, "store", None)

    def _map(self, box: np.ndarray | tuple[int, ...]) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
        y0, x0, y1, x1 = (int(v) for v in box)
        f = self.factor
        hs, ws = (self.labels.shape[-2], self.labels.shape[-1])  # type: ignore[attr-defined]
        ys = np.minimum((np.arange(y0, y1) + 0.5) / f, hs - 1e-6).astype(np.int64)
        xs = np.minimum((np.arange(x0, x1) + 0.5) / f, ws - 1e-6).astype(np.int64)
        sbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        return sbox, ys - sbox[0], xs - sbox[1]

    def _read(self, box: np.ndarray | tuple[int, ...], probs: bool) -> np.ndarray:
        sbox, ys, xs = self._map(box)
        if hasattr(self.labels, "read"):
            block = self.labels.read_probs(sbox) if probs else self.labels.read(sbox)  # type: ignore[attr-defined]
        else:
            block = np.asarray(self.labels)[..., sbox[0] : sbox[2], sbox[1] : sbox[3]]
        return block[..., ys[:, None], xs[None, :]]

    def read(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self._read(box, False)

    def read_probs(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self._read(box, True)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = self.read((0, 0, *self.shape))
        return out if dtype is None else out.astype(dtype)


@dataclass
class Result:
    """Engine output: uint8 labels at full resolution, optional probabilities, and what happened."""

    labels: np.ndarray
    probs: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    #: the network's labels before a boundary class was folded into its object (segcli.bundle.Bundle.fold)
    parts: np.ndarray | None = None


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
    """The downscaled image padded to S×S (edge values) and the valid (h, w) inside it.

    Made once: :func:`prime_rough_input` makes it on the thread that read the image, beside the network."""
    hw = rough_shape(plane.shape, size, keep_aspect)
    made = getattr(plane, "rough_made", None)
    if made is not None and made[0] == (hw, size):
        return made[1], hw
    x = plane.downscaled(hw)
    x, _ = letterbox(x, size)
    return x, hw


def prime_rough_input(plane: Plane, size: int, keep_aspect: bool) -> None:
    """Make the rough pass's input now and keep it on the plane (a photo batch's reader thread does this while
    the network runs the frame before: the edge padding was 0.8 ms a frame on the network's thread)."""
    x, hw = rough_input(plane, size, keep_aspect)
    with suppress(AttributeError):  # a plane without room for it makes it when asked
        plane.rough_made = ((hw, size), x)  # type: ignore[attr-defined]


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
