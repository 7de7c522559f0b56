"""The memory plan (segcli.memplan): budget shares, measured network costs, refusal before work, and the CLI
under a hard address-space limit at a budget the plan says is enough."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcli import memplan
from segcli.api import Segmenter
from segcli.memplan import BudgetError, cost_at, efficient_batch, make_plan
from segcli.runtimes import onnx_backend, onnx_cache
from tests.conftest import REPO

MB = 10**6
# nuclei-he's measured tables (bytes of RSS growth of a fresh session at each batch, 256² inputs)
FINE = {1: 14 * MB, 2: 23 * MB, 4: 28 * MB, 8: 60 * MB}
COARSE = {1: 25 * MB, 2: 43 * MB, 4: 109 * MB, 8: 238 * MB}


def _plan(budget: int, **kw):
    args = {"budget": budget, "kind": "slide", "name": "nuclei-he", "base": 140 * MB,
            "costs": {"coarse": COARSE, "fine": FINE}, "how": "measured", "size": 256, "channels": 3,
            "n_classes": 2, "zoom": 1.0, "wanted": 8}
    return make_plan(**{**args, **kw})


def test_a_budget_below_the_smallest_plan_is_refused_with_the_minimum() -> None:
    small = _plan(10**12).minimum
    with pytest.raises(BudgetError) as exc:
        _plan(300 * MB)
    msg = str(exc.value)
    assert msg.startswith("nuclei-he needs at least ") and msg.endswith("at batch 1; --max-memory is 300.0 MB")
    assert f"{small / MB:.1f} MB" in msg and exc.value.exit_code == 2
    _plan(small)  # exactly the minimum is accepted


def test_the_plan_fits_its_budget_and_grows_batches_and_caches_with_it() -> None:
    plans = [_plan(b * MB) for b in (370, 600, 1200, 16000)]
    for p in plans:
        assert p.total <= p.budget
    assert [p.batch for p in plans] == sorted(p.batch for p in plans)
    assert plans[0].batch < plans[-1].batch == 8
    # the coarse network's arena doubles past batch 2 for no gain per item: it stays at 2
    assert plans[-1].rough_batch == 2
    assert plans[-1].region_cache == memplan.REGION_CACHE[1] and plans[0].region_cache < plans[-1].region_cache
    assert plans[-1].fuse_cache == memplan.FUSE_CACHE[1] and plans[0].fuse_cache < plans[-1].fuse_cache


def test_the_default_budget_caps_the_rough_batch() -> None:
    """Without --max-memory the coarse network's rough batch is at most 2: its arena is held for the whole run
    (with --instances the instance window on top). Batch 4 had a default --instances run on a 16000² slide peak
    above 600 MB, and the measured costs of another machine planned batch 8 for a plain run (621 MB). A user's
    budget still plans it from the measured cost per item (31.5 MB at 4, within 1.25x of 27.3 at 2: batch 4)."""
    coarse = {1: 33_100_000, 2: 54_600_000, 4: 126_000_000, 8: 285_500_000}  # nuclei-he, re-measured
    extra = memplan.instance_windows(1024)
    user = _plan(16000 * MB, costs={"coarse": coarse, "fine": FINE}, extra=extra)
    default = _plan(16000 * MB, costs={"coarse": coarse, "fine": FINE}, extra=extra, user_budget=False)
    assert user.rough_batch == 4 and default.rough_batch == memplan.DEFAULT_ROUGH_BATCH == 2
    assert default.batch == user.batch == 8  # the fine batch is not touched
    assert user.total - default.total == coarse[4] - coarse[2]
    assert default.minimum == user.minimum
    plain = _plan(16000 * MB, costs={"coarse": coarse, "fine": FINE}, user_budget=False)
    assert plain.rough_batch == 2  # no instance split: the same cap
    # a small default budget still plans below the cap when that is all that fits
    tight = _plan(default.minimum, costs={"coarse": coarse, "fine": FINE}, extra=extra, user_budget=False)
    assert tight.rough_batch == 1 and tight.total <= tight.budget


def test_batches_are_chosen_from_measured_cost_per_item() -> None:
    assert efficient_batch(FINE, 8) == 8  # 7.5 MB per item at 8 against 7.0 at 4
    assert efficient_batch(COARSE, 8) == 2  # 21.5 MB per item at 2, 30 at 8
    assert efficient_batch(FINE, 3) == 2
    assert cost_at(FINE, 6) == 44 * MB and cost_at(FINE, 16) == 124 * MB  # interpolated, extrapolated


def test_workers_refusal_names_the_per_worker_share() -> None:
    with pytest.raises(BudgetError, match=r"at batch 1 \(.* per worker \(--workers 2\) and "):
        _plan(300 * MB, workers=2)


def test_measured_costs_are_recorded_beside_the_cached_exports(rgb_bundle) -> None:
    cache = Path(os.environ["SEGCLI_ONNX_CACHE"])  # the session's cache (tests/conftest.py)
    seg = Segmenter(rgb_bundle)
    plan = seg.memory_plan("slide")
    assert plan.network_cost == "measured" and plan.total <= plan.budget
    for role in ("coarse", "fine"):  # one record per network, keyed by its export's SHA-256
        pred = seg.predictor(seg.bundle_for("slide"), role)
        table = onnx_cache.memory_record(pred.model_sha256(), 32)
        assert table is not None and set(table) == set(memplan.MEASURED_BATCHES)
        assert all(v >= 0 for v in table.values())
        doc = json.loads((cache / f"memory-{pred.model_sha256()[:40]}.json").read_text())
        assert doc["sha256"] == pred.model_sha256() and "32" in doc["sizes"]


def test_the_memory_key_is_the_digest_the_cache_checked(rgb_bundle, monkeypatch) -> None:
    """A predictor built from a cached export keys its memory record by the SHA-256 the cache lookup verified,
    without hashing the model again (16 MB of a photo run's start for polyp's two networks)."""
    seg = Segmenter(rgb_bundle)
    bundle = seg.bundle_for("2d")
    for role in ("coarse", "fine"):
        pred = seg.predictor(bundle, role)
        want = hashlib.sha256(pred.model_source).hexdigest()
        with monkeypatch.context() as m:
            m.setattr(onnx_backend.hashlib, "sha256", lambda *a: pytest.fail("the model was hashed again"))
            assert pred.model_sha256() == want


def _slide(path: Path) -> Path:
    """An 8200² RGB slide (above the 64 MPix in-memory limit) of glass with a few dark squares, with a pyramid."""
    n = 8200
    rng = np.random.default_rng(0)
    a = np.full((n, n, 3), 236, np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, n - 300, 2)
        a[y : y + 300, x : x + 300] = 40
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(a, tile=(512, 512), compression="zlib", compressionargs={"level": 1}, photometric="rgb",
                 subifds=2, resolution=(40000, 40000), resolutionunit=3)
        for f in (4, 16):
            tw.write(np.ascontiguousarray(a[::f, ::f]), tile=(256, 256), compression="zlib", subfiletype=1,
                     photometric="rgb")
    return path


#: Address space a Python + ONNX Runtime process maps without ever touching it (library images, thread
#: stacks, allocator reservations): VmPeak − VmHWM of a small slide run was 300 MB with MALLOC_ARENA_MAX=2.
UNTOUCHED = 500 * MB


def _limited(as_bytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))

    return preexec


def test_cli_completes_under_a_hard_limit_at_the_budget_the_plan_asks_for(tmp_path: Path, rgb_bundle) -> None:
    Segmenter(rgb_bundle).warm_up("slide")  # export once, as an earlier run would (the export loads torch)
    slide = _slide(tmp_path / "slide.tif")
    env = {"MALLOC_ARENA_MAX": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "SEGCLI_ONNX_CACHE": os.environ["SEGCLI_ONNX_CACHE"]}
    cmd = [sys.executable, "-m", "segcli", "predict", str(slide), "--model", str(rgb_bundle), "-o",
           str(tmp_path / "m.tif"), "--json", "--max-memory"]
    refused = subprocess.run([*cmd, "1MB"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert refused.returncode == 2 and not (tmp_path / "m.tif").exists()
    m = re.search(r"segcli: error: \S+ needs at least ([0-9.]+) MB at batch 1; --max-memory is 1\.0 MB$",
                  refused.stderr.strip())
    assert m, refused.stderr
    budget = int(float(m.group(1)) * MB) + 60 * MB  # the minimum plan, with a little room for caches
    ok = subprocess.run(["/usr/bin/time", "-v", *cmd, str(budget)], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=300, preexec_fn=_limited(budget + UNTOUCHED))
    assert ok.returncode == 0, ok.stderr[-2000:]
    rep = json.loads(ok.stdout)
    assert rep["files"][0]["status"] == "ok" and rep["files"][0]["info"]["bounded_memory"]
    assert rep["files"][0]["info"]["memory_plan"]["planned_peak_mb"] <= budget / MB
    peak_kb = int(next(x.split(":")[1] for x in ok.stderr.splitlines() if "Maximum resident" in x))
    assert peak_kb * 1024 <= 1.05 * budget, (peak_kb, budget)
    assert rep["memory"]["peak_rss_mb"] <= 1.05 * budget / MB


def _dark(batch: np.ndarray) -> np.ndarray:
    p = (batch[:, :1] < 0.5).astype(np.float32)
    return np.concatenate([1 - p, p], axis=1)


def test_a_resampled_20x_slide_stays_a_slide_and_glass_is_never_computed(tmp_path: Path, monkeypatch) -> None:
    """The mpp rule doubles a 20x slide: counted at the networks' size it takes the bounded route, whose
    sliding windows cover only what the rough pass finds (never the glass)."""
    from segcli import header_needs
    from segcli.runtimes import FunctionPredictor
    from tests.conftest import make_bundle

    bundle = make_bundle(tmp_path / "he", in_channels=3, size=64, method="sliding", normalization={"kind": "dtype"})
    doc = json.loads((bundle / "segcli.json").read_text())
    doc["params"]["training_mpp"] = 0.25
    (bundle / "segcli.json").write_text(json.dumps(doc))
    img = np.full((640, 640, 3), 235, np.uint8)
    img[100:180, 200:300] = 40  # one patch of "tissue" on glass
    monkeypatch.setattr(header_needs, "SLIDE_PIXELS", 10**6)  # 640² is 0.4 MPix, 1280² once resampled: 1.6 MPix
    reports = {}
    for mpp in (0.5, 0.25):
        src = tmp_path / f"s{mpp}.tif"
        tifffile.imwrite(src, img, photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        seg = Segmenter(bundle, max_memory="8GB")
        b = seg.bundle_for("slide")
        for role in ("coarse", "fine"):
            seg.set_predictor(b, role, FunctionPredictor(_dark, in_channels=3))
        reports[mpp] = seg.predict_file(src, tmp_path / f"o{mpp}.tif")
        assert reports[mpp].status == "ok", reports[mpp].error
    r20 = reports[0.5]
    assert r20.info.get("bounded_memory") and r20.info["resampled"]["network_shape"] == [1280, 1280]
    assert 0 < r20.info["windows"]["kept"] < r20.info["windows"]["grid"] / 4  # tissue windows only
    assert "bounded_memory" not in reports[0.25].info  # 0.4 MPix at its own pixel size: in memory
    mask = tifffile.imread(tmp_path / "o0.5.tif")
    assert mask.shape == (640, 640) and mask[110:170, 210:290].all() and not mask[400:, 400:].any()


def test_the_instance_split_is_in_the_plan_when_asked_for(rgb_bundle) -> None:
    """--instances: a slide's plan holds one instance window at the reach (1536² at 64 bytes a pixel: 151 MB,
    measured 161 MB on a 16000² nuclei-he mask), the crops whose objects are measured beside it, and the tile
    cache of class ids (32 MiB), and an image split whole brings 64 bytes a pixel more."""
    from segcli import memory

    plain = Segmenter(rgb_bundle, max_memory="8GB")
    split = Segmenter(rgb_bundle, max_memory="8GB", instances=True)
    windows = memplan.instance_windows(split.options.tile_size)
    # the split's window, the crops measured beside it (32 bytes a pixel, and two crops of ids and classes)
    assert windows == 1536 * 1536 * (memory.INSTANCE_PER_PIXEL + 32 + 2 * 5) + 32 * 2**20
    a, b = plain.memory_plan("slide"), split.memory_plan("slide")
    assert b.workset == a.workset + windows and b.minimum - b.base == a.minimum - a.base + windows
    assert split.memory_plan("2d").workset == plain.memory_plan("2d").workset  # split whole: the image's own
    own = memory.image_bytes(split, "2d", (1000, 1000), 3, 1) - memory.image_bytes(plain, "2d", (1000, 1000), 3, 1)
    assert own == 1000 * 1000 * memory.INSTANCE_PER_PIXEL


def test_own_peak_is_not_the_parents() -> None:
    """A process started from a large one (a test session, a batch script) reports its own peak, not the
    parent's: Linux carries the parent's high-water mark into a fork-and-exec child's ru_maxrss."""
    child = ("import resource, json; from segcli.memory import peak_rss_bytes; "
             "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    parent = ("import subprocess, sys, numpy as np; a = np.ones(400 * 10**6 // 8); "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, "
              "check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, cwd=REPO)
    own, inherited = json.loads(out.stdout)
    assert own < 150e6, own
    if sys.platform.startswith("linux"):
        assert inherited > 400e6  # the quirk this guards against is still there to guard against
