"""Instance labels from a semantic mask: touching objects split by a seeded watershed on the distance map.

This is the classic post-processing of a U-Net for nuclei (the "U-Net with watershed" row of the MoNuSeg
literature): the centre of a round object is far from its edge, the neck between two touching ones is
close to it, so the peaks of the Euclidean distance transform seed one object each and the watershed of
the inverted distance cuts along the necks. It needs no extra network output, so it serves every bundle;
a network trained with a boundary class separates better where nuclei overlap rather than touch.

Seeds are the regional maxima of the smoothed distance that stand at least ``min_distance`` px from the
edge and from a higher maximum (an h-maxima-like rule on a dilation), so one elongated nucleus is not cut
into beads. Every connected component keeps at least one seed, so no foreground pixel is lost.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def split_touching(mask: np.ndarray, min_distance: float = 3.0, smooth: float = 1.0) -> np.ndarray:
    """uint32 instance ids (0 = background) for a 2D foreground ``mask``.

    ``min_distance``: seeds closer than this to a higher seed merge (px at the image's own scale).
    """
    fg = np.asarray(mask) > 0
    if fg.ndim != 2:
        raise ValueError(f"split_touching takes a 2D mask, not shape {fg.shape}")
    comps, n = ndi.label(fg, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(fg.shape, np.uint32)
    dist = ndi.distance_transform_edt(fg).astype(np.float32)
    if smooth > 0:
        dist = ndi.gaussian_filter(dist, smooth) * fg
    size = max(3, int(2 * round(min_distance) + 1))
    peaks = (dist >= ndi.maximum_filter(dist, size=size)) & (dist >= min(min_distance, 1.0)) & fg
    seeds, n_seeds = ndi.label(peaks, structure=np.ones((3, 3), bool))
    # a component without a seed (too small or flat) gets one at its deepest pixel
    seeded = np.zeros(n + 1, bool)
    seeded[np.unique(comps[seeds > 0])] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        for i, (y, x) in enumerate(_deepest(dist, comps, missing)):
            seeds[y, x] = n_seeds + 1 + i
        n_seeds += missing.size
    # scikit-image's compact priority-flood watershed over the inverted distance, restricted to the mask.
    # (scipy's watershed_ift and OpenCV's watershed were tried first: both flood by neighbour differences,
    # and on two equal touching discs one seed took most of the other disc.)
    from skimage.segmentation import watershed

    out = watershed(-dist, markers=seeds, mask=fg, connectivity=2).astype(np.uint32)
    # consecutive ids (a seed the flood never left can vanish under the mask), by a lookup table rather than
    # np.unique's sort of every pixel (a third of the split's time on 768² windows)
    present = np.bincount(out.ravel(), minlength=n_seeds + 1) > 0
    present[0] = True
    if present.all():
        return out
    lut = (np.cumsum(present) - 1).astype(np.uint32)
    return lut[out]


def _deepest(dist: np.ndarray, comps: np.ndarray, which: np.ndarray) -> list[tuple[int, int]]:
    """For each component in ``which``: its first pixel (raster order) of largest ``dist``, as
    ``ndi.maximum_position`` gives it, found with one sort of those components' pixels only."""
    want = np.zeros(int(comps.max()) + 1, bool)
    want[which] = True
    flat = np.flatnonzero(want[comps.ravel()])
    lab, val = comps.ravel()[flat], dist.ravel()[flat]
    order = np.lexsort((flat, -val, lab))
    first = np.r_[True, lab[order][1:] != lab[order][:-1]]
    best = dict(zip(lab[order][first].tolist(), flat[order][first].tolist(), strict=True))
    w = comps.shape[1]
    return [(best[k] // w, best[k] % w) for k in which.tolist()]


def components(mask: np.ndarray) -> np.ndarray:
    """uint32 ids of 8-connected components: the instances a semantic mask gives without splitting."""
    lab, _ = ndi.label(np.asarray(mask) > 0, structure=np.ones((3, 3), bool))
    return lab.astype(np.uint32)
