"""ARSM: HRNet + Adaptive Resolution Selection Module (Fujii & Hotta).

Each HRNet branch is an *expert*: a 1x1 conv gives class logits e_n at its own resolution, upsampled to
the highest branch. A *gating network* (ShuffleNetV2 units on the concatenated branches, ΔX) gives, per
class and pixel, logits A over the 4 resolutions; the output is Y = Σ_n g_n · e_n. Small objects can
then be read from the high-resolution expert and large ones from the semantically stronger low ones.

Gates (no public code exists; see section 2 of the architecture notes):

* training: Gumbel-softmax with T = 0.1 across the 4 resolutions, near one-hot so experts specialise.
  The uniform noise is clamped to [eps, 1 - eps], because ``-log(-log(u))`` is infinite at 0 and 1.
* ``gate_eval="expectation"`` (default): softmax(A) across resolutions. This is the limit of the
  paper's "average 100 Gumbel samples" protocol (as T -> 0 each sample is one-hot(argmax(A + g)), and
  P(argmax = i) = softmax(A)_i), deterministic and ONNX-exportable. Note it is softmax(A), not
  softmax(A / T).
* ``gate_eval="mc"``: the paper's protocol literally, ``mc_samples`` Gumbel-softmax samples averaged,
  drawn from a generator seeded with ``mc_seed`` on every call (reproducible; not ONNX-equivalent).
* ``gate_eval="hard"``: one-hot(argmax A), the noise-free T -> 0 sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segcli.nets.hrnet import HRNetBackbone, concat_branches
from segcli.nets.layers import conv_bn_relu, kaiming_init, resize_to
from segcli.nets.registry import register

GATE_EVAL_MODES = ("expectation", "mc", "hard")
NUM_RESOLUTIONS = 4


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit (torchvision ``InvertedResidual``): cheap on wide, full-res input.

    Half the channels pass through, the other half get 1x1 -> depthwise 3x3 -> 1x1; a channel shuffle
    then mixes the halves. The shuffle is a constant index permutation, not a 5-D reshape, so the
    exported graph has no shape arithmetic.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"ShuffleUnit needs an even channel count, got {channels}")
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, kernel=1),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            conv_bn_relu(half, half, kernel=1),
        )
        perm = torch.arange(channels).view(2, half).t().reshape(-1)  # channel_shuffle(x, groups=2)
        self.register_buffer("perm", perm, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, self.branch(x2)], dim=1)
        return out.index_select(1, self.perm)


def gumbel_softmax_safe(
    logits: torch.Tensor, tau: float, dim: int, eps: float = 1e-6, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-softmax whose noise can never be infinite (``F.gumbel_softmax`` can give NaN, pytorch#22442)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = -torch.log(-torch.log(u.clamp_(eps, 1.0 - eps)))
    return torch.softmax((logits.float() + g) / tau, dim=dim).to(logits.dtype)


class ARSM(nn.Module):
    """HRNet backbone + ARSM head; ``forward`` returns logits Y at the input size."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: str = "w18",
        stem_stride: int = 1,
        base_channels: int | None = None,
        stem_channels: int | None = None,
        stage1_planes: int | None = None,
        gate_units: int = 2,
        gate_channels: int | None = None,
        tau: float = 0.1,
        gate_eval: str = "expectation",
        mc_samples: int = 100,
        mc_seed: int = 0,
    ) -> None:
        super().__init__()
        if gate_eval not in GATE_EVAL_MODES:
            raise ValueError(f"gate_eval must be one of {GATE_EVAL_MODES}, got {gate_eval!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.tau = tau
        self.gate_eval = gate_eval
        self.mc_samples = mc_samples
        self.mc_seed = mc_seed
        self.backbone = HRNetBackbone(
            in_channels, width, stem_stride, base_channels, stem_channels, stage1_planes
        )
        chans = self.backbone.channels
        self.experts = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in chans)
        total = sum(chans)
        gate: list[nn.Module] = []
        if gate_channels:  # optional 1x1 reduction: the full-res concat is the expensive part
            gate.append(conv_bn_relu(total, gate_channels, kernel=1))
            total = gate_channels
        gate += [ShuffleUnit(total) for _ in range(gate_units)]
        gate.append(nn.Conv2d(total, NUM_RESOLUTIONS * out_channels, 1))
        self.gate = nn.Sequential(*gate)
        kaiming_init(self.gate)
        self.gate[-1].reset_parameters()  # classifier-like layers keep torch's small default init

    def _experts_and_gate_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E and A, both (N, 4, K, h, w) at the highest branch resolution."""
        xs = self.backbone(x)
        e = torch.stack([resize_to(ex(xi), xs[0]) for ex, xi in zip(self.experts, xs, strict=True)], dim=1)
        a = self.gate(concat_branches(xs))
        a = a.unflatten(1, (NUM_RESOLUTIONS, self.out_channels))
        return e, a

    def _gates(self, a: torch.Tensor) -> torch.Tensor:
        """G from gate logits A, summing to 1 over dim 1 (the resolutions)."""
        if self.training:
            return gumbel_softmax_safe(a, self.tau, dim=1)
        if self.gate_eval == "expectation":
            return torch.softmax(a, dim=1)
        if self.gate_eval == "hard":
            # one-hot by comparison with a constant range: exports cleanly, unlike a scalar scatter
            levels = torch.arange(NUM_RESOLUTIONS, device=a.device).view(1, -1, 1, 1, 1)
            return (a.argmax(dim=1, keepdim=True) == levels).to(a.dtype)
        gen = torch.Generator(device=a.device)
        gen.manual_seed(self.mc_seed)
        acc = torch.zeros_like(a)
        for _ in range(self.mc_samples):  # accumulate, so memory stays at one sample
            acc = acc + gumbel_softmax_safe(a, self.tau, dim=1, generator=gen)
        return acc / self.mc_samples

    def _to_input(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.backbone.stem_stride == 1:
            return t
        return F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, a = self._experts_and_gate_logits(x)
        y = (self._gates(a) * e).sum(dim=1)
        return self._to_input(y, x)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """G as (N, 4, K, H, W) at the input size, in the current train/eval mode."""
        _, a = self._experts_and_gate_logits(x)
        g = self._gates(a)
        if self.backbone.stem_stride == 1:
            return g
        return self._to_input(g.flatten(1, 2), x).unflatten(1, (NUM_RESOLUTIONS, self.out_channels))

    @torch.no_grad()
    def gate_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Index 0..3 (0 = highest resolution) of the resolution chosen per class and pixel, (N, K, H, W).

        Uses the evaluation gates whatever the module's mode, so maps are reproducible.
        """
        was_training = self.training
        self.eval()
        try:
            return self.gates(x).argmax(dim=1)
        finally:
            self.train(was_training)


@register(
    "arsm",
    description="HRNet + Adaptive Resolution Selection Module (Gumbel-gated per-class resolution experts)",
    width="w18",
    stem_stride=1,
    base_channels=None,
    stem_channels=None,
    stage1_planes=None,
    gate_units=2,
    gate_channels=None,
    tau=0.1,
    gate_eval="expectation",
    mc_samples=100,
    mc_seed=0,
)
def arsm(
    in_channels: int = 3,
    out_channels: int = 1,
    width: str = "w18",
    stem_stride: int = 1,
    base_channels: int | None = None,
    stem_channels: int | None = None,
    stage1_planes: int | None = None,
    gate_units: int = 2,
    gate_channels: int | None = None,
    tau: float = 0.1,
    gate_eval: str = "expectation",
    mc_samples: int = 100,
    mc_seed: int = 0,
) -> ARSM:
    """HRNet + ARSM head (paper: stem_stride 1, T = 0.1)."""
    return ARSM(
        in_channels,
        out_channels,
        width,
        stem_stride,
        base_channels,
        stem_channels,
        stage1_planes,
        gate_units,
        gate_channels,
        tau,
        gate_eval,
        mc_samples,
        mc_seed,
    )
