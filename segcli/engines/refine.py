"""Uncertainty-ranked patch refinement (Teixeira e Silva, Cruz, Gonçalves; Cruz et al. 2023).

A low-resolution pass segments the whole image; the full-resolution grid patches whose rough
probabilities are most uncertain are re-segmented by a second network at full resolution and
overwrite the upsampled rough result. Cost is about (1 + N·patch²/S²) rough-pass equivalents
instead of a full-resolution pass over every pixel.
"""

from __future__ import annotations

import numpy as np

from segcli.engines.base import Plane, ProgressFn, Result, Timer, batched, rough_input, upsample_labels
from segcli.fusion import labels_from_probs
from segcli.geometry import patch_grid, patch_std, scale_boxes, select_patches, uncertainty_scores
from segcli.params import DEFAULT_PARAMS as D
from segcli.resize import resize
from segcli.runtimes.predictor import Predictor


def refine(
    plane: Plane,
    coarse: Predictor,
    fine: Predictor,
    *,
    size: int,
    fine_size: int | None = None,
    patch_size: int | None = None,
    patches: int | None = D["patches"],
    refine_threshold: float | None = D["refine_threshold"],
    criterion: str = D["criterion"],
    min_patch_std: float | None = D["min_patch_std"],
    threshold: float = D["threshold"],
    keep_aspect: bool = D["keep_aspect"],
    batch_size: int = D["batch_size"],
    return_probs: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """Segment one 2D image: rough pass at ``size``, then refine the top patches at full resolution.

    ``patch_size`` is the side of a grid patch in full-resolution pixels (default: the fine
    network's input size, so patches are seen at native resolution); ``patches`` caps how many
    are refined and ``refine_threshold`` refines every patch scoring above it. ``min_patch_std``
    skips patches whose rough-pass input is flat (standard deviation below it, in normalised
    intensity): on slide glass the rough network is uncertain, but there is nothing to refine.
    """
    timer = Timer()
    H, W = plane.shape
    fine_size = fine_size or size
    patch_size = patch_size or fine_size
    with timer.stage("rough"):
        x, (h, w) = rough_input(plane, size, keep_aspect)
        rough = coarse(x[None])[0][:, :h, :w]
    with timer.stage("rank"):
        grid = patch_grid((H, W), patch_size)
        low = scale_boxes(grid, (H, W), (h, w))
        low[:, 2] = np.maximum(low[:, 2], low[:, 0] + 1)
        low[:, 3] = np.maximum(low[:, 3], low[:, 1] + 1)
        scores = uncertainty_scores(rough, low, criterion)
        eligible = None if not min_patch_std else patch_std(x[:, :h, :w], low) >= min_patch_std
        chosen = select_patches(scores, n=patches, threshold=refine_threshold, eligible=eligible)
    with timer.stage("upsample"):
        labels, probs = upsample_labels(rough, (H, W), threshold, want_probs=return_probs)
    done = 0
    for chunk in batched(chosen.tolist(), batch_size):
        with timer.stage("crops"):
            xb = np.stack([resize(plane.region(grid[i]), (fine_size, fine_size), "area") for i in chunk])
        with timer.stage("fine"):
            pb = fine(xb)
        with timer.stage("fuse"):
            for j, i in enumerate(chunk):
                y0, x0, y1, x1 = grid[i]
                p = resize(pb[j], (y1 - y0, x1 - x0), "bilinear")
                labels[y0:y1, x0:x1] = labels_from_probs(p, threshold)
                if probs is not None:
                    probs[:, y0:y1, x0:x1] = p
        done += len(chunk)
        if progress:
            progress("fine", done, len(chosen))
    info = {"patches_total": int(len(grid)), "patches_refined": int(len(chosen)), "patch_size": int(patch_size),
            "patches_flat": 0 if eligible is None else int((~eligible).sum()),
            "refined_boxes": grid[chosen].tolist()}
    return Result(labels, probs, timer.t, info)
