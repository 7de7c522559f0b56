"""nnU-Net's PlainConvUNet (2D), written from its description in plans.json, with the same weight names.

Layout (dynamic_network_architectures' naming, so nnU-Net checkpoints load with ``strict=True`` once
their duplicate aliases are dropped): ``encoder.stages.S.0.convs.I.{conv,norm}``, then per decoder
stage a transposed convolution ``decoder.transpconvs.K``, a concatenation with the skip,
``decoder.stages.K.convs.I.{conv,norm}``, and the last stage's 1x1 ``decoder.seg_layers.K``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvNormAct(nn.Module):
    """conv → norm → nonlin (or conv → nonlin → norm with ``nonlin_first``); dropout is a no-op at inference."""

    def __init__(self, cin: int, cout: int, kernel: Any, stride: Any, ops: dict[str, Any]) -> None:
        super().__init__()
        k = _pair(kernel)
        self.conv = nn.Conv2d(cin, cout, k, _pair(stride), padding=[(i - 1) // 2 for i in k], bias=ops["bias"])
        self.norm = ops["norm"](cout, **ops["norm_kwargs"]) if ops["norm"] is not None else nn.Identity()
        self.nonlin = ops["nonlin"](**ops["nonlin_kwargs"]) if ops["nonlin"] is not None else nn.Identity()
        self.nonlin_first = ops["nonlin_first"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(self.nonlin(x)) if self.nonlin_first else self.nonlin(self.norm(x))


class Stack(nn.Module):
    """``n`` ConvNormAct blocks, the first one strided."""

    def __init__(self, n: int, cin: int, cout: int, kernel: Any, stride: Any, ops: dict[str, Any]) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvNormAct(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, ops)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Encoder(nn.Module):
    def __init__(self, cin: int, kw: dict[str, Any], ops: dict[str, Any]) -> None:
        super().__init__()
        n = int(kw["n_stages"])
        feats = _per_stage(kw["features_per_stage"], n)
        convs = _per_stage(kw["n_conv_per_stage"], n)
        kernels, strides = _per_stage(kw["kernel_sizes"], n), _per_stage(kw["strides"], n)
        stages = []
        for s in range(n):
            stages.append(nn.Sequential(Stack(int(convs[s]), cin, int(feats[s]), kernels[s], strides[s], ops)))
            cin = int(feats[s])
        self.stages = nn.Sequential(*stages)
        self.features, self.kernels, self.strides = [int(f) for f in feats], kernels, strides

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, enc: Encoder, n_classes: int, n_conv: Any, ops: dict[str, Any]) -> None:
        super().__init__()
        n = len(enc.features)
        convs = _per_stage(n_conv, n - 1)
        ups, stages, segs = [], [], []
        for s in range(1, n):
            below, skip = enc.features[-s], enc.features[-(s + 1)]
            st = _pair(enc.strides[-s])
            ups.append(nn.ConvTranspose2d(below, skip, st, st, bias=ops["bias"]))
            stages.append(Stack(int(convs[s - 1]), 2 * skip, skip, enc.kernels[-(s + 1)], 1, ops))
            segs.append(nn.Conv2d(skip, n_classes, 1, 1, 0, bias=True))  # deep-supervision heads kept for loading
        self.transpconvs, self.stages, self.seg_layers = nn.ModuleList(ups), nn.ModuleList(stages), nn.ModuleList(segs)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
        return self.seg_layers[-1](x)


class PlainConvUNet(nn.Module):
    """The network nnU-Net's default plans describe, returning full-resolution logits only."""

    def __init__(self, in_channels: int, n_classes: int, kw: dict[str, Any]) -> None:
        super().__init__()
        ops = _ops(kw)
        self.encoder = Encoder(in_channels, kw, ops)
        self.decoder = Decoder(self.encoder, n_classes, kw["n_conv_per_stage_decoder"], ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Ensemble(nn.Module):
    """Mean logits over folds and (optionally) mirrorings, as nnU-Net's predictor averages them."""

    def __init__(self, nets: list[nn.Module], mirror_axes: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        axes = [a + 2 for a in mirror_axes]
        self.flips = [list(c) for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for net in self.nets:
            y = net(x)
            for axes in self.flips:
                y = y + torch.flip(net(torch.flip(x, axes)), axes)
            total = y if total is None else total + y
        return total / (len(self.nets) * (len(self.flips) + 1))


def _per_stage(v: Any, n: int) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _ops(kw: dict[str, Any]) -> dict[str, Any]:
    """Layer classes from plans' dotted names, limited to the few nnU-Net's default U-Net uses."""
    norms = {"InstanceNorm2d": nn.InstanceNorm2d, "BatchNorm2d": nn.BatchNorm2d}
    nonlins = {"LeakyReLU": nn.LeakyReLU, "ReLU": nn.ReLU}
    tail = (lambda s: str(s).rsplit(".", 1)[-1])  # noqa: E731
    norm_kwargs = {k: v for k, v in dict(kw.get("norm_op_kwargs") or {}).items() if k in ("eps", "affine", "momentum")}
    nonlin_kwargs = {k: v for k, v in dict(kw.get("nonlin_kwargs") or {}).items() if k == "negative_slope"}
    return {
        "bias": bool(kw.get("conv_bias", False)),
        "norm": norms[tail(kw["norm_op"])] if kw.get("norm_op") else None,
        "norm_kwargs": norm_kwargs,
        "nonlin": nonlins[tail(kw["nonlin"])] if kw.get("nonlin") else None,
        "nonlin_kwargs": nonlin_kwargs,
        "nonlin_first": bool(kw.get("nonlin_first", False)),
    }
