"""Volumes: 2D engines slice by slice, and segment-then-segment with 3D components.

For stts the rough slice masks are stacked and labelled in 3D, so one object gets ONE in-plane
square box for all the slices it spans: crops stay consistent from slice to slice, and blobs
smaller than ``min_volume`` rough voxels (one-slice noise) are dropped before any fine pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from segcli.engines.base import Plane, ProgressFn, Result, Timer, batched, foreground, rough_input
from segcli.engines.stts import fine_pass
from segcli.geometry import boxes3d_to_2d, component_boxes, scale_boxes, square_pad_shift, valid_boxes
from segcli.runtimes import Predictor


def per_slice(planes: Sequence[Plane], fn: Callable[[Plane], Result], progress: ProgressFn | None = None) -> Result:
    """Apply a 2D engine to every slice and stack the results."""
    results = []
    for z, plane in enumerate(planes):
        results.append(fn(plane))
        if progress:
            progress("slices", z + 1, len(planes))
    return _stack(results)


def _stack(results: list[Result]) -> Result:
    labels = np.stack([r.labels for r in results])
    probs = np.stack([r.probs for r in results], axis=1) if results and results[0].probs is not None else None
    timings: dict[str, float] = {}
    for r in results:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    info: dict[str, object] = {}
    for key in ("crops", "patches_refined", "tiles"):
        if results and key in results[0].info:
            info[key] = int(sum(int(r.info[key]) for r in results))
    return Result(labels, probs, timings, info)


def stts_volume(
    planes: Sequence[Plane],
    coarse: Predictor,
    fine: Predictor,
    *,
    size: int,
    pad: int | None = None,
    threshold: float = 0.5,
    keep_aspect: bool = True,
    min_side: int = 5,
    min_volume: int = 1,
    keep_coarse: bool = False,
    batch_size: int = 16,
    return_probs: bool = False,
    progress: ProgressFn | None = None,
) -> Result:
    """Segment-then-segment on a stack of slices with 3D connected components."""
    timer = Timer()
    H, W = planes[0].shape
    pad = size // 8 if pad is None else pad
    rough: list[np.ndarray] = []
    with timer.stage("rough"):
        hw = (0, 0)
        for chunk in batched(list(planes), batch_size):
            xs = [rough_input(p, size, keep_aspect) for p in chunk]
            hw = xs[0][1]
            pb = coarse(np.stack([x for x, _ in xs]))
            rough.extend(pb[:, :, : hw[0], : hw[1]])
    with timer.stage("components"):
        fg = np.stack([foreground(r, threshold) for r in rough])
        b3 = component_boxes(fg, min_size=min_volume)
        zr, b2 = boxes3d_to_2d(b3)
        b2 = square_pad_shift(scale_boxes(b2, hw, (H, W)), (H, W), pad)
        keep = valid_boxes(b2, (H, W), min_side)
        zr, b2 = zr[keep], b2[keep]
    results = []
    for z, plane in enumerate(planes):
        sel = (zr[:, 0] <= z) & (z < zr[:, 1])
        results.append(fine_pass(plane, fine, b2[sel], rough[z], size=size, threshold=threshold,
                                 keep_coarse=keep_coarse, batch_size=batch_size, return_probs=return_probs,
                                 timer=timer))
        if progress:
            progress("slices", z + 1, len(planes))
    out = _stack(results)
    out.timings = timer.t
    out.info = {"crops": int(sum(r.info["crops"] for r in results)), "components": int(len(b2))}
    return out
