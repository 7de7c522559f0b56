"""Segment-then-segment (Benčević et al., Sensors 2023): rough pass, components, full-res crops, fine pass.

Differences from the reference code, each a deliberate fix:

* the rough pass keeps the aspect ratio (letterboxed) unless ``keep_aspect=False``;
* a padded square larger than the image is clamped to it instead of being dropped (recall hole);
* ``keep_coarse`` fills pixels that no crop reached with the rough mask (second recall hole);
* crops share the size S, so the fine pass runs in batches instead of one crop at a time;
* resizing is area-averaged when shrinking (thin objects survive) and bilinear when enlarging.
"""

from __future__ import annotations

import numpy as np

from segcli.engines.base import (
    Plane,
    ProgressFn,
    Result,
    Timer,
    batched,
    foreground,
    rough_input,
    upsample_labels,
)
from segcli.geometry import crop_boxes, fuse_max
from segcli.resize import letterbox, resize
from segcli.runtimes import Predictor


def fine_inputs(plane: Plane, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops at full resolution, letterboxed to squares, resized to S×S: ``(N, C, S, S)``."""
    out = np.empty((len(boxes), plane.channels, size, size), dtype=np.float32)
    for i, box in enumerate(boxes):
        crop, _ = letterbox(plane.region(box))
        out[i] = resize(crop, (size, size), "area")
    return out


def paste_back(probs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Undo :func:`fine_inputs` for one crop: S×S probabilities → the box's (h, w)."""
    h, w = int(box[2] - box[0]), int(box[3] - box[1])
    side = max(h, w)
    return resize(probs, (side, side), "bilinear")[:, :h, :w]


def stts(
    plane: Plane,
    coarse: Predictor,
    fine: Predictor,
    *,
    size: int,
    pad: int | None = None,
    threshold: float = 0.5,
    keep_aspect: bool = True,
    min_side: int = 5,
    min_component: int = 1,
    keep_coarse: bool = False,
    batch_size: int = 16,
    return_probs: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """Segment one 2D image with segment-then-segment; see the module docstring."""
    timer = Timer()
    H, W = plane.shape
    pad = size // 8 if pad is None else pad
    with timer.stage("rough"):
        x, (h, w) = rough_input(plane, size, keep_aspect)
        rough = coarse(x[None])[0][:, :h, :w]
    with timer.stage("components"):
        boxes = crop_boxes(foreground(rough, threshold), (H, W), pad, min_size=min_component, min_side=min_side)
    return fine_pass(plane, fine, boxes, rough, size=size, threshold=threshold, keep_coarse=keep_coarse,
                     batch_size=batch_size, return_probs=return_probs, timer=timer, progress=progress)


def fine_pass(
    plane: Plane,
    fine: Predictor,
    boxes: np.ndarray,
    rough: np.ndarray,
    *,
    size: int,
    threshold: float,
    keep_coarse: bool,
    batch_size: int,
    return_probs: bool,
    timer: Timer,
    progress: ProgressFn | None = None,
) -> Result:
    """Run the fine network on ``boxes`` in batches and fuse by per-class maximum (OR for binary)."""
    H, W = plane.shape
    K = rough.shape[0]
    binary = K == 2
    # Binary tasks keep only the foreground channel: max-fusion of p₁ is the paper's OR.
    canvas = np.zeros((1 if binary else K, H, W), dtype=np.float32)
    covered = np.zeros((H, W), dtype=bool) if (keep_coarse or return_probs) else None
    done = 0
    for chunk in batched(list(range(len(boxes))), batch_size):
        with timer.stage("crops"):
            xb = fine_inputs(plane, boxes[chunk], size)
        with timer.stage("fine"):
            pb = fine(xb)
        with timer.stage("fuse"):
            for j, i in enumerate(chunk):
                p = paste_back(pb[j], boxes[i])
                fuse_max(canvas, boxes[i], p[1:2] if binary else p)
                if covered is not None:
                    y0, x0, y1, x1 = boxes[i]
                    covered[y0:y1, x0:x1] = True
        done += len(chunk)
        if progress:
            progress("fine", done, len(boxes))
    with timer.stage("fuse"):
        labels = (canvas[0] > threshold).astype(np.uint8) if binary else canvas.argmax(axis=0).astype(np.uint8)
        probs = None
        if keep_coarse or return_probs:
            rough_labels, rough_probs = upsample_labels(rough, (H, W), threshold, want_probs=return_probs)
            if keep_coarse:
                labels[~covered] = rough_labels[~covered]
            if return_probs:
                probs = np.concatenate([1.0 - canvas, canvas]) if binary else canvas
                if keep_coarse:
                    probs[:, ~covered] = rough_probs[:, ~covered]
                else:
                    probs[:, ~covered] = 0.0
                    probs[0, ~covered] = 1.0
    return Result(labels, probs, timer.t, {"crops": int(len(boxes)), "boxes": boxes.tolist()})
