"""Where to look on a slide: glass found on the overview, and windows placed on what the rough pass found.

* :func:`content_mask` finds bare glass on a brightfield overview (Otsu on the grey level, as tissue-masking
  tools do) and returns the rest, grown by a margin, so the rough pass runs the coarse network only where
  there is something to see. It returns ``None`` (look everywhere) unless the overview is mostly a bright,
  uniform background: a fluorescence slide, a slide full of tissue or a photo are left alone.
* :func:`box_windows` places the fine windows per connected part of the rough foreground, each part covered
  by its own evenly spread grid (as a sliding window over that part's box would be), instead of the
  slide-wide grid: a 1000² patch of tissue takes 5 × 5 windows of 256² rather than the 6–7 × 6–7 of the
  slide-wide grid that it happens to straddle. Only windows whose footprint holds foreground are kept, and
  the slide-wide grid is used whenever it would need fewer windows. Parts are the connected cells (a quarter
  window a side) that hold foreground, so nearby specks share one grid.
"""

from __future__ import annotations

import numpy as np

from segcli.geometry import scale_boxes, sliding_grid

#: The background must cover at least this fraction of the overview for glass to be skipped.
MIN_GLASS_FRACTION = 0.5
#: ... and be uniform: its grey-level spread under this fraction of the gap between the two Otsu classes.
MAX_GLASS_SPREAD = 0.25


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (the value that maximises the between-class variance)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def content_mask(overview: np.ndarray, margin: int) -> tuple[np.ndarray | None, dict]:
    """Pixels of a ``(C, h, w)`` overview that are not bare glass, grown by ``margin`` pixels; ``None`` when
    the overview is not a brightfield slide that is mostly glass (then everything is looked at)."""
    info: dict = {"glass_skip": False}
    if overview.ndim != 3 or overview.shape[0] < 3 or overview.size == 0:
        return None, info
    grey = np.asarray(overview[:3], dtype=np.float32).mean(axis=0)
    t = otsu(grey.ravel())
    glass = grey > t
    frac = float(glass.mean())
    info["glass_fraction"] = round(frac, 4)
    if frac < MIN_GLASS_FRACTION or frac >= 1.0:
        return None, info
    gap = float(grey[glass].mean() - grey[~glass].mean())
    spread = float(grey[glass].std())
    info["glass_spread"] = round(spread / gap, 4) if gap > 0 else None
    if gap <= 0 or spread > MAX_GLASS_SPREAD * gap:
        return None, info
    content = ~glass
    if margin > 0:
        content = grow(content, int(margin))
    info.update({"glass_skip": True, "content_fraction": round(float(content.mean()), 4)})
    return content, info


def grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` dilated ``steps`` times by the 4-neighbour cross, outside the image counted as empty (scipy's
    ``binary_dilation(mask, iterations=steps)``), by OpenCV."""
    import cv2  # lazy: 0.03 s

    if steps <= 0 or mask.size == 0:
        return np.asarray(mask, bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    out = cv2.dilate(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), kernel, iterations=int(steps),
                     borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.view(bool)


def label_boxes(lab: np.ndarray, n: int) -> np.ndarray:
    """``(y0, x0, y1, x1)`` of the pixels of each label 1..n of ``lab`` that has any (``find_objects``'s boxes)."""
    ys, xs = np.nonzero(lab)
    ids = lab[ys, xs].astype(np.int64)
    lo = np.full((n + 1, 2), np.iinfo(np.int64).max, np.int64)
    hi = np.full((n + 1, 2), -1, np.int64)
    np.minimum.at(lo, ids, np.stack([ys, xs], axis=1))
    np.maximum.at(hi, ids, np.stack([ys, xs], axis=1))
    keep = hi[1:, 0] >= 0
    return np.concatenate([lo[1:][keep], hi[1:][keep] + 1], axis=1).reshape(-1, 4)


def touches(mask: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """For each full-resolution box, whether its footprint on ``mask`` (a coarser grid) holds a True pixel."""
    H, W = image_shape
    h, w = mask.shape
    sy, sx = h / H, w / W
    out = np.zeros(len(boxes), bool)
    for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes).reshape(-1, 4).tolist()):
        a, b = int(y0 * sy), int(x0 * sx)
        out[i] = mask[a: max(a + 1, int(np.ceil(y1 * sy))), b: max(b + 1, int(np.ceil(x1 * sx)))].any()
    return out


def _part_grid(box: list[int], image_shape: tuple[int, int], size: int, overlap: float) -> np.ndarray:
    """The evenly spread grid over one part's box, the box first grown to at least ``size`` a side."""
    H, W = image_shape
    y0, x0, y1, x1 = box
    if y1 - y0 < size:
        y0 = min(max(0, (y0 + y1 - size) // 2), max(0, H - size))
        y1 = min(H, y0 + size)
    if x1 - x0 < size:
        x0 = min(max(0, (x0 + x1 - size) // 2), max(0, W - size))
        x1 = min(W, x0 + size)
    return sliding_grid((y1 - y0, x1 - x0), size, overlap) + np.asarray([y0, x0, y0, x0], np.int64)


def box_windows(fg_low: np.ndarray, image_shape: tuple[int, int], size: int, overlap: float,
                margin: int | None = None) -> np.ndarray:
    """Full-resolution windows (side ``size``) over the rough foreground ``fg_low``; see the module doc.

    ``margin`` None: the mask is grown by one of its pixels first, so a window that an object of the rough map
    only grazes is kept. A number: each part's box is grown by that many full-resolution pixels instead (a
    tissue mask, whose edge is within half a mask pixel of the tissue's: growing by a whole pixel of a ×16
    thumbnail took a 1000² piece of tissue from 5 × 5 windows to 6 × 6).
    """
    import cv2  # lazy: 0.03 s (scipy.ndimage, which did this, took 0.3-0.4 s of every slide run's start)

    grid = sliding_grid(image_shape, size, overlap)
    if not fg_low.any():
        return grid[:0]
    fg = grow(fg_low, 1) if margin is None else fg_low
    slide_wide = grid[touches(fg, grid, image_shape)]
    # parts are found on cells of about a quarter window (any foreground in the cell), so the scattered
    # specks of one patch of tissue make one part, not one grid each
    c = max(1, int(round(size / 4 * fg.shape[0] / image_shape[0])))
    h, w = -(-fg.shape[0] // c), -(-fg.shape[1] // c)
    own = fg  # a part's box holds its pixels grown by one rough pixel: the rough mask's own uncertainty
    cells = np.pad(own, ((0, h * c - fg.shape[0]), (0, w * c - fg.shape[1]))).reshape(h, c, w, c).any(axis=(1, 3))
    n, lab = cv2.connectedComponents(cells.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    lab = np.repeat(np.repeat(lab, c, axis=0), c, axis=1)[: fg.shape[0], : fg.shape[1]] * own
    parts = label_boxes(lab, n - 1)  # in OpenCV's order: the windows are sorted below
    parts = scale_boxes(parts, fg.shape, image_shape)
    if margin:
        parts = np.clip(parts + np.asarray([-margin, -margin, margin, margin]), 0,
                        np.asarray([image_shape[0], image_shape[1]] * 2))
    if len(parts) > len(slide_wide):
        return slide_wide
    local = [_part_grid(b, image_shape, size, overlap) for b in parts.tolist()]
    windows = np.unique(np.concatenate(local), axis=0)
    windows = windows[touches(fg, windows, image_shape)]
    return windows if len(windows) < len(slide_wide) else slide_wide
