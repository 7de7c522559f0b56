"""Batch augmentation on tensors: flips, 90° rotations, a small affine warp, intensity jitter, and
(opt-in, RGB H&E only) stain jitter in HED optical-density space, and (opt-in, RGB endoscopy)
colour/blur/zoom/highlight jitter (:mod:`segcli.train.endoscopy`).

Everything runs on the whole batch at once (on the training device) with per-sample parameters
drawn from an explicit ``torch.Generator``, so a seed reproduces the run and resuming restores the
generator's state. Geometric transforms move image and soft target together; the target is
warped bilinearly (it is a soft one-hot map), the image's border values are repeated, as the
inference letterbox does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segcli.train.endoscopy import draw, endoscopy_jitter


@dataclass
class AugmentConfig:
    """Probabilities and ranges; the defaults are deliberately mild (medical images are not photos)."""

    flip: float = 0.5  # each of horizontal and vertical
    rot90: bool = True  # only applied to square inputs
    affine: float = 0.5  # probability of a small affine warp
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05  # fraction of the side
    intensity: float = 0.5  # probability of brightness/contrast jitter
    brightness: float = 0.1  # additive, in normalised units
    contrast: float = 0.1  # multiplicative around the sample mean
    # HED stain jitter (Tellez et al. 2018): 0 = off. For RGB in [0, 1] (the dtype rule on 8-bit
    # images): each sample's haematoxylin/eosin/DAB concentrations (Ruifrok-Johnston colour
    # deconvolution) are scaled by U(1-s, 1+s) and shifted by U(-s, s). Its random numbers are drawn
    # only when s > 0, so runs without it keep their exact random stream.
    stain: float = 0.0
    # Endoscopy jitter strength in [0, 1] (segcli.train.endoscopy; 0 = off): colour, blur, zoom and
    # specular highlights. Drawn after the stain numbers and only when > 0, as the stain jitter is.
    endoscopy: float = 0.0


# Ruifrok & Johnston (2001) stain vectors, rows = haematoxylin, eosin, DAB, in optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_MIN = 1e-6  # smallest transmitted fraction used for log(); keeps pure black finite


def stain_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB ``x (N, 3, H, W)`` in [0, 1] → the same tissue with stain amounts ``c * scale + shift``.

    ``scale``/``shift`` are ``(N, 3)`` per sample and stain (H, E, D). ``scale=1, shift=0`` returns
    ``x`` (up to float rounding, and values below ``_OD_MIN`` raised to it).
    """
    dt = x.dtype
    od = -torch.log(x.float().clamp(_OD_MIN, 1.0))  # (N, 3, H, W), natural-log optical density
    m = _HED_FROM_RGB.to(device=x.device, dtype=torch.float32)
    hed = torch.einsum("nchw,cs->nshw", od, m)
    hed = hed * scale.to(x.device, torch.float32).view(-1, 3, 1, 1) + shift.to(x.device, torch.float32).view(-1, 3, 1, 1)
    od = torch.einsum("nshw,sc->nchw", hed, _RGB_FROM_HED.to(device=x.device, dtype=torch.float32))
    return torch.exp(-od).clamp(0.0, 1.0).to(dt)


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def augment(
    x: torch.Tensor, y: torch.Tensor, g: torch.Generator, cfg: AugmentConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch ``x (N, C, H, W)`` and its soft target ``y (N, K, H, W)``; returns new tensors.

    Random numbers are always drawn in the same order and amount, whatever is applied, so the
    generator's stream (and thus the run) does not depend on which branches fired.
    """
    cfg = cfg or AugmentConfig()
    n = x.shape[0]
    dev = x.device
    hflip = torch.rand(n, generator=g) < cfg.flip
    vflip = torch.rand(n, generator=g) < cfg.flip
    k90 = torch.randint(0, 4, (n,), generator=g)
    do_aff = torch.rand(n, generator=g) < cfg.affine
    ang = _u(n, -cfg.rotate_deg, cfg.rotate_deg, g) * math.pi / 180.0
    sc = _u(n, cfg.scale[0], cfg.scale[1], g)
    tx = _u(n, -cfg.translate, cfg.translate, g) * 2.0
    ty = _u(n, -cfg.translate, cfg.translate, g) * 2.0
    do_int = torch.rand(n, generator=g) < cfg.intensity
    bright = _u(n, -cfg.brightness, cfg.brightness, g)
    contrast = _u(n, 1.0 - cfg.contrast, 1.0 + cfg.contrast, g)
    if cfg.stain > 0:
        if x.shape[1] != 3:
            raise ValueError(f"stain jitter needs RGB inputs, got {x.shape[1]} channel(s)")
        s_scale = _u(n * 3, 1.0 - cfg.stain, 1.0 + cfg.stain, g).view(n, 3)
        s_shift = _u(n * 3, -cfg.stain, cfg.stain, g).view(n, 3)
    if cfg.endoscopy > 0:
        endo = draw(n, cfg.endoscopy, g)

    x = x.clone()
    y = y.clone()
    hf = hflip.to(dev)
    vf = vflip.to(dev)
    if hf.any():
        x[hf] = x[hf].flip(-1)
        y[hf] = y[hf].flip(-1)
    if vf.any():
        x[vf] = x[vf].flip(-2)
        y[vf] = y[vf].flip(-2)
    if cfg.rot90 and x.shape[-1] == x.shape[-2]:
        for k in (1, 2, 3):
            sel = (k90 == k).to(dev)
            if sel.any():
                x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
                y[sel] = torch.rot90(y[sel], k, dims=(-2, -1))
    if cfg.affine > 0 and do_aff.any():
        idx = torch.nonzero(do_aff).flatten()
        cos, sin = torch.cos(ang[idx]) / sc[idx], torch.sin(ang[idx]) / sc[idx]
        theta = torch.stack(
            [torch.stack([cos, -sin, tx[idx]], 1), torch.stack([sin, cos, ty[idx]], 1)], 1
        ).to(device=dev, dtype=torch.float32)
        idx = idx.to(dev)
        xs = x[idx].float()
        grid = F.affine_grid(theta, list(xs.shape), align_corners=False)
        x[idx] = F.grid_sample(xs, grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)
        y[idx] = F.grid_sample(y[idx].float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(y.dtype)
    if cfg.stain > 0:
        x = stain_jitter(x, s_scale, s_shift)
    if cfg.endoscopy > 0:
        x, y = endoscopy_jitter(x, y, endo)
    if cfg.intensity > 0 and do_int.any():
        sel = do_int.to(dev)
        xi = x[sel]
        mean = xi.mean(dim=(1, 2, 3), keepdim=True)
        c = contrast.to(dev)[sel].view(-1, 1, 1, 1)
        b = bright.to(dev)[sel].view(-1, 1, 1, 1)
        x[sel] = (xi - mean) * c + mean + b
    return x, y
