"""Volumes: 2D engines slice by slice, and segment-then-segment with 3D components.

For stts the rough slice masks are stacked and labelled in 3D, so one object gets ONE in-plane
square box for all the slices it spans: crops stay consistent from slice to slice, and blobs
smaller than ``min_volume`` rough voxels (one-slice noise) are dropped before any fine pass.

Memory: slices are fetched (from an in-memory array, or decoded slab by slab from the file, see
:mod:`segcli.io.volstream`) and normalised one at a time (:class:`SlicePlane`), results are written
straight into one preallocated uint8 volume, and the rough maps are kept only when ``keep_coarse`` or
probabilities need them, so a streamed 512×512×1000 CT holds its mask and one slab, never the decoded
volume or a float copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segcli.engines.base import ArrayPlane, Plane, ProgressFn, Result, Timer, batched, rough_input
from segcli.engines.stts import fine_pass
from segcli.fusion import foreground
from segcli.geometry import boxes3d_to_2d, component_boxes, scale_boxes, square_pad_shift, valid_boxes
from segcli.params import DEFAULT_PARAMS as D
from segcli.params import default_pad
from segcli.runtimes.predictor import Predictor


class SlicePlane:
    """One slice of a channel-last volume, fetched and normalised only when an engine reads it.

    ``fetch(index)`` gives the raw ``(H, W, C)`` slice; ``normalize(slice)`` must equal the slice of
    the whole normalised volume (see ``segcli.prepare.volume_normalizer``), so results are those of
    normalising everything up front, at one slice of float memory instead of the whole volume's.
    """

    def __init__(self, fetch: Callable[[int], np.ndarray], index: int, shape: tuple[int, int],
                 normalize: Callable[[np.ndarray], np.ndarray], channels: int) -> None:
        self._fetch, self.index, self._normalize = fetch, index, normalize
        self.channels = channels
        self.shape = (int(shape[0]), int(shape[1]))

    def array(self) -> np.ndarray:
        """``(C, H, W)`` float32 of the whole slice."""
        s = self._fetch(self.index)  # (H, W, C) raw
        return np.ascontiguousarray(np.moveaxis(self._normalize(s), -1, 0))

    def region(self, box: np.ndarray) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        return self.array()[:, y0:y1, x0:x1]

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        return ArrayPlane(self.array()).downscaled(out_hw)


class _Cached:
    """A plane read whole once (a slice is small) while one engine call works on it."""

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self.shape = plane.shape
        self.channels = plane.channels
        self._arr: ArrayPlane | None = None

    def _get(self) -> ArrayPlane:
        if self._arr is None:
            inner: Any = self.plane
            self._arr = ArrayPlane(inner.array()) if hasattr(inner, "array") and callable(inner.array) \
                else inner  # type: ignore[assignment]
        return self._arr  # type: ignore[return-value]

    def region(self, box: np.ndarray) -> np.ndarray:
        return self._get().region(box)

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        return self._get().downscaled(out_hw)


def per_slice(planes: Sequence[Plane], fn: Callable[[Plane], Result], progress: ProgressFn | None = None,
              out: np.ndarray | None = None, probs_out: Any = None) -> Result:
    """Apply a 2D engine to every slice, writing into one preallocated volume (no list of slices).

    ``out`` (``(Z, H, W)`` uint8, any strides) receives the labels; by default one is allocated.
    ``probs_out`` (anything with ``put(z, (K, H, W))``, e.g. a file-backed store) receives the
    probabilities slice by slice instead of a ``(K, Z, H, W)`` array.
    """
    acc = _Stacker(len(planes), out, probs_out)
    for z, plane in enumerate(planes):
        acc.add(z, fn(_Cached(plane) if isinstance(plane, SlicePlane) else plane))
        if progress:
            progress("slices", z + 1, len(planes))
    return acc.result()


class _Stacker:
    """Collects per-slice results into ``(Z, H, W)`` labels and ``(K, Z, H, W)`` probabilities.

    ``out`` may be a strided view of the writer's buffer (see ``segcli.io.medical.canonical_view``),
    so the mask is written once, in the file's own axis order.
    """

    def __init__(self, n: int, out: np.ndarray | None = None, probs_out: Any = None) -> None:
        self.n = n
        self.labels: np.ndarray | None = out
        self.probs: np.ndarray | None = None
        self.sink = probs_out
        self.timings: dict[str, float] = {}
        self.info: dict[str, int] = {}

    def add(self, z: int, r: Result) -> None:
        lab = np.asarray(r.labels)
        if self.labels is None:
            self.labels = np.zeros((self.n, *lab.shape), np.uint8)
        self.labels[z] = lab
        if r.probs is not None and self.sink is not None:
            self.sink.put(z, r.probs)
        elif r.probs is not None:
            if self.probs is None:
                self.probs = np.zeros((r.probs.shape[0], self.n, *lab.shape), np.float32)
            self.probs[:, z] = r.probs
        for k, v in r.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v
        for key in ("crops", "patches_refined", "tiles"):
            if key in r.info:
                self.info[key] = self.info.get(key, 0) + int(r.info[key])  # type: ignore[call-overload]

    def result(self) -> Result:
        labels = self.labels if self.labels is not None else np.zeros((0, 0, 0), np.uint8)
        probs = self.sink if self.sink is not None and self.labels is not None else self.probs
        return Result(labels, probs, self.timings, dict(self.info))


def stts_volume(
    planes: Sequence[Plane],
    coarse: Predictor,
    fine: Predictor,
    *,
    size: int,
    pad: int | None = None,
    threshold: float = D["threshold"],
    keep_aspect: bool = D["keep_aspect"],
    min_side: int = D["min_side"],
    min_volume: int = D["min_volume"],
    keep_coarse: bool = D["keep_coarse"],
    batch_size: int = D["batch_size"],
    return_probs: bool = False,
    progress: ProgressFn | None = None,
    out: np.ndarray | None = None,
    probs_out: Any = None,
) -> Result:
    """Segment-then-segment on a stack of slices with 3D connected components (``out``, ``probs_out``: see
    per_slice)."""
    timer = Timer()
    H, W = planes[0].shape
    pad = default_pad(size) if pad is None else pad
    rough: list[np.ndarray] = []
    fgs: list[np.ndarray] = []
    keep_rough = keep_coarse or return_probs
    with timer.stage("rough"):
        hw = (0, 0)
        for chunk in batched(list(planes), batch_size):
            xs = [rough_input(p, size, keep_aspect) for p in chunk]
            hw = xs[0][1]
            pb = coarse(np.stack([x for x, _ in xs]))
            for r in pb[:, :, : hw[0], : hw[1]]:
                fgs.append(foreground(r, threshold))
                # Only keep_coarse/probabilities need the rough floats later; the rest needs the mask.
                rough.append(np.array(r) if keep_rough else np.zeros((r.shape[0], 1, 1), np.float32))
    with timer.stage("components"):
        fg = np.stack(fgs)
        del fgs
        b3 = component_boxes(fg, min_size=min_volume)
        zr, b2 = boxes3d_to_2d(b3)
        b2 = square_pad_shift(scale_boxes(b2, hw, (H, W)), (H, W), pad)
        keep = valid_boxes(b2, (H, W), min_side)
        zr, b2 = zr[keep], b2[keep]
    acc = _Stacker(len(planes), out, probs_out)
    crops = 0
    for z, plane in enumerate(planes):
        sel = (zr[:, 0] <= z) & (z < zr[:, 1])
        r = fine_pass(_Cached(plane) if isinstance(plane, SlicePlane) else plane, fine, b2[sel], rough[z],
                      size=size, threshold=threshold, keep_coarse=keep_coarse, batch_size=batch_size,
                      return_probs=return_probs, timer=timer)
        crops += int(r.info["crops"])  # type: ignore[call-overload]
        acc.add(z, r)
        rough[z] = rough[z][:, :1, :1]  # free this slice's rough map
        if progress:
            progress("slices", z + 1, len(planes))
    out = acc.result()
    out.timings = timer.t
    out.info = {"crops": crops, "components": int(len(b2))}
    return out
