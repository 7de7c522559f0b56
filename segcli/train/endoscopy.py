"""Endoscopy jitter (``segcli train --endoscopy-jitter S``): what changes between colonoscopes and
centres — colour (brightness, contrast, saturation, hue), defocus/motion blur, the distance to the
wall (scale) and specular highlights from the scope's light — applied to a batch with per-sample
parameters, so a model trained on one centre's frames sees a wider range of the others'.

``S`` in (0, 1] scales every range (1 = the widest, ``S = 0`` = off). Only the zoom moves the target
(image and soft target share one sampling grid); colour, blur and highlights change the image alone,
since a highlight on a polyp is still a polyp. Inputs are RGB in [0, 1] (the dtype rule on 8-bit
frames); the output is clamped to [0, 1]. All random numbers are drawn up front in a fixed amount
(:func:`draw`), so which branches fire never changes the generator's stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Ranges at strength 1 (each is multiplied by S).
BRIGHTNESS = 0.25  # multiplicative factor U(1 ± 0.25)
CONTRAST = 0.25  # around the sample's mean luminance
SATURATION = 0.35  # blend with the luminance image
HUE = 0.06  # turns of the chroma plane (YIQ), about ±22°
BLUR_SIGMA = 1.2  # px at the network's input size, sigma U(0, 1.2 S)
ZOOM = 0.35  # log-uniform factor in [1/(1 + 0.35 S), 1 + 0.35 S]
SPOTS = 3  # highlights per sample at most
SPOT_RADIUS = (0.01, 0.05)  # fraction of the shorter side
P_BLUR, P_ZOOM, P_SPOT = 0.3, 0.5, 0.4  # probability of each op per sample (per spot for highlights)

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass
class EndoParams:
    """One batch's draws: per-sample factors (``N``) and per-spot geometry (``N, SPOTS``)."""

    bright: torch.Tensor
    contrast: torch.Tensor
    sat: torch.Tensor
    hue: torch.Tensor
    sigma: torch.Tensor  # 0 where no blur
    zoom: torch.Tensor  # 1 where no zoom
    spot_on: torch.Tensor  # bool
    spot_xy: torch.Tensor  # (N, SPOTS, 2) in [-1, 1]
    spot_r: torch.Tensor  # (N, SPOTS, 2) radii (x, y), fraction of the shorter side


def _u(shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def draw(n: int, s: float, g: torch.Generator) -> EndoParams:
    """Draw every parameter for ``n`` samples at strength ``s`` (always the same amount of numbers)."""
    do_blur = torch.rand(n, generator=g) < P_BLUR
    do_zoom = torch.rand(n, generator=g) < P_ZOOM
    log_z = math.log1p(ZOOM * s)
    return EndoParams(
        bright=_u((n,), 1 - BRIGHTNESS * s, 1 + BRIGHTNESS * s, g),
        contrast=_u((n,), 1 - CONTRAST * s, 1 + CONTRAST * s, g),
        sat=_u((n,), 1 - SATURATION * s, 1 + SATURATION * s, g),
        hue=_u((n,), -HUE * s, HUE * s, g),
        sigma=torch.where(do_blur, _u((n,), 0.0, BLUR_SIGMA * s, g), torch.zeros(n)),
        zoom=torch.where(do_zoom, torch.exp(_u((n,), -log_z, log_z, g)), torch.ones(n)),
        spot_on=(torch.rand((n, SPOTS), generator=g) < P_SPOT * min(1.0, 2 * s)),
        spot_xy=_u((n, SPOTS, 2), -0.9, 0.9, g),
        spot_r=_u((n, SPOTS, 2), SPOT_RADIUS[0], SPOT_RADIUS[1], g),
    )


def zoom(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom each sample about its centre by ``factor`` (>1 = closer); image and target share the grid."""
    sel = torch.nonzero(factor != 1).flatten().to(x.device)
    if sel.numel() == 0:
        return x, y
    inv = (1.0 / factor[sel.cpu()]).to(device=x.device, dtype=torch.float32)
    theta = torch.zeros(len(sel), 2, 3, device=x.device)
    theta[:, 0, 0] = inv
    theta[:, 1, 1] = inv
    grid = F.affine_grid(theta, [len(sel), x.shape[1], *x.shape[-2:]], align_corners=False)
    x, y = x.clone(), y.clone()
    for t in (x, y):
        t[sel] = F.grid_sample(t[sel].float(), grid, mode="bilinear", padding_mode="border",
                               align_corners=False).to(t.dtype)
    return x, y


def colour(x: torch.Tensor, p: EndoParams) -> torch.Tensor:
    """Brightness, contrast (about the mean luminance), saturation, then a hue rotation in YIQ."""
    dev = x.device
    v = lambda t: t.to(device=dev, dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    xf = x.float() * v(p.bright)
    luma = torch.einsum("nchw,c->nhw", xf, torch.tensor(_LUMA, device=dev)).unsqueeze(1)
    xf = (xf - luma.mean(dim=(2, 3), keepdim=True)) * v(p.contrast) + luma.mean(dim=(2, 3), keepdim=True)
    luma = torch.einsum("nchw,c->nhw", xf, torch.tensor(_LUMA, device=dev)).unsqueeze(1)
    xf = luma + (xf - luma) * v(p.sat)
    ang = (p.hue * 2 * math.pi).to(device=dev, dtype=torch.float32)
    rot = torch.zeros(len(ang), 3, 3, device=dev)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(ang), -torch.sin(ang)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(ang), torch.cos(ang)
    m = _YIQ_TO_RGB.to(dev) @ rot @ _RGB_TO_YIQ.to(dev)  # (N, 3, 3), RGB -> RGB
    xf = torch.einsum("nij,njhw->nihw", m, xf)
    return xf.clamp(0.0, 1.0).to(x.dtype)


def highlights(x: torch.Tensor, p: EndoParams) -> torch.Tensor:
    """Blend white, flat-topped elliptical spots (the light's reflection on wet mucosa) into the image."""
    if not bool(p.spot_on.any()):
        return x
    n, _, h, w = x.shape
    dev = x.device
    side = min(h, w)
    yy = torch.linspace(-1, 1, h, device=dev).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w, device=dev).view(1, 1, 1, w)
    cx, cy = (p.spot_xy[..., i].to(dev).view(n, SPOTS, 1, 1) for i in (0, 1))
    rx = (p.spot_r[..., 0] * 2 * side / w).to(dev).view(n, SPOTS, 1, 1)
    ry = (p.spot_r[..., 1] * 2 * side / h).to(dev).view(n, SPOTS, 1, 1)
    d2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    alpha = torch.exp(-(d2**2)) * p.spot_on.to(dev).view(n, SPOTS, 1, 1)
    alpha = alpha.amax(dim=1, keepdim=True)  # (N, 1, H, W)
    return (x.float() * (1 - alpha) + alpha).clamp(0.0, 1.0).to(x.dtype)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` in px (0 = unchanged)."""
    if not bool((sigma > 0).any()):
        return x
    n, c, h, w = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    s = sigma.to(device=x.device, dtype=torch.float32).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    z = x.float().reshape(1, n * c, h, w)
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return z.reshape(n, c, h, w).to(x.dtype)


def endoscopy_jitter(x: torch.Tensor, y: torch.Tensor, p: EndoParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the drawn jitter: zoom (image and target), then colour, highlights and blur (image only)."""
    if x.shape[1] != 3:
        raise ValueError(f"endoscopy jitter needs RGB inputs, got {x.shape[1]} channel(s)")
    x, y = zoom(x, y, p.zoom)
    x = colour(x, p)
    x = highlights(x, p)
    return blur(x, p.sigma), y
