"""Big 2D mask pairs are scored band by band (segcli.metrics_stream) with the same numbers as whole."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from segcli import metrics, metrics_stream
from segcli.evaluate import evaluate, to_json


def _masks(rng: np.random.Generator, h: int = 150, w: int = 170) -> tuple[np.ndarray, np.ndarray]:
    g = ndimage.binary_dilation(rng.random((h, w)) < 0.004, iterations=4).astype(np.uint8)
    p = ndimage.binary_dilation(rng.random((h, w)) < 0.004, iterations=3).astype(np.uint8) | (g & (rng.random((h, w)) < 0.9))
    return p, g


def _same(a: dict, b: dict) -> None:
    for c in a:
        for k, x in a[c].items():
            y = b[c][k]
            assert (isinstance(x, float) and math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), (c, k)


@pytest.mark.parametrize("trial", range(5))
def test_banded_metrics_equal_the_whole_image_metrics(trial: int) -> None:
    rng = np.random.default_rng(trial)
    p, g = _masks(rng)
    if trial % 2:  # two classes
        g[g > 0] = rng.integers(1, 3, int(g.sum()))
    spacing = None if trial < 2 else (0.5, 0.7)
    fov = (rng.random(g.shape) < 0.95).astype(np.uint8) if trial == 4 else None
    whole = metrics.case_metrics(p, g, [1, 2], spacing=spacing, fov=fov)
    banded = metrics_stream.banded_case_metrics(
        lambda a, b: p[a:b], lambda a, b: g[a:b], g.shape, [1, 2], spacing=spacing,
        read_fov=(lambda a, b: fov[a:b]) if fov is not None else None, band=16)
    _same(whole, banded)


def test_hd95_halo_grows_until_the_percentile_is_exact() -> None:
    p = np.zeros((400, 50), np.uint8)
    g = np.zeros((400, 50), np.uint8)
    p[5:8, 5:8] = 1
    g[380:390, 30:40] = 1  # every distance is far beyond the first 64-px halo
    whole = metrics.hd95(p > 0, g > 0)
    banded = metrics_stream.banded_case_metrics(lambda a, b: p[a:b], lambda a, b: g[a:b], p.shape, [1], band=32)
    assert banded[1]["hd95"] == pytest.approx(whole, abs=1e-9) and whole > 300


def test_evaluate_streams_a_big_pair_with_the_scores_of_the_whole_path(tmp_path: Path, monkeypatch) -> None:
    p, g = _masks(np.random.default_rng(7), 600, 500)
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    tifffile.imwrite(tmp_path / "pred" / "c.tif", p, tile=(128, 128), compression="zlib")
    Image.fromarray(g * 255).save(tmp_path / "gt" / "c.png")  # 0/255 ground truth, read as 0/1
    whole = evaluate(tmp_path / "pred", tmp_path / "gt")
    monkeypatch.setattr(metrics_stream, "STREAM_PIXELS", 1000)
    calls = []
    real = metrics_stream.score_streamed
    monkeypatch.setattr(metrics_stream, "score_streamed", lambda *a, **k: calls.append(1) or real(*a, **k, band=64))
    streamed = evaluate(tmp_path / "pred", tmp_path / "gt")
    assert calls == [1]
    assert whole["n_cases"] == 1 and whole["mean"]["class_1"]["objects"] > 100
    a, b = json.loads(to_json(streamed)), json.loads(to_json(whole))  # every number, NaNs included
    assert a["mean"] == b["mean"] and len(a["cases"]) == len(b["cases"]) == 1
