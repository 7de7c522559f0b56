"""The tiled rough pass over a slide without a pyramid (issue 34): finding the glass decodes the slide whole, so
the overview is made in that same pass and the slide's tiles are decoded once, not again by region (a 40000²
mosaic's were decoded 4.1 times); the rough map is the one of the in-memory rough pass."""

from __future__ import annotations

import numpy as np
import tifffile

from segcli.engines.base import ArrayPlane
from segcli.engines.stts import rough_pass
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
