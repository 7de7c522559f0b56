"""Engines with fake predictors: the engines never know which runtime is behind a predictor."""

import numpy as np

from segcli.engines.base import ArrayPlane
from segcli.engines.direct import direct, sliding
from segcli.engines.refine import refine
from segcli.engines.stts import stts
from segcli.engines.volume import per_slice, stts_volume
from segcli.runtimes import FunctionPredictor


def identity_probs(batch: np.ndarray) -> np.ndarray:
    """A 'network' whose foreground probability is the (normalised) intensity of channel 0."""
    p = np.clip(batch[:, :1], 0, 1)
    return np.concatenate([1 - p, p], axis=1)


def scene(h=300, w=400):
    img = np.zeros((1, h, w), np.float32)
    truth = np.zeros((h, w), np.uint8)
    for y0, x0, s in [(20, 30, 12), (150, 200, 40), (250, 350, 30)]:
        img[0, y0 : y0 + s, x0 : x0 + s] = 1.0
        truth[y0 : y0 + s, x0 : x0 + s] = 1
    return img, truth


def test_stts_segments_every_object_exactly_and_batches_crops():
    img, truth = scene()
    coarse = FunctionPredictor(identity_probs)
    fine = FunctionPredictor(identity_probs)
    res = stts(ArrayPlane(img), coarse, fine, size=64, batch_size=16)
    assert res.info["crops"] == 3
    assert fine.calls == 1 and fine.items == 3  # one batch, not one call per crop
    assert coarse.calls == 1
    np.testing.assert_array_equal(res.labels, truth)
    assert set(res.timings) >= {"rough", "components", "crops", "fine", "fuse"}


def test_stts_pixels_outside_crops_are_background_unless_keep_coarse():
    img, truth = scene()
    coarse = FunctionPredictor(identity_probs)
    # A fine network that sees nothing: result is empty without keep_coarse...
    blind = FunctionPredictor(lambda b: np.concatenate([np.ones_like(b[:, :1]), np.zeros_like(b[:, :1])], 1))
    assert stts(ArrayPlane(img), coarse, blind, size=64).labels.sum() == 0
    # ... but crops cover their objects, so keep_coarse only fills pixels no crop reached: still empty.
    res = stts(ArrayPlane(img), coarse, blind, size=64, keep_coarse=True)
    assert res.labels.sum() == 0
    # When no crop survives (min_side too big), keep_coarse falls back to the rough mask.
    res = stts(ArrayPlane(img), coarse, blind, size=64, keep_coarse=True, min_side=10_000)
    assert res.info["crops"] == 0
    assert (res.labels & truth).sum() > 0.8 * truth.sum()


def test_stts_object_bigger_than_image_after_padding_is_kept():
    img = np.zeros((1, 60, 200), np.float32)
    img[0, 5:55, 90:110] = 1.0  # padded square side > 60 px image height
    res = stts(ArrayPlane(img), FunctionPredictor(identity_probs), FunctionPredictor(identity_probs), size=64, pad=8)
    assert res.info["crops"] == 1
    np.testing.assert_array_equal(res.labels, (img[0] > 0.5).astype(np.uint8))


def test_stts_probabilities_match_labels():
    img, truth = scene()
    res = stts(ArrayPlane(img), FunctionPredictor(identity_probs), FunctionPredictor(identity_probs), size=64,
               return_probs=True)
    assert res.probs.shape == (2,) + truth.shape
    np.testing.assert_array_equal((res.probs[1] > 0.5).astype(np.uint8), res.labels)
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)


def test_stts_multiclass_per_class_max():
    img = np.zeros((1, 100, 100), np.float32)
    img[0, 10:30, 10:30] = 0.6  # class 1
    img[0, 60:90, 60:90] = 0.9  # class 2

    def three(b):
        x = b[:, 0]
        p = np.stack([(x < 0.3), (x >= 0.3) & (x < 0.75), (x >= 0.75)], 1).astype(np.float32)
        return p * 0.9 + 0.1 / 3

    res = stts(ArrayPlane(img), FunctionPredictor(three, 3), FunctionPredictor(three, 3), size=32)
    assert res.labels[20, 20] == 1 and res.labels[75, 75] == 2 and res.labels[50, 50] == 0


def test_stts_with_a_boundary_class_looks_where_the_folded_network_finds_objects():
    """Background 0.4, nucleus 0.35, boundary 0.25 over a square: argmax says background, the folded network
    (nucleus + boundary = 0.6 > 0.5) says object. A slide's --instances run (fold_boundary) must look where a
    run without instances looks, so it crops the square; without the rule it finds nothing."""
    img, _ = scene()

    def three(batch: np.ndarray) -> np.ndarray:
        on = (batch[:, :1] > 0.5).astype(np.float32)
        return np.concatenate([1 - 0.6 * on, 0.35 * on, 0.25 * on], axis=1)

    plain = stts(ArrayPlane(img), FunctionPredictor(three), FunctionPredictor(three), size=64)
    assert plain.info["crops"] == 0
    folded = stts(ArrayPlane(img), FunctionPredictor(three), FunctionPredictor(three), size=64,
                  fold_boundary=(2, 1))
    assert folded.info["crops"] == 3


def test_the_fine_pass_says_which_rows_are_final_as_it_goes():
    """A reader beside the fine pass (a slide's instance split) reads rows once on_fused says they are final:
    the labels it would read there then are the labels of the finished run, the row only goes down the image,
    starts at 0 before any window ran, and ends at the image's height."""
    img = np.zeros((1, 600, 300), np.float32)
    for y0 in range(20, 560, 90):  # squares all the way down, so windows run in many rows
        img[0, y0 : y0 + 30, 40 + y0 % 200 : 70 + y0 % 200] = 1.0
    net = FunctionPredictor(identity_probs)
    seen: list[tuple[int, np.ndarray]] = []

    def on_fused(labels, y: int) -> None:
        seen.append((y, labels.read((0, 0, y, 300)) if y else None))

    res = stts(ArrayPlane(img), net, net, size=64, crop_mode="grid", fusion="gaussian", lazy=True, batch_size=2,
               on_fused=on_fused)
    rows = [y for y, _ in seen]
    assert rows[0] == 0 and rows[-1] == 600 and rows == sorted(rows) and len(set(rows)) > 3
    final = res.labels.read((0, 0, 600, 300))
    assert final.any()
    for y, early in seen[1:]:
        np.testing.assert_array_equal(early, final[:y])


def test_refine_picks_uncertain_patches_and_all_patches_give_exact_result():
    img, truth = scene(256, 256)
    coarse = FunctionPredictor(identity_probs)
    fine = FunctionPredictor(identity_probs)
    res = refine(ArrayPlane(img), coarse, fine, size=32, fine_size=32, patches=2, criterion="pixel")
    assert res.info["patches_refined"] == 2 and res.info["patches_total"] == 64
    # Refined patches must contain object boundaries (where the rough pass is blurred).
    for y0, x0, y1, x1 in res.info["refined_boxes"]:
        t = truth[y0:y1, x0:x1]
        assert 0 < t.sum() < t.size or t.sum() > 0
    full = refine(ArrayPlane(img), coarse, fine, size=32, fine_size=32, patches=None, refine_threshold=-1)
    np.testing.assert_array_equal(full.labels, truth)
    # Refining more patches never makes this (exact) fine network worse.
    errs = [np.sum(refine(ArrayPlane(img), coarse, fine, size=32, patches=n).labels != truth) for n in (0, 2, 8)]
    assert errs[0] >= errs[1] >= errs[2]


def test_refine_skips_flat_patches():
    """A 'glass' background at probability 0.5 is maximally uncertain but flat: min_patch_std skips it."""
    img, truth = scene(256, 256)
    glass = np.where(img > 0, img, 0.5).astype(np.float32)  # uncertain everywhere off the objects
    net = FunctionPredictor(identity_probs)
    plain = refine(ArrayPlane(glass), net, net, size=32, patches=None, refine_threshold=0.0)
    assert plain.info["patches_refined"] == 64  # every patch looks uncertain
    flat = refine(ArrayPlane(glass), net, net, size=32, patches=None, refine_threshold=0.0, min_patch_std=0.05)
    refined = {tuple(b) for b in flat.info["refined_boxes"]}
    boxes = [(y, x, y + 32, x + 32) for y in range(0, 256, 32) for x in range(0, 256, 32)]
    touched = {b for b in boxes if truth[b[0] : b[2], b[1] : b[3]].any()}
    clearly = {b for b in boxes if truth[b[0] : b[2], b[1] : b[3]].sum() >= 64}  # not a 2-px sliver
    assert clearly <= refined <= touched  # glass-only patches are never refined
    assert len(refined) < 64 / 4
    assert flat.info["patches_flat"] == 64 - len(refined)


def test_direct_and_sliding():
    img, truth = scene(200, 200)
    d = direct(ArrayPlane(img), FunctionPredictor(identity_probs), size=200)
    np.testing.assert_array_equal(d.labels, truth)
    net = FunctionPredictor(identity_probs)
    s = sliding(ArrayPlane(img), net, size=64, overlap=0.25, batch_size=4)
    np.testing.assert_array_equal(s.labels, truth)
    assert s.info["tiles"] == net.items == 16


def test_sliding_image_smaller_than_tile():
    img = np.zeros((1, 20, 30), np.float32)
    img[0, 5:10, 5:10] = 1
    s = sliding(ArrayPlane(img), FunctionPredictor(identity_probs), size=64)
    np.testing.assert_array_equal(s.labels, (img[0] > 0.5).astype(np.uint8))


def test_stts_volume_uses_one_box_per_3d_component_and_drops_small_blobs():
    vol = np.zeros((6, 1, 120, 120), np.float32)
    vol[1:5, 0, 40:70, 50:80] = 1.0  # a 4-slice object
    vol[5, 0, 5:7, 5:7] = 1.0  # a tiny one-slice blob
    planes = [ArrayPlane(v) for v in vol]
    fine = FunctionPredictor(identity_probs)
    res = stts_volume(planes, FunctionPredictor(identity_probs), fine, size=60, min_volume=3)
    assert res.info["components"] == 1
    assert res.info["crops"] == 4  # the same box on each of the 4 slices
    expect = (vol[:, 0] > 0.5).astype(np.uint8)
    expect[5] = 0
    np.testing.assert_array_equal(res.labels, expect)
    per = per_slice(planes, lambda p: direct(p, FunctionPredictor(identity_probs), size=120))
    assert per.labels.shape == (6, 120, 120)


def test_array_plane_keeps_its_last_downscaled_view():
    """The batch reader makes the rough pass's view ahead of time; the engine must get that very array,
    and another size must be computed afresh (and equal a plain resize)."""
    from segcli.resize import resize

    img = np.random.default_rng(0).random((3, 50, 70), dtype=np.float32)
    plane = ArrayPlane(img)
    a = plane.downscaled((10, 14))
    assert plane.downscaled((10, 14)) is a and not a.flags.writeable
    b = plane.downscaled((5, 7))
    np.testing.assert_array_equal(b, resize(img, (5, 7), "area"))
    np.testing.assert_array_equal(plane.downscaled((10, 14)), a)


def test_area_weights_known_answers():
    """Box-filter overlaps: 4 → 2 averages pairs; 3 → 2 splits the middle pixel; rows sum to one."""
    from segcli.resize import resize_matrix

    np.testing.assert_allclose(resize_matrix(4, 2, "area"), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(resize_matrix(3, 2, "area"), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], rtol=1e-6)
    m = resize_matrix(1920, 64, "area")
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-5)
    assert (np.count_nonzero(m, axis=1) <= 32).all()


def test_rough_pass_methods_take_keep_aspect():
    """plan.prime_2d makes the rough view from the method's keep_aspect: every rough-pass method must take it."""
    from segcli.methods import TABLE

    assert {m.name for m in TABLE.values() if m.rough_pass} == {"stts", "refine", "direct"}
    assert all("keep_aspect" in m.params for m in TABLE.values() if m.rough_pass)
