"""AJI, PQ and F1 on hand-built label images whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from segcli.instance_metrics import instance_counts, instance_scores


def _two_touching() -> np.ndarray:
    """Two 4x4 nuclei side by side (ids 1 and 2), 16 px each."""
    t = np.zeros((8, 12), np.uint16)
    t[2:6, 2:6] = 1
    t[2:6, 6:10] = 2
    return t


def test_perfect_prediction_scores_one_whatever_the_ids():
    t = _two_touching()
    p = np.where(t == 1, 7, np.where(t == 2, 3, 0)).astype(np.uint32)
    s = instance_scores(t, p)
    assert s["aji"] == 1.0 and s["pq"] == 1.0 and s["sq"] == 1.0 and s["f1_iou50"] == 1.0
    assert (s["objects_true"], s["objects_pred"], s["matched"]) == (2, 2, 2)


def test_a_merged_blob_counts_once_not_for_every_nucleus_under_it():
    t = _two_touching()
    p = (t > 0).astype(np.uint8)  # one blob of 32 px over both
    s = instance_scores(t, p)
    # each nucleus pairs with the blob: inter 16, union 32, twice -> 32 / 64
    assert s["aji"] == pytest.approx(0.5)
    # IoU 16/32 = 0.5 is not above 0.5: no match, one false positive, two misses
    assert s["matched"] == 0 and s["pq"] == 0.0 and s["f1_iou50"] == 0.0
    c = instance_counts(t, p)
    assert (c.tp, c.fp, c.fn) == (0, 1, 2)


def test_a_split_object_leaves_a_piece_unpaired():
    t = np.zeros((8, 12), np.uint8)
    t[2:6, 2:10] = 1  # 32 px
    p = np.zeros_like(t)
    p[2:6, 2:6] = 1
    p[2:6, 6:10] = 2
    s = instance_scores(t, p)
    # the object pairs with one half (inter 16, union 32); the other half (16 px) joins the union
    assert s["aji"] == pytest.approx(16 / 48)
    assert (s["matched"], s["pq"]) == (0, 0.0)


def test_partial_overlap_known_pq_and_aji():
    t = _two_touching()
    p = np.zeros_like(t)
    p[2:6, 2:5] = 1  # 12 of nucleus 1's 16 px: IoU 0.75
    p[0:2, 10:12] = 5  # a false positive of 4 px
    s = instance_scores(t, p)
    assert s["matched"] == 1
    assert s["sq"] == pytest.approx(0.75)
    assert s["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert s["pq"] == pytest.approx(0.75 * 0.5)
    # nucleus 1: inter 12, union 16; nucleus 2 unpaired: +16; false positive unpaired: +4
    assert s["aji"] == pytest.approx(12 / (16 + 16 + 4))


def test_counts_pool_by_sums_not_by_mean_of_ratios():
    t = _two_touching()
    a = instance_counts(t, t)
    b = instance_counts(t, (t > 0).astype(np.uint8))
    pooled = (a + b).scores()
    assert pooled["aji"] == pytest.approx((32 + 32) / (32 + 64))
    assert pooled["matched"] == 2 and pooled["objects_true"] == 4


def test_empty_cases():
    z = np.zeros((4, 4), np.uint8)
    assert instance_scores(z, z)["aji"] is None
    one = z.copy()
    one[1:3, 1:3] = 1
    assert instance_scores(one, z)["aji"] == 0.0 and instance_scores(one, z)["pq"] == 0.0
    assert instance_scores(z, one)["aji"] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        instance_scores(z, np.zeros((4, 5), np.uint8))


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_watershed_splits_two_touching_discs_and_keeps_one_disc_whole():
    from segcli.instances import components, split_touching

    a, b = _disc((40, 60), 20, 18, 10), _disc((40, 60), 20, 36, 10)  # overlapping by 2 px: one blob
    truth = np.zeros((40, 60), np.uint8)
    truth[a] = 1
    truth[b & ~a] = 2
    blob = a | b
    assert components(blob).max() == 1
    inst = split_touching(blob)
    assert inst.max() == 2 and np.array_equal(inst > 0, blob)  # no pixel lost or added
    assert instance_scores(truth, inst)["aji"] > 0.9
    assert instance_scores(truth, components(blob))["aji"] < 0.55
    single = split_touching(_disc((40, 60), 20, 30, 12))
    assert single.max() == 1
    ellipse = np.zeros((40, 80), bool)
    yy, xx = np.mgrid[:40, :80]
    ellipse[((yy - 20) / 6.0) ** 2 + ((xx - 40) / 25.0) ** 2 <= 1] = True
    assert split_touching(ellipse).max() == 1  # an elongated nucleus is not cut into beads
    tiny = np.zeros((10, 10), bool)
    tiny[4, 4] = True
    assert split_touching(tiny).max() == 1  # a one-pixel object still gets its id


def test_evaluate_instances_through_the_cli(tmp_path):
    """A merged blob scored as a user would: one match at most, AJI 0.5, and Dice still 1 on the foreground."""
    import json

    from PIL import Image

    from tests.conftest import run_cli

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    t = _two_touching()
    Image.fromarray(t.astype(np.uint16)).save(gt_dir / "a.png")
    Image.fromarray((t > 0).astype(np.uint8)).save(pred_dir / "a.png")  # binary: its component is one object
    r = run_cli("evaluate", pred_dir, gt_dir, "--instances", "--json", "--no-hd95")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["cases"][0]["instances"]["aji"] == pytest.approx(0.5)
    assert res["instances"]["pooled"]["matched"] == 0 and res["instances"]["pooled"]["objects_true"] == 2
    assert res["mean"][next(iter(res["mean"]))]["dice"] == pytest.approx(1.0)
    r = run_cli("evaluate", pred_dir, gt_dir, "--instances", "--no-hd95")
    assert r.returncode == 0 and "instances: AJI 0.5000, PQ 0.0000" in r.stdout, r.stdout + r.stderr


def test_predict_instances_writes_the_split_label_image(tmp_path, grey_bundle):
    """--instances beside the mask: uint32 ids exactly on the mask's foreground, equal to the library's split;
    a volume is refused with one line naming it, and the input is left as it was."""
    import json

    import tifffile
    from PIL import Image

    from segcli.instances import split_touching
    from tests.conftest import run_cli

    rng = np.random.default_rng(0)
    img = (rng.random((96, 128)) * 255).astype(np.uint8)
    img[20:60, 20:60] = 250
    src = tmp_path / "cells.png"
    Image.fromarray(img).save(src)
    before = src.read_bytes()
    out = tmp_path / "out"
    r = run_cli("predict", src, "-o", out, "--model", grey_bundle, "--instances", "--json")
    assert r.returncode == 0, r.stderr
    mask = np.asarray(Image.open(out / "cells_seg.png"))
    inst = tifffile.imread(out / "cells_seg_instances.tif")
    assert inst.dtype == np.uint32 and inst.shape == mask.shape
    assert np.array_equal(inst > 0, mask > 0)
    assert np.array_equal(inst, split_touching(mask > 0))
    rep = json.loads(r.stdout)["files"][0]
    assert rep["info"]["instances"]["objects"] == int(inst.max())
    assert src.read_bytes() == before

    import nibabel as nib

    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((16, 16, 4)).astype(np.float32), np.eye(4)), vol)
    r = run_cli("predict", vol, "-o", tmp_path / "vout", "--model", grey_bundle, "--instances")
    assert r.returncode == 1
    assert "--instances is written for 2D images" in r.stderr and str(vol) in r.stderr


def test_object_ids_scored_as_classes_get_a_warning(tmp_path):
    """Forty unnamed label values in the ground truth and no --instances: scored as classes as asked, with one
    warning naming --instances; a few unnamed classes, or --instances, get none."""
    from PIL import Image

    from tests.conftest import run_cli

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    ids = np.zeros((64, 80), np.uint16)
    for k in range(40):
        ids[(k // 8) * 12 : (k // 8) * 12 + 8, (k % 8) * 10 : (k % 8) * 10 + 8] = k + 1
    Image.fromarray(ids).save(gt_dir / "a.png")
    Image.fromarray((ids > 0).astype(np.uint8)).save(pred_dir / "a.png")
    r = run_cli("evaluate", pred_dir, gt_dir, "--no-hd95")
    assert r.returncode == 0, r.stderr
    assert "warning: the ground truth holds 40 unnamed label values, scored as classes" in r.stderr
    r = run_cli("evaluate", pred_dir, gt_dir, "--no-hd95", "--instances")
    assert r.returncode == 0 and "unnamed label values" not in r.stderr, r.stderr
    Image.fromarray(np.minimum(ids, 3).astype(np.uint8)).save(gt_dir / "a.png")
    r = run_cli("evaluate", pred_dir, gt_dir, "--no-hd95")
    assert r.returncode == 0 and "unnamed label values" not in r.stderr, r.stderr
