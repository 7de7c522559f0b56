"""Where stts' fine network trains (segcli.train.stts_crops): crops from the rough mask as inference cuts
them, ground-truth crops, and a validation that IS the full-resolution stts pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segcli.geometry import square_pad_shift
from segcli.train import train
from segcli.train.data import Sample
from segcli.train.stts_crops import CropSampler, label_scores
from tests.test_train import SHARED, TINY


def _sample(boxes: list[list[int]], shape: tuple[int, int] = (100, 120)) -> Sample:
    return Sample(stem="s", case="s", shape=shape, image=np.zeros((1, *shape), np.uint8),
                  mask=np.zeros(shape, np.uint8), spacing=None, boxes=np.asarray(boxes, np.int64).reshape(-1, 4))


def test_rough_only_sampler_cuts_the_rough_component_as_inference_does() -> None:
    s = _sample([[10, 10, 20, 20]])
    rough = np.asarray([[40, 50, 60, 90]], np.int64)
    box = CropSampler(pad=8, jitter=0, gt_share=0.0).box(s, rough, np.random.default_rng(0))
    np.testing.assert_array_equal(box, square_pad_shift(rough, s.shape, 8)[0])
    assert box[2] - box[0] == box[3] - box[1] == 40 + 16  # square on the long side, padded by k each side


def test_gt_share_one_uses_the_ground_truth_and_mixes_otherwise() -> None:
    s = _sample([[10, 10, 20, 20]])
    rough = np.asarray([[40, 50, 60, 90]], np.int64)
    gt_box = square_pad_shift(s.boxes, s.shape, 8)[0]
    rough_box = square_pad_shift(rough, s.shape, 8)[0]
    rng = np.random.default_rng(0)
    assert all(np.array_equal(CropSampler(8, 0, 1.0).box(s, rough, rng), gt_box) for _ in range(20))
    half = [CropSampler(8, 0, 0.5).box(s, rough, rng) for _ in range(400)]
    n_gt = sum(np.array_equal(b, gt_box) for b in half)
    assert sum(np.array_equal(b, rough_box) for b in half) + n_gt == 400
    assert 160 < n_gt < 240  # about half


def test_no_components_anywhere_gives_the_whole_image() -> None:
    s = _sample([])
    box = CropSampler(8, 4, 0.5).box(s, np.zeros((0, 4), np.int64), np.random.default_rng(0))
    np.testing.assert_array_equal(box, [0, 0, 100, 120])


def test_label_scores_known_answers() -> None:
    mask = np.zeros((4, 4), np.uint8)
    mask[:2] = 1
    pred = np.zeros_like(mask)
    pred[:1] = 1
    dice, miou = label_scores(pred, mask, 2)
    assert dice == pytest.approx(2 * 4 / (4 + 8))
    assert miou == pytest.approx((4 / 8 + 8 / 12) / 2)
    assert np.isnan(label_scores(np.zeros_like(mask), np.zeros_like(mask), 2)[0])  # no foreground anywhere


def test_fine_validation_is_the_full_resolution_pipeline(tmp_path: Path) -> None:
    """The fine stage's best validation Dice is exactly what `segcli predict` scores on the val split."""
    res = train(SHARED, tmp_path / "run", method="stts", epochs=8, crops_per_image=2, **TINY)
    t = res.training
    assert t["stages"]["fine"]["epochs_run"] == 4
    assert t["stages"]["fine"]["val_dice"] == pytest.approx(t["val_full_res"]["dice"], abs=1e-6)


@pytest.mark.parametrize("bad", [{"fine_crops": "ground"}, {"crops_per_image": 0}])
def test_bad_fine_crop_options_are_usage_errors(tmp_path: Path, bad: dict) -> None:
    from segcli.errors import UsageError

    with pytest.raises(UsageError):
        train(SHARED, tmp_path / "x", method="stts", epochs=1, **bad, **TINY)
