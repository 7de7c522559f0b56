"""RPN-FCN with ROI convolution (Zhang et al., ISBI 2018, "ROI-FCN"; reference: vincentzhang/roi-fcn).

A VGG16-style backbone (BN, ``width_mult``, no pool5: stride 16) feeds two heads:

* a small region proposal network (objectness + box regression per anchor), and
* an FCN head whose first layer is an *ROI convolution*: its output, bias included, is zero outside the
  union of the regions of interest, so the segmentation head only spends capacity (and only receives
  gradient) where the RPN says there is an object. Scores are upsampled x16 by a learned transposed
  conv initialised as bilinear.

Training ROIs are the ground-truth boxes plus proposals overlapping them (IoU >= 0.5), as in the
reference ``roi_target_layer``. Inference is NMS-free so the whole graph exports to ONNX: keep the
``topk`` best anchors whose objectness passes ``score_thresh``, take the union of their decoded boxes
as the ROI mask, and force background outside it (the head's output there never received a loss).

Coordinates are continuous pixels, x1y1x2y2: pixel (i, j) covers [j, j+1) x [i, i+1), so the box of a
component spanning columns a..b is [a, b+1). The box geometry functions are pure and unit-tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from segcli.nets.layers import bilinear_kernel, kaiming_init, pad_to_multiple
from segcli.nets.registry import register

STRIDE = 16
BG_LOGIT = 30.0  # |logit| that makes sigmoid/softmax say "background" with p > 1 - 1e-13
BOX_CLIP = math.log(1000.0 / 16)  # torchvision's cap on exp() in box decoding

# ---------------------------------------------------------------------------------------------------
# Box geometry (pure functions)


def make_base_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
    """(A, 4) anchors centred on 0, one per (ratio, size); ratio = h / w, area = size**2."""
    out = []
    for r in ratios:
        for s in sizes:
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def grid_anchors(base: torch.Tensor, feat_h: int, feat_w: int, stride: int = STRIDE) -> torch.Tensor:
    """(feat_h * feat_w * A, 4) anchors, ordered (y, x, a), centred on feature-cell centres.

    Cell (i, j) covers pixels [stride*j, stride*(j+1)), so its centre is stride*(j + 0.5) (the
    py-faster-rcnn convention, not torchvision's stride*j).
    """
    ys = (torch.arange(feat_h, dtype=torch.float32, device=base.device) + 0.5) * stride
    xs = (torch.arange(feat_w, dtype=torch.float32, device=base.device) + 0.5) * stride
    cy = ys.view(-1, 1, 1).expand(-1, xs.shape[0], 1)
    cx = xs.view(1, -1, 1).expand(ys.shape[0], -1, 1)
    shifts = torch.cat([cx, cy, cx, cy], dim=2).view(-1, 1, 4)  # (Hf*Wf, 1, 4)
    return (shifts + base.view(1, -1, 4)).reshape(-1, 4)


def _cxcywh(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Faster R-CNN deltas (dx, dy, dw, dh) that move ``anchors`` onto ``boxes`` (same shape, (..., 4))."""
    gx, gy, gw, gh = _cxcywh(boxes)
    ax, ay, aw, ah = _cxcywh(anchors)
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`; dw, dh are capped so an untrained head cannot overflow exp()."""
    ax, ay, aw, ah = _cxcywh(anchors)
    cx = ax + deltas[..., 0] * aw
    cy = ay + deltas[..., 1] * ah
    w = aw * torch.exp(deltas[..., 2].clamp(max=BOX_CLIP))
    h = ah * torch.exp(deltas[..., 3].clamp(max=BOX_CLIP))
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) intersection over union of x1y1x2y2 boxes (N, 4) and (M, 4)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def boxes_from_mask(mask: np.ndarray, mode: str = "components", min_area: int = 4) -> torch.Tensor:
    """(B, 4) ground-truth boxes from a 2-D foreground mask.

    ``components``: one box per 8-connected component (tiny ones dropped unless nothing else is left);
    ``enclosing``: one box spanning all foreground (the reference ``bbox_from_seg.py``).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return torch.zeros((0, 4), dtype=torch.float32)
    if mode == "enclosing":
        ys, xs = np.nonzero(mask)
        return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    if mode != "components":
        raise ValueError(f"rpn_targets must be 'components' or 'enclosing', got {mode!r}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    boxes, fallback = [], []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        box = [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
        (boxes if areas[k] >= min_area else fallback).append(box)
    return torch.tensor(boxes or fallback, dtype=torch.float32)


def union_mask(
    boxes: torch.Tensor, keep: torch.Tensor, height: int, width: int, cell: int = 1
) -> torch.Tensor:
    """(N, H, W) bool: inside any kept box. ``boxes`` (N, K, 4), ``keep`` (N, K) in {0, 1}.

    With ``cell == 1`` a pixel is inside when its centre is (the rule that reproduces a component's
    bounding box); with ``cell > 1`` (a feature grid) a cell is inside when it overlaps the box.
    A box is the outer product of a row and a column indicator, so the union is one batched matmul:
    exportable, and O(K*(H+W) + H*W) memory instead of O(K*H*W).
    """
    ys = torch.arange(height, dtype=torch.float32, device=boxes.device) * cell
    xs = torch.arange(width, dtype=torch.float32, device=boxes.device) * cell
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
    if cell == 1:
        rows = (ys + 0.5 >= y1) & (ys + 0.5 <= y2)
        cols = (xs + 0.5 >= x1) & (xs + 0.5 <= x2)
    else:
        rows = (ys < y2) & (ys + cell > y1)
        cols = (xs < x2) & (xs + cell > x1)
    rows = rows.to(torch.float32) * keep[..., None]
    return torch.matmul(rows.transpose(1, 2), cols.to(torch.float32)) > 0


# ---------------------------------------------------------------------------------------------------
# Network


class ROIConv2d(nn.Conv2d):
    """Convolution whose output, bias included, is zeroed outside the ROI mask.

    Multiplying by the mask also masks the upstream gradient, so weight and input gradients come only
    from output positions inside the ROIs (the caffe-roi im2col behaviour, with the bias masked too).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * mask


def _vgg_backbone(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """VGG16 conv1_1..conv5_3 with BN, 2x2 pooling after blocks 1-4 only (no pool5: stride 16)."""
    layers: list[nn.Module] = []
    cin = in_channels
    for b, (w, n) in enumerate(zip(widths, (2, 2, 3, 3, 3), strict=True)):
        for _ in range(n):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        if b < 4:
            layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class RPNFCN(nn.Module):
    """VGG16-BN backbone + RPN + ROI-convolution FCN head; see the module docstring."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width_mult: float = 0.25,
        fc_channels: int | None = None,
        fc6_kernel: int | None = None,
        anchor_sizes: Sequence[float] = (16, 32, 64, 128),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        rpn_targets: str = "components",
        score_thresh: float = 0.5,
        topk: int = 100,
        dropout: float = 0.5,
        seg_loss: str = "roi_ce",
        min_box_area: int = 4,
    ) -> None:
        super().__init__()
        if rpn_targets not in ("components", "enclosing"):
            raise ValueError(f"rpn_targets must be 'components' or 'enclosing', got {rpn_targets!r}")
        if seg_loss not in ("roi_ce", "loss_fn"):
            raise ValueError(f"seg_loss must be 'roi_ce' or 'loss_fn', got {seg_loss!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rpn_targets = rpn_targets
        self.score_thresh = score_thresh
        self.topk = topk
        self.seg_loss = seg_loss
        self.min_box_area = min_box_area
        widths = [max(4, round(c * width_mult)) for c in (64, 128, 256, 512, 512)]
        fc = fc_channels or (4096 if width_mult >= 1 else max(16, round(2048 * width_mult)))
        k6 = fc6_kernel or (7 if width_mult >= 0.5 else 3)
        c5 = widths[-1]

        self.backbone = _vgg_backbone(in_channels, widths)
        self.register_buffer("base_anchors", make_base_anchors(anchor_sizes, aspect_ratios), persistent=False)
        na = self.base_anchors.shape[0]
        self.num_anchors = na
        self.rpn_conv = nn.Conv2d(c5, c5, 3, padding=1)
        self.rpn_cls = nn.Conv2d(c5, na, 1)
        self.rpn_reg = nn.Conv2d(c5, 4 * na, 1)

        self.fc6 = ROIConv2d(c5, fc, k6, padding=k6 // 2)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Conv2d(fc, out_channels, 1)
        self.up = nn.ConvTranspose2d(
            out_channels, out_channels, 2 * STRIDE, stride=STRIDE, padding=STRIDE // 2, bias=False
        )
        bg = torch.zeros(1, out_channels, 1, 1)
        bg[:, 0] = -BG_LOGIT if out_channels == 1 else BG_LOGIT
        self.register_buffer("bg_logits", bg, persistent=False)

        kaiming_init(self)
        self.score.reset_parameters()  # small logits at init
        for m in (self.rpn_cls, self.rpn_reg):  # small heads start neutral, as in torchvision's RPNHead
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.up.weight.copy_(bilinear_kernel(out_channels, 2 * STRIDE))

    # -- shared pieces --------------------------------------------------------------------------------

    def _rpn(self, xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (N, C5, h, w), objectness logits (N, A_tot), deltas (N, A_tot, 4), anchors (A_tot, 4)."""
        f = self.backbone(xp)
        r = F.relu(self.rpn_conv(f))
        obj = self.rpn_cls(r).permute(0, 2, 3, 1).flatten(1)
        reg = self.rpn_reg(r).unflatten(1, (self.num_anchors, 4)).permute(0, 3, 4, 1, 2).flatten(1, 3)
        anchors = grid_anchors(self.base_anchors, f.shape[-2], f.shape[-1])
        return f, obj, reg, anchors

    def _seg_head(self, f: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
        """Score map at the padded input size (N, K, 16h, 16w) from features and the ROI feature mask."""
        h = self.drop(F.relu(self.fc6(f, feat_mask.unsqueeze(1).to(f.dtype))))
        h = self.drop(F.relu(self.fc7(h)))
        return self.up(self.score(h))

    def _select(self, obj: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NMS-free proposals: the ``topk`` best anchors, kept when sigmoid(objectness) >= score_thresh.

        Scores are padded to at least ``topk`` entries so that k is a constant (small inputs have few
        anchors), which keeps TopK static in the ONNX graph.
        """
        k = self.topk
        pad_s = torch.full_like(obj[:, :1], -1e4).expand(-1, k)
        pad_b = torch.zeros_like(boxes[:, :1]).expand(-1, k, -1)
        val, idx = torch.topk(torch.cat([obj, pad_s], dim=1), k, dim=1)
        sel = torch.gather(torch.cat([boxes, pad_b], dim=1), 1, idx.unsqueeze(-1).expand(-1, -1, 4))
        keep = (torch.sigmoid(val) >= self.score_thresh).to(boxes.dtype)
        return sel, keep

    # -- inference ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, STRIDE)
        f, obj, reg, anchors = self._rpn(xp)
        boxes, keep = self._select(obj, decode_boxes(reg, anchors.unsqueeze(0)))
        s = self._seg_head(f, union_mask(boxes, keep, f.shape[-2], f.shape[-1], cell=STRIDE))
        inside = union_mask(boxes, keep, xp.shape[-2], xp.shape[-1]).unsqueeze(1)
        return torch.where(inside, s, self.bg_logits)[..., :h, :w]

    @torch.no_grad()
    def roi_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) bool union of the inference ROIs, for inspection."""
        h, w = x.shape[-2:]
        xp = pad_to_multiple(x, STRIDE)
        _, obj, reg, anchors = self._rpn(xp)
        boxes, keep = self._select(obj, decode_boxes(reg, anchors.unsqueeze(0)))
        return union_mask(boxes, keep, xp.shape[-2], xp.shape[-1])[:, :h, :w]

    # -- training -------------------------------------------------------------------------------------

    @staticmethod
    def _class_ids(target: torch.Tensor) -> torch.Tensor:
        """Class ids (N, H, W) from what a trainer may pass: ids, a (N, 1, H, W) foreground map or one-hot."""
        if target.dim() == 4:
            if target.shape[1] == 1:
                return (target[:, 0] > 0.5).long()
            return target.argmax(dim=1)
        return target.long()

    def _gt_boxes(self, target: torch.Tensor) -> list[torch.Tensor]:
        valid_fg = (target > 0) & (target < max(self.out_channels, 2))
        fg = valid_fg.cpu().numpy()
        return [boxes_from_mask(m, self.rpn_targets, self.min_box_area).to(target.device) for m in fg]

    @staticmethod
    def _anchor_labels(anchors: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels 1 / 0 / -1 (fg, bg, ignore) at IoU 0.7 / 0.3, plus each GT's best anchors; matched GT index."""
        labels = torch.zeros(anchors.shape[0], device=anchors.device)
        if gt.shape[0] == 0:
            return labels, torch.zeros_like(labels, dtype=torch.long)
        iou = box_iou(anchors, gt)
        best, matched = iou.max(dim=1)
        labels[(best >= 0.3) & (best < 0.7)] = -1
        labels[best >= 0.7] = 1
        per_gt = iou.max(dim=0).values
        low_quality = ((iou == per_gt[None]) & (per_gt[None] > 0)).any(dim=1)
        labels[low_quality] = 1
        return labels, matched

    @staticmethod
    def _sample(
        labels: torch.Tensor, batch: int = 256, pos_fraction: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.nonzero(labels == 1).flatten()
        neg = torch.nonzero(labels == 0).flatten()
        n_pos = min(pos.numel(), int(batch * pos_fraction))
        n_neg = min(neg.numel(), batch - n_pos)
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:n_pos]]
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:n_neg]]
        return pos, neg

    def compute_loss(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Objectness BCE + smooth-L1 box regression + segmentation loss inside the training ROIs (1:1:1).

        ``seg_loss="roi_ce"`` (reference): cross-entropy (BCE for one output) averaged over ROI pixels.
        ``seg_loss="loss_fn"``: the trainer's loss on logits forced to background outside the ROIs;
        ``torch.where`` blocks the gradient there, so only ROI pixels still train the head.
        """
        h, w = x.shape[-2:]
        seg_target = target
        target = self._class_ids(target)
        xp = pad_to_multiple(x, STRIDE)
        f, obj, reg, anchors = self._rpn(xp)
        proposals = decode_boxes(reg.detach(), anchors.unsqueeze(0))
        loss_obj = obj.sum() * 0.0
        loss_reg = reg.sum() * 0.0
        roi_boxes = []
        for i, gt in enumerate(self._gt_boxes(target)):
            labels, matched = self._anchor_labels(anchors, gt)
            pos, neg = self._sample(labels)
            sampled = torch.cat([pos, neg])
            if sampled.numel():
                loss_obj = loss_obj + F.binary_cross_entropy_with_logits(obj[i, sampled], labels[sampled])
            if pos.numel():
                tgt = encode_boxes(gt[matched[pos]], anchors[pos])
                reg_l = F.smooth_l1_loss(reg[i, pos], tgt, beta=1.0 / 9, reduction="sum")
                loss_reg = loss_reg + reg_l / max(1, sampled.numel())
            vals, idx = obj[i].detach().topk(min(self.topk, obj.shape[1]))
            top = proposals[i][idx]
            if gt.shape[0]:  # reference RoITargetLayer: GT boxes plus proposals with IoU >= 0.5
                rois = torch.cat([gt, top[box_iou(top, gt).max(dim=1).values >= 0.5]])
            else:  # nothing to find: train the head to say "background" inside what the RPN proposes
                rois = top[torch.sigmoid(vals) >= self.score_thresh]
                rois = rois if rois.shape[0] else top[:1]
            roi_boxes.append(rois)
        n = len(roi_boxes)
        kmax = max(b.shape[0] for b in roi_boxes)
        boxes = torch.zeros(n, kmax, 4, device=x.device)
        keep = torch.zeros(n, kmax, device=x.device)
        for i, b in enumerate(roi_boxes):
            boxes[i, : b.shape[0]] = b
            keep[i, : b.shape[0]] = 1
        s = self._seg_head(f, union_mask(boxes, keep, f.shape[-2], f.shape[-1], cell=STRIDE))
        inside = union_mask(boxes, keep, xp.shape[-2], xp.shape[-1])[:, :h, :w]
        s = s[..., :h, :w]
        if self.seg_loss == "loss_fn":
            loss_seg = loss_fn(torch.where(inside.unsqueeze(1), s, self.bg_logits), seg_target)
        else:
            loss_seg = self._roi_ce(s, target, inside)
        return loss_obj / n + loss_reg / n + loss_seg

    def _roi_ce(self, s: torch.Tensor, target: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Mean pixel CE over ROI pixels with a valid label (the reference SoftmaxWithLossROI)."""
        k = max(self.out_channels, 2)
        m = inside & (target >= 0) & (target < k)
        if not bool(m.any()):
            return s.sum() * 0.0
        if self.out_channels == 1:
            return F.binary_cross_entropy_with_logits(s[:, 0][m], target[m].to(s.dtype))
        return F.cross_entropy(s.permute(0, 2, 3, 1)[m], target[m])


@register(
    "rpn-fcn",
    description="VGG16-BN + RPN + ROI-convolution FCN (ROI-FCN, ISBI 2018); width_mult 0.25 ~1.9M params",
    width_mult=0.25,
    fc_channels=None,
    fc6_kernel=None,
    anchor_sizes=(16, 32, 64, 128),
    aspect_ratios=(0.5, 1.0, 2.0),
    rpn_targets="components",
    score_thresh=0.5,
    topk=100,
    dropout=0.5,
    seg_loss="roi_ce",
    min_box_area=4,
)
def rpn_fcn(
    in_channels: int = 3,
    out_channels: int = 1,
    width_mult: float = 0.25,
    fc_channels: int | None = None,
    fc6_kernel: int | None = None,
    anchor_sizes: Sequence[float] = (16, 32, 64, 128),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_targets: str = "components",
    score_thresh: float = 0.5,
    topk: int = 100,
    dropout: float = 0.5,
    seg_loss: str = "roi_ce",
    min_box_area: int = 4,
) -> RPNFCN:
    """RPN-FCN with ROI convolution (fc defaults: 4096 / 7x7 at width 1, else 2048*width / 3x3 below 0.5)."""
    return RPNFCN(
        in_channels,
        out_channels,
        width_mult,
        fc_channels,
        fc6_kernel,
        tuple(anchor_sizes),
        tuple(aspect_ratios),
        rpn_targets,
        score_thresh,
        topk,
        dropout,
        seg_loss,
        min_box_area,
    )


class VGGFCN(nn.Module):
    """RPN-FCN's baseline: the same VGG-BN backbone, fc6/fc7 and stride-16 upsampling, with no RPN and
    a plain convolution instead of the ROI convolution (the paper's "FCN" row), so the two compare like
    with like."""

    def __init__(self, in_channels: int, out_channels: int, width_mult: float = 0.25, fc_channels: int | None = None,
                 fc6_kernel: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        widths = [max(4, round(c * width_mult)) for c in (64, 128, 256, 512, 512)]
        fc = fc_channels or (4096 if width_mult >= 1 else max(16, round(2048 * width_mult)))
        k6 = fc6_kernel or (7 if width_mult >= 0.5 else 3)
        self.backbone = _vgg_backbone(in_channels, widths)
        self.fc6 = nn.Conv2d(widths[-1], fc, k6, padding=k6 // 2)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.score = nn.Conv2d(fc, out_channels, 1)
        self.up = nn.ConvTranspose2d(out_channels, out_channels, 2 * STRIDE, stride=STRIDE, padding=STRIDE // 2,
                                     bias=False)
        kaiming_init(self)
        self.score.reset_parameters()
        with torch.no_grad():
            self.up.weight.copy_(bilinear_kernel(out_channels, 2 * STRIDE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = self.backbone(pad_to_multiple(x, STRIDE))
        y = self.drop(F.relu(self.fc6(f)))
        y = self.drop(F.relu(self.fc7(y)))
        return self.up(self.score(y))[..., :h, :w]


@register("vgg-fcn", description="RPN-FCN's baseline: the same VGG-BN FCN without RPN or ROI convolution",
          width_mult=0.25, fc_channels=None, fc6_kernel=None, dropout=0.5)
def vgg_fcn(in_channels: int = 3, out_channels: int = 1, width_mult: float = 0.25, fc_channels: int | None = None,
            fc6_kernel: int | None = None, dropout: float = 0.5) -> VGGFCN:
    """The FCN half of RPN-FCN on its own (for the paper's comparison)."""
    return VGGFCN(in_channels, out_channels, width_mult, fc_channels, fc6_kernel, dropout)
