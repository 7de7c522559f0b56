"""Instances of a slide read tile by tile: one id per object across tile edges, the same objects as in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcli.instances import split_touching
from segcli.instances_tiled import TiledInstances, TileLabels


def _discs(shape: tuple[int, int], seed: int = 0, n: int = 60) -> np.ndarray:
    """Discs of radius 5-11 px, many of them touching or overlapping, scattered over tile edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    m = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(5, 11)
        m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return m


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Both label images have the same foreground and cut it into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    fg = a > 0
    pairs = np.unique(np.column_stack([a[fg], b[fg]]), axis=0)
    return len(pairs) == len(np.unique(a[fg])) == len(np.unique(b[fg]))


def _tiled(labels: np.ndarray, tile: int, **kw) -> tuple[np.ndarray, TiledInstances]:
    H, W = labels.shape
    t = TiledInstances(lambda b: labels[b[0] : b[2], b[1] : b[3]], (H, W), tile, **kw)
    out = np.zeros((H, W), np.uint32)
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            box = (y, x, min(y + tile, H), min(x + tile, W))
            out[box[0] : box[2], box[1] : box[3]] = t.read(box)
    return out, t


def test_tile_labels_read_each_tile_once_and_keep_at_most_their_limit():
    """Any box is the source's pixels; each grid tile is read once while it stays cached, background tiles cost
    no bytes, and the least recently used tiles go first when the limit is reached."""
    rng = np.random.default_rng(1)
    src = (rng.random((100, 130)) > 0.7).astype(np.uint8)
    src[:40, :40] = 0  # tile (0, 0) at 40 px is background
    asked: list[tuple[int, int, int, int]] = []

    def read(b):
        asked.append(tuple(b))
        return src[b[0] : b[2], b[1] : b[3]]

    cache = TileLabels(read, src.shape, 40)
    for box in [(0, 0, 100, 130), (5, 7, 63, 99), (30, 30, 31, 31), (90, 120, 100, 130)]:
        assert np.array_equal(cache.read(box), src[box[0] : box[2], box[1] : box[3]])
    assert len(asked) == len(set(asked)) == 12  # 3 x 4 tiles, each read once
    assert cache._bytes == src.size - 40 * 40  # every tile but the background one
    small = TileLabels(read, src.shape, 40, limit=2 * 40 * 40)
    asked.clear()
    small.read((0, 40, 40, 130))  # three tiles with objects: the first read goes when the third comes
    small.read((0, 40, 40, 80))
    assert asked[-1] == (0, 40, 40, 80) and small._bytes <= 2 * 40 * 40


@pytest.mark.parametrize("tile", [32, 48, 64])
def test_tiled_instances_equal_the_whole_image_split(tile):
    labels = _discs((190, 230)).astype(np.uint8)
    whole = split_touching(labels > 0)
    tiled, t = _tiled(labels, tile, margin=24, reach=128)
    assert t.cut_components == 0
    assert tiled.max() == whole.max() == len(np.unique(tiled[tiled > 0]))  # ids 1..n, each used
    assert _same_partition(tiled, whole)
    # objects across tile edges kept one id: some object spans two tiles
    assert _spans(tiled, tile) >= 2


def test_a_region_wider_than_the_reach_is_reported_cut():
    labels = np.zeros((64, 256), np.uint8)
    labels[20:40, 10:250] = 1  # a bar of 240 px: wider than reach 96
    tiled, t = _tiled(labels, 64, margin=16, reach=96)
    assert t.cut_components > 0 and np.array_equal(tiled > 0, labels > 0)
    small, t2 = _tiled(labels[:, :90], 64, margin=16, reach=96)  # 80 px: one object across the seam
    assert t2.cut_components == 0 and small.max() == 1


def _slide(tmp_path: Path) -> Path:
    """A slide-like tiled RGB TIFF: purple discs on pale pink, with resolution tags at nuclei-he's own 0.25 µm/px
    (so it is segmented on its own grid; tests/test_slide_mask.py covers a slide the pixel-size rule resamples)."""
    fg = _discs((300, 340), seed=3, n=70)
    rng = np.random.default_rng(3)
    img = (rng.random((300, 340, 3)) * 20 + np.array([225, 200, 215])).astype(np.uint8)
    img[fg] = (90, 50, 150)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(40000, 40000), resolutionunit=3)
    return path


NUCLEI_HE = Path(__file__).resolve().parents[1] / "models" / "nuclei-he"


def test_tile_labels_shared_by_two_threads_compute_each_tile_once():
    """The mask writer and the instance split read through one cache from two threads: a tile asked by both at
    once is computed by one of them while the other waits, and both get its pixels."""
    import threading
    import time

    src = np.arange(80 * 80, dtype=np.uint32).reshape(80, 80) % 7
    asked: list[tuple[int, int, int, int]] = []

    def slow(b):
        asked.append(tuple(b))
        time.sleep(0.05)  # long enough for the second thread to ask while the first computes
        return src[b[0] : b[2], b[1] : b[3]]

    cache = TileLabels(slow, src.shape, 40)
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(cache.read((0, 0, 80, 80)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and all(np.array_equal(g, src) for g in got)
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 4 and cache.computed == 4

def test_the_mask_writer_waits_for_the_split_to_reach_its_row():
    """The mask writer reads a tile row's class ids only once the split has reached that row (or ended), so it
    cannot run rows ahead and push tiles the split still needs out of the shared cache (on a 40000² slide
    11,689 tile computations for 6,241 tiles before; 6,241 after)."""
    import threading
    import time

    from segcli.instances_tiled import SlideInstances

    src = np.ones((256, 128), np.uint8)
    inst = SlideInstances.__new__(SlideInstances)  # the waiting part alone, without a run behind it
    inst._tile, inst._row, inst._progress = 64, -1, threading.Condition()
    inst.labels = TileLabels(lambda b: src[b[0] : b[2], b[1] : b[3]], src.shape, 64)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(int(inst.read_mask((64, 0, 128, 64)).sum())))
    reader.start()
    inst._advance(0)  # the split is at row 0: row 1 must still wait
    time.sleep(0.1)
    assert reader.is_alive() and not got
    inst._advance(1)
    reader.join(5)
    assert got == [64 * 64]
    inst._advance(np.iinfo(np.int64).max)  # a split that ended (or failed) holds nothing back
    assert int(inst.read_mask((192, 0, 256, 128)).sum()) == 64 * 128


def test_the_owner_of_a_component_is_the_first_tile_holding_one_of_its_pixels():
    """Owners from the components' boxes (and their top tile row where a box crosses a tile column) equal the
    first tile index, in raster order, over every pixel of each component, in windows placed anywhere."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    labels = _discs((260, 300), seed=5, n=90)
    labels[40:44, 10:290] = True  # long thin bars across many tile columns, with the disc clusters
    labels[150:230, 200:203] = True
    t = TiledInstances(lambda b: labels[b[0] : b[2], b[1] : b[3]], labels.shape, 32)
    for _ in range(12):
        y0, x0 = int(rng.integers(0, 120)), int(rng.integers(0, 140))
        win = (y0, x0, y0 + int(rng.integers(60, 140)), x0 + int(rng.integers(60, 160)))
        comp, n = ndi.label(labels[win[0] : win[2], win[1] : win[3]], structure=np.ones((3, 3), bool))
        ids = np.arange(1, n + 1)
        ys, xs = np.nonzero(comp)
        raster = ((ys + win[0]) // 32) * t.cols + (xs + win[1]) // 32
        brute = np.full(n + 1, np.iinfo(np.int64).max)
        np.minimum.at(brute, comp[ys, xs], raster)
        assert n > 3 and np.array_equal(t._owners(comp, win, ids, ndi.find_objects(comp)), brute[1:])


def _spans(inst: np.ndarray, tile: int) -> int:
    """The most tiles any one object's pixels lie in."""
    return max(len({(y // tile, x // tile) for y, x in zip(*np.nonzero(inst == i), strict=True)})
               for i in range(1, int(inst.max()) + 1))


def test_slide_read_by_region_writes_one_id_per_object(tmp_path, monkeypatch):
    """The bounded route (lazy_pixels=0) with 64-px tiles, on the shipped H&E bundle: a tiled uint32 BigTIFF
    whose objects are those of the whole-image split of the same run's mask, as many as the in-memory run
    finds; one GeoJSON detection and one CSV row per instance, objects across tile edges with one id."""
    import csv

    import segcli.instances_tiled
    from segcli.api import Segmenter

    monkeypatch.setattr(segcli.instances_tiled, "INSTANCE_TILE", 64)  # 64-px tiles: many seams on a small slide
    import segcli.engines.stts

    folds: list = []
    fold = segcli.engines.stts.fold_probs
    monkeypatch.setattr(segcli.engines.stts, "fold_probs", lambda p, b: folds.append(b) or fold(p, b))
    path = _slide(tmp_path)
    seg = Segmenter(str(NUCLEI_HE), lazy_pixels=0, instances=True, geojson=True, stats=True, tile_size=64)
    rep = seg.predict_file(path, tmp_path / "out" / "slide_seg.tif")
    assert rep.status == "ok", rep.error
    assert rep.info.get("bounded_memory")
    mask = tifffile.imread(tmp_path / "out" / "slide_seg.tif")
    with tifffile.TiffFile(tmp_path / "out" / "slide_seg_instances.tif") as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and page.dtype == np.uint32 and page.shape == mask.shape
        assert page.tilewidth == 64
        inst = page.asarray()
    info = rep.info["instances"]
    assert info["tiled"] and info["cut_components"] == 0 and info["objects"] == int(inst.max()) > 30
    assert _spans(inst, 64) >= 2  # some object crosses a tile edge and kept one id
    assert info["label_tiles_computed"] == 5 * 6  # 300 x 340 px: each 64-px tile's class ids computed once
    # where to look is decided on the folded rough probabilities, as a run without instances decides it
    assert folds == [(2, 1)]
    # the mask is the one a run without --instances writes (its network folded before fusion), on both routes
    Segmenter(str(NUCLEI_HE), lazy_pixels=0, tile_size=64).predict_file(path, tmp_path / "plain" / "slide_seg.tif")
    assert np.array_equal(tifffile.imread(tmp_path / "plain" / "slide_seg.tif"), mask)
    mem = Segmenter(str(NUCLEI_HE), instances=True).predict_file(path, tmp_path / "mem" / "slide_seg.tif")
    assert not mem.info.get("bounded_memory") and mem.info["instances"]["objects"] == info["objects"]
    assert mem.info["instances"]["split"] == info["split"]  # the bundle's rule (its boundary class) on both routes
    # the same objects as the whole-image split of the in-memory run, which saw the same mask
    assert np.array_equal(tifffile.imread(tmp_path / "mem" / "slide_seg.tif"), mask)
    assert _same_partition(inst, tifffile.imread(tmp_path / "mem" / "slide_seg_instances.tif"))
    doc = json.loads((tmp_path / "out" / "slide_seg.geojson").read_text())
    assert sorted(int(f["properties"]["metadata"]["instance"]) for f in doc["features"]) == \
        list(range(1, int(inst.max()) + 1))
    assert all(f["properties"]["measurements"]["Hematoxylin OD mean"] > 0.1 for f in doc["features"])
    rows = list(csv.DictReader((tmp_path / "out" / "slide_seg_objects.csv").open()))
    assert len(rows) == int(inst.max())
    assert all(int(r["area_px"]) == int((inst == int(r["id"])).sum()) for r in rows)
    assert all(float(r["area_um2"]) == pytest.approx(int(r["area_px"]) * 0.0625, rel=1e-3) for r in rows)  # 0.25 µm


@pytest.mark.parametrize("where", ["read", "_describe_now"])
def test_a_failing_instance_split_fails_the_file_and_leaves_no_instance_outputs(tmp_path, monkeypatch, where):
    """The split runs in a thread of its own beside the mask, and the objects are measured in another: what
    either raises reaches the file's report, and neither the label image nor the GeoJSON is left half written."""
    import segcli.instances_tiled
    from segcli.api import Segmenter

    def broken(self, *args):
        raise RuntimeError("split broke")

    monkeypatch.setattr(segcli.instances_tiled.TiledInstances, where, broken)
    seg = Segmenter(str(NUCLEI_HE), lazy_pixels=0, instances=True, geojson=True, tile_size=64)
    rep = seg.predict_file(_slide(tmp_path), tmp_path / "out" / "slide_seg.tif")
    assert rep.status == "failed" and "split broke" in str(rep.error)
    assert not (tmp_path / "out" / "slide_seg_instances.tif").exists()
    assert not (tmp_path / "out" / "slide_seg.geojson").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_fused_rows_are_read_only_once_final():
    """A reader of the fused labels waits until every row of its box is final, and a failed fine pass releases
    it with an error instead of leaving it waiting."""
    import threading
    import time

    from segcli.instances_tiled import FusedRows

    src = np.arange(100 * 10, dtype=np.uint8).reshape(100, 10)

    class Labels:
        def read(self, b):
            return src[b[0] : b[2], b[1] : b[3]]

    rows = FusedRows(Labels(), 100)
    got: list[np.ndarray] = []
    reader = threading.Thread(target=lambda: got.append(rows.read((40, 0, 60, 10))))
    reader.start()
    rows.advance(59)  # one row of the box still open
    time.sleep(0.1)
    assert reader.is_alive() and not got
    rows.advance(60)
    reader.join(5)
    assert len(got) == 1 and np.array_equal(got[0], src[40:60])
    rows.fail()
    with pytest.raises(InterruptedError):
        rows.read((90, 0, 100, 10))


def test_folded_labels_decide_the_object_first_then_boundary_or_interior():
    """Background 0.4, nucleus 0.35, boundary 0.25: the argmax says background, the folded network (0.6 > 0.5)
    says nucleus, and so does this rule; with nucleus and boundary swapped the pixel is boundary; weighted sums
    (a blend store's channels with its weight) give the same labels as the means."""
    from segcli.fusion import folded_labels

    p = np.array([[0.4, 0.4, 0.6, 0.1], [0.35, 0.25, 0.2, 0.3], [0.25, 0.35, 0.2, 0.6]], np.float32)[:, None, :]
    want = np.array([[1, 2, 0, 2]], np.uint8)
    assert np.array_equal(folded_labels(p, (2, 1), 0.5), want)
    w = np.array([[2.0, 0.5, 3.0, 1.5]], np.float32)
    assert np.array_equal(folded_labels(p * w, (2, 1), 0.5, w), want)
