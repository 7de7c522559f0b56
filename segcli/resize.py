"""Separable image resizing as two small matrix products, in numpy.

Engines resize many crops and probability maps; doing it as ``Ry @ img @ Rx.T`` is vectorised over
channels and batches, needs no torch (engines stay runtime-agnostic) and gives true area averaging
when shrinking, which nearest-neighbour downscaling (the reference's choice) does not: a thin
object vanishes under nearest but survives as a faint signal under area averaging.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=256)
def resize_matrix(n_in: int, n_out: int, mode: str = "area") -> np.ndarray:
    """Weights ``(n_out, n_in)`` mapping a 1D signal of length ``n_in`` to ``n_out`` samples.

    * ``nearest``: torch's ``mode='nearest'`` (source index ``floor(i * n_in / n_out)``).
    * ``bilinear``: half-pixel centres (``align_corners=False``), no antialiasing.
    * ``area``: exact box-filter overlap when shrinking (antialiased); bilinear when enlarging.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError("sizes must be >= 1")
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    if mode == "nearest":
        src = np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)
        m[np.arange(n_out), src] = 1.0
    elif mode == "bilinear" or (mode == "area" and n_out >= n_in):
        c = (np.arange(n_out) + 0.5) * scale - 0.5
        c = np.clip(c, 0, n_in - 1)
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        f = c - i0
        np.add.at(m, (np.arange(n_out), i0), 1.0 - f)
        np.add.at(m, (np.arange(n_out), i1), f)
    elif mode == "area":
        edges = np.arange(n_out + 1) * scale
        for i in range(n_out):
            a, b = edges[i], edges[i + 1]
            j0, j1 = int(np.floor(a)), min(int(np.ceil(b)), n_in)
            for j in range(j0, j1):
                m[i, j] = min(b, j + 1) - max(a, j)
            m[i] /= m[i].sum()
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return m.astype(np.float32)


def resize(img: np.ndarray, out_hw: tuple[int, int], mode: str = "area") -> np.ndarray:
    """Resize the last two axes of ``img`` (any leading axes: channels, batch) to ``out_hw``."""
    h, w = img.shape[-2:]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (h, w) == (oh, ow):
        return np.asarray(img, dtype=np.float32)
    x = np.asarray(img, dtype=np.float32)
    ry = resize_matrix(h, oh, mode)
    rx = resize_matrix(w, ow, mode)
    # Contract the larger reduction first to keep the intermediate small.
    if oh * w <= h * ow:
        return np.matmul(np.matmul(ry, x), rx.T)
    return np.matmul(ry, np.matmul(x, rx.T))


def letterbox(img: np.ndarray, side: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad the last two axes to a square (edge values), returning the array and the original (h, w)."""
    h, w = img.shape[-2:]
    s = side if side is not None else max(h, w)
    if (h, w) == (s, s):
        return img, (h, w)
    pad = [(0, 0)] * (img.ndim - 2) + [(0, s - h), (0, s - w)]
    return np.pad(img, pad, mode="edge"), (h, w)


def resize_rows(img: np.ndarray, out_hw: tuple[int, int], rows: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Rows ``rows[0]:rows[1]`` of ``resize(img, out_hw)`` without building the whole output.

    Upsampling a low-resolution probability map to a huge image strip by strip keeps the
    full-resolution float map out of memory.
    """
    h, w = img.shape[-2:]
    ry = resize_matrix(h, int(out_hw[0]), mode)[rows[0] : rows[1]]
    rx = resize_matrix(w, int(out_hw[1]), mode)
    x = np.asarray(img, dtype=np.float32)
    return np.matmul(np.matmul(ry, x), rx.T)
