"""Losses on logits against SOFT one-hot targets of the same shape.

Targets are soft because training inputs are area-downscaled (whole images at S, crops resized to
S): a thin vessel that covers 30 % of a low-res pixel stays a 0.3 target instead of vanishing,
which is the same information the area-resized image carries. Binary tasks use one logit channel
(sigmoid); K-class tasks use K channels (softmax), as the bundle's ``out_channels`` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from segcli.methods import TABLE

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NAMES = ("dice", "bce", "ce", "focal", "dice+bce", "dice+ce", "focal+dice")


def default_loss(method: str, out_channels: int) -> str:
    """Per-method defaults: Dice plus BCE/CE for stts and direct, focal + Dice for refine (Cruz et al.)."""
    return TABLE[method].train_loss or ("dice+bce" if out_channels == 1 else "dice+ce")


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice, pooled over the batch per class, averaged over foreground classes.

    Pooling over the batch (rather than per sample) keeps images without foreground from producing
    a 0/0 that the smoothing term turns into a large, meaningless gradient.
    """
    p = _probs(logits.float())
    t = target.float()
    if p.shape[1] > 1:  # softmax: leave the background channel out
        p, t = p[:, 1:], t[:, 1:]
    dims = (0, *range(2, p.ndim))
    inter = (p * t).sum(dims)
    den = p.sum(dims) + t.sum(dims)
    return 1.0 - ((2.0 * inter + eps) / (den + eps)).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Binary cross-entropy; ``class_weights = (w_bg, w_fg)`` weight the two terms."""
    logits = logits.float()
    target = target.float()
    if class_weights is None:
        return F.binary_cross_entropy_with_logits(logits, target)
    w0, w1 = float(class_weights[0]), float(class_weights[1])
    weight = w1 * target + w0 * (1.0 - target)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Cross-entropy against soft targets, optionally class-weighted (normalised by the weights used)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    t = target.float()
    if class_weights is not None:
        w = torch.as_tensor(list(class_weights), dtype=logp.dtype, device=logp.device).view(1, -1, *([1] * (logp.ndim - 2)))
        t = t * w
        return -(t * logp).sum() / t.sum().clamp_min(1e-8)
    return -(t * logp).sum(1).mean()


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, class_weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Focal loss (Lin et al.) with γ = 2: cross-entropy down-weighted where the net is already right."""
    logits = logits.float()
    t = target.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        logp = F.logsigmoid(logits)
        log1p = F.logsigmoid(-logits)
        w1, w0 = (1.0, 1.0) if class_weights is None else (float(class_weights[1]), float(class_weights[0]))
        loss = -(w1 * t * (1 - p) ** gamma * logp + w0 * (1 - t) * p**gamma * log1p)
        return loss.mean()
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    loss = -(t * (1 - p) ** gamma * logp)
    if class_weights is not None:
        w = torch.as_tensor(list(class_weights), dtype=loss.dtype, device=loss.device).view(1, -1, *([1] * (loss.ndim - 2)))
        loss = loss * w
    return loss.sum(1).mean()


def make_loss(name: str, out_channels: int, class_weights: Sequence[float] | None = None) -> LossFn:
    """A loss by name (see :data:`NAMES`); ``bce``/``ce`` pick the right one for the channel count."""
    name = name.lower().replace(" ", "")
    if name == "dice+ce" and out_channels == 1:
        name = "dice+bce"
    if name == "dice+bce" and out_channels > 1:
        name = "dice+ce"
    if name == "ce" and out_channels == 1:
        name = "bce"
    if name == "bce" and out_channels > 1:
        name = "ce"
    if name not in NAMES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(NAMES)}")
    if class_weights is not None and len(class_weights) != max(out_channels, 2):
        raise ValueError(f"--class-weights needs {max(out_channels, 2)} values (one per class), got {len(class_weights)}")
    cw = class_weights

    def xent(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return bce_loss(lg, t, cw) if out_channels == 1 else ce_loss(lg, t, cw)

    table: dict[str, LossFn] = {
        "dice": soft_dice_loss,
        "bce": xent,
        "ce": xent,
        "focal": lambda lg, t: focal_loss(lg, t, class_weights=cw),
        "dice+bce": lambda lg, t: soft_dice_loss(lg, t) + xent(lg, t),
        "dice+ce": lambda lg, t: soft_dice_loss(lg, t) + xent(lg, t),
        "focal+dice": lambda lg, t: focal_loss(lg, t, class_weights=cw) + soft_dice_loss(lg, t),
    }
    return table[name]
