"""Where to look on a slide (segcli.tissue): glass skipped by the rough pass, windows placed per part of tissue."""

import numpy as np
import pytest

from segcli.engines.base import ArrayPlane
from segcli.engines.direct import sliding
from segcli.engines.stts import rough_pass
from segcli.geometry import sliding_grid
from segcli.runtimes import FunctionPredictor
from segcli.tissue import box_windows, content_mask, otsu, touches


def fg_probs(batch: np.ndarray) -> np.ndarray:
    """A 'network' that calls foreground whatever is darker than 0.5 in channel 0 (tissue on bright glass)."""
    p = (batch[:, :1] < 0.5).astype(np.float32)
    return np.concatenate([1 - p, p], axis=1)


def glass_slide(h=400, w=600, seed=0):
    """A bright, slightly noisy RGB glass overview (C, h, w) in [0, 1] with two dark tissue patches."""
    rng = np.random.default_rng(seed)
    img = np.clip(0.92 + rng.normal(0, 0.005, (3, h, w)), 0, 1).astype(np.float32)
    tissue = np.zeros((h, w), bool)
    for y0, x0, s in [(40, 48, 60), (252, 400, 88)]:  # on multiples of 4: a ×4 overview keeps their edges
        img[:, y0 : y0 + s, x0 : x0 + s] = 0.15 + 0.25 * rng.random((3, s, s))
        tissue[y0 : y0 + s, x0 : x0 + s] = True
    return img, tissue


def test_otsu_splits_two_modes():
    v = np.concatenate([np.full(900, 0.9), np.full(100, 0.3)])
    assert 0.3 < otsu(v) <= 0.9
    assert otsu(np.full(10, 0.5)) == 0.5


def test_content_mask_keeps_tissue_and_its_margin_and_drops_glass():
    img, tissue = glass_slide()
    mask, info = content_mask(img, margin=2)
    assert info["glass_skip"] is True and info["glass_fraction"] > 0.9
    assert mask[tissue].all()  # no tissue pixel is called glass
    assert mask[38, 50] and mask[40, 46] and not mask[37, 50] and not mask[40, 45]  # grown by exactly 2 pixels
    assert not mask[0:30, 200:380].any()  # far glass is skipped


@pytest.mark.parametrize("kind", ["fluorescence", "all tissue", "grey"])
def test_content_mask_looks_everywhere_unless_mostly_uniform_bright_glass(kind):
    rng = np.random.default_rng(1)
    if kind == "fluorescence":  # dark background, a few bright nuclei: the bright class is the minority
        img = np.full((3, 200, 200), 0.05, np.float32)
        img[:, 50:70, 50:70] = 0.9
    elif kind == "all tissue":  # textured tissue everywhere: the brighter Otsu class is not uniform
        img = rng.uniform(0.3, 0.9, (3, 200, 200)).astype(np.float32)
    else:
        img = np.full((1, 200, 200), 0.9, np.float32)  # one channel: not a brightfield RGB overview
    mask, info = content_mask(img, margin=1)
    assert mask is None and info["glass_skip"] is False


def test_box_windows_covers_a_patch_with_its_own_grid():
    H = W = 16000
    fg = np.zeros((2048, 2048), bool)  # rough mask at factor 7.8125
    y, x = 5100, 9300  # a 1000² patch that straddles the slide-wide grid
    f = 2048 / H
    fg[int(y * f) : int(np.ceil((y + 1000) * f)), int(x * f) : int(np.ceil((x + 1000) * f))] = True
    wins = box_windows(fg, (H, W), 256, 0.25)
    grid = sliding_grid((H, W), 256, 0.25)
    slide_wide = grid[touches(np.pad(fg, 0), grid, (H, W))]
    # the part's box, grown by one rough pixel (the rough mask's uncertainty), is 1025 × 1024 px: 6 × 5 windows,
    # against the 6 × 6 of the slide-wide grid that the patch straddles
    assert len(wins) == 30 and len(slide_wide) == 36
    assert ((wins[:, 2] - wins[:, 0]) == 256).all() and ((wins[:, 3] - wins[:, 1]) == 256).all()
    cover = np.zeros((1200, 1200), bool)  # every pixel of the patch is inside some window
    for y0, x0, y1, x1 in wins.tolist():
        cover[max(0, y0 - y + 100) : y1 - y + 100, max(0, x0 - x + 100) : x1 - x + 100] = True
    assert cover[100:1100, 100:1100].all()


def test_box_windows_small_parts_get_full_size_windows_and_empty_gives_none():
    fg = np.zeros((100, 100), bool)
    fg[0, 0] = fg[99, 99] = True  # two specks in opposite corners of an 800² image
    wins = box_windows(fg, (800, 800), 256, 0.25)
    assert len(wins) == 2
    assert ((wins[:, 2] - wins[:, 0]) == 256).all() and (wins >= 0).all() and (wins[:, 2:] <= 800).all()
    assert len(box_windows(np.zeros((100, 100), bool), (800, 800), 256, 0.25)) == 0


def test_box_windows_falls_back_to_the_slide_grid_when_that_needs_fewer():
    fg = np.zeros((64, 64), bool)
    fg[::4, ::4] = True  # specks everywhere: the whole image is one part; the slide grid is as good
    wins = box_windows(fg, (512, 512), 256, 0.25)
    assert len(wins) == len(sliding_grid((512, 512), 256, 0.25))


def test_sliding_where_runs_only_over_the_mask_and_calls_the_rest_background():
    img, tissue = glass_slide()
    net = FunctionPredictor(fg_probs)
    full = sliding(ArrayPlane(img), FunctionPredictor(fg_probs), size=64, overlap=0.25)
    where, _ = content_mask(img, margin=1)
    part = sliding(ArrayPlane(img), net, size=64, overlap=0.25, where=where)
    np.testing.assert_array_equal(part.labels, full.labels)  # the same answer ...
    np.testing.assert_array_equal(part.labels, tissue.astype(np.uint8))
    assert net.items == part.info["tiles"] < full.info["tiles"]  # ... from fewer network inputs
    assert part.info["tiles_skipped"] == full.info["tiles"] - part.info["tiles"]


class LevelPlane(ArrayPlane):
    """An ArrayPlane that says it has a pyramid level at ×4 (as a slide reader does)."""

    factors = [1.0, 4.0]


def test_tiled_rough_pass_skips_glass_and_snaps_to_a_pyramid_level():
    img, tissue = glass_slide(800, 1200)
    coarse = FunctionPredictor(fg_probs)
    rough, info = rough_pass(LevelPlane(img), coarse, size=64, max_downscale=3.9)
    assert info["rough_tiled"] and info["rough_factor"] == 4.0  # the ×4 level, not a ×3.9 overview
    assert info["glass_skip"] and info["rough_tiles_glass"] > 0
    assert rough.shape == (2, 200, 300)
    small = tissue[::4, ::4]
    np.testing.assert_array_equal(rough[1] > 0.5, small)


def test_level_view_regions_equal_the_whole_overview(tmp_path):
    from segcli.io.bigtiff import TiffPlane
    from tests.test_slides import tissue, write_svs

    path = write_svs(tmp_path / "s.svs", tissue(), factors=(4, 16))
    with TiffPlane(path, spec={"kind": "dtype"}, channels_want=3) as plane:
        hw = (87, 123)  # a ×8.05 view (of a 700 × 1000 slide): averaged from the ×4 level
        view = plane.level_view(hw)
        assert view.level == 1
        whole = plane.downscaled(hw)
        for box in [(0, 0, 64, 64), (17, 33, 80, 120), (hw[0] - 50, hw[1] - 70, hw[0], hw[1])]:
            y0, x0, y1, x1 = box
            np.testing.assert_allclose(view.region(box), whole[:, y0:y1, x0:x1], atol=1e-5)
        assert plane.level_view(hw) is not None
    with TiffPlane(path, spec={"kind": "zscore"}, channels_want=3) as plane:
        assert plane.level_view(hw) is None  # statistics need the whole pass


def test_grow_and_label_boxes_are_scipys():
    """The tissue rules dilate and box with OpenCV (scipy.ndimage took 0.3-0.4 s of every slide run's start):
    the same pixels as ``binary_dilation(iterations=k)`` (cross, empty outside) and the same boxes as
    ``find_objects``, labels without pixels left out."""
    from scipy import ndimage

    from segcli.tissue import grow, label_boxes

    rng = np.random.default_rng(11)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        m = rng.random((h, w)) < rng.uniform(0.01, 0.3)
        for k in (1, 2, 5):
            assert np.array_equal(grow(m, k), ndimage.binary_dilation(m, iterations=k))
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        lab[lab == 2] = 0  # a label with no pixels: find_objects gives None
        want = [[s.start for s in sl] + [s.stop for s in sl] for sl in ndimage.find_objects(lab, n) if sl is not None]
        assert label_boxes(lab, n).tolist() == want


def test_sliding_on_a_slide_places_windows_on_the_thumbnails_tissue_without_the_coarse_network():
    """The bounded sliding route (stts, grid windows, look="tissue"): windows over every tissue pixel of a
    brightfield slide, found on a ×4 thumbnail, none on bare glass, and no coarse network run; where no glass is
    found the coarse network's rough pass decides, as before."""
    from segcli.engines.stts import stts

    def no_coarse(batch):
        raise AssertionError("the coarse network ran")

    img, tissue = glass_slide(800, 1200)
    fine = FunctionPredictor(fg_probs)
    res = stts(ArrayPlane(img), FunctionPredictor(no_coarse), fine, size=64, crop_mode="grid", fusion="gaussian",
               max_zoom=None, look="tissue")
    assert res.info["look"] == "tissue" and res.info["tissue_shape"] == [200, 300]
    np.testing.assert_array_equal(res.labels, tissue.astype(np.uint8))
    boxes = np.asarray(res.info["boxes"])
    grid = sliding_grid((800, 1200), 64, 0.25)
    assert fine.items == len(boxes) < len(grid) // 10  # only windows over the two patches ran
    covered = np.zeros_like(tissue)
    for y0, x0, y1, x1 in boxes.tolist():
        covered[y0:y1, x0:x1] = True
    assert covered[tissue].all()

    full = np.clip(img * 0 + 0.3, 0, 1)  # tissue from edge to edge: no glass, so the coarse network looks
    coarse = FunctionPredictor(fg_probs)
    res = stts(ArrayPlane(full), coarse, FunctionPredictor(fg_probs), size=64, crop_mode="grid", fusion="gaussian",
               max_zoom=None, look="tissue")
    assert coarse.items > 0 and "look" not in res.info
