"""The memory plan on the photo, volume and --workers routes (issue 28): a file's own buffers are added to
the measured plan, a file that cannot fit is refused alone (or the run, up front, when none can), and
workers share what the parent leaves once it released its networks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli import memory, memplan
from segcli.api import Segmenter
from segcli.batch import check_budget
from tests.conftest import run_cli

MB = 10**6


def _png(path: Path, side: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _cli_minimum(*args) -> float:
    """The CLI's own smallest plan (its interpreter, libraries and networks at batch 1), in MB."""
    r = run_cli(*args, "--max-memory", "1MB")
    assert r.returncode == 2, r.stderr
    m = re.search(r"needs at least ([0-9.]+) MB at batch 1", r.stderr)
    assert m, r.stderr
    return float(m.group(1))


def test_workers_refusal_names_the_whole_runs_minimum() -> None:
    table = {1: 10 * MB, 2: 18 * MB, 4: 34 * MB, 8: 66 * MB}
    args = {"kind": "2d", "name": "polyp", "base": 150 * MB, "costs": {"fine": table}, "how": "measured",
            "size": 64, "channels": 3, "n_classes": 2, "zoom": 1.0, "wanted": 8}
    minimum = memplan.make_plan(budget=10**12, **args).minimum
    with pytest.raises(memplan.BudgetError) as exc:
        memplan.make_plan(budget=150 * MB, workers=2, parent=100 * MB, run_budget=400 * MB, **args)
    total = memplan.run_need(minimum, 2, 100 * MB)
    assert total == 2 * minimum + 100 * MB and exc.value.exit_code == 2
    assert str(exc.value) == (f"polyp needs at least {total / MB:.1f} MB at batch 1 ({minimum / MB:.1f} MB per "
                              "worker (--workers 2) and 100.0 MB for the parent); --max-memory is 400.0 MB")


def test_an_image_brings_its_own_buffers_and_smaller_batches(rgb_bundle) -> None:
    seg = Segmenter(rgb_bundle, max_memory="4GB")
    own = memory.image_bytes(seg, "2d", (2000, 2000), 3, 1)
    # decoded RGB + three float32 copies of the normalised image + the mask + stts's fusion store
    assert own == 2000 * 2000 * (3 + 3 * 4 * 3 + 1 + 1)
    assert memory.file_need(seg, "2d", own) == seg.plan_minimum("2d") + own
    seg.budget_share = 3  # two more files read ahead: each file's buffers held three times
    assert memory.file_need(seg, "2d", own) == seg.plan_minimum("2d") + 3 * own
    seg.budget_share = 1
    whole = seg.memory_plan("2d")
    tight = seg.memory_plan("2d", reserve=seg.budget - seg.plan_minimum("2d") - 1)
    assert tight.budget < whole.budget and tight.batch <= whole.batch and tight.total <= tight.budget


def test_a_photo_that_cannot_fit_is_refused_alone_and_the_batch_goes_on(tmp_path: Path, rgb_bundle) -> None:
    _png(tmp_path / "in" / "small.png", 64)
    big = _png(tmp_path / "in" / "big.png", 2000, seed=1)
    base = ("predict", tmp_path / "in", "--model", rgb_bundle, "-o", tmp_path / "out", "--prefetch", "0")
    minimum = _cli_minimum(*base)
    own_big = 2000 * 2000 * 41 / MB  # 164 MB: see the test above
    r = run_cli(*base, "--max-memory", f"{minimum + 40:.0f}MB", "--json")
    assert r.returncode == 1, r.stderr  # one file failed, the other was written
    lines = [x for x in r.stderr.splitlines() if "needs at least" in x]
    assert lines and all(f"{big}: --method stts on this 2000x2000 image needs at least" in x for x in lines)
    need = float(re.search(r"needs at least ([0-9.]+) MB", lines[0]).group(1))  # type: ignore[union-attr]
    assert abs(need - (minimum + own_big)) < 10  # the plan's minimum + the file's own buffers
    assert f"; --max-memory is {minimum + 40:.0f}.0 MB" in lines[0]
    rep = {Path(f["input"]).name: f for f in json.loads(r.stdout)["files"]}
    assert rep["small.png"]["status"] == "ok" and (tmp_path / "out" / "small_seg.png").exists()
    assert rep["big.png"]["status"] == "failed" and not (tmp_path / "out" / "big_seg.png").exists()


def test_a_run_where_no_file_can_fit_is_refused_before_any_work(tmp_path: Path, rgb_bundle) -> None:
    big = _png(tmp_path / "big.png", 2000)
    base = ("predict", big, "--model", rgb_bundle, "-o", tmp_path / "out.png")
    minimum = _cli_minimum(*base)
    r = run_cli(*base, "--max-memory", f"{minimum + 40:.0f}MB")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"segcli: error: {big}: this 2000x2000 image needs at least ")
    assert r.stderr.strip().endswith(f"; --max-memory is {minimum + 40:.0f}.0 MB")
    assert not (tmp_path / "out.png").exists()


def test_the_parent_releases_its_networks_and_workers_share_what_it_leaves(tmp_path: Path, rgb_bundle) -> None:
    from segcli.memplan import rss_now

    items = [(_png(tmp_path / f"p{i}.png", 64, seed=i), None) for i in range(2)]
    # This runs inside the test process, whose RSS (the parent's, and each worker's base in the plan) depends on
    # the tests run before it: the budget leaves room for three such processes.
    budget = 3 * rss_now() + 10**9
    seg = Segmenter(rgb_bundle, max_memory=budget)
    check_budget(seg, items, 2)
    assert seg._predictors == {}  # released: each worker loads its own
    assert 0 < seg.parent_bytes < budget and seg.run_budget == budget
    assert seg.budget == (budget - seg.parent_bytes) // 2
    plan = seg.memory_plan("2d")
    assert plan.workers == 2 and plan.budget == seg.budget and plan.total <= plan.budget


def test_workers_run_on_their_share_and_a_budget_below_it_is_refused(tmp_path: Path, rgb_bundle) -> None:
    for i in range(3):
        _png(tmp_path / "in" / f"p{i}.png", 48, seed=i)
    base = ("predict", tmp_path / "in", "--model", rgb_bundle, "-o", tmp_path / "out", "--workers", "2")
    refused = run_cli(*base, "--max-memory", "1MB")
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    m = re.search(r"segcli: error: \S+ needs at least ([0-9.]+) MB at batch 1 \(([0-9.]+) MB per worker "
                  r"\(--workers 2\) and ([0-9.]+) MB for the parent\); --max-memory is 1\.0 MB", refused.stderr)
    assert m, refused.stderr
    total, per, parent = (float(g) for g in m.groups())
    assert abs(total - (2 * per + parent)) < 0.2
    budget = int(total + 200)
    r = run_cli(*base, "--max-memory", f"{budget}MB", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    mem = doc["memory"]
    assert mem["workers"] == 2 and abs(2 * mem["worker_budget_mb"] + mem["parent_mb"] - budget) < 1
    for f in doc["files"]:  # each worker planned for its share, not the whole budget
        assert f["status"] == "ok" and f["info"]["memory_plan"]["budget_mb"] <= mem["worker_budget_mb"] + 0.1


def test_a_streamed_volume_counts_its_mask_once() -> None:
    """Streamed, the mask goes straight into the writer's buffer and out plane by plane: counted once (a
    512²x1000 CT needed 960 MB when it was counted twice)."""
    shape = (1000, 512, 512)
    vox = 1000 * 512 * 512
    streamed = memory.estimate_volume(shape, 1, 2, model_channels=1, n_classes=2, return_probs=False, streamed=True)
    assert streamed == 3 * memory.SLAB_BYTES + vox
    whole = memory.estimate_volume(shape, 1, 2, model_channels=1, n_classes=2, return_probs=False)
    assert whole == 2 * vox + 2 * vox  # int16 decoded, the mask and its reoriented copy
    small = memory.estimate_volume((8, 64, 64), 1, 2, model_channels=1, n_classes=2, return_probs=False,
                                   streamed=True)
    assert small == 3 * 8 * 64 * 64 * 2 + 8 * 64 * 64  # slabs never larger than the volume


def test_a_streamed_nifti_is_refused_up_front_with_its_minimum(tmp_path: Path, grey_bundle) -> None:
    import SimpleITK as sitk

    shape = (400, 256, 256)
    img = sitk.GetImageFromArray(np.zeros(shape, np.uint8))
    sitk.WriteImage(img, str(tmp_path / "v.nii"))  # uncompressed NIfTI: streamed slab by slab
    base = ("predict", tmp_path / "v.nii", "--model", grey_bundle, "-o", tmp_path / "m.nii.gz")
    minimum = _cli_minimum(*base)
    r = run_cli(*base, "--max-memory", f"{minimum + 50:.0f}MB")
    assert r.returncode == 2 and not (tmp_path / "m.nii.gz").exists(), r.stderr
    assert r.stderr.startswith(f"segcli: error: {tmp_path / 'v.nii'}: this 400x256x256 volume needs at least ")
    need = float(re.search(r"needs at least ([0-9.]+) MB", r.stderr).group(1))  # type: ignore[union-attr]
    vox = 400 * 256 * 256
    assert abs(need - (minimum + (3 * vox + vox) / MB)) < 2  # three slabs (the whole 26 MB) + the mask once


def test_a_first_use_export_is_refused_below_its_need_and_runs_within_it(tmp_path: Path, rgb_bundle) -> None:
    """The first-use ONNX export (a child process that loads torch) counts against --max-memory: below what it
    needs with this process, the run is refused before any work naming the need; at that need it runs, and
    the parent's RSS then plus the child's measured peak stay under the budget."""
    src = _png(tmp_path / "a.png", 48)
    cache = tmp_path / "cache"
    args = ("predict", src, "--model", rgb_bundle, "-q", "--json")
    small = run_cli(*args, "-o", tmp_path / "o1.png", "--max-memory", "200MB", env={"SEGCLI_ONNX_CACHE": str(cache)})
    assert small.returncode == 2, small.stderr
    m = re.match(r"segcli: error: first use of model rgb needs about ([0-9.]+) MB to export its ONNX graph; "
                 r"--max-memory is 200\.0 MB \(run it once without --max-memory first", small.stderr)
    assert m, small.stderr
    assert not (tmp_path / "o1.png").exists() and not list(cache.glob("*.onnx"))
    budget = float(m.group(1)) + 1
    ok = run_cli(*args, "-o", tmp_path / "o2.png", "--max-memory", f"{budget:.0f}MB",
                 env={"SEGCLI_ONNX_CACHE": str(cache)})
    assert ok.returncode == 0, ok.stderr
    exports = json.loads(ok.stdout)["memory"]["onnx_exports"]
    assert [e["role"] for e in exports] == ["coarse", "fine"]
    for e in exports:  # the prediction held, and with it the budget
        assert 0 < e["parent_mb"] + e["child_peak_mb"] <= e["need_mb"] <= budget, e
