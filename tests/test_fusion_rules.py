"""Known answers for the stts fusion rules (issue 22): max (default), mean, centre, own-box.

Two crops on a 2 × 6 image overlap on columns 2 and 3: crop A (columns 0-3) says p = 0.9 everywhere,
crop B (columns 2-5) says p = 0.0 everywhere. Each rule's fused probabilities and labels follow by hand.
"""

import math

import numpy as np
import pytest

from segcli.engines.base import ArrayPlane
from segcli.engines.stts import boxes_and_own, stts
from segcli.fusion import (
    FUSION_RULES,
    BlendStore,
    CentreFuse,
    CoarseFill,
    FuseStore,
    MeanFuse,
    OwnBoxFuse,
    WeightedMean,
    centre_weight,
    make_fusion,
)
from segcli.geometry import crop_boxes
from segcli.runtimes import FunctionPredictor

A, B = (0, 0, 2, 4), (0, 2, 2, 6)


def probs(p: float, h: int = 2, w: int = 4) -> np.ndarray:
    return np.stack([np.full((h, w), 1 - p), np.full((h, w), p)]).astype(np.float32)


def fuse(agg, **kw_a):
    agg.aggregate(A, probs(0.9), **kw_a.get("a", {}))
    agg.aggregate(B, probs(0.0), **kw_a.get("b", {}))
    return agg.finalize(True)


def test_max_is_the_default_and_unchanged():
    labels, p = fuse(FuseStore((2, 6), 2, 0.5, exact=True))
    np.testing.assert_allclose(p[1, 0], [0.9, 0.9, 0.9, 0.9, 0.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0])
    assert isinstance(make_fusion("max", (2, 6), 2, 0.5), FuseStore)
    assert not isinstance(make_fusion("max", (2, 6), 2, 0.5), OwnBoxFuse)


def test_mean_averages_over_the_crops_that_cover_a_pixel():
    labels, p = fuse(MeanFuse((2, 6), 2, 0.5))
    np.testing.assert_allclose(p[1], [[0.9, 0.9, 0.45, 0.45, 0.0, 0.0]] * 2, atol=1e-6)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels[0], [1, 1, 0, 0, 0, 0])


def test_centre_weight_is_the_sliding_window_gaussian():
    g = centre_weight(1, 4)  # σ = 4 / 8 = 0.5, offsets from the centre -1.5, -0.5, 0.5, 1.5
    np.testing.assert_allclose(g[0], [math.exp(-4.5), math.exp(-0.5), math.exp(-0.5), math.exp(-4.5)], rtol=1e-6)
    assert centre_weight(5, 5)[2, 2] == 1.0


def test_centre_gives_each_overlap_pixel_to_the_nearer_crop_centre():
    labels, p = fuse(CentreFuse((2, 6), 2, 0.5))
    # Column 2 is 0.5 px from A's centre and 1.5 px from B's; column 3 the reverse (rows cancel).
    c2 = 0.9 / (1 + math.exp(-4.0))
    c3 = 0.9 / (1 + math.exp(4.0))
    np.testing.assert_allclose(p[1], [[0.9, 0.9, c2, c3, 0.0, 0.0]] * 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, [[1, 1, 1, 0, 0, 0]] * 2)


def test_centre_weights_follow_the_network_window_not_the_written_core():
    agg = CentreFuse((1, 8), 2, 0.5)
    agg.aggregate((0, 4, 1, 8), probs(0.9, 1, 4), crop=(0, 0, 1, 8))  # the right half of an 8-px window
    agg.aggregate((0, 4, 1, 8), probs(0.0, 1, 4))  # a 4-px window centred on the same pixels
    _, p = agg.finalize(True)
    g8, g4 = centre_weight(1, 8)[0, 4:], centre_weight(1, 4)[0]
    np.testing.assert_allclose(p[1, 0, 4:], 0.9 * g8 / (g8 + g4), rtol=1e-5)


def test_own_box_writes_only_inside_each_crops_own_region():
    # A owns columns 0-1 (its object box plus margin), B owns columns 2-5: the overlap belongs to B.
    for exact in (True, False):
        labels, p = fuse(OwnBoxFuse((2, 6), 2, 0.5, exact=exact), a={"own": (0, 0, 2, 2)}, b={"own": (0, 2, 2, 6)})
        np.testing.assert_array_equal(labels[0], [1, 1, 0, 0, 0, 0])
        np.testing.assert_allclose(p[1, 0], [0.9, 0.9, 0, 0, 0, 0], atol=0.01)
    # Two own regions that overlap: max among them (A's 0.9 wins column 2).
    labels, _ = fuse(OwnBoxFuse((2, 6), 2, 0.5, exact=True), a={"own": (0, 0, 2, 3)}, b={"own": (0, 2, 2, 6)})
    np.testing.assert_array_equal(labels[0], [1, 1, 1, 0, 0, 0])
    # Without own regions it is plain max fusion.
    labels, _ = fuse(OwnBoxFuse((2, 6), 2, 0.5, exact=True))
    np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0])


def test_uncovered_pixels_are_background_or_the_rough_map():
    # Own regions leave columns 2-3 to nobody; mean leaves nothing uncovered here, so shrink B.
    rough = probs(0.8, 1, 3)  # rough map at half resolution, foreground everywhere
    fill = CoarseFill(rough, (2, 6), 0.5)
    for agg in (OwnBoxFuse((2, 6), 2, 0.5, exact=True), MeanFuse((2, 6), 2, 0.5), CentreFuse((2, 6), 2, 0.5)):
        own = isinstance(agg, OwnBoxFuse)
        agg.aggregate(A, probs(0.0), **({"own": (0, 0, 2, 2)} if own else {}))
        agg.aggregate((0, 5, 2, 6), probs(0.0, 2, 1))
        labels, p = agg.finalize(True, fill)
        expect = [0, 0, 1, 1, 1, 0] if own else [0, 0, 0, 0, 1, 0]
        np.testing.assert_array_equal(labels[0], expect)
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-6)


def test_make_fusion_rejects_unknown_rules():
    assert set(FUSION_RULES) == {"max", "mean", "centre", "own-box", "gaussian"}
    with pytest.raises(ValueError, match="unknown fusion rule"):
        make_fusion("or", (2, 2), 2, 0.5)


# -- through the engine --------------------------------------------------------------------------------


def identity_probs(batch: np.ndarray) -> np.ndarray:
    p = np.clip(batch[:, :1], 0, 1)
    return np.concatenate([1 - p, p], axis=1)


def all_foreground(batch: np.ndarray) -> np.ndarray:
    """A fine 'network' that calls every pixel of every crop foreground (p = 0.9)."""
    p = np.full_like(batch[:, :1], 0.9)
    return np.concatenate([1 - p, p], axis=1)


OBJECTS = [(40, 40, 20), (40, 72, 20), (140, 148, 32)]  # on the 4-px grid of the S = 64 rough pass


def scene():
    img = np.zeros((1, 256, 256), np.float32)
    for y0, x0, s in OBJECTS:
        img[0, y0 : y0 + s, x0 : x0 + s] = 1.0
    return img


def test_boxes_and_own_gives_the_same_crops_as_crop_boxes():
    mask = scene()[0, ::4, ::4] > 0.5
    boxes, own = boxes_and_own(mask, (256, 256), 8, 3)
    np.testing.assert_array_equal(boxes, crop_boxes(mask, (256, 256), 8))
    assert own.shape == boxes.shape
    assert ((own[:, :2] >= boxes[:, :2]) & (own[:, 2:] <= boxes[:, 2:])).all()  # inside the padded crop


def test_stts_fusion_rules_through_the_engine():
    img = scene()
    coarse = FunctionPredictor(identity_probs)
    truth = (img[0] > 0.5).astype(np.uint8)
    default = stts(ArrayPlane(img), coarse, FunctionPredictor(identity_probs), size=64)
    for rule in FUSION_RULES:
        res = stts(ArrayPlane(img), coarse, FunctionPredictor(identity_probs), size=64, fusion=rule)
        np.testing.assert_array_equal(res.labels, truth)  # a perfect fine network: every rule is exact
    np.testing.assert_array_equal(default.labels, truth)
    # A fine network that paints its whole crop: max paints the padded squares, own-box only the
    # objects' boxes grown by the margin.
    mx = stts(ArrayPlane(img), coarse, FunctionPredictor(all_foreground), size=64, pad=16)
    ob = stts(ArrayPlane(img), coarse, FunctionPredictor(all_foreground), size=64, pad=16, fusion="own-box",
              own_margin=2)
    paint = np.zeros_like(truth)
    for y0, x0, y1, x1 in mx.info["boxes"]:
        paint[y0:y1, x0:x1] = 1
    np.testing.assert_array_equal(mx.labels, paint)
    grown = np.zeros_like(truth)
    for y0, x0, s in OBJECTS:
        grown[y0 - 2 : y0 + s + 2, x0 - 2 : x0 + s + 2] = 1
    np.testing.assert_array_equal(ob.labels, grown)
    assert ob.labels.sum() < mx.labels.sum()


def test_non_max_fusion_needs_the_in_memory_path():
    img = scene()
    nets = FunctionPredictor(identity_probs), FunctionPredictor(identity_probs)
    with pytest.raises(ValueError, match="in-memory"):
        stts(ArrayPlane(img), *nets, size=64, fusion="mean", lazy=True)
    with pytest.raises(ValueError, match="unknown fusion"):
        stts(ArrayPlane(img), *nets, size=64, fusion="or")


@pytest.mark.parametrize("classes", [2, 3])
def test_blend_store_spilled_equals_the_dense_sliding_blend(tmp_path, classes):
    """BlendStore (tiles, spilled to disk behind a 4-tile cache) gives the dense WeightedMean's probabilities and
    labels wherever windows reached, and background elsewhere."""
    from segcli.geometry import gaussian_weight, sliding_grid

    rng = np.random.default_rng(3)
    H, W, S = 300, 420, 64
    windows = sliding_grid((H, W), S, 0.25)
    probs = rng.dirichlet(np.ones(classes), size=(len(windows), S, S)).transpose(0, 3, 1, 2).astype(np.float32)
    dense = WeightedMean((H, W), classes, 0.5, gaussian_weight((S, S)))
    store = BlendStore((H, W), classes, 0.5, tile=64, spill_dir=tmp_path, cache_bytes=1)
    skip = set(range(0, len(windows), 7))  # glass: windows the bounded route never runs
    for i, box in enumerate(windows):
        dense.aggregate(box, probs[i])
        if i not in skip:
            store.aggregate(box, probs[i])
    reached = np.zeros((H, W), bool)
    for i, (y0, x0, y1, x1) in enumerate(windows):
        if i not in skip:
            reached[y0:y1, x0:x1] = True
    only = np.zeros((H, W), bool)  # pixels every covering window of which was run: equal to the dense blend
    for i, (y0, x0, y1, x1) in enumerate(windows):
        if i in skip:
            only[y0:y1, x0:x1] = True
    only = reached & ~only
    assert only.sum() > 1000
    ref_labels, ref_probs = dense.finalize(True)
    labels, p = store.finalize(True)
    np.testing.assert_allclose(p[:, only], ref_probs[:, only], atol=1e-6)
    np.testing.assert_array_equal(labels[only], ref_labels[only])
    assert not labels[~reached].any() and np.all(p[0, ~reached] == 1.0)


def test_class_argmax_is_numpys_argmax_ties_included():
    from segcli.fusion import class_argmax

    rng = np.random.default_rng(2)
    p = rng.random((4, 33, 47)).astype(np.float32)
    p[:, :5, :5] = 0.25  # a four-way tie: the first class, as numpy's argmax
    p[2, 10:12, :] = p[1, 10:12, :]  # two-way ties
    assert np.array_equal(class_argmax(p), p.argmax(axis=0)) and class_argmax(p).dtype == np.uint8
