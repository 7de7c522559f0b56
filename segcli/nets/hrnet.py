"""HRNetV2 (HRNet/HRNet-Semantic-Segmentation ``seg_hrnet.py``) with its reference segmentation head.

The backbone keeps four parallel branches (C, 2C, 4C, 8C channels) that repeatedly exchange information;
the head concatenates all branches at the highest resolution. Stage tables follow the reference yamls, so
W18 / W32 with 19 classes give 9,641,119 / 29,546,515 parameters. ``stem_stride=4`` is the reference
(branches at H/4..H/32, logits upsampled by 4); ``stem_stride=1`` is the ARSM paper's variant (branches
at H..H/8, ~16x the compute). Plain ``BatchNorm2d`` replaces SyncBN so CPU training and ONNX export work.

Branch sizes are ceil-chained stride-2 convs and every upsample takes ``size=`` from the target
branch, so any H, W >= 1 works without padding and the ONNX graph stays dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from segcli.nets.layers import conv_bn_relu, kaiming_init, resize_to
from segcli.nets.registry import register


@dataclass(frozen=True)
class StageSpec:
    modules: int
    blocks: int


@dataclass(frozen=True)
class HRNetSpec:
    """One row of the reference stage table (section 1.2 of the architecture notes)."""

    channels: int  # C, the width of the highest-resolution branch
    stage1_blocks: int
    stage1_planes: int  # bottleneck planes; stage-1 output is 4x this
    stage2: StageSpec
    stage3: StageSpec
    stage4: StageSpec


HRNET_WIDTHS: dict[str, HRNetSpec] = {
    "w18": HRNetSpec(18, 4, 64, StageSpec(1, 4), StageSpec(4, 4), StageSpec(3, 4)),
    "w32": HRNetSpec(32, 4, 64, StageSpec(1, 4), StageSpec(4, 4), StageSpec(3, 4)),
    "w48": HRNetSpec(48, 4, 64, StageSpec(1, 4), StageSpec(4, 4), StageSpec(3, 4)),
    "w18-small-v1": HRNetSpec(16, 1, 32, StageSpec(1, 2), StageSpec(1, 2), StageSpec(1, 2)),
    "w18-small-v2": HRNetSpec(18, 2, 64, StageSpec(1, 2), StageSpec(3, 2), StageSpec(2, 2)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = conv_bn_relu(cin, planes, kernel=1, stride=stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + res)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            conv_bn_relu(cin, planes, kernel=1),
            conv_bn_relu(planes, planes, kernel=3, stride=stride),
            conv_bn_relu(planes, cout, kernel=1, relu=False),
        )
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn_relu(cin, cout, kernel=1, stride=stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + res)


class HighResolutionModule(nn.Module):
    """Parallel BasicBlock branches followed by all-to-all fusion (sum, then ReLU)."""

    def __init__(self, channels: list[int], blocks: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c, c) for _ in range(blocks)]) for c in channels
        )
        nb = len(channels)
        self.fuse = nn.ModuleList()
        for i in range(nb):
            row = nn.ModuleList()
            for j in range(nb):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution: 1x1 to C_i, then upsample in forward
                    row.append(conv_bn_relu(channels[j], channels[i], kernel=1, relu=False))
                else:  # higher resolution: (i - j) stride-2 3x3 convs, ReLU on all but the last
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else channels[j]
                        steps.append(conv_bn_relu(channels[j], cout, kernel=3, stride=2, relu=not last))
                    row.append(nn.Sequential(*steps))
            self.fuse.append(row)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for i, row in enumerate(self.fuse):
            y = xs[i]
            for j, f in enumerate(row):
                if j == i:
                    continue
                z = f(xs[j])
                y = y + (resize_to(z, xs[i]) if j > i else z)
            out.append(self.relu(y))
        return out


class HRNetBackbone(nn.Module):
    """Stem + stage 1 (bottlenecks) + stages 2-4; returns the four branch outputs, highest first."""

    def __init__(
        self,
        in_channels: int = 3,
        width: str = "w18",
        stem_stride: int = 4,
        base_channels: int | None = None,
        stem_channels: int | None = None,
        stage1_planes: int | None = None,
    ) -> None:
        super().__init__()
        if width not in HRNET_WIDTHS:
            raise ValueError(f"unknown HRNet width {width!r}; known: {', '.join(HRNET_WIDTHS)}")
        if stem_stride not in (1, 2, 4):
            raise ValueError("stem_stride must be 1, 2 or 4")
        spec = HRNET_WIDTHS[width]
        c = base_channels or spec.channels
        # A narrower base scales the stem and stage 1 with it, so a small net is small throughout.
        scale = c / spec.channels
        stem = stem_channels or max(8, round(64 * scale))
        planes = stage1_planes or max(4, round(spec.stage1_planes * scale))
        s1, s2 = (2, 2) if stem_stride == 4 else (2, 1) if stem_stride == 2 else (1, 1)
        self.stem = nn.Sequential(
            conv_bn_relu(in_channels, stem, 3, stride=s1), conv_bn_relu(stem, stem, 3, stride=s2)
        )
        layer1: list[nn.Module] = [Bottleneck(stem, planes)]
        layer1 += [Bottleneck(planes * 4, planes) for _ in range(spec.stage1_blocks - 1)]
        self.layer1 = nn.Sequential(*layer1)
        self.stem_stride = stem_stride
        self.channels = [c, 2 * c, 4 * c, 8 * c]

        prev = [planes * 4]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for nb, st in ((2, spec.stage2), (3, spec.stage3), (4, spec.stage4)):
            cur = self.channels[:nb]
            self.transitions.append(self._transition(prev, cur))
            self.stages.append(
                nn.Sequential(*[HighResolutionModule(cur, st.blocks) for _ in range(st.modules)])
            )
            prev = cur
        kaiming_init(self)

    @staticmethod
    def _transition(prev: list[int], cur: list[int]) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i, c in enumerate(cur):
            if i < len(prev):
                layers.append(nn.Identity() if prev[i] == c else conv_bn_relu(prev[i], c, 3))
            else:  # a new, lower branch grows from the last existing one
                steps: list[nn.Module] = []
                for k in range(i + 1 - len(prev)):
                    cout = c if k == i - len(prev) else prev[-1]
                    steps.append(conv_bn_relu(prev[-1], cout, 3, stride=2))
                layers.append(nn.Sequential(*steps))
        return layers

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.layer1(self.stem(x))
        xs = [y]
        for transition, stage in zip(self.transitions, self.stages, strict=True):
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            xs = stage(xs)
        return xs


def concat_branches(xs: list[torch.Tensor]) -> torch.Tensor:
    """The HRNetV2 representation: every branch upsampled to the highest one, concatenated."""
    return torch.cat([xs[0]] + [resize_to(x, xs[0]) for x in xs[1:]], dim=1)


class HRNetSeg(nn.Module):
    """HRNetV2 + reference head (1x1 conv+BN+ReLU, 1x1 classifier), logits resized to the input."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: str = "w18",
        stem_stride: int = 4,
        base_channels: int | None = None,
        stem_channels: int | None = None,
        stage1_planes: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.backbone = HRNetBackbone(
            in_channels, width, stem_stride, base_channels, stem_channels, stage1_planes
        )
        total = sum(self.backbone.channels)
        self.head = nn.Sequential(
            nn.Conv2d(total, total, 1),
            nn.BatchNorm2d(total),
            nn.ReLU(inplace=True),
            nn.Conv2d(total, out_channels, 1),
        )
        kaiming_init(self.head)
        self.head[-1].reset_parameters()  # small logits at init: He init on a classifier gives |logits| ~ 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(concat_branches(self.backbone(x)))
        if self.backbone.stem_stride == 1:
            return logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@register(
    "hrnet",
    description="HRNetV2 + reference head; width w18/w32/w48/w18-small-v1/v2, stem_stride 4 (ref) or 1 (paper)",
    width="w18",
    stem_stride=4,
    base_channels=None,
    stem_channels=None,
    stage1_planes=None,
)
def hrnet(
    in_channels: int = 3,
    out_channels: int = 1,
    width: str = "w18",
    stem_stride: int = 4,
    base_channels: int | None = None,
    stem_channels: int | None = None,
    stage1_planes: int | None = None,
) -> HRNetSeg:
    """HRNetV2 segmentation network (9.64M params at W18 with 19 classes)."""
    return HRNetSeg(
        in_channels, out_channels, width, stem_stride, base_channels, stem_channels, stage1_planes
    )
