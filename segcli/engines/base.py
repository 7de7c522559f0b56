"""What every engine shares: the image source protocol, the result type and the rough pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
