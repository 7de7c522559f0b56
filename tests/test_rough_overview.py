"""The tiled rough pass over a slide without a pyramid (issue 34): finding the glass decodes the slide whole, so
the overview is made in that same pass and the slide's tiles are decoded once, not again by region (a 40000²
mosaic's were decoded 4.1 times); the rough map is the one of the in-memory rough pass."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from segcli.engines.base import ArrayPlane
from segcli.engines.stts import rough_pass
from segcli.io import lazyplane
from segcli.io.bigtiff import TiffPlane
from segcli.resize import downscale_by_bands
from segcli.runtimes import FunctionPredictor
from tests.test_slides import TILE, tissue, write_svs


def _nuclei(batch: np.ndarray) -> np.ndarray:
    """Dark purple is object: a rough 'network' whose answer depends only on each pixel."""
    fg = (batch.mean(axis=1) < 0.5).astype(np.float32)
    return np.stack([1 - fg, fg], 1)


def test_banded_downscale_equals_the_whole_one():
    a = np.random.default_rng(1).random((3, 613, 459), dtype=np.float32)
    for out in [(153, 114), (61, 45), (613, 459)]:
        banded = downscale_by_bands(ArrayPlane(a).region, a.shape[1:], 3, out, band=100)
        np.testing.assert_allclose(banded, ArrayPlane(a).downscaled(out), atol=1e-6)


def test_a_slide_without_a_pyramid_is_decoded_once(tmp_path):
    img = tissue()
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, tile=(TILE, TILE), photometric="rgb", compression="zlib", metadata=None)
    tiles = -(-img.shape[0] // TILE) * -(-img.shape[1] // TILE)
    spec = {"kind": "scale", "factor": 1 / 255}
    with TiffPlane(path, spec=spec, channels_want=3) as plane:
        rough, info = rough_pass(plane, FunctionPredictor(_nuclei), size=64, max_downscale=3.9)
        assert info["rough_tiled"] and info["overview"] == "one pass" and info["glass_skip"]
        assert plane.segments_decoded == tiles  # every tile once: the glass and the overview from one pass
    mem, _ = rough_pass(ArrayPlane(np.moveaxis(img, -1, 0).astype(np.float32) / 255), FunctionPredictor(_nuclei),
                        size=64, max_downscale=3.9)
    assert rough.shape == mem.shape
    assert np.mean((rough[1] > 0.5) == (mem[1] > 0.5)) > 0.999


def test_a_pyramid_level_still_finds_the_glass_and_the_view_reads_by_region(tmp_path):
    path = write_svs(tmp_path / "s.svs", tissue(), factors=(4, 16))
    with TiffPlane(path, spec={"kind": "scale", "factor": 1 / 255}, channels_want=3) as plane:
        _, info = rough_pass(plane, FunctionPredictor(_nuclei), size=64, max_downscale=3.9)
    assert info["overview"] == "by region"


def test_a_level_a_whole_factor_from_the_view_needs_no_weights(tmp_path, monkeypatch):
    """The thumbnail of a slide whose pyramid has a level of that size is the level's pixels (a 16000² SVS's ×16
    level for its 1000² tissue thumbnail), and one a whole factor smaller is its block means, both read without
    resize weights (and scipy.sparse); a view one pixel smaller goes through the weights. All three are the area
    average of the same level."""
    path = write_svs(tmp_path / "s.svs", tissue(), factors=(4, 16))
    with tifffile.TiffFile(path) as tf:  # the ×4 level: the first tiled page after the stripped thumbnail
        level = next(p for p in tf.pages[1:] if p.is_tiled).asarray()
    assert level.shape[:2] == tissue()[::4, ::4].shape[:2]
    want = np.moveaxis(level, -1, 0).astype(np.float32) * np.float32(1 / 255)
    with TiffPlane(path, spec={"kind": "scale", "factor": 1 / 255}, channels_want=3) as plane:
        assert plane.choose_level(level.shape[:2]) == 1
        with monkeypatch.context() as m:  # no weights built, so no scipy.sparse imported for it
            m.setattr(lazyplane, "resize_weights", lambda *a, **k: pytest.fail("weights built for the identity"))
            np.testing.assert_allclose(plane.downscaled(level.shape[:2]), want, rtol=0, atol=1e-7)
            halved = (level.shape[0], level.shape[1] // 2)  # 175 x 125: factor 1 down, 2 across
            assert plane.choose_level(halved) == 1 and level.shape[1] % 2 == 0
            np.testing.assert_allclose(plane.downscaled(halved), ArrayPlane(want).downscaled(halved), atol=1e-6)
        smaller = (level.shape[0] - 1, level.shape[1] - 1)
        np.testing.assert_allclose(plane.downscaled(smaller), ArrayPlane(want).downscaled(smaller), atol=1e-5)
