"""Fusion: turning many overlapping window predictions into one label image, in bounded memory.

Every engine hands its network outputs to an aggregator with the same two calls, ``aggregate(box, probs)`` per
window and ``finalize(return_probs)`` once, so the fusion rule is a choice of aggregator, not engine code:

* :class:`FuseStore`: per-class maximum (OR for binary tasks, the segment-then-segment paper's rule),
  stored only where windows reached, 1 byte per pixel for binary tasks, optionally spilled to disk;
  :class:`LazyLabels` reads it back window by window for masks too large to hold.
* :class:`WeightedMean`: Gaussian-weighted mean of overlapping tiles (the sliding-window rule), dense; :class:`BlendStore`
  is the same rule kept as tiles where windows reached (spillable, read lazily), for a bounded sliding run.
* stts's other fusion rules (:data:`FUSION_RULES`, chosen with :func:`make_fusion`, in memory): :class:`MeanFuse`
  (mean over the crops that reach a pixel), :class:`CentreFuse` (Gaussian weight towards each crop's centre) and
  :class:`OwnBoxFuse` (max, each crop writing only inside its own object's box plus a margin).
  ``benchmarks/bench_stts_ablation.py`` compares them. :class:`CoarseFill` gives the rough map where none reached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from segcli.resize import resize_window
from segcli.runtimes.predictor import log_probs, logit, logits_to_probs
from segcli.tiles import TileStore


def class_argmax(probs: np.ndarray) -> np.ndarray:
    """uint8 index of the largest of ``(K, ...)`` probabilities, the first one on a tie (as ``argmax(axis=0)``),
    by K contiguous passes: numpy's argmax over the leading axis strides across planes, 2× slower on a
    (3, 512, 512) tile (7.2 against 3.7 ms), and it was a tenth of a three-class bundle's slide run."""
    best = np.array(probs[0], copy=True)
    out = np.zeros(best.shape, np.uint8)
    for k in range(1, probs.shape[0]):
        np.putmask(out, probs[k] > best, k)
        np.maximum(best, probs[k], out=best)
    return out


def foreground(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Binary foreground from ``(K, ...)`` probabilities: p₁ > t for K = 2, argmax ≠ 0 otherwise."""
    if probs.shape[0] == 2:
        return probs[1] > threshold
    return class_argmax(probs) != 0


def labels_from_probs(probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 labels from ``(K, ...)`` probabilities: p₁ > t for K = 2, argmax otherwise."""
    if probs.shape[0] == 2:
        return (probs[1] > threshold).astype(np.uint8)
    return class_argmax(probs)


def folded_labels(v: np.ndarray, boundary: tuple[int, int], threshold: float,
                  weight: np.ndarray | None = None) -> np.ndarray:
    """uint8 network labels of ``(K, ...)`` probabilities (or their weighted sums, with ``weight``) of a network
    with a boundary class, whose folded labels are those of the network folded before fusion.

    The mask decides first with the boundary added to its object, as a run without instances does (p_obj +
    p_bnd > t for a binary fold, the argmax of the folded classes otherwise); only inside that object is a pixel
    boundary or interior, whichever of the two is larger. So a slide's mask is the same with or without
    ``--instances``; the argmax of the three classes (background 0.4, nucleus 0.35, boundary 0.25 is
    background) gave 2.2 % fewer nucleus pixels on a 16000² slide."""
    b, obj = boundary
    folded = fold_probs(v, boundary)
    if folded.shape[0] == 2:
        t = threshold if weight is None else threshold * weight
        flab = (folded[1] > t).astype(np.uint8)
    else:
        flab = class_argmax(folded)
    back = np.array([k if k < b else k + 1 for k in range(folded.shape[0])], np.uint8)  # folded -> network ids
    lab = back[flab]
    lab[(lab == obj) & (v[b] > v[obj])] = b
    return lab


class WeightedMean:
    """Weighted mean of overlapping windows (Gaussian importance in sliding windows), dense in memory; with
    ``logits`` (blend ``nnunet``) of their log-probabilities, then softmax: nnU-Net's averaged logits."""

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float, weight: np.ndarray,
                 nested: tuple[int, int] | None = None, logits: bool = False) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.threshold = threshold
        self.nested = nested  # a boundary class: labels by folded_labels
        self.logits = logits
        self.window_weight = np.asarray(weight, dtype=np.float32)
        self.acc = np.zeros((n_classes, *self.shape), dtype=np.float32)
        self.weight = np.zeros(self.shape, dtype=np.float32)

    def aggregate(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray) -> None:
        y0, x0, y1, x1 = (int(v) for v in box)
        gw = self.window_weight[: y1 - y0, : x1 - x0]
        p = probs[:, : y1 - y0, : x1 - x0]
        self.acc[:, y0:y1, x0:x1] += (log_probs(p) if self.logits else p) * gw
        self.weight[y0:y1, x0:x1] += gw

    def finalize(self, return_probs: bool, uncovered_background: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities); ``uncovered_background``: pixels no window reached are background."""
        empty = self.weight == 0
        np.divide(self.acc, self.weight[None], out=self.acc, where=~empty[None])
        if self.logits:  # the averaged logits' softmax, in place: a K×H×W map's temporaries are two H×W planes
            logits_to_probs(self.acc[None], inplace=True)
        if uncovered_background and empty.any():
            self.acc[:, empty] = 0.0
            self.acc[0][empty] = 1.0
        if self.nested is not None:
            return folded_labels(self.acc, self.nested, self.threshold), (self.acc if return_probs else None)
        return labels_from_probs(self.acc, self.threshold), (self.acc if return_probs else None)


class CoarseFill:
    """Labels and probabilities of the upsampled rough map, for any window, on demand.

    Pixels no crop reached take these values under ``keep_coarse``; computing them per window means
    the full-resolution float map (K×H×W×4 bytes, 12.8 GB at 40k² and K = 2) never exists.
    """

    def __init__(self, rough: np.ndarray, full_hw: tuple[int, int], threshold: float) -> None:
        # float16 rough maps (huge slides) stay float16: windows are cast as they are read
        self.rough = rough if rough.dtype in (np.float16, np.float32) else np.asarray(rough, dtype=np.float32)
        self.full_hw = (int(full_hw[0]), int(full_hw[1]))
        self.threshold = threshold

    def probs(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        return resize_window(self.rough, self.full_hw, box, "bilinear")

    def labels(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        return labels_from_probs(self.probs(box), self.threshold)


# -- bounded fusion of crop probabilities ------------------------------------------------------------------


class Quantizer:
    """uint8 codes for a foreground probability that keep ``p > t`` exact: ``q ≥ 128 ⇔ p > t``.

    The code is monotone in p, so max-fusion of codes equals the code of the max-fused probability: binary
    OR-fusion through 1 byte per pixel gives exactly the labels of float fusion, and probabilities good to ~1/127
    of their side of the threshold. 0 means "no crop reached here". ``labels_only`` (no probability will be read):
    255 or 1, the same labels and coverage from one comparison (a photo's crop: 0.46 → 0.1 ms).
    """

    def __init__(self, threshold: float, labels_only: bool = False) -> None:
        self.t = float(min(max(threshold, 1e-6), 1.0))
        self.labels_only = labels_only

    def encode(self, p: np.ndarray) -> np.ndarray:
        if self.labels_only:
            return np.where(np.asarray(p, dtype=np.float32) > self.t, np.uint8(255), np.uint8(1))
        p = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
        t = self.t
        lo = 1.0 + np.floor(p / t * 126.999)
        hi = 128.0 + np.floor((p - t) / max(1.0 - t, 1e-6) * 127.999)
        return np.where(p > t, hi, lo).astype(np.uint8)

    def decode(self, q: np.ndarray) -> np.ndarray:
        if self.labels_only:
            raise RuntimeError("labels-only fusion codes hold no probabilities")
        q = q.astype(np.float32)
        t = self.t
        return np.where(q >= 128, t + (q - 127.5) / 128.0 * (1.0 - t), (q - 0.5) / 127.0 * t).astype(np.float32)


def _fill_uncovered(p: np.ndarray, cov: np.ndarray, fill: CoarseFill | None,
                    box: np.ndarray | tuple[int, ...]) -> np.ndarray:
    """``p`` where a window reached (``cov``), else the rough map's probabilities (``fill``) or background."""
    if cov.all():
        return p
    if fill is not None:
        other = fill.probs(box)
    else:
        other = np.zeros_like(p)
        other[0] = 1.0
    return np.where(cov[None], p, other).astype(np.float32)


class FuseStore(TileStore):
    """Per-class maximum of crop probabilities, only where crops reached (a :class:`TileStore`).

    Binary tasks store the foreground channel as :class:`Quantizer` codes (1 byte/pixel, exact
    labels); multi-class tasks, or callers wanting exact probabilities (``exact=True``), store
    float32 with -1 meaning "no crop". Untouched tiles cost nothing.
    """

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float, *, exact: bool = False,
                 tile: int = 512, spill_dir: str | os.PathLike | None = None, cache_bytes: int = 64 * 2**20,
                 labels_only: bool = False) -> None:
        self.n_classes = n_classes
        self.binary = n_classes == 2
        self.quant = Quantizer(threshold, labels_only) if (self.binary and not exact) else None
        self.threshold = threshold
        super().__init__(shape, 1 if self.binary else n_classes, np.uint8 if self.quant else np.float32,
                         0 if self.quant else -1.0, tile=tile, spill_dir=spill_dir, cache_bytes=cache_bytes)

    # fusion and reads ---------------------------------------------------------------------------------
    def aggregate(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray) -> None:
        """Max-fuse ``probs`` — ``(K, h, w)`` for the box ``(y0, x0, y1, x1)``; a binary task's may be its
        foreground alone, ``(1, h, w)`` — into the store."""
        p = probs[-1:] if self.binary else probs
        self.maximum(box, self.quant.encode(p) if self.quant else np.asarray(p, dtype=np.float32))

    fuse = aggregate  # the paper's word for it

    def finalize(self, return_probs: bool, fill: CoarseFill | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Full-size labels (and probabilities) with ``fill`` where no window reached; closes the store."""
        lazy = LazyLabels(self, fill, fill)
        labels = np.asarray(lazy)
        probs = None
        if return_probs:
            H, W = self.shape
            probs = np.empty((self.n_classes, H, W), np.float32)
            for y in range(0, H, self.tile):
                y1 = min(H, y + self.tile)
                probs[:, y:y1] = lazy.read_probs((y, 0, y1, W))
        self.close()
        return labels, probs

    def covered(self, stored: np.ndarray) -> np.ndarray:
        return stored[0] != self.empty if self.quant else stored[0] >= 0

    def labels(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """uint8 labels of a box: fused crops where they reached, else the rough labels or background."""
        if not self.touches(box):
            return self._untouched_labels(box, fill)
        v = self.read(box)
        if self.quant:
            lab = (v[0] >= 128).astype(np.uint8)
        elif self.binary:
            lab = (v[0] > self.threshold).astype(np.uint8)
        else:
            lab = class_argmax(v)
        if fill is not None:
            cov = self.covered(v)
            if not cov.all():
                lab = np.where(cov, lab, fill.labels(box)).astype(np.uint8)
        return lab

    def probs(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """float32 ``(K, h, w)``: fused probabilities; rough ones (``fill``) or background elsewhere."""
        v = self.read(box)
        cov = self.covered(v)
        if self.binary:
            p1 = self.quant.decode(v[0]) if self.quant else v[0]
            p = np.stack([1.0 - p1, p1]).astype(np.float32)
        else:
            p = v.astype(np.float32)
        return _fill_uncovered(p, cov, fill, box)


class LazyLabels:
    """A label image that exists only as a :class:`FuseStore` plus a rough map, read window by window: what stts
    returns for inputs too large to hold, read a tile at a time by the streamed TIFF writer (``np.asarray``: all)."""

    ndim = 2
    dtype = np.dtype(np.uint8)

    def __init__(self, store: FuseStore | BlendStore, fill: CoarseFill | None,
                 probs_fill: CoarseFill | None = None) -> None:
        self.store = store
        self.fill = fill
        self.probs_fill = probs_fill
        self.shape = store.shape

    def read(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self.store.labels(box, self.fill)

    def read_probs(self, box: np.ndarray | tuple[int, ...]) -> np.ndarray:
        return self.store.probs(box, self.probs_fill)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        T = self.store.tile
        for y in range(0, self.shape[0], T):
            for x in range(0, self.shape[1], T):
                box = (y, x, min(y + T, self.shape[0]), min(x + T, self.shape[1]))
                out[box[0] : box[2], box[1] : box[3]] = self.read(box)
        return out if dtype is None else out.astype(dtype)


class BlendStore(TileStore):
    """The sliding window's Gaussian blending (:class:`WeightedMean`'s rule: σ = side / 8, floored at 1e-3),
    kept as tiles only where windows reached and spillable like :class:`FuseStore`, so a bounded run over a
    slide's tissue fuses exactly as the in-memory sliding window does over a small image.

    Channels: the weighted sum of each class's probability (only the foreground's for binary tasks), then the
    summed weight. float32, 8 bytes per touched pixel for a binary task. ``logits`` (blend ``nnunet``, as
    :class:`WeightedMean`): the sums are of log-probabilities (binary: of the gap log p₁ − log p₀), the same
    bytes; ``weight_for((h, w))`` gives a window's importance map (default: segcli's Gaussian).
    """

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float, *, tile: int = 512,
                 spill_dir: str | os.PathLike | None = None, cache_bytes: int = 64 * 2**20,
                 nested: tuple[int, int] | None = None, logits: bool = False,
                 weight_for: Callable[[tuple[int, int]], np.ndarray] | None = None) -> None:
        self.n_classes = n_classes
        self.binary = n_classes == 2
        self.weight_for = weight_for
        self.threshold = threshold
        self.logits = logits
        self.cut = logit(threshold)  # logits, binary: p₁ > t where the mean gap exceeds this
        self.nested = nested if not self.binary else None  # a boundary class: labels by folded_labels
        self._weights: dict[tuple[int, int], np.ndarray] = {}
        super().__init__(shape, (1 if self.binary else n_classes) + 1, np.float32, 0.0, tile=tile,
                         spill_dir=spill_dir, cache_bytes=cache_bytes)

    def _window_weight(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._weights:
            # lazy: brings scipy
            from segcli.geometry import gaussian_weight

            self._weights[(h, w)] = (self.weight_for or gaussian_weight)((h, w))
        return self._weights[(h, w)]

    def _values(self, probs: np.ndarray) -> np.ndarray:
        """What a window adds (before its weight): probabilities, or log-probabilities (binary: the gap)."""
        p = np.asarray(probs, np.float32)
        if not self.logits:
            return p[1:2] if self.binary else p
        lp = log_probs(p)
        return lp[1:2] - lp[0:1] if self.binary else lp

    def aggregate(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray,
                  crop: np.ndarray | tuple[int, ...] | None = None, own: object = None) -> None:
        """Add ``probs`` ``(K, h, w)`` for ``box``, weighted by the Gaussian of its window ``crop`` (default ``box``)."""
        b = tuple(int(v) for v in box)
        c = b if crop is None else tuple(int(v) for v in crop)
        g = self._window_weight(c[2] - c[0], c[3] - c[1])[b[0] - c[0] : b[2] - c[0], b[1] - c[1] : b[3] - c[1]]
        p = self._values(probs)
        # tile by tile into the store, without first stacking the weighted channels and the weight (a copy of
        # K + 1 planes per window: a three-class bundle's windows fused in 1.33 ms each that way, 0.8 ms now)
        y0, x0 = b[0], b[1]
        T = self.tile
        with self._lock:
            for key, (a0, b0, a1, b1) in self._tiles(b):
                arr = self._get(key, create=True)
                assert arr is not None
                ty, tx = key[0] * T, key[1] * T
                gw = g[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
                dst = arr[:, a0 - ty : a1 - ty, b0 - tx : b1 - tx]
                dst[:-1] += p[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] * gw
                dst[-1] += gw
                self._dirty.add(key)

    def covered(self, stored: np.ndarray) -> np.ndarray:
        return stored[-1] > 0

    def _mean(self, box: np.ndarray | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The weighted mean of the stored channels over a box (0 where no window reached) and that coverage."""
        v = self.read(box)
        cov = self.covered(v)
        return np.divide(v[:-1], v[-1:], out=np.zeros_like(v[:-1]), where=cov[None]), cov

    def _mean_probs(self, mean: np.ndarray) -> np.ndarray:
        """``(K, h, w)`` probabilities of the stored means."""
        if not self.logits:
            return np.concatenate([1.0 - mean, mean]) if self.binary else mean
        return logits_to_probs(mean[None], inplace=True)[0]  # binary: the gap's sigmoid; else the softmax

    def probs(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """float32 ``(K, h, w)``: blended probabilities; rough ones (``fill``) or background elsewhere."""
        mean, cov = self._mean(box)
        return _fill_uncovered(self._mean_probs(mean).astype(np.float32), cov, fill, box)

    def labels(self, box: np.ndarray | tuple[int, ...], fill: CoarseFill | None = None) -> np.ndarray:
        """uint8 labels of a box: the blended windows where they reached, else the rough labels or background."""
        # The weighted sums give the labels without dividing by the weight (> 0 where a window reached): the
        # mean exceeds t where the sum exceeds t·weight, and a class's sum is largest where its mean is (of
        # log-probabilities too: they differ from the logits by one number per pixel, the same for every class).
        if not self.touches(box):
            return self._untouched_labels(box, fill)
        v = self.read(box)
        cov = self.covered(v)
        if self.binary:
            with np.errstate(invalid="ignore"):  # ±inf cut (t = 0 or 1) times a zero weight: uncovered anyway
                lab = (v[0] > (self.cut if self.logits else self.threshold) * v[-1]).astype(np.uint8)
        elif self.nested is None:
            lab = class_argmax(v[:-1])
        else:  # the fold adds probabilities: a logit blend's softmax first
            lab = folded_labels(self._mean_probs(self._mean(box)[0]), self.nested, self.threshold) if self.logits \
                else folded_labels(v[:-1], self.nested, self.threshold, v[-1])
        lab[~cov] = 0  # no window reached: background
        if fill is not None and not cov.all():
            lab = np.where(cov, lab, fill.labels(box)).astype(np.uint8)
        return lab

    def finalize(self, return_probs: bool, fill: CoarseFill | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Full-size labels (and probabilities) with ``fill`` where no window reached; closes the store."""
        return FuseStore.finalize(self, return_probs, fill)  # type: ignore[arg-type]


# -- alternative fusion rules for stts (issue 22 ablations; in memory, dense) ---------------------------------

#: ``gaussian`` is the sliding window's blending (:class:`BlendStore`), the rule of a bounded sliding run.
FUSION_RULES = ("max", "mean", "centre", "own-box", "gaussian")


def centre_weight(h: int, w: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance of an ``(h, w)`` crop: 1 at its centre, σ = ``sigma_scale`` × side per axis (nnU-Net: side / 8),
    floored at 1e-6 so that a pixel only one crop reaches, at its very border, still takes that crop's probability."""
    ys = np.arange(h, dtype=np.float64) - (h - 1) / 2.0
    xs = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    sy, sx = max(h * sigma_scale, 1e-6), max(w * sigma_scale, 1e-6)
    g = np.exp(-(ys[:, None] ** 2) / (2 * sy * sy) - (xs[None, :] ** 2) / (2 * sx * sx))
    return np.maximum(g, 1e-6).astype(np.float32)


class MeanFuse:
    """Mean of crop probabilities over the crops that reach each pixel (dense K×H×W float32); pixels no crop
    reached are background, or the rough map's values with ``fill`` (``keep_coarse``)."""

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_classes = n_classes
        self.threshold = threshold
        self.acc = np.zeros((n_classes, *self.shape), dtype=np.float32)
        self.weight = np.zeros(self.shape, dtype=np.float32)
        self.touched_tiles = 0  # Result.info parity with FuseStore; dense, so no tiles

    def weights(self, box: tuple[int, int, int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
        return np.ones((box[2] - box[0], box[3] - box[1]), dtype=np.float32)

    def aggregate(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray,
                  crop: np.ndarray | tuple[int, ...] | None = None,
                  own: np.ndarray | tuple[int, ...] | None = None) -> None:
        """Add ``probs`` ``(K, h, w)`` for ``box``; ``crop`` (default ``box``) is the network's window."""
        b = tuple(int(v) for v in box)
        c = b if crop is None else tuple(int(v) for v in crop)
        y0, x0, y1, x1 = b
        w = self.weights(b, c)  # type: ignore[arg-type]
        self.acc[:, y0:y1, x0:x1] += np.asarray(probs, dtype=np.float32)[:, : y1 - y0, : x1 - x0] * w
        self.weight[y0:y1, x0:x1] += w

    def finalize(self, return_probs: bool, fill: CoarseFill | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        cov = self.weight > 0
        probs = self.acc
        np.divide(probs, self.weight[None], out=probs, where=cov[None])
        probs = _fill_uncovered(probs, cov, fill, (0, 0, *self.shape))
        return labels_from_probs(probs, self.threshold), (probs if return_probs else None)


class CentreFuse(MeanFuse):
    """Weighted mean of crop probabilities, each crop weighted by :func:`centre_weight` over its window."""

    def __init__(self, shape: tuple[int, int], n_classes: int, threshold: float, sigma_scale: float = 0.125) -> None:
        super().__init__(shape, n_classes, threshold)
        self.sigma_scale = sigma_scale

    def weights(self, box: tuple[int, int, int, int], crop: tuple[int, int, int, int]) -> np.ndarray:
        g = centre_weight(crop[2] - crop[0], crop[3] - crop[1], self.sigma_scale)
        return g[box[0] - crop[0] : box[2] - crop[0], box[1] - crop[1] : box[3] - crop[1]]


class OwnBoxFuse(FuseStore):
    """Max fusion where each crop writes only inside ``own`` (its object's box plus a margin)."""

    def aggregate(self, box: np.ndarray | tuple[int, ...], probs: np.ndarray,  # type: ignore[override]
                  crop: np.ndarray | tuple[int, ...] | None = None,
                  own: np.ndarray | tuple[int, ...] | None = None) -> None:
        y0, x0, y1, x1 = (int(v) for v in box)
        if own is not None:
            a0, b0, a1, b1 = max(y0, int(own[0])), max(x0, int(own[1])), min(y1, int(own[2])), min(x1, int(own[3]))
            if a1 <= a0 or b1 <= b0:
                return
            probs = probs[:, a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
            y0, x0, y1, x1 = a0, b0, a1, b1
        super().aggregate((y0, x0, y1, x1), probs)


def make_fusion(rule: str, shape: tuple[int, int], n_classes: int, threshold: float, *, exact: bool = False,
                spill_dir: str | os.PathLike | None = None, cache_bytes: int = 64 * 2**20,
                nested: tuple[int, int] | None = None, logits: bool = False, labels_only: bool = False,
                weight_for: Callable[[tuple[int, int]], np.ndarray] | None = None) -> FuseStore | MeanFuse | BlendStore:
    """The aggregator of one stts fusion rule (:data:`FUSION_RULES`); ``max`` is :class:`FuseStore`.

    ``cache_bytes``: the tile cache of a spilled store (its share of the memory plan, segcli.memplan). ``nested`` (a
    boundary class): the Gaussian blend labels by :func:`folded_labels`; the per-class maxima of ``max`` cannot give
    the folded network's maximum, so that rule keeps the argmax. ``logits``, ``weight_for``: the Gaussian blend's
    (:class:`BlendStore`). ``labels_only``: ``max`` keeps no probabilities (:class:`Quantizer`)."""
    if rule == "max":
        return FuseStore(shape, n_classes, threshold, exact=exact, spill_dir=spill_dir, cache_bytes=cache_bytes,
                         labels_only=labels_only)
    if rule == "own-box":
        return OwnBoxFuse(shape, n_classes, threshold, exact=exact, spill_dir=spill_dir, cache_bytes=cache_bytes)
    if rule == "gaussian":
        return BlendStore(shape, n_classes, threshold, spill_dir=spill_dir, cache_bytes=cache_bytes, nested=nested,
                          logits=logits, weight_for=weight_for)
    if rule == "mean":
        return MeanFuse(shape, n_classes, threshold)
    if rule == "centre":
        return CentreFuse(shape, n_classes, threshold)
    raise ValueError(f"unknown fusion rule {rule!r}; expected one of {', '.join(FUSION_RULES)}")


def fold_boundary(res: Any, lut: np.ndarray | None, boundary: tuple[int, int] | None) -> None:
    """A 2D result of a network with a boundary class run unfolded, a photo or a slide for its instance split
    (``segcli.bundle.Bundle.fold``, ``.boundary``): the mask and probabilities get the boundary as part of its
    object, and the network's own labels stay in ``res.parts`` for the split. (Slides without an instance split
    and volumes fold before fusion: ``Bundle.folded``.)"""
    if lut is None or boundary is None or res.parts is not None:
        return
    res.parts, res.labels = res.labels, lut[res.labels]
    if isinstance(res.probs, np.ndarray) and res.probs.shape[0] == len(lut):
        res.probs = fold_probs(res.probs, boundary)


def fold_probs(probs: np.ndarray, boundary: tuple[int, int] | None, axis: int = 0) -> np.ndarray:
    """Network probabilities (classes along ``axis``) to the mask's classes: the boundary class's added to its
    object's."""
    if boundary is None:
        return probs
    b, obj = boundary
    out = np.delete(probs, b, axis=axis)
    keep = obj if obj < b else obj - 1
    np.moveaxis(out, axis, 0)[keep] += np.moveaxis(probs, axis, 0)[b]
    return out
