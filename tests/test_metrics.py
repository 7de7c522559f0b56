"""Metrics and `segcli evaluate` on hand-made masks whose scores are worked out by hand below."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli import metrics
from segcli.errors import InputError
from segcli.evaluate import evaluate, pair_files
from tests.conftest import run_cli


def _half_square() -> tuple[np.ndarray, np.ndarray]:
    """GT: a 4x4 square (16 px). Prediction: its left 4x2 half (8 px)."""
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 2:4] = 1
    return pred, gt


def test_overlap_by_hand() -> None:
    pred, gt = _half_square()
    # tp = 8, fp = 0, fn = 8: Dice = 2*8/(8+16) = 2/3, IoU = 8/16, precision 8/8, recall 8/16.
    s = metrics.overlap_scores(pred, gt)
    assert s["dice"] == pytest.approx(2 / 3)
    assert s["iou"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(1.0)
    assert s["recall"] == pytest.approx(0.5)


def test_hd95_by_hand() -> None:
    pred, gt = _half_square()
    # Surfaces: all 8 prediction pixels (a 2-wide block has no interior); the GT's 12 border pixels.
    # pred -> GT surface: 6 pixels on it (0), (3,3) and (4,3) one column from (3,2)/(4,2): [0]*6 + [1, 1];
    #   95th percentile (linear) at index 0.95*7 = 6.65 -> 1.
    # GT -> pred: column 2 and (2,3), (5,3) are 0; (2,4), (5,4) are 1; (2,5), (5,5), (3,5), (4,5) are 2:
    #   [0]*6 + [1, 1] + [2]*4, 95th percentile at index 10.45 -> 2.  HD95 = max(1, 2) = 2 px.
    assert metrics.hd95(pred, gt) == pytest.approx(2.0)
    # Rows 2 mm apart, columns 0.5 mm: every nonzero distance above runs along a row, so it halves.
    assert metrics.hd95(pred, gt, spacing=(2.0, 0.5)) == pytest.approx(1.0)


def test_hd95_percentile_interpolates() -> None:
    gt = np.zeros((3, 12), bool)
    gt[0, 0] = True
    pred = gt.copy()
    pred[0, 10] = True
    # pred -> GT distances [0, 10]: 95th percentile 9.5; GT -> pred [0].
    assert metrics.hd95(pred, gt) == pytest.approx(9.5)


def test_empty_mask_conventions() -> None:
    empty = np.zeros((5, 5), bool)
    full = np.zeros((5, 5), bool)
    full[1:3, 1:3] = True
    both = metrics.overlap_scores(empty, empty)
    assert all(math.isnan(v) for v in both.values()) and set(both) == {"dice", "iou", "precision", "recall"}
    assert metrics.hd95(empty, empty) == 0.0
    miss = metrics.overlap_scores(empty, full)
    assert miss["dice"] == 0.0 and miss["recall"] == 0.0 and miss["precision"] == 0.0
    assert math.isnan(metrics.hd95(empty, full))


def test_object_recall_and_size_bins() -> None:
    gt = np.zeros((100, 100), np.uint8)  # 10,000 px: small < 10 px, medium 10-100, large >= 100
    gt[0, 0] = 1  # 1 px, small
    gt[10:15, 10:15] = 1  # 25 px, medium
    gt[50:70, 50:70] = 1  # 400 px, large
    pred = np.zeros_like(gt)
    pred[12, 12] = 1  # one pixel touches the medium object
    pred[69, 69] = 1  # and one the large one; the small one is missed
    r = metrics.object_recall(pred, gt)
    assert r["objects"] == 3 and r["hit"] == 2
    assert r["object_recall"] == pytest.approx(2 / 3)
    assert (r["small_objects"], r["small_hit"]) == (1, 0)
    assert (r["medium_objects"], r["medium_hit"]) == (1, 1)
    assert (r["large_objects"], r["large_hit"]) == (1, 1)


def test_case_metrics_fov() -> None:
    pred, gt = _half_square()
    pred[8, 8] = 1  # a false positive outside the field of view
    fov = np.zeros_like(gt, dtype=bool)
    fov[:7, :7] = True
    assert metrics.case_metrics(pred, gt, [1])[1]["precision"] < 1.0
    assert metrics.case_metrics(pred, gt, [1], fov=fov)[1]["precision"] == pytest.approx(1.0)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_a, gt_a = _half_square()
    gt_b = np.zeros((10, 10), np.uint8)
    gt_b[1:4, 1:4] = 1
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    _png(gt_dir / "a.png", gt_a)
    _png(gt_dir / "b.png", gt_b)
    _png(gt_dir / "c.png", gt_b)  # no prediction
    _png(pred_dir / "a_seg.png", pred_a)  # segcli predict's naming
    _png(pred_dir / "b.png", gt_b * 255)  # a 0/255 export, perfect
    _png(pred_dir / "zzz.png", gt_b)  # no ground truth
    return pred_dir, gt_dir


def test_pairing(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    pairs, up, ug = pair_files(pred_dir, gt_dir)
    assert [(c, p.name, g.name) for c, p, g in pairs] == [("a", "a_seg.png", "a.png"), ("b", "b.png", "b.png")]
    assert [p.name for p in up] == ["zzz.png"]
    assert [p.name for p in ug] == ["c.png"]


def test_evaluate_folders(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, gt_dir = folders
    messages: list[str] = []
    res = evaluate(pred_dir, gt_dir, csv_path=tmp_path / "s.csv", json_path=tmp_path / "s.json", log=messages.append)
    assert res["n_cases"] == 2 and res["units"] == "px"
    per = {c["case"]: c["metrics"]["class_1"] for c in res["cases"]}
    assert per["a"]["dice"] == pytest.approx(2 / 3) and per["a"]["hd95"] == pytest.approx(2.0)
    assert per["b"]["dice"] == pytest.approx(1.0) and per["b"]["hd95"] == pytest.approx(0.0)
    mean = res["mean"]["class_1"]
    assert mean["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert mean["iou"] == pytest.approx((0.5 + 1) / 2)
    assert mean["hd95"] == pytest.approx(1.0)
    assert mean["object_recall"] == pytest.approx(1.0)
    assert any("zzz.png" in m for m in messages) and any("c.png" in m for m in messages)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["mean"]["class_1"]["dice"] == pytest.approx(mean["dice"])
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("case,class,dice,iou") and len(lines) == 1 + 2 + 1


def test_evaluate_nothing_pairs(tmp_path: Path) -> None:
    _png(tmp_path / "p" / "x.png", np.zeros((4, 4)))
    _png(tmp_path / "g" / "y.png", np.zeros((4, 4)))
    with pytest.raises(InputError, match="no prediction pairs"):
        evaluate(tmp_path / "p", tmp_path / "g")


def test_evaluate_spacing_mm(folders: tuple[Path, Path]) -> None:
    pred_dir, gt_dir = folders
    res = evaluate(pred_dir, gt_dir, spacing=(2.0, 0.5))
    assert res["units"] == "mm"
    assert {c["case"]: c["metrics"]["class_1"]["hd95"] for c in res["cases"]}["a"] == pytest.approx(1.0)


def test_evaluate_cli(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred_dir, gt_dir = folders
    out = tmp_path / "scores.json"
    r = run_cli("evaluate", pred_dir, gt_dir, "--json-file", out)
    assert r.returncode == 0, r.stderr
    assert "zzz.png" in r.stderr
    assert "mean" in r.stdout
    assert json.loads(out.read_text())["n_cases"] == 2
    r = run_cli("evaluate", pred_dir, gt_dir, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["n_cases"] == 2  # one --json convention: stdout
    r = run_cli("evaluate", tmp_path / "nope", gt_dir)
    assert r.returncode != 0 and "segcli: error:" in r.stderr


def test_label_stats_known_answer() -> None:
    from segcli.stats import label_stats

    lab = np.zeros((6, 10, 12), np.uint8)
    lab[1:3, 2:5, 3:7] = 1  # 24 voxels
    lab[4, 8, 11] = 1  # a second component, diagonal-free
    lab[0:6, 0, 0] = 2  # 6 voxels along z
    rows = {r["class"]: r for r in label_stats(lab, ["bg", "a", "b", "c"], (2.0, 1.0, 0.5))}
    assert rows["a"]["voxels"] == 25 and rows["a"]["components"] == 2
    assert rows["a"]["bbox"] == [1, 2, 3, 5, 9, 12]
    assert rows["a"]["volume_ml"] == pytest.approx(25 * 1.0 / 1000)
    assert rows["b"]["bbox"] == [0, 0, 0, 6, 1, 1] and rows["b"]["components"] == 1
    assert rows["c"] == {"class": "c", "voxels": 0, "volume_ml": 0.0, "area_mm2": None, "components": 0, "bbox": None}


@pytest.mark.parametrize("tile", [7, 16, 64])
def test_tile_stats_equal_whole_map_stats(tile: int) -> None:
    """Streamed (tile by tile) statistics equal label_stats of the whole map, components merged across edges."""
    from segcli.stats import TileStats, label_stats

    rng = np.random.default_rng(tile)
    lab = (rng.random((50, 61)) < 0.08).astype(np.uint8)  # speckle: many components crossing tile edges
    lab[10:40, 20] = 2  # a long line across several tiles
    lab[5, 5:55] = 2
    lab[30:33, 30:33] = 3
    lab[44, 60] = 1  # the corner
    classes = ["bg", "a", "b", "c", "d"]
    ts = TileStats(classes, (0.5, 0.25), width=lab.shape[1])
    for y in range(0, lab.shape[0], tile):
        for x in range(0, lab.shape[1], tile):
            box = (y, x, min(y + tile, lab.shape[0]), min(x + tile, lab.shape[1]))
            ts.add(lab[box[0] : box[2], box[1] : box[3]], box)
    assert ts.rows() == label_stats(lab, classes, (0.5, 0.25))


def test_count_labels_fast_path_matches_bincount() -> None:
    """The per-class count for few classes equals bincount, and a value outside the classes is not lost."""
    from segcli.report import count_labels

    m = np.zeros((7, 9), np.uint8)
    m[1:3, 2:5] = 1
    m[5, 0] = 2
    full = count_labels(m)
    assert full[0] == 56 and full[1] == 6 and full[2] == 1
    np.testing.assert_array_equal(count_labels(m, 3), full)
    np.testing.assert_array_equal(count_labels(m, 2), full)  # label 2 is outside 2 classes: bincount again
    np.testing.assert_array_equal(count_labels(np.zeros((0, 4), np.uint8), 2), np.zeros(256))


def test_refine_warns_when_it_refines_a_sliver_of_a_large_image() -> None:
    """16 of 3,969 patches (a slide at the default budget) leaves the mask to the rough pass: say so; a photo's
    8 of 25 patches is the method working as intended and stays quiet."""
    from segcli.engines.base import Result
    from segcli.report import FileReport, fill_run

    def warnings(total: int, refined: int) -> list[str]:
        rep = FileReport(input="x.tif")
        res = Result(np.zeros((4, 4), np.uint8), info={"patches_total": total, "patches_refined": refined})
        fill_run(rep, res, model="m", method="refine", device="cpu", providers={"coarse": "onnx:CPU"})
        return rep.warnings

    assert warnings(3969, 16)[0].startswith("refine re-segmented 16 of 3969 patches (0.4 %)")
    assert warnings(25, 8) == [] and warnings(3969, 3969) == [] and warnings(200, 10) == []
