"""A slide's mask written beside the fine pass: the same files as written after it, and nothing left when the
file fails."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

NUCLEI_HE = Path(__file__).resolve().parents[1] / "models" / "nuclei-he"


def _slide(tmp_path: Path, mpp: float = 0.5) -> Path:
    """A slide-like tiled RGB TIFF: purple discs on pale pink, with resolution tags (0.5 µm/px: nuclei-he, trained
    at 0.25, reads it at twice its size; at 0.25 it is segmented on its own grid)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:300, :340]
    fg = np.zeros((300, 340), bool)
    for _ in range(60):
        cy, cx, r = rng.uniform(0, 300), rng.uniform(0, 340), rng.uniform(5, 11)
        fg |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = (rng.random((300, 340, 3)) * 20 + np.array([225, 200, 215])).astype(np.uint8)
    img[fg] = (90, 50, 150)
    path = tmp_path / "slide.tif"
    px_per_cm = 1e4 / mpp
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(px_per_cm, px_per_cm), resolutionunit=3)
    return path


def _after_the_fine_pass(monkeypatch) -> None:
    """Run the tiled route as it ran before: no ``on_fused``, so the mask is written in the write stage."""
    import segcli.pipeline

    monkeypatch.setattr(segcli.pipeline.TiledTiffRoute, "_write_beside", lambda self, *args: None)
    run = segcli.pipeline.plan.run_2d

    def without_beside(method, plane, predictors, kw, **k):
        kw = {key: v for key, v in kw.items() if not (key == "on_fused" and v is None)}
        return run(method, plane, predictors, kw, **k)

    monkeypatch.setattr(segcli.pipeline.plan, "run_2d", without_beside)


def _no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left
    assert not any(t.name == "segcli-mask" for t in threading.enumerate())


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_the_mask_written_beside_the_fine_pass_is_the_one_written_after_it(tmp_path, monkeypatch, mpp):
    """Mask, GeoJSON, class counts and statistics rows are the same whether the mask is written beside the
    network (the default on the tiled route) or after it, on a slide resampled by the pixel-size rule and on
    one segmented on its own grid."""
    from segcli.api import Segmenter

    path = _slide(tmp_path, mpp)

    def run(name: str) -> tuple[object, Path]:
        seg = Segmenter(str(NUCLEI_HE), lazy_pixels=0, geojson=True, stats=tmp_path / f"{name}.csv", tile_size=64)
        out = tmp_path / name / "slide_seg.tif"
        rep = seg.predict_file(path, out)
        assert rep.status == "ok", rep.error
        assert rep.info.get("bounded_memory")
        assert ("resampled" in rep.info) == (mpp == 0.5)
        return rep, out

    beside, out_b = run("beside")
    with monkeypatch.context() as m:
        _after_the_fine_pass(m)
        after, out_a = run("after")
    assert beside.info.get("mask_written_beside_fine_pass") is True
    assert "mask_written_beside_fine_pass" not in after.info
    mask = tifffile.imread(out_b)
    assert np.array_equal(mask, tifffile.imread(out_a)) and mask.any()
    assert beside.voxel_counts == after.voxel_counts and beside.area_mm2 == after.area_mm2
    assert beside.stats == after.stats and beside.stats
    geo_b, geo_a = (json.loads(p.with_suffix(".geojson").read_text()) for p in (out_b, out_a))
    assert [f["geometry"] for f in geo_b["features"]] == [f["geometry"] for f in geo_a["features"]]
    assert len(geo_b["features"]) == beside.info["geojson"]["features"] > 5
    _no_leftovers(out_b.parent)


@pytest.mark.parametrize("instances", [False, True])
def test_a_fine_pass_that_fails_leaves_nothing_written_beside_it(tmp_path, monkeypatch, instances):
    """The mask (and with --instances the split) start with the first fused rows: when the network fails midway,
    the file fails with the network's error, their threads are gone, and no mask, instance image or GeoJSON is
    left."""
    import segcli.engines.stts
    import segcli.instances_tiled
    from segcli.api import Segmenter

    started: list[int] = []
    rows_init = segcli.instances_tiled.FusedRows.__init__
    monkeypatch.setattr(segcli.instances_tiled.FusedRows, "__init__",
                        lambda self, *a: started.append(1) or rows_init(self, *a))
    calls: list[int] = []
    paste = segcli.engines.stts.paste_back

    def breaks_later(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("network broke")
        return paste(*args)

    monkeypatch.setattr(segcli.engines.stts, "paste_back", breaks_later)
    seg = Segmenter(str(NUCLEI_HE), lazy_pixels=0, instances=instances, geojson=True, tile_size=64)
    rep = seg.predict_file(_slide(tmp_path), tmp_path / "out" / "slide_seg.tif")
    assert started == [1] and len(calls) == 2  # the writers were running beside the network
    assert rep.status == "failed" and "network broke" in str(rep.error)
    assert not any(t.name.startswith(("segcli-instances", "segcli-objects")) for t in threading.enumerate())
    for name in ("slide_seg.tif", "slide_seg_instances.tif", "slide_seg.geojson"):
        assert not (tmp_path / "out" / name).exists()
    _no_leftovers(tmp_path / "out")


def test_a_file_that_fails_after_its_mask_was_written_beside_leaves_no_mask(tmp_path, monkeypatch):
    """The mask is complete when the fine pass ends; if the probabilities written next fail (a full disk), the
    file fails naming the output and the mask written beside goes too: no mask without its probabilities."""
    import segcli.pipeline
    from segcli.api import Segmenter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "slide_seg_probs.tif"))

    monkeypatch.setattr(segcli.pipeline, "write_tiled", full)  # the probabilities' writer (the mask has its own)
    seg = Segmenter(str(NUCLEI_HE), lazy_pixels=0, probabilities=True, tile_size=64)
    rep = seg.predict_file(_slide(tmp_path), tmp_path / "out" / "slide_seg.tif")
    assert rep.status == "failed" and str(rep.error).endswith("slide_seg_probs.tif: no space left on the device")
    assert not (tmp_path / "out" / "slide_seg.tif").exists()
    _no_leftovers(tmp_path / "out")
