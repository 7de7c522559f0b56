"""Baselines: one network on the downscaled image (``direct``) or full-resolution sliding window.

They exist so users and benchmarks compare coarse-to-fine against the usual ways with the same
networks and backends.
"""

from __future__ import annotations

import numpy as np

from segcli.engines.base import (
    Plane,
    ProgressFn,
    Result,
    Timer,
    batched,
    labels_from_probs,
    rough_input,
    upsample_labels,
)
from segcli.geometry import gaussian_weight, sliding_grid
from segcli.resize import letterbox
from segcli.runtimes import Predictor


def direct(
    plane: Plane,
    net: Predictor,
    *,
    size: int,
    threshold: float = 0.5,
    keep_aspect: bool = True,
    return_probs: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """The papers' baseline: the whole image downscaled to S, one pass, upsampled back."""
    timer = Timer()
    with timer.stage("rough"):
        x, (h, w) = rough_input(plane, size, keep_aspect)
        rough = net(x[None])[0][:, :h, :w]
    with timer.stage("upsample"):
        labels, probs = upsample_labels(rough, plane.shape, threshold, want_probs=return_probs)
    return Result(labels, probs, timer.t, {})


def sliding(
    plane: Plane,
    net: Predictor,
    *,
    size: int,
    overlap: float = 0.25,
    threshold: float = 0.5,
    batch_size: int = 16,
    return_probs: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """Full-resolution sliding window with Gaussian blending (the nnU-Net/MONAI way)."""
    timer = Timer()
    H, W = plane.shape
    tiles = sliding_grid((H, W), size, overlap)
    g = gaussian_weight((size, size))
    acc: np.ndarray | None = None
    weight = np.zeros((H, W), dtype=np.float32)
    done = 0
    for chunk in batched(list(range(len(tiles))), batch_size):
        with timer.stage("crops"):
            xb = np.stack([letterbox(plane.region(tiles[i]), size)[0] for i in chunk])
        with timer.stage("fine"):
            pb = net(xb)
        with timer.stage("fuse"):
            if acc is None:
                acc = np.zeros((pb.shape[1], H, W), dtype=np.float32)
            for j, i in enumerate(chunk):
                y0, x0, y1, x1 = tiles[i]
                gw = g[: y1 - y0, : x1 - x0]
                acc[:, y0:y1, x0:x1] += pb[j][:, : y1 - y0, : x1 - x0] * gw
                weight[y0:y1, x0:x1] += gw
        done += len(chunk)
        if progress:
            progress("tiles", done, len(tiles))
    with timer.stage("fuse"):
        acc /= weight[None]
        labels = labels_from_probs(acc, threshold)
    return Result(labels, acc if return_probs else None, timer.t, {"tiles": int(len(tiles))})
