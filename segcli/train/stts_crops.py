"""Where stts' fine network is trained and validated: on the crops inference will give it.

Inference cuts fine crops around the connected components of the ROUGH mask, not of the ground
truth. In dense fields (nuclei) those components are merged blobs whose crops cover many objects
at a lower zoom, boxes clamped at the image edge, and false-positive blobs of background. A fine
network trained only on single ground-truth objects never sees those inputs (issue 22's ablation:
with ground-truth crops alone the DSB 2018 fine network scored Dice 0.66 even on ground-truth
boxes, against 0.81 for the coarse network alone). So, once the coarse network is trained:

* :func:`rough_maps` runs it over every training and validation image exactly as the rough pass
  does (long side S, aspect kept, edge-padded), once (the coarse network is frozen by then);
* :class:`CropSampler` draws each training crop from the rough mask's components (jittered, then
  squared, padded and clamped as :func:`segcli.geometry.crop_boxes` does) or, with probability
  ``gt_share``, from the ground truth's components, so the network also learns complete objects
  the rough pass split or clipped;
* :func:`stts_validation` scores a candidate fine network with the stts engine itself
  (:func:`segcli.engines.stts.fine_pass`, the shipped fusion and ``keep_coarse`` rule) at full
  resolution on the validation images, so the checkpoint kept is the one with the best final
  Dice, not the best Dice on crops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcli.engines.base import ArrayPlane, Timer
from segcli.engines.stts import fine_pass
from segcli.fusion import foreground
from segcli.geometry import component_boxes, crop_boxes, scale_boxes
from segcli.params import DEFAULT_PARAMS as D
from segcli.runtimes.predictor import logits_to_probs
from segcli.train.data import coarse_input, crop_candidates, to_float
from segcli.train.loop import predict_logits


@dataclass
class RoughMap:
    """One image's rough probabilities ``(K, h, w)`` and its rough components' full-res boxes (unsquared)."""

    probs: np.ndarray
    boxes: np.ndarray


def rough_maps(model: Any, samples: list[Any], size: int, device: str, threshold: float = D["threshold"],
               min_component: int = D["min_component"], batch_size: int = 32) -> list[RoughMap]:
    """The frozen coarse network's rough pass on each sample, as the stts engine runs it (no tiling)."""
    out: list[RoughMap] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        xs, hws = zip(*(coarse_input(s.get_image(), size) for s in chunk), strict=True)
        probs = logits_to_probs(predict_logits(model, np.stack(xs), device, batch_size))
        for s, p, (h, w) in zip(chunk, probs, hws, strict=True):
            rough = np.ascontiguousarray(p[:, :h, :w], dtype=np.float32)
            boxes = component_boxes(foreground(rough, threshold), min_size=min_component)
            boxes = scale_boxes(boxes, (h, w), s.shape) if (h, w) != tuple(s.shape) else boxes
            out.append(RoughMap(rough, np.asarray(boxes, dtype=np.int64).reshape(-1, 4)))
    return out


class CropSampler:
    """Random fine-training boxes for one image: rough-mask components, ground-truth components or the whole image."""

    def __init__(self, pad: int, jitter: int, gt_share: float, min_side: int = D["min_side"]) -> None:
        self.pad, self.jitter, self.gt_share, self.min_side = pad, jitter, gt_share, min_side

    def box(self, sample: Any, rough_boxes: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        use_gt = rough_boxes is None or len(rough_boxes) == 0 or rng.random() < self.gt_share
        source = sample.boxes if use_gt else rough_boxes
        if len(source) == 0 and not use_gt:
            source = sample.boxes
        if len(source):
            pick = np.asarray(source, dtype=np.int64).reshape(-1, 4)[int(rng.integers(len(source)))][None]
            _, final = crop_candidates(pick, sample.shape, self.pad, self.jitter, rng, self.min_side)
            if len(final):
                return final[0]
        return np.array([0, 0, sample.shape[0], sample.shape[1]], dtype=np.int64)


def label_scores(labels: np.ndarray, mask: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(mean foreground Dice, mIoU over all classes) of one image; a class absent from both is skipped."""
    dice, iou = [], []
    for c in range(n_classes):
        p, g = labels == c, mask == c
        tp = int(np.count_nonzero(p & g))
        fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp
        if tp + fp + fn == 0:
            continue
        iou.append(tp / (tp + fp + fn))
        if c > 0:
            dice.append(2 * tp / (2 * tp + fp + fn))
    return (float(np.mean(dice)) if dice else float("nan"), float(np.mean(iou)) if iou else float("nan"))


def stts_validation(samples: list[Any], maps: list[RoughMap], size: int, pad: int, n_classes: int,
                    predict: Callable[[Any, np.ndarray], np.ndarray], batch_size: int) -> Callable[[Any], dict[str, float]]:
    """``validate(model)``: full-resolution stts Dice (and mIoU for K > 2) over ``samples``.

    The crops are the engine's own (``crop_boxes`` on each rough mask, computed once), so the number
    reported is the one ``segcli predict`` would score with these two networks.
    """
    boxes = [crop_boxes(foreground(m.probs, D["threshold"]), s.shape, pad, min_size=D["min_component"],
                        min_side=D["min_side"]) for s, m in zip(samples, maps, strict=True)]

    def validate(model: Any) -> dict[str, float]:
        dice, miou = [], []
        for s, m, b in zip(samples, maps, boxes, strict=True):
            plane = ArrayPlane(to_float(s.get_image()))
            res = fine_pass(plane, lambda x: predict(model, x), b, m.probs, size=size, threshold=D["threshold"],
                            keep_coarse=D["keep_coarse"], batch_size=batch_size, return_probs=False, timer=Timer())
            d, i = label_scores(np.asarray(res.labels), s.mask, n_classes)
            dice.append(d)
            miou.append(i)
        if not dice:
            return {}
        with np.errstate(invalid="ignore"):
            out = {"dice": float(np.nan_to_num(np.nanmean(dice)))}
            if n_classes > 2:
                out["miou"] = float(np.nan_to_num(np.nanmean(miou)))
        return out

    return validate
