"""The content rules that pick a model without --model: sampled, but the same answers as on every pixel."""

from __future__ import annotations

import numpy as np

from segcli.choose import HE_GREEN_SHARE, content_kind, he_score


def _he_share_every_pixel(a: np.ndarray) -> float:
    """The H&E rule on all pixels, with the logarithm written out (no sampling, no lookup table)."""
    od = -np.log((a.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    o = od[od.sum(axis=1) > 0.3]
    return float(((o[:, 1] >= o[:, 0]) & (o[:, 1] >= 0.9 * o[:, 2])).mean())


def _stained(seed: int, pink: float) -> np.ndarray:
    """A 900x1100 tile of purple (haematoxylin-like) and pink (eosin-like) pixels with noise, and some glass."""
    rng = np.random.default_rng(seed)
    purple, eosin, glass = np.array([110, 60, 150]), np.array([230, 130, 190]), np.array([245, 245, 245])
    pick = rng.random((900, 1100))
    a = np.where(pick[..., None] < pink, eosin, purple)
    a = np.where(pick[..., None] > 0.9, glass, a)
    return np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)


def test_the_sampled_he_share_is_the_share_of_every_pixel() -> None:
    for seed, pink in ((0, 0.3), (1, 0.6)):
        a = _stained(seed, pink)
        assert abs(he_score(a) - _he_share_every_pixel(a)) < 0.01
    assert content_kind(_stained(0, 0.3), "2d") == "he"


def test_a_red_photo_is_not_he() -> None:
    rng = np.random.default_rng(2)
    red = np.clip(np.array([200, 70, 60]) + rng.normal(0, 15, (480, 640, 3)), 0, 255).astype(np.uint8)
    assert he_score(red) < HE_GREEN_SHARE and content_kind(red, "2d") == "2d"
