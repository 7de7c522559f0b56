"""Batches: sharding, the prefetch pipeline, workers, statistics, locks and merged summaries."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.api import Segmenter
from segcli.errors import UsageError
from segcli.io.atomic import OutputLock
from segcli.shard import assign_shards, input_size, parse_shard, select_shard
from tests.conftest import run_cli


def random_tree(root: Path, rng: random.Random, n: int) -> list[Path]:
    files = []
    for i in range(n):
        d = root.joinpath(*[f"d{rng.randrange(3)}" for _ in range(rng.randrange(3))])
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"f{i}.bin"
        f.write_bytes(b"x" * rng.choice([10, 100, 1000, 50_000, rng.randrange(1, 5000)]))
        files.append(f)
    return sorted(files)


@pytest.mark.parametrize("seed", range(6))
def test_shards_cover_every_input_exactly_once_and_balance_bytes(tmp_path, seed):
    rng = random.Random(seed)
    files = random_tree(tmp_path, rng, rng.randrange(1, 60))
    for n in (1, 2, 3, 7):
        parts = [select_shard(files, k, n) for k in range(n)]
        flat = [f for p in parts for f in p]
        assert sorted(flat) == files and len(flat) == len(set(flat))
        loads = [sum(input_size(f) for f in p) for p in parts]
        biggest = max(input_size(f) for f in files)
        assert max(loads) - min(loads) <= biggest  # greedy LPT bound
        assert select_shard(files, 0, n) == parts[0]  # deterministic
    # Balancing is by size, not by count: one huge file gets a shard to itself.
    sizes = [input_size(f) for f in files]
    if len(files) > 3 and max(sizes) > sum(sizes) / 2:
        shards = assign_shards(files, 2)
        big = sizes.index(max(sizes))
        assert [s for i, s in enumerate(shards) if i != big].count(shards[big]) == 0


def test_parse_shard():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "-1/3", "x", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def _pngs(folder: Path, n: int, corrupt_at: int | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        if i == corrupt_at:
            p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
        else:
            a = np.random.default_rng(i).integers(0, 255, (48, 56, 3), dtype=np.uint8)
            Image.fromarray(a).save(p)
        out.append(p)
    return out


def test_prefetch_pipeline_keeps_order_and_reports_the_corrupt_file(tmp_path, rgb_bundle):
    files = _pngs(tmp_path / "in", 9, corrupt_at=4)
    seg = Segmenter(rgb_bundle)
    reports = list(seg.predict_many([(f, None) for f in files], tmp_path / "out", prefetch=2))
    assert [r.input for r in reports] == [str(f) for f in files]
    assert [r.status for r in reports] == ["ok"] * 4 + ["failed"] + ["ok"] * 4
    assert "img04.png" in reports[4].error
    written = sorted(p.name for p in (tmp_path / "out").glob("*_seg.png"))
    assert written == [f"img{i:02d}_seg.png" for i in range(9) if i != 4]
    # Same masks as the plain sequential path.
    seq = list(seg.predict_many([(f, None) for f in files], tmp_path / "seq", prefetch=0))
    for r in seq:
        if r.status == "ok":
            a = np.asarray(Image.open(r.output))
            b = np.asarray(Image.open(tmp_path / "out" / Path(r.output).name))
            np.testing.assert_array_equal(a, b)


def test_workers_and_shards_write_each_file_once(tmp_path, rgb_bundle):
    _pngs(tmp_path / "in", 10)
    out = tmp_path / "out"
    summaries = []
    for k in range(2):
        r = run_cli("predict", tmp_path / "in", "-o", out, "--model", rgb_bundle, "--shard", f"{k}/2",
                    "--workers", "2", "--json")
        assert r.returncode == 0, r.stderr
        p = tmp_path / f"s{k}.json"
        p.write_text(r.stdout)
        summaries.append(p)
    r = run_cli("merge-summaries", *summaries, "-o", tmp_path / "all.json")
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["summary"]["total"] == 10 and merged["summary"]["ok"] == 10 and merged["summary"]["duplicates"] == []
    assert len(list(out.glob("*_seg.png"))) == 10
    # Rerunning a shard with --skip-existing does nothing new.
    r = run_cli("predict", tmp_path / "in", "-o", out, "--model", rgb_bundle, "--shard", "1/2", "--skip-existing", "--json")
    s = json.loads(r.stdout)["summary"]
    assert s["skipped"] == s["total"] > 0


def test_clashing_outputs_are_refused(tmp_path, rgb_bundle):
    _pngs(tmp_path / "in", 2)
    Image.open(tmp_path / "in" / "img00.png").convert("RGB").save(tmp_path / "in" / "img00.jpg")
    r = run_cli("predict", tmp_path / "in", "-o", tmp_path / "out", "--model", rgb_bundle, "--json")
    assert r.returncode == 1
    assert "would overwrite" in r.stderr
    assert json.loads(r.stdout)["summary"]["ok"] == 2


def test_stats_csv_and_lock(tmp_path, rgb_bundle):
    files = _pngs(tmp_path / "in", 3)
    out = tmp_path / "out"
    held = OutputLock(out / "img01_seg.png")
    assert held.acquire()
    try:
        r = run_cli("predict", tmp_path / "in", "-o", out, "--model", rgb_bundle, "--lock",
                    "--stats", tmp_path / "stats.csv", "--json")
    finally:
        held.release()
    assert r.returncode == 0, r.stderr
    statuses = {Path(f["input"]).name: f["status"] for f in json.loads(r.stdout)["files"]}
    assert statuses == {"img00.png": "ok", "img01.png": "skipped", "img02.png": "ok"}
    rows = list(csv.DictReader((tmp_path / "stats.csv").read_text().splitlines()))
    assert {r["input"] for r in rows} == {str(files[0]), str(files[2])}
    for row in rows:
        mask = np.asarray(Image.open(out / (Path(row["input"]).stem + "_seg.png")))
        assert int(row["voxels"]) == int((mask == 1).sum())
        if int(row["voxels"]):
            y0, x0, y1, x1 = map(int, row["bbox"].split())
            ys, xs = np.nonzero(mask == 1)
            assert (y0, x0, y1, x1) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
            assert int(row["components"]) >= 1


@pytest.mark.parametrize("method", ["stts", "refine", "direct", "sliding"])
def test_staged_batch_equals_one_array_at_a_time(tmp_path, rgb_bundle, method):
    """Normalisation and the rough pass's downscaled view are made in the reader thread: the masks must be
    exactly those of ``segment_array``, images of several sizes and aspect ratios, and a constant image
    still reports "empty"."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "in"
    folder.mkdir()
    shapes = [(48, 56), (130, 40), (37, 200), (64, 64), (90, 91)]
    files = []
    for i, (h, w) in enumerate(shapes):
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        a[h // 4 : h // 2, w // 3 : w // 2] = 250  # a bright block, so the toy network finds something
        files.append(folder / f"im{i}.png")
        Image.fromarray(a).save(files[-1])
    files.append(folder / "flat.png")
    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(files[-1])
    seg = Segmenter(rgb_bundle, method=method)
    reports = list(seg.predict_many([(f, None) for f in files], tmp_path / "out", prefetch=2))
    assert [r.status for r in reports] == ["ok"] * len(shapes) + ["empty"]
    assert all("prepare" in r.seconds for r in reports)
    for f, r in zip(files[:-1], reports[:-1], strict=True):
        want, _ = seg.segment_array(np.asarray(Image.open(f)))
        np.testing.assert_array_equal(np.asarray(Image.open(r.output)), want.labels, err_msg=f.name)
