"""Separable image resizing as two small matrix products, in numpy.

Engines resize many crops and probability maps; doing it as ``Ry @ img @ Rx.T`` is vectorised over
channels and batches, needs no torch (engines stay runtime-agnostic) and gives true area averaging
when shrinking, which nearest-neighbour downscaling (the reference's choice) does not: a thin
object vanishes under nearest but survives as a faint signal under area averaging.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from scipy import sparse


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
        # Overlap of output cell [a, b) with input pixel [j, j + 1), for all pairs at once.
        edges = np.arange(n_out + 1) * scale
        j = np.arange(n_in)
        step = max(1, (1 << 22) // n_in)  # blocks of output rows: temporaries stay near 32 MB
        for i0 in range(0, n_out, step):
            i1 = min(n_out, i0 + step)
            blk = np.minimum(edges[i0 + 1 : i1 + 1, None], j + 1.0) - np.maximum(edges[i0:i1, None], j)
            np.maximum(blk, 0.0, out=blk)
            m[i0:i1] = blk / blk.sum(axis=1, keepdims=True)
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


# -- windowed resizing: the weights of resize(), for a window of the output, without dense matrices ---------


@lru_cache(maxsize=32)
def resize_weights(n_in: int, n_out: int, mode: str = "bilinear") -> sparse.csr_matrix:
    """The same ``(n_out, n_in)`` weights as :func:`segcli.resize.resize_matrix`, as a sparse matrix.

    ``resize_matrix(2500, 40000)`` is 400 MB dense; a 40k-pixel slide needs its rows and columns
    only a window at a time, and the band of non-zeros is 2 (bilinear) or ⌈n_in/n_out⌉+1 (area) wide.
    """
    # lazy: scipy.sparse costs ~0.3 s to import
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


def downscale_by_bands(region: Any, shape: tuple[int, int], channels: int, out_hw: tuple[int, int],
                       band: int = 256) -> np.ndarray:
    """``(C, *out_hw)`` area-downscale of a plane read ``band`` rows at a time through ``region(box)`` (which
    returns ``(C, rows, W)``), so a plane kept on disk (a slide's spilled overview, 300 MB of float32 at 5000²)
    is never read back whole. Equals :func:`resize` with ``"area"`` of the whole plane."""
    H, W = shape
    ry = resize_weights(H, out_hw[0], "area").tocsc()
    rx = resize_weights(W, out_hw[1], "area")
    out = np.zeros((channels, *out_hw), np.float32)
    for y0 in range(0, H, band):
        y1 = min(H, y0 + band)
        wy = ry[:, y0:y1].tocsr()
        hit = np.flatnonzero(np.diff(wy.indptr))
        o0, o1 = int(hit[0]), int(hit[-1]) + 1
        a = region(np.asarray((y0, 0, y1, W)))
        for c in range(channels):
            out[c, o0:o1] += wy[o0:o1] @ (rx @ a[c].T).T
    return out

