"""Segmentation metrics on label maps: overlap, boundary distance and object-level recall.

Conventions (chosen so that a mean over cases is always defined and never flatters a method):

* A class absent from both prediction and ground truth has no Dice, IoU, precision or recall: they
  are NaN and left out of every mean (the convention of nnU-Net's evaluation and of MONAI's
  ``ignore_empty``). Counting such cases as 1.0 inflated multi-class means with classes an image
  simply does not contain. Any other zero denominator (a one-sided miss) scores 0.0.
* HD95 is the larger of the two directed 95th-percentile surface distances (MONAI's
  ``compute_hausdorff_distance(percentile=95)``), in mm when the pixel spacing is known, else in
  pixels. Surfaces are the mask minus its erosion (face connectivity). It is 0.0 when both masks
  are empty and NaN (undefined, left out of means) when exactly one is.
* Object-level recall: the fraction of ground-truth connected components (8-connectivity in 2D,
  26 in 3D) that the prediction touches at all (hit = any overlap). Objects are binned by their
  share of the image area (volume): small < 0.1 %, medium 0.1–1 %, large >= 1 %. Relative
  thresholds are used because medical images range from 300 px to 100k px across: COCO's
  absolute 32²/96² pixel thresholds would call every polyp in a 1920 px frame "large".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Object size bins as fractions of the image area: [lower, upper).
SIZE_BINS: dict[str, tuple[float, float]] = {"small": (0.0, 0.001), "medium": (0.001, 0.01), "large": (0.01, np.inf)}


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return float("nan") if both_empty else 0.0


def confusion(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> tuple[int, int, int]:
    """(tp, fp, fn) of two binary masks, counted inside ``fov`` when given."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if fov is not None:
        f = np.asarray(fov, dtype=bool)
        p, g = p & f, g & f
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def overlap_scores(pred: np.ndarray, gt: np.ndarray, fov: np.ndarray | None = None) -> dict[str, float]:
    """Dice, IoU, precision and recall of two binary masks (see the module's zero-division rule)."""
    tp, fp, fn = confusion(pred, gt, fov)
    empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
    }


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks."""
    return overlap_scores(pred, gt)["dice"]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks."""
    return overlap_scores(pred, gt)["iou"]


def _surface(mask: np.ndarray) -> np.ndarray:
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
    from scipy import ndimage

    if not mask.any():
        return mask
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface point of ``a`` to the surface of ``b`` and back (mm or px)."""
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
    from scipy import ndimage

    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    sampling = None if spacing is None else [float(s) for s in spacing]
    sa, sb = _surface(a), _surface(b)
    # Crop to the joint bounding box plus one pixel: distance transforms of huge images are slow.
    both = sa | sb
    if both.any():
        idx = np.nonzero(both)
        sl = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
        sa, sb = sa[sl], sb[sl]
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return dt_b[sa], dt_a[sb]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance (max of the two directed percentiles)."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float("nan")
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def object_recall(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Ground-truth objects hit by the prediction, overall and by size bin (counts and fractions)."""
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
    from scipy import ndimage

    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    structure = ndimage.generate_binary_structure(g.ndim, g.ndim)
    labels, n = ndimage.label(g, structure=structure)
    out: dict[str, Any] = {"objects": int(n), "hit": 0}
    for name in SIZE_BINS:
        out[f"{name}_objects"] = 0
        out[f"{name}_hit"] = 0
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        hits = np.bincount(labels[p & g].ravel(), minlength=n + 1)[1:] > 0
        frac = sizes / float(g.size)
        out["hit"] = int(hits.sum())
        for name, (lo, hi) in SIZE_BINS.items():
            sel = (frac >= lo) & (frac < hi)
            out[f"{name}_objects"] = int(sel.sum())
            out[f"{name}_hit"] = int(hits[sel].sum())
    out["object_recall"] = out["hit"] / n if n else float("nan")
    return out


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    *,
    spacing: Sequence[float] | None = None,
    fov: np.ndarray | None = None,
    with_hd95: bool = True,
) -> dict[int, dict[str, Any]]:
    """All metrics for each class id in ``classes`` of one case (label maps of equal shape).

    With ``fov`` everything is computed inside the field of view only (DRIVE's protocol).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    f = None if fov is None else np.asarray(fov, dtype=bool)
    out: dict[int, dict[str, Any]] = {}
    for c in classes:
        p = pred == c
        g = gt == c
        if f is not None:
            p, g = p & f, g & f
        m: dict[str, Any] = overlap_scores(p, g)
        m["hd95"] = hd95(p, g, spacing) if with_hd95 else float("nan")
        m.update(object_recall(p, g))
        out[int(c)] = m
    return out
