"""The segment-then-segment U-Net (mateuszbuda brain-segmentation U-Net), width and depth configurable.

Defaults (32 features, 4 levels, BN, transposed-conv upsampling) give 7,763,041 parameters for
3 input channels and 1 output, the figure of the reference. Any input size works: the input is
padded to a multiple of 2**depth and the output cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.nets.registry import register


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 1, features: int = 32, depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        widths = [features * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.encoders.append(_block(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2, 2)
        self.bottleneck = _block(widths[-2], widths[-1])
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2))
            self.decoders.append(_block(widths[i - 1] * 2, widths[i - 1]))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        # Always pad (even by zero): a conditional would be frozen into an ONNX trace at one size.
        ph, pw = (-h) % m, (-w) % m
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        x = self.head(x)
        return x[..., :h, :w]


@register("unet", description="segment-then-segment U-Net (BN, transposed conv); 7.76M params at features=32")
def unet(in_channels: int = 3, out_channels: int = 1, features: int = 32, depth: int = 4) -> UNet:
    return UNet(in_channels=in_channels, out_channels=out_channels, features=features, depth=depth)
