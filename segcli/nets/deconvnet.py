"""DeconvNet (Noh et al. 2015): max-pooling indices drive unpooling in a mirrored deconvolution decoder.

``variant="rbc"`` (default) is the red-blood-cell variant: 3 encoder blocks of [conv3x3+ReLU x2, 2x2 max
pool with indices], dropout 0.5, and a decoder of [unpool, deconv3x3+ReLU x2] x3 then a 1x1 classifier.
Channel widths are not published; the VGG-like 64/128/256 gives 2,325,890 parameters for 3 -> 2 channels.
``variant="vgg16"`` is the full VGG16 DeconvNet with BN (fc6/fc6-deconv padded "same" so inputs smaller
than 224 work): 251,804,418 parameters for 3 -> 2 channels, as in the reference.

Unpooling is a scatter on the pooling indices (:func:`segcli.nets.layers.max_unpool_scatter`), exactly
``nn.MaxUnpool2d``, because the legacy ONNX exporter has no ``max_unpool2d``. Inputs are padded to a
multiple of 2**blocks and cropped back, so every H, W >= 1 works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcli.nets.layers import kaiming_init, max_unpool_scatter, pad_to_multiple
from segcli.nets.registry import register

# (encoder widths per block, convs per block) and the decoder's per-block output widths, from the
# reference DeconvNet_inference_deploy.prototxt
VGG16_ENCODER = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
VGG16_DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64, 64))


def _conv(cin: int, cout: int, bn: bool, transposed: bool = False) -> list[nn.Module]:
    conv_t = nn.ConvTranspose2d if transposed else nn.Conv2d
    # conv bias kept even before BN: the reference prototxt has it (and the published counts include it)
    layers: list[nn.Module] = [conv_t(cin, cout, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class DeconvNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        variant: str = "rbc",
        widths: Sequence[int] = (64, 128, 256),
        batch_norm: bool | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if variant not in ("rbc", "vgg16"):
            raise ValueError(f"variant must be 'rbc' or 'vgg16', got {variant!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.variant = variant
        bn = (variant == "vgg16") if batch_norm is None else batch_norm
        if variant == "rbc":
            enc_spec = [(w, 2) for w in widths]
            # decoder block i mirrors encoder block i: [w_i -> w_i, w_i -> w_{i-1}], last keeps w_0
            dec_spec = [
                (w, w_prev) for w, w_prev in zip(widths[::-1], [*widths[::-1][1:], widths[0]], strict=True)
            ]
        else:
            enc_spec = list(VGG16_ENCODER)
            dec_spec = list(VGG16_DECODER)
        self.multiple = 2 ** len(enc_spec)

        self.encoders = nn.ModuleList()
        cin = in_channels
        for w, n in enc_spec:
            layers: list[nn.Module] = []
            for _ in range(n):
                layers += _conv(cin, w, bn)
                cin = w
            self.encoders.append(nn.Sequential(*layers))

        self.fc: nn.Module = nn.Identity()
        if variant == "vgg16":  # fc6 7x7 / fc7 1x1 / fc6-deconv 7x7, "same" padded for small crops
            self.fc = nn.Sequential(
                nn.Conv2d(cin, 4096, 7, padding=3),
                nn.BatchNorm2d(4096),
                nn.ReLU(inplace=True),
                nn.Conv2d(4096, 4096, 1),
                nn.BatchNorm2d(4096),
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(4096, cin, 7, padding=3),
                nn.BatchNorm2d(cin),
                nn.ReLU(inplace=True),
            )
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.decoders = nn.ModuleList()
        for outs in dec_spec:
            layers = []
            for w in outs:
                layers += _conv(cin, w, bn, transposed=True)
                cin = w
            self.decoders.append(nn.Sequential(*layers))
        self.score = nn.Conv2d(cin, out_channels, 1)
        kaiming_init(self)
        self.score.reset_parameters()  # small logits at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.multiple)
        stack = []
        for enc in self.encoders:
            x = enc(x)
            pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            stack.append((idx, x))
            x = pooled
        x = self.drop(self.fc(x))
        for dec, (idx, ref) in zip(self.decoders, reversed(stack), strict=True):
            x = dec(max_unpool_scatter(x, idx, ref))
        return self.score(x)[..., :h, :w]


@register(
    "deconvnet",
    description="DeconvNet, RBC variant (3 blocks 64/128/256, 2.33M params) or variant='vgg16' (~252M)",
    variant="rbc",
    widths=(64, 128, 256),
    batch_norm=None,
    dropout=0.5,
)
def deconvnet(
    in_channels: int = 3,
    out_channels: int = 2,
    variant: str = "rbc",
    widths: Sequence[int] = (64, 128, 256),
    batch_norm: bool | None = None,
    dropout: float = 0.5,
) -> DeconvNet:
    """DeconvNet with scatter-based, ONNX-exportable unpooling."""
    return DeconvNet(in_channels, out_channels, variant, tuple(widths), batch_norm, dropout)
