"""Box, crop and patch geometry as pure numpy functions, shared by inference and training.

Boxes are int64 arrays of shape ``(N, 4)`` holding ``(y0, x0, y1, x1)`` half-open pixel
coordinates; 3D component boxes are ``(N, 6)`` holding ``(z0, y0, x0, z1, y1, x1)``. Keeping one
set of functions for both training crops and inference crops is what makes the fine network see
at inference exactly what it saw in training (segment-then-segment, Benčević et al. 2023).
"""

from __future__ import annotations

import numpy as np

EMPTY2 = np.zeros((0, 4), dtype=np.int64)
EMPTY3 = np.zeros((0, 6), dtype=np.int64)


def component_boxes(mask: np.ndarray, connectivity: int | None = None, min_size: int = 1) -> np.ndarray:
    """Bounding boxes of the connected components of a binary mask.

    2D masks give ``(N, 4)`` boxes with 8-connectivity by default (the reference uses OpenCV's
    default of 8); 3D masks give ``(N, 6)`` boxes with 26-connectivity by default. Components with
    fewer than ``min_size`` pixels (voxels) are dropped, which removes one-pixel noise blobs.
    """
    mask = np.asarray(mask, dtype=bool)
    nd = mask.ndim
    if nd not in (2, 3):
        raise ValueError(f"component_boxes expects a 2D or 3D mask, got {mask.ndim}D")
    if nd == 2:
        return _component_boxes_2d(mask, 8 if connectivity in (None, 2) else 4, min_size)
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up, and photos and slides label in 2D (OpenCV)
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(nd, connectivity if connectivity is not None else nd)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return EMPTY3.copy()
    slices = ndimage.find_objects(labels)
    if min_size > 1:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = []
    for i, sl in enumerate(slices):
        if sl is None or (min_size > 1 and sizes[i] < min_size):
            continue
        boxes.append([s.start for s in sl] + [s.stop for s in sl])
    if not boxes:
        return EMPTY3.copy()
    return np.asarray(boxes, dtype=np.int64)


def _component_boxes_2d(mask: np.ndarray, connectivity: int, min_size: int) -> np.ndarray:
    """OpenCV's labelling and its statistics, the boxes put in scipy's order (raster order of each component's
    first pixel): the same boxes as ``ndimage.label`` + ``find_objects``, in the same order, without scipy."""
    import cv2  # lazy: 0.03 s, only runs that label components need it

    if mask.size == 0 or not mask.any():
        return EMPTY2.copy()
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=connectivity,
                                                          ltype=cv2.CV_32S)
    st = stats[1:n].astype(np.int64)
    x, y, w, h, area = (st[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                           cv2.CC_STAT_HEIGHT, cv2.CC_STAT_AREA))
    # OpenCV numbers components block by block; scipy by the first pixel met scanning rows
    first = np.fromiter((x[i] + int(np.argmax(labels[y[i], x[i]: x[i] + w[i]] == i + 1)) for i in range(n - 1)),
                        np.int64, n - 1)
    order = np.argsort(y * mask.shape[1] + first, kind="stable")
    if min_size > 1:
        order = order[area[order] >= min_size]
    if not len(order):
        return EMPTY2.copy()
    return np.stack([y[order], x[order], (y + h)[order], (x + w)[order]], axis=1)


def scale_boxes(boxes: np.ndarray, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> np.ndarray:
    """Map 2D boxes from one grid to another (coarse mask → full resolution).

    Starts are floored and ends ceiled, so the scaled box always covers every full-resolution
    pixel that the coarse pixels covered.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sy = to_shape[0] / from_shape[0]
    sx = to_shape[1] / from_shape[1]
    out = np.empty_like(boxes)
    out[:, 0] = np.floor(boxes[:, 0] * sy)
    out[:, 1] = np.floor(boxes[:, 1] * sx)
    out[:, 2] = np.ceil(boxes[:, 2] * sy - 1e-9)
    out[:, 3] = np.ceil(boxes[:, 3] * sx - 1e-9)
    out[:, 0:2] = np.maximum(out[:, 0:2], 0)
    out[:, 2] = np.minimum(out[:, 2], to_shape[0])
    out[:, 3] = np.minimum(out[:, 3], to_shape[1])
    return out.astype(np.int64)


def jitter_boxes(boxes: np.ndarray, amplitude: int, rng: np.random.Generator) -> np.ndarray:
    """Training-time box augmentation: each of (top, left, height, width) moves by U{-A..A}.

    This is the reference's ±16 px jitter on ``(l, t, w, h)``; heights and widths are kept >= 1.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if amplitude <= 0 or len(boxes) == 0:
        return boxes.copy()
    t, l_ = boxes[:, 0], boxes[:, 1]
    h, w = boxes[:, 2] - t, boxes[:, 3] - l_
    d = rng.integers(-amplitude, amplitude + 1, size=(len(boxes), 4))
    t2, l2 = t + d[:, 0], l_ + d[:, 1]
    h2, w2 = np.maximum(h + d[:, 2], 1), np.maximum(w + d[:, 3], 1)
    return np.stack([t2, l2, t2 + h2, l2 + w2], axis=1)


def square_pad_shift(boxes: np.ndarray, image_shape: tuple[int, int], pad: int, clamp: bool = True) -> np.ndarray:
    """Square each box on its long side, pad it by ``pad`` px per side, then shift it inside the image.

    Follows the reference (``cropping.expand_bbox``): the short side grows symmetrically (the extra
    odd pixel goes to the end), the box is padded, then moved, never shrunk, to lie inside the
    image. A padded square larger than the image would end up at a negative origin, and the
    reference silently drops it (a recall hole); with ``clamp=True`` it is clamped to the image
    instead, so it may become a rectangle. With ``clamp=False`` such boxes keep their negative
    origin and :func:`valid_boxes` removes them, which reproduces the reference exactly.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4).copy()
    H, W = int(image_shape[0]), int(image_shape[1])
    t, l_, b, r = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    h, w = b - t, r - l_
    side = np.maximum(h, w)
    l_ = l_ - np.where(w < h, (h - w) // 2, 0)
    t = t - np.where(h < w, (w - h) // 2, 0)
    side = side + 2 * pad
    t, l_ = t - pad, l_ - pad
    t = np.maximum(t, 0)
    l_ = np.maximum(l_, 0)
    t = t - np.maximum(t + side - H, 0)
    l_ = l_ - np.maximum(l_ + side - W, 0)
    out = np.stack([t, l_, t + side, l_ + side], axis=1)
    if clamp:
        out[:, 0] = np.maximum(out[:, 0], 0)
        out[:, 1] = np.maximum(out[:, 1], 0)
        out[:, 2] = np.minimum(out[:, 2], H)
        out[:, 3] = np.minimum(out[:, 3], W)
    return out


def valid_boxes(boxes: np.ndarray, image_shape: tuple[int, int], min_side: int = 5) -> np.ndarray:
    """Boolean keep-mask: inside the image and at least ``min_side`` px on each side (the paper's rule)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    H, W = image_shape
    return (
        (boxes[:, 0] >= 0)
        & (boxes[:, 1] >= 0)
        & (boxes[:, 2] <= H)
        & (boxes[:, 3] <= W)
        & (boxes[:, 2] - boxes[:, 0] >= min_side)
        & (boxes[:, 3] - boxes[:, 1] >= min_side)
    )


def crop_boxes(
    mask: np.ndarray,
    image_shape: tuple[int, int],
    pad: int,
    *,
    min_size: int = 1,
    min_side: int = 5,
    clamp: bool = True,
    jitter: int = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The whole stts box pipeline: components of ``mask`` → full-res squares, padded, shifted, filtered.

    ``mask`` may be at a lower resolution than ``image_shape`` (the rough pass); boxes are scaled
    up first. ``jitter`` (training only) perturbs the component boxes before squaring.
    """
    boxes = component_boxes(mask, min_size=min_size)
    if mask.shape != tuple(image_shape):
        boxes = scale_boxes(boxes, mask.shape, image_shape)
    if jitter:
        boxes = jitter_boxes(boxes, jitter, rng if rng is not None else np.random.default_rng())
    boxes = square_pad_shift(boxes, image_shape, pad, clamp=clamp)
    return boxes[valid_boxes(boxes, image_shape, min_side)]


def boxes3d_to_2d(boxes3d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``(z0, y0, x0, z1, y1, x1)`` boxes into z-ranges ``(N, 2)`` and in-plane boxes ``(N, 4)``."""
    b = np.asarray(boxes3d, dtype=np.int64).reshape(-1, 6)
    return b[:, [0, 3]], b[:, [1, 2, 4, 5]]


def fit_aspect(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """Shape of an image resized so that its long side is ``size``, aspect ratio kept."""
    h, w = shape
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def patch_grid(shape: tuple[int, int], patch: int | tuple[int, int]) -> np.ndarray:
    """Tile an image into a grid of ``patch``-sized boxes; the last row/column is shifted inside.

    Patches never leave the image (images smaller than a patch give one clamped patch), and they
    cover every pixel, so writing refined patches back leaves no hole.
    """
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    H, W = shape
    ph, pw = min(ph, H), min(pw, W)
    ys = list(range(0, max(H - ph, 0) + 1, ph))
    xs = list(range(0, max(W - pw, 0) + 1, pw))
    if ys[-1] + ph < H:
        ys.append(H - ph)
    if xs[-1] + pw < W:
        xs.append(W - pw)
    return np.asarray([[y, x, y + ph, x + pw] for y in ys for x in xs], dtype=np.int64)


def sliding_grid(shape: tuple[int, int], tile: int, overlap: float = 0.25) -> np.ndarray:
    """Tiles of ``tile`` px with at least ``overlap`` fraction shared, spread evenly (nnU-Net's rule)."""
    H, W = shape
    th, tw = min(tile, H), min(tile, W)

    def starts(n: int, t: int) -> list[int]:
        if n <= t:
            return [0]
        step = max(1.0, t * (1.0 - overlap))
        k = int(np.ceil((n - t) / step)) + 1
        return [int(round(i * (n - t) / (k - 1))) for i in range(k)]

    return np.asarray(
        [[y, x, y + th, x + tw] for y in starts(H, th) for x in starts(W, tw)], dtype=np.int64
    )


def gaussian_weight(shape: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance map for blending tiles (σ = size/8, as nnU-Net and MONAI), min > 0."""
    h, w = shape
    gy = np.exp(-0.5 * ((np.arange(h) - (h - 1) / 2) / max(h * sigma_scale, 1e-6)) ** 2)
    gx = np.exp(-0.5 * ((np.arange(w) - (w - 1) / 2) / max(w * sigma_scale, 1e-6)) ** 2)
    g = np.outer(gy, gx).astype(np.float32)
    g /= g.max()
    return np.maximum(g, 1e-3).astype(np.float32)


def uncertainty_scores(probs: np.ndarray, boxes: np.ndarray, criterion: str = "pixel") -> np.ndarray:
    """Score each patch by how uncertain the rough probabilities are inside it (higher = refine first).

    ``probs`` is ``(K, H, W)`` on the same grid as ``boxes``.

    * ``mean``: the paper's "lowest |mean − 0.5|", as ``1 − 2|mean(p_fg) − 0.5|`` for binary tasks
      and ``1 − (m₁ − m₂)`` (top-two class means) for K > 2. It flags patches whose average is
      ambiguous, including a patch that is half confident background, half confident object.
    * ``pixel``: Cruz et al.'s code, the mean of ``1 − 2|p − 0.5|`` per pixel (top-two margin for
      K > 2). It flags patches full of half-confident pixels, and ignores patches that are merely
      mixed but sharp.

    Both exist because they disagree on exactly those two cases; which wins depends on whether the
    rough network's errors are blurry boundaries (pixel) or mixed regions (mean).
    """
    probs = np.asarray(probs, dtype=np.float32)
    K = probs.shape[0]
    scores = np.empty(len(boxes), dtype=np.float64)
    if criterion == "pixel":
        if K == 2:
            u = 1.0 - 2.0 * np.abs(probs[1] - 0.5)
        else:
            top2 = np.sort(probs, axis=0)[-2:]
            u = 1.0 - (top2[1] - top2[0])
        cs = np.pad(u.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for i, (y0, x0, y1, x1) in enumerate(boxes):
            area = max((y1 - y0) * (x1 - x0), 1)
            scores[i] = (cs[y1, x1] - cs[y0, x1] - cs[y1, x0] + cs[y0, x0]) / area
    elif criterion == "mean":
        for i, (y0, x0, y1, x1) in enumerate(boxes):
            m = probs[:, y0:y1, x0:x1].reshape(K, -1).mean(axis=1)
            if K == 2:
                scores[i] = 1.0 - 2.0 * abs(m[1] - 0.5)
            else:
                top2 = np.sort(m)[-2:]
                scores[i] = 1.0 - (top2[1] - top2[0])
    else:
        raise ValueError(f"unknown criterion {criterion!r}; use 'mean' or 'pixel'")
    return scores


def patch_std(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Largest per-channel standard deviation of ``image`` (``(C, H, W)``) inside each box.

    Summed-area tables make it O(pixels + boxes). refine uses it to skip flat patches (slide glass,
    the black outside a fundus), where the rough network is uncertain but there is nothing to find.
    """
    img = np.asarray(image, dtype=np.float64)
    out = np.zeros(len(boxes), dtype=np.float64)
    for c in img:
        s1 = np.pad(c.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        s2 = np.pad((c * c).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for i, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, dtype=np.int64)):
            n = max((y1 - y0) * (x1 - x0), 1)
            m1 = (s1[y1, x1] - s1[y0, x1] - s1[y1, x0] + s1[y0, x0]) / n
            m2 = (s2[y1, x1] - s2[y0, x1] - s2[y1, x0] + s2[y0, x0]) / n
            out[i] = max(out[i], float(np.sqrt(max(m2 - m1 * m1, 0.0))))
    return out


def select_patches(scores: np.ndarray, n: int | None = None, threshold: float | None = None,
                   eligible: np.ndarray | None = None) -> np.ndarray:
    """Indices of patches to refine: the top ``n`` by score, or all with score > ``threshold``.

    Only ``eligible`` patches (a boolean mask; default all) are candidates. Ties break by index so
    the choice is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))
    if eligible is not None:
        order = order[np.asarray(eligible, bool)[order]]
    if threshold is not None:
        order = order[scores[order] > threshold]
    if n is not None:
        order = order[: max(n, 0)]
    return order


# -- volumes: which axis 2D networks slice along ------------------------------------------------------------

#: Another axis must be this much coarser than the S/I axis before volumes are sliced along it
#: (nnU-Net's anisotropy threshold).
ANISOTROPY = 3.0


def slice_axis(spacing: tuple[float, ...] | None) -> int:
    """Axis 0 (canonical S/I: axial slices) unless another axis is clearly coarser (a sagittal or coronal
    acquisition), then that one.

    Thin-slice CT (0.98 mm pixels, 0.625 mm slices) stays axial, as 2D models are trained, instead of
    being cut sagittally because its pixels are larger than its slices; a thick-slice sagittal MRI
    (0.5 mm in plane, 3 mm between slices) is cut along its own slices.
    """
    if not spacing:
        return 0
    sp = np.asarray(spacing, dtype=np.float64)
    k = int(np.argmax(sp))
    return k if sp[k] >= ANISOTROPY * sp[0] else 0
