"""Small building blocks shared by the networks in :mod:`segcli.nets`.

Everything here is written so that the legacy TorchScript ONNX exporter keeps H and W dynamic: sizes
are only ever read from tensor shapes and passed straight back to torch ops, never through ``int()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias, BN follows) + BN (+ ReLU): the unit nearly every backbone here is made of."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad H and W at the bottom/right up to a multiple, so pooling stacks round-trip exactly.

    Replicate padding avoids a dark border the network would have to learn to ignore; the pad amounts
    come from the traced shape, so an ONNX export stays valid for every input size (checked in tests).
    """
    if multiple <= 1:
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple), mode="replicate")


def resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the spatial size of ``ref`` (``size=``, never a scale factor)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def max_unpool_scatter(x: torch.Tensor, indices: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``nn.MaxUnpool2d`` rebuilt as a scatter on flattened planes, to the size of ``ref``.

    The legacy ONNX exporter has no ``max_unpool2d`` symbolic; ``Tensor.scatter`` exports as
    ScatterElements, keeps H and W dynamic and, taking the size from the pre-pool tensor, restores odd
    sizes exactly. PyTorch pooling indices are per (N, C) plane, which is what scattering along the
    flattened plane axis expects.
    """
    out = torch.zeros_like(ref).flatten(2)  # (N, C, H*W); ref is the pre-pool tensor, same N and C as x
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.view_as(ref)


def bilinear_kernel(channels: int, kernel: int) -> torch.Tensor:
    """Weights of a per-channel bilinear upsampler (FCN's ``get_upsampling_weight``)."""
    factor = (kernel + 1) // 2
    center = factor - 1 if kernel % 2 == 1 else factor - 0.5
    og = torch.arange(kernel, dtype=torch.float32)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel, kernel)
    for i in range(channels):
        weight[i, i] = filt
    return weight


def kaiming_init(module: nn.Module) -> None:
    """He init for convs and unit BN: the networks are trained from scratch (no ImageNet weights)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
