"""benchmarks/refine_ranking.py: the pieces its published curves rest on (issue 33), on synthetic cases
with known answers: temperature scaling recovers a known temperature, a composite is what the refine
engine writes, and the summary reads the smallest budget within the tolerance."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("refine_ranking", REPO / "benchmarks" / "refine_ranking.py")
rr = importlib.util.module_from_spec(_spec)
sys.modules["refine_ranking"] = rr  # its dataclass looks its module up
_spec.loader.exec_module(rr)


def _case(probs: np.ndarray, gt: np.ndarray) -> rr.Case:
    H, W = gt.shape
    grid = np.asarray([[0, 0, H, W // 2], [0, W // 2, H, W]])
    rough = (probs[1] > 0.5).astype(np.uint8)
    fine = [gt[:, : W // 2].copy(), gt[:, W // 2:].copy()]
    return rr.Case("c", grid, probs, rough, fine, np.zeros((1, H, W), np.float32), gt, np.ones((H, W), bool))


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.02, 0.98, size=(200, 200)).astype(np.float32)
    gt = (rng.uniform(size=p1.shape) < p1).astype(np.uint8)  # labels drawn from the true probabilities
    true = np.stack([1 - p1, p1])
    reported = rr.calibrate(true, 2.0)  # an under-confident network: probabilities flattened by T = 2
    t = rr.fit_temperature([_case(reported, gt)])
    assert abs(t - 0.5) < 0.05, t  # scaling by 0.5 undoes T = 2
    assert np.allclose(rr.calibrate(reported, t), true, atol=0.03)


def test_composite_and_gains_match_the_engine_and_the_truth():
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 6:] = 1  # the object lies in the right patch only
    probs = np.stack([np.full((8, 8), 0.6, np.float32), np.full((8, 8), 0.4, np.float32)])
    c = _case(probs, gt)  # rough says background everywhere; the fine labels are the truth
    assert (rr.composite(c, np.asarray([1])) == np.where(np.arange(8) >= 6, 1, 0)[None, :]).all()
    assert rr.gains(c).tolist() == [0.0, 16.0]  # refining the left patch fixes nothing, the right 16 px
    s = rr.score([rr.composite(c, np.asarray([1]))], [c], 2)
    assert s["dice"] == 1.0 and s["miou"] == 1.0


def test_summary_reads_the_smallest_budget_within_tolerance():
    rows = [{"fraction": f, "dice": d} for f, d in [(0.0, 0.5), (0.5, 0.795), (1.0, 0.80)]]
    table = {"pixel": rows, "mean": [dict(r, dice=r["dice"] - 0.02 * (r["fraction"] < 1)) for r in rows]}
    out = rr.summarise(table, "dice", 0.01)["criteria"]
    assert out["pixel"]["min_fraction"] == 0.5 and out["pixel"]["fine_flops_saved"] == 0.5
    assert out["mean"]["min_fraction"] == 1.0
