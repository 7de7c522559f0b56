"""Baselines: one network on the downscaled image (``direct``) or full-resolution sliding window.

They exist so users and benchmarks compare coarse-to-fine against the usual ways with the same
networks and backends.
"""

from __future__ import annotations

import numpy as np

from segcli.engines.base import Plane, ProgressFn, Result, Timer, batched, rough_input, upsample_labels
from segcli.fusion import WeightedMean
from segcli.geometry import gaussian_weight, sliding_grid
from segcli.params import DEFAULT_PARAMS as D
from segcli.resize import letterbox
from segcli.runtimes.predictor import Predictor
from segcli.tissue import box_windows


def direct(
    plane: Plane,
    net: Predictor,
    *,
    size: int,
    threshold: float = D["threshold"],
    keep_aspect: bool = D["keep_aspect"],
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


def nnunet_gaussian(shape: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's importance map, from its rule: a unit impulse at ``side // 2`` of each axis smoothed by a sampled
    Gaussian of σ = ``side × sigma_scale`` cut at 4σ (a truncated, separable kernel), scaled to a maximum of 1,
    zeros raised to the smallest non-zero value. Unlike :func:`segcli.geometry.gaussian_weight` it is centred
    half a pixel off (n // 2, not (n - 1) / 2) and has no 1e-3 floor: a 256² window's corners weigh 1e-7.
    (nnU-Net also multiplies by 10 to keep its float16 sums clear of underflow; segcli sums in float32, where
    only the ratios count.)"""
    axes = []
    for n in shape:
        sigma = max(n * sigma_scale, 1e-6)
        off = np.arange(n, dtype=np.float64) - n // 2
        k = np.exp(-0.5 * (off / sigma) ** 2)
        k[np.abs(off) > int(4.0 * sigma + 0.5)] = 0.0  # the kernel's radius
        axes.append(k)
    g = np.outer(axes[0], axes[1])
    g /= g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def window_weight(shape: tuple[int, int], blend: str) -> np.ndarray:
    """A window's importance map under a blend mode (segcli.params.BLENDS)."""
    return nnunet_gaussian(shape) if blend == "nnunet" else gaussian_weight(shape)


def sliding(
    plane: Plane,
    net: Predictor,
    *,
    size: int,
    overlap: float = D["overlap"],
    threshold: float = D["threshold"],
    batch_size: int = D["batch_size"],
    return_probs: bool = False,
    progress: ProgressFn | None = None,
    where: np.ndarray | None = None,
    fold_boundary: tuple[int, int] | None = None,
    blend: str = D["blend"],
) -> Result:
    """Full-resolution sliding window with Gaussian blending (the nnU-Net/MONAI way).

    ``blend`` (segcli.params.BLENDS): ``probs`` averages probabilities under segcli's Gaussian; ``nnunet``
    averages logits under nnU-Net's discretised Gaussian and takes the softmax, as nnUNetv2_predict does.

    ``fold_boundary`` (a network's (boundary class, object class), a slide's ``--instances`` run): labels by
    :func:`segcli.fusion.folded_labels`, so the mask is that of the folded network a run without instances uses.

    ``where`` (a boolean mask on any coarser grid of the plane) limits the tiles to its True parts, each
    covered by its own grid (:func:`segcli.tissue.box_windows`); pixels no tile covers are background
    (probability 1 for class 0).
    """
    timer = Timer()
    H, W = plane.shape
    tiles = sliding_grid((H, W), size, overlap)
    n_grid = len(tiles)
    if where is not None:
        tiles = box_windows(where, (H, W), size, overlap)
        if not len(tiles):  # one network call at least: it says how many classes there are
            tiles = sliding_grid((H, W), size, overlap)[:1]
    g = window_weight((size, size), blend)
    acc: WeightedMean | None = None
    done = 0
    for chunk in batched(list(range(len(tiles))), batch_size):
        with timer.stage("crops"):
            xb = np.stack([letterbox(plane.region(tiles[i]), size)[0] for i in chunk])
        with timer.stage("fine"):
            pb = net(xb)
        with timer.stage("fuse"):
            if acc is None:
                acc = WeightedMean((H, W), pb.shape[1], threshold, g, nested=fold_boundary, logits=blend == "nnunet")
            for j, i in enumerate(chunk):
                acc.aggregate(tiles[i], pb[j])
        done += len(chunk)
        if progress:
            progress("tiles", done, len(tiles))
    assert acc is not None  # a plane always has at least one tile
    with timer.stage("fuse"):
        labels, probs = acc.finalize(return_probs, uncovered_background=where is not None)
    return Result(labels, probs, timer.t, {"tiles": int(len(tiles)), "tiles_skipped": int(n_grid - len(tiles)),
                                           "blend": blend})
