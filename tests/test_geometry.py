"""Known-answer tests for the box and patch geometry shared by training and inference."""

import numpy as np
import pytest

from segcli import geometry as g


def fuse_max(canvas: np.ndarray, box: np.ndarray, probs: np.ndarray) -> None:
    """The paper's OR fusion on a dense canvas: per-class maximum in place (the reference for FuseStore)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    np.maximum(canvas[:, y0:y1, x0:x1], probs, out=canvas[:, y0:y1, x0:x1])


def fuse_or(canvas: np.ndarray, box: np.ndarray, mask: np.ndarray) -> None:
    """OR a binary crop mask into a binary canvas, in place."""
    y0, x0, y1, x1 = (int(v) for v in box)
    np.logical_or(canvas[y0:y1, x0:x1], mask, out=canvas[y0:y1, x0:x1])


def test_component_boxes_2d_uses_8_connectivity():
    m = np.zeros((10, 10), bool)
    m[1, 1] = m[2, 2] = True  # diagonal neighbours: one component under 8-connectivity
    m[6:8, 5:9] = True
    boxes = g.component_boxes(m)
    assert boxes.tolist() == [[1, 1, 3, 3], [6, 5, 8, 9]]
    assert len(g.component_boxes(m, connectivity=1)) == 3


def test_component_boxes_min_size_drops_noise():
    m = np.zeros((10, 10), bool)
    m[0, 0] = True
    m[5:8, 5:8] = True
    assert g.component_boxes(m, min_size=2).tolist() == [[5, 5, 8, 8]]
    assert g.component_boxes(np.zeros((4, 4), bool)).shape == (0, 4)


def test_component_boxes_3d():
    v = np.zeros((5, 10, 10), bool)
    v[1:4, 2:5, 3:6] = True
    v[0, 9, 9] = True
    assert g.component_boxes(v).tolist() == [[0, 9, 9, 1, 10, 10], [1, 2, 3, 4, 5, 6]]
    assert g.component_boxes(v, min_size=2).tolist() == [[1, 2, 3, 4, 5, 6]]
    z, b = g.boxes3d_to_2d(g.component_boxes(v, min_size=2))
    assert z.tolist() == [[1, 4]] and b.tolist() == [[2, 3, 5, 6]]


def test_scale_boxes_covers_full_resolution_pixels():
    b = np.array([[1, 2, 3, 5]])
    assert g.scale_boxes(b, (10, 10), (100, 50)).tolist() == [[10, 10, 30, 25]]
    # Non-integer ratios: floor the start, ceil the end.
    assert g.scale_boxes(np.array([[1, 1, 2, 2]]), (3, 3), (10, 10)).tolist() == [[3, 3, 7, 7]]


def test_square_centres_on_long_side_then_pads():
    # h=10, w=4 → square of 10, left moves by (10-4)//2 = 3; pad 2 → side 14.
    b = g.square_pad_shift(np.array([[20, 20, 30, 24]]), (100, 100), pad=2)
    assert b.tolist() == [[18, 15, 32, 29]]
    # h=3, w=8 → top moves by (8-3)//2 = 2.
    b = g.square_pad_shift(np.array([[50, 40, 53, 48]]), (100, 100), pad=0)
    assert b.tolist() == [[48, 40, 56, 48]]


@pytest.mark.parametrize(
    "box, expected",
    [
        ([0, 0, 4, 4], [0, 0, 8, 8]),  # top-left corner: shifted right/down, size kept
        ([96, 96, 100, 100], [92, 92, 100, 100]),  # bottom-right corner: shifted up/left
        ([0, 96, 4, 100], [0, 92, 8, 100]),  # top-right
        ([96, 0, 100, 4], [92, 0, 100, 8]),  # bottom-left
        ([48, 0, 52, 4], [46, 0, 54, 8]),  # left edge only
    ],
)
def test_shift_inside_at_every_edge(box, expected):
    out = g.square_pad_shift(np.array([box]), (100, 100), pad=2)
    assert out.tolist() == [expected]
    assert (out[:, 2] - out[:, 0] == out[:, 3] - out[:, 1]).all()


def test_too_large_square_is_clamped_not_dropped():
    # A 60x10 object in a 50x100 image, padded by 5 → side 70 > H = 50.
    raw = g.square_pad_shift(np.array([[0, 20, 50, 30]]), (50, 100), pad=5, clamp=False)
    assert raw[0, 0] < 0  # the reference's behaviour: negative origin ...
    assert not g.valid_boxes(raw, (50, 100)).any()  # ... and then silently dropped.
    out = g.square_pad_shift(np.array([[0, 20, 50, 30]]), (50, 100), pad=5)
    assert out.tolist() == [[0, 0, 50, 60]]
    assert g.valid_boxes(out, (50, 100)).all()


def test_discard_boxes_under_min_side():
    b = np.array([[0, 0, 4, 10], [0, 0, 5, 5], [10, 10, 30, 30]])
    assert g.valid_boxes(b, (100, 100), min_side=5).tolist() == [False, True, True]


def test_crop_boxes_from_rough_mask_pipeline():
    rough = np.zeros((10, 10), bool)
    rough[2:4, 2:3] = True  # 2x1 at coarse scale → 20x10 at 100x100
    boxes = g.crop_boxes(rough, (100, 100), pad=5)
    assert boxes.tolist() == [[15, 10, 45, 40]]


def test_jitter_bounds():
    rng = np.random.default_rng(0)
    base = np.array([[40, 40, 60, 70]] * 500)
    j = g.jitter_boxes(base, 16, rng)
    assert (np.abs(j[:, :2] - base[:, :2]) <= 16).all()
    h0, w0 = 20, 30
    assert (np.abs((j[:, 2] - j[:, 0]) - h0) <= 16).all() and (np.abs((j[:, 3] - j[:, 1]) - w0) <= 16).all()
    assert len({tuple(r) for r in j}) > 100


def test_patch_grid_covers_image_and_stays_inside():
    grid = g.patch_grid((100, 130), 40)
    cover = np.zeros((100, 130), int)
    for y0, x0, y1, x1 in grid:
        assert y1 - y0 == 40 and x1 - x0 == 40 and y0 >= 0 and x1 <= 130 and y1 <= 100
        cover[y0:y1, x0:x1] += 1
    assert (cover > 0).all()
    assert g.patch_grid((30, 20), 64).tolist() == [[0, 0, 30, 20]]


def test_sliding_grid_overlap():
    tiles = g.sliding_grid((100, 100), 40, 0.25)
    starts = sorted({int(t[0]) for t in tiles})
    assert starts[0] == 0 and starts[-1] == 60
    assert all(b - a <= 30 for a, b in zip(starts, starts[1:], strict=False))


def test_uncertainty_criteria_disagree_where_documented():
    K, H, W = 2, 8, 16
    probs = np.zeros((K, H, W), np.float32)
    # patch A (cols 0-7): half confident 0, half confident 1 → mean p = 0.5, pixel uncertainty 0
    probs[1, :, 4:8] = 1.0
    # patch B (cols 8-15): every pixel at p = 0.6 → mean p = 0.6, pixel uncertainty 0.8
    probs[1, :, 8:16] = 0.6
    probs[0] = 1 - probs[1]
    boxes = np.array([[0, 0, 8, 8], [0, 8, 8, 16]])
    mean = g.uncertainty_scores(probs, boxes, "mean")
    pix = g.uncertainty_scores(probs, boxes, "pixel")
    np.testing.assert_allclose(mean, [1.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(pix, [0.0, 0.8], atol=1e-6)
    assert g.select_patches(mean, n=1).tolist() == [0]
    assert g.select_patches(pix, n=1).tolist() == [1]
    assert g.select_patches(pix, threshold=0.5).tolist() == [1]


def test_uncertainty_multiclass_margin():
    probs = np.zeros((3, 2, 2), np.float32)
    probs[:, 0, 0] = [0.4, 0.4, 0.2]  # margin 0 → u = 1
    probs[:, 0, 1] = [1, 0, 0]  # u = 0
    probs[:, 1, :] = [[0.5], [0.3], [0.2]]  # margin 0.2 → u = 0.8
    s = g.uncertainty_scores(probs, np.array([[0, 0, 1, 1], [0, 1, 1, 2], [1, 0, 2, 2]]), "pixel")
    np.testing.assert_allclose(s, [1.0, 0.0, 0.8], atol=1e-6)


def test_fusion_or_and_per_class_max():
    canvas = np.zeros((1, 6, 6), np.float32)
    fuse_max(canvas, np.array([0, 0, 4, 4]), np.full((1, 4, 4), 0.7, np.float32))
    fuse_max(canvas, np.array([2, 2, 6, 6]), np.full((1, 4, 4), 0.2, np.float32))
    assert canvas[0, 3, 3] == np.float32(0.7) and canvas[0, 5, 5] == np.float32(0.2) and canvas[0, 0, 5] == 0
    # OR: a pixel is foreground if any crop says so.
    m = np.zeros((6, 6), bool)
    fuse_or(m, np.array([0, 0, 3, 3]), np.eye(3, dtype=bool))
    fuse_or(m, np.array([0, 0, 3, 3]), np.zeros((3, 3), bool))
    assert m[:3, :3].tolist() == np.eye(3, dtype=bool).tolist()
    # Multi-class: per-class maximum in the overlap, then argmax.
    c = np.zeros((3, 2, 2), np.float32)
    fuse_max(c, np.array([0, 0, 2, 2]), np.broadcast_to(np.array([0.2, 0.7, 0.1], np.float32)[:, None, None], (3, 2, 2)))
    fuse_max(c, np.array([0, 1, 2, 2]), np.broadcast_to(np.array([0.1, 0.1, 0.8], np.float32)[:, None, None], (3, 2, 1)))
    assert c.argmax(0).tolist() == [[1, 2], [1, 2]]


def test_gaussian_weight_positive_peak_centre():
    w = g.gaussian_weight((9, 9))
    assert w[4, 4] == 1.0 and w.min() > 0 and w[0, 0] < w[2, 2]


def test_patch_std_known_answer() -> None:
    from segcli.geometry import patch_std

    img = np.zeros((2, 4, 6), np.float32)
    img[0, :, 3:] = 2.0  # channel 0: left half 0, right half 2
    img[1, 0, 0] = 4.0  # channel 1: one bright pixel in the first box
    boxes = np.array([[0, 0, 4, 3], [0, 3, 4, 6], [0, 2, 2, 4]])
    std = patch_std(img, boxes)
    # box 0: channel 1 holds one 4 among 12 pixels -> sqrt(16/12 - (4/12)^2); box 1: constant;
    # box 2: channel 0 is half 0, half 2 -> std 1
    np.testing.assert_allclose(std, [np.sqrt(16 / 12 - (4 / 12) ** 2), 0.0, 1.0], atol=1e-9)


@pytest.mark.parametrize("connectivity", [None, 1, 2])
@pytest.mark.parametrize("min_size", [1, 3])
def test_2d_component_boxes_are_scipys_in_scipys_order(connectivity, min_size):
    """2D boxes come from OpenCV (scipy.ndimage is not imported on the photo path: 0.3-0.4 s a process), in the
    order scipy's label + find_objects gives them (raster order of each component's first pixel)."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        m = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        lab, n = ndimage.label(m, structure=ndimage.generate_binary_structure(2, connectivity or 2))
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        want = [[s.start for s in sl] + [s.stop for s in sl]
                for i, sl in enumerate(ndimage.find_objects(lab)) if sizes[i] >= min_size]
        got = g.component_boxes(m, connectivity, min_size)
        assert got.tolist() == want
