"""Object-level scores for instance label images: AJI, panoptic quality and detection F1.

A semantic Dice cannot tell one merged blob from the nuclei under it; these can, and they are what the
nuclei literature reports (HoVer-Net on MoNuSeg: AJI 0.618; a U-Net with watershed 0.574-0.591).

- **AJI**, aggregated Jaccard index (Kumar et al., IEEE TMI 2017): each ground-truth object is paired with
  the prediction of highest IoU; intersections and unions are summed over the pairs, and the areas of
  predictions never paired are added to the union. A blob covering two nuclei is counted in both their
  unions, so merging is penalised; a split nucleus leaves a piece unpaired, so splitting is too.
- **PQ = SQ × DQ**, panoptic quality (Kirillov et al., CVPR 2019): pairs with IoU > 0.5 are matches (they
  are unique by construction); SQ is their mean IoU, DQ = TP / (TP + FP/2 + FN/2).
- **F1 at IoU 0.5**: detection F1 with the same matches. It equals DQ; both are reported because papers
  name either.

Label images are integer arrays, 0 = background, every other value one object. The counts are kept so
that scores pool over images exactly (summed intersections and unions, summed matches), not as a mean of
per-image ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class InstanceCounts:
    """What the scores are made of; add counts of several images to pool them."""

    aji_inter: int = 0
    aji_union: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0
    n_true: int = 0
    n_pred: int = 0

    def __add__(self, other: InstanceCounts) -> InstanceCounts:
        return InstanceCounts(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def _values(self) -> tuple:
        return (self.aji_inter, self.aji_union, self.tp, self.fp, self.fn, self.iou_sum, self.n_true, self.n_pred)

    def scores(self) -> dict[str, float | int | None]:
        """AJI, PQ, SQ, DQ, F1 at IoU 0.5 and the object counts; None where a ratio has nothing to divide."""
        det = self.tp + 0.5 * self.fp + 0.5 * self.fn
        sq = self.iou_sum / self.tp if self.tp else None
        dq = self.tp / det if det else None
        return {
            "aji": self.aji_inter / self.aji_union if self.aji_union else None,
            "pq": (sq or 0.0) * dq if dq is not None else None,
            "sq": sq,
            "dq": dq,
            "f1_iou50": dq,
            "objects_true": self.n_true,
            "objects_pred": self.n_pred,
            "matched": self.tp,
        }


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids 1..n (0 stays background) and each id's area, index 0 unused."""
    ids, inverse = np.unique(labels.ravel(), return_inverse=True)
    if ids.size and ids[0] == 0:
        dense = inverse
    else:  # no background pixel: shift so that 0 stays unused
        dense = inverse + 1
        ids = np.concatenate([[0], ids])
    n = ids.size
    return dense.astype(np.int64), np.bincount(dense, minlength=n)


def instance_counts(true: np.ndarray, pred: np.ndarray) -> InstanceCounts:
    """The counts behind AJI, PQ and F1 for one pair of instance label images of the same shape."""
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} and {pred.shape}")
    t, t_area = _relabel(true)
    p, p_area = _relabel(pred)
    nt, np_ = t_area.size, p_area.size
    # Every (true, pred) overlap in one bincount over paired ids: O(pixels), whatever the object count.
    inter = np.bincount(t * np_ + p, minlength=nt * np_).reshape(nt, np_)[1:, 1:].astype(np.float64)
    t_area, p_area = t_area[1:].astype(np.float64), p_area[1:].astype(np.float64)
    union = t_area[:, None] + p_area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    c = InstanceCounts(n_true=len(t_area), n_pred=len(p_area))
    if len(t_area) and len(p_area):
        best = iou.argmax(axis=1)
        rows = np.arange(len(t_area))
        hit = iou[rows, best] > 0
        c.aji_inter = int(inter[rows, best][hit].sum())
        c.aji_union = int(union[rows, best][hit].sum() + t_area[~hit].sum())
        used = np.zeros(len(p_area), bool)
        used[best[hit]] = True
        c.aji_union += int(p_area[~used].sum())
        matched = iou > 0.5  # at most one per row and per column: two IoUs above 0.5 cannot share an object
        c.tp = int(matched.sum())
        c.iou_sum = float(iou[matched].sum())
    else:
        c.aji_union = int(t_area.sum() + p_area.sum())
    c.fp = c.n_pred - c.tp
    c.fn = c.n_true - c.tp
    return c


def instance_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int | None]:
    """AJI, PQ (SQ, DQ), F1 at IoU 0.5 and object counts for one image."""
    return instance_counts(true, pred).scores()
