"""``--endoscopy-jitter`` (segcli.train.endoscopy): colour, blur, zoom and highlights change the image,
only the zoom moves the target, a seed reproduces a batch, and bad values are refused with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segcli.train.augment import AugmentConfig, augment
from segcli.train.endoscopy import EndoParams, blur, colour, draw, endoscopy_jitter, highlights, zoom
from tests.conftest import run_cli

FIX = Path(__file__).parent / "fixtures"
NO_GEOMETRY = {"flip": 0.0, "rot90": False, "affine": 0.0, "intensity": 0.0}


def _batch(n: int = 6, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(n, 3, side, side, generator=g) * 0.8 + 0.1
    fg = torch.zeros(n, 1, side, side)
    fg[:, :, 8:20, 10:24] = 1.0
    return x, torch.cat([1 - fg, fg], 1)


def _identity(n: int) -> EndoParams:
    return EndoParams(bright=torch.ones(n), contrast=torch.ones(n), sat=torch.ones(n), hue=torch.zeros(n),
                      sigma=torch.zeros(n), zoom=torch.ones(n), spot_on=torch.zeros(n, 3, dtype=torch.bool),
                      spot_xy=torch.zeros(n, 3, 2), spot_r=torch.full((n, 3, 2), 0.05))


def test_identity_parameters_change_nothing() -> None:
    x, y = _batch()
    xo, yo = endoscopy_jitter(x, y, _identity(len(x)))
    assert torch.allclose(xo, x, atol=1e-5) and torch.equal(yo, y)


def test_colour_ops_do_what_they_say() -> None:
    x, _ = _batch(2)
    p = _identity(2)
    p.sat = torch.zeros(2)  # no saturation: every pixel grey
    grey = colour(x, p)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    p = _identity(2)
    p.bright = torch.tensor([0.5, 0.5])
    assert torch.allclose(colour(x, p), x * 0.5, atol=1e-5)
    p = _identity(2)
    p.hue = torch.tensor([0.1, -0.1])  # a hue turn keeps the luminance
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    turned = colour(x * 0.5 + 0.25, p)  # mid-range, so the clamp does not bite
    assert torch.allclose((turned * luma).sum(1), ((x * 0.5 + 0.25) * luma).sum(1), atol=1e-4)
    assert not torch.allclose(turned, x * 0.5 + 0.25, atol=1e-3)


def test_blur_and_highlights() -> None:
    x, _ = _batch(2)
    b = blur(x, torch.tensor([0.0, 1.5]))
    assert torch.equal(b[0], x[0]) and b[1].std() < x[1].std()  # sample 0 untouched, sample 1 smoothed
    assert torch.allclose(b[1].mean(), x[1].mean(), atol=0.02)
    p = _identity(2)
    p.spot_on[1, 0] = True
    h = highlights(x, p)
    assert torch.equal(h[0], x[0])
    assert h[1, :, 15:17, 15:17].min() > 0.95  # white at the spot's centre
    assert torch.equal(h[1, :, 0, 0], x[1, :, 0, 0])  # and nothing far from it


def test_zoom_moves_image_and_target_identically() -> None:
    _, y = _batch(3)
    x = y[:, 1:2].repeat(1, 3, 1, 1)  # an image that IS the mask
    f = torch.tensor([1.0, 1.4, 0.75])
    xz, yz = zoom(x, y, f)
    assert xz.shape == x.shape and yz.shape == y.shape
    assert torch.equal(xz[0], x[0]) and torch.equal(yz[0], y[0])
    assert torch.allclose(xz[:, 0], yz[:, 1], atol=1e-6)
    assert torch.allclose(yz.sum(1), torch.ones_like(yz[:, 0]), atol=1e-5)  # still a soft one-hot map
    area = yz[:, 1].sum(dim=(1, 2))
    assert area[1] > area[0] > area[2]  # closer = bigger polyp


def test_augment_keeps_shapes_mask_and_seed() -> None:
    x, y = _batch()
    cfg = AugmentConfig(endoscopy=1.0, **NO_GEOMETRY)
    xa, ya = augment(x, y, torch.Generator().manual_seed(3), cfg)
    xb, yb = augment(x, y, torch.Generator().manual_seed(3), cfg)
    assert xa.shape == x.shape and ya.shape == y.shape
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # a seed reproduces the batch
    assert not torch.allclose(xa, x) and xa.min() >= 0 and xa.max() <= 1
    moved = (ya != y).flatten(1).any(1)  # with this seed some samples are zoomed, some not
    assert moved.any() and not moved.all()
    assert torch.equal(ya[~moved], y[~moved])  # colour, blur and highlights never touch the target
    xc, yc = augment(x, y, torch.Generator().manual_seed(3), AugmentConfig(endoscopy=0.0, **NO_GEOMETRY))
    xd, yd = augment(x, y, torch.Generator().manual_seed(3), AugmentConfig(**NO_GEOMETRY))
    assert torch.equal(xc, xd) and torch.equal(yc, y)  # off by default, and off leaves the stream alone
    with pytest.raises(ValueError, match="RGB"):
        augment(x[:, :1], y, torch.Generator().manual_seed(3), cfg)


@pytest.mark.parametrize("value", ["1.5", "lots"])
def test_bad_value_exits_2(tmp_path: Path, value: str) -> None:
    r = run_cli("train", "--data", FIX / "shared", "-o", tmp_path / "o", "--endoscopy-jitter", value, "-q")
    assert r.returncode == 2 and "endoscopy-jitter" in r.stderr.lower().replace("'", "")



def test_draw_ranges_scale_with_strength() -> None:
    p = draw(2000, 0.5, torch.Generator().manual_seed(0))
    assert p.bright.min() >= 0.875 and p.bright.max() <= 1.125 and p.hue.abs().max() <= 0.03
    assert (p.zoom != 1).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert p.zoom.max() <= 1.175 and p.zoom.min() >= 1 / 1.175 and p.sigma.max() <= 0.6
    q = draw(2000, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(p.zoom, q.zoom) and torch.equal(p.spot_xy, q.spot_xy)
