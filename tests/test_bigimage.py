"""Bounded-memory processing of large inputs: lazy TIFF regions, pyramids, streamed writing, bounded fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcli import memory
from segcli.api import Segmenter
from segcli.engines.base import ArrayPlane
from segcli.engines.stts import stts, zoom_tiles
from segcli.errors import UsageError
from segcli.fusion import FuseStore, Quantizer
from segcli.io.bigtiff import TiffPlane, write_tiled
from segcli.prepare import slice_normalizer
from segcli.resize import resize
from segcli.runtimes import FunctionPredictor
from tests.conftest import make_bundle

DTYPE = {"kind": "dtype"}


def identity_probs(batch: np.ndarray) -> np.ndarray:
    """Foreground probability = darkness of channel 0 (objects are dark on a bright slide)."""
    p = np.clip(1.0 - batch[:, :1], 0, 1)
    return np.concatenate([1 - p, p], axis=1)


def slide(h: int, w: int, n: int, seed: int = 0, rgb: bool = True) -> np.ndarray:
    """A bright 'glass' background with ``n`` dark discs (nuclei-like), uint8 channel-last."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3 if rgb else 1), 235, np.uint8)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(n):
        y, x, r = rng.integers(20, h - 20), rng.integers(20, w - 20), rng.integers(4, 12)
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(20, 90)
    return img


def write_pyramid(path: Path, img: np.ndarray, levels: int = 3, tile: int = 128, ome: bool = False) -> None:
    img = img[..., 0] if img.shape[-1] == 1 else img
    axes = "YX" if img.ndim == 2 else "YXS"
    meta = {"axes": axes, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5} if ome else None
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        tw.write(img, tile=(tile, tile), compression="zlib", subifds=levels - 1, metadata=meta,
                 resolution=(20000, 20000), resolutionunit=3)
        for i in range(1, levels):
            tw.write(img[:: 2**i, :: 2**i], tile=(tile, tile), compression="zlib", subfiletype=1)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (700, 900, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["tiled", "striped", "planar"])
def test_region_reads_equal_the_full_read(tmp_path: Path, image: np.ndarray, layout: str) -> None:
    path = tmp_path / f"{layout}.tif"
    if layout == "tiled":
        tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    elif layout == "striped":
        tifffile.imwrite(path, image, compression="zlib", rowsperstrip=33)
    else:
        tifffile.imwrite(path, np.moveaxis(image, -1, 0), tile=(64, 64), compression="zlib",
                         planarconfig="separate", photometric="rgb")
    full = np.moveaxis(image.astype(np.float32) / 255.0, -1, 0)
    rng = np.random.default_rng(0)
    boxes = [(0, 0, 1, 1), (699, 899, 700, 900), (0, 0, 700, 900), (127, 127, 129, 129)]
    for _ in range(8):
        y0, x0 = rng.integers(0, 690), rng.integers(0, 890)
        boxes.append((y0, x0, rng.integers(y0 + 1, 701), rng.integers(x0 + 1, 901)))
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        assert plane.shape == (700, 900) and plane.channels == 3
        for y0, x0, y1, x1 in boxes:
            np.testing.assert_array_equal(plane.region(np.array([y0, x0, y1, x1])), full[:, y0:y1, x0:x1])
        # Without a pyramid the overview is streamed band by band with the same area weights.
        np.testing.assert_allclose(plane.downscaled((70, 90)), resize(full, (70, 90), "area"), atol=1e-5)


def test_region_reads_decode_only_touched_tiles(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        plane.region(np.array([130, 130, 250, 250]))  # inside one tile
        assert plane.segments_decoded == 1
        plane.region(np.array([100, 100, 140, 140]))  # four tiles, one already cached
        assert plane.segments_decoded == 4


@pytest.mark.parametrize("ome", [False, True])
def test_pyramid_level_is_closest_not_coarser(tmp_path: Path, image: np.ndarray, ome: bool) -> None:
    path = tmp_path / ("p.ome.tif" if ome else "p.tif")
    write_pyramid(path, image, levels=3, ome=ome)
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        assert plane.factors == [1.0, 2.0, 4.0]
        assert plane.choose_level((700, 900)) == 0
        assert plane.choose_level((400, 500)) == 0  # level 1 (350×450) would be coarser than asked
        assert plane.choose_level((350, 450)) == 1
        assert plane.choose_level((200, 260)) == 1
        assert plane.choose_level((175, 225)) == 2
        assert plane.choose_level((10, 10)) == 2
        plane.downscaled((100, 128))
        assert set(plane.decoded_by_level) == {2}  # level 0 never touched
        if ome:
            assert plane.spacing == pytest.approx((0.0005, 0.0005))
        else:
            assert plane.spacing == pytest.approx((0.0005, 0.0005))  # 20000 px/cm


def test_streamed_writer_round_trips_with_tags_and_pyramid(tmp_path: Path) -> None:
    mask = (np.random.default_rng(0).random((1100, 1300)) > 0.7).astype(np.uint8)
    out = tmp_path / "m.ome.tif"
    seen = []
    write_tiled(out, mask.shape, lambda b: mask[b[0] : b[2], b[1] : b[3]], tile=256,
                resolution={"XResolution": (20000, 1), "YResolution": (20000, 1), "ResolutionUnit": 3},
                ome={"PhysicalSizeX": "0.5", "PhysicalSizeY": "0.5", "PhysicalSizeXUnit": "µm"},
                pyramid=True, on_tile=lambda t, box: seen.append((t, box)))
    assert sum(t.size for t, _ in seen) == mask.size
    for t, (y0, x0, y1, x1) in seen:  # each tile comes with its place, in raster order
        np.testing.assert_array_equal(t, mask[y0:y1, x0:x1])
    assert [b for _, b in seen] == sorted(b for _, b in seen)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial/spill file left
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and tif.is_ome
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression == 8  # zlib/deflate
        assert page.tags["XResolution"].value == (20000, 1) and page.tags["ResolutionUnit"].value == 3
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(1100, 1300), (550, 650), (275, 325)]
        np.testing.assert_array_equal(levels[0].asarray(), mask)
        np.testing.assert_array_equal(levels[1].asarray(), mask[::2, ::2])
        np.testing.assert_array_equal(levels[2].asarray(), mask[::4, ::4])
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata


def test_stts_on_a_2k_tiff_never_loads_the_whole_image(tmp_path: Path) -> None:
    img = np.full((2048, 2048, 1), 235, np.uint8)
    truth = np.zeros((2048, 2048), np.uint8)
    for y, x, s in [(300, 400, 40), (1500, 900, 60), (1800, 1800, 30)]:
        img[y : y + s, x : x + s] = 20
        truth[y : y + s, x : x + s] = 1
    path = tmp_path / "big.tif"
    write_pyramid(path, img, levels=4, tile=128)
    fine = FunctionPredictor(identity_probs)
    with TiffPlane(path, spec=DTYPE, channels_want=1) as plane:
        res = stts(plane, FunctionPredictor(identity_probs), fine, size=256, lazy=True, spill_dir=tmp_path)
        labels = np.asarray(res.labels)
        level0_tiles = (2048 // 128) ** 2
        assert plane.level_reads == [3]  # rough view from the 256² level
        assert plane.decoded_by_level.get(0, 0) < 0.1 * level0_tiles
        assert plane.bytes_decoded < 0.15 * img.nbytes
    assert res.info["crops"] == 3 and fine.items == 3
    np.testing.assert_array_equal(labels, truth)
    res.labels.store.close()


def mosaic(h: int = 1024, w: int = 1280, seed: int = 3) -> np.ndarray:
    """Dense texture of overlapping dark blobs of varied contrast, so boxes touch and overlap."""
    return slide(h, w, 300, seed=seed, rgb=False)[..., 0]


def test_bounded_path_equals_in_memory_path_engine_level(tmp_path: Path) -> None:
    img = mosaic(640, 768)
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    x = img[None].astype(np.float32) / 255.0

    def smooth(batch: np.ndarray) -> np.ndarray:  # not a hard threshold: exercises the fusion of floats
        p = 1.0 / (1.0 + np.exp(-(0.6 - batch[:, :1]) * 12))
        return np.concatenate([1 - p, p], axis=1)

    kw = {"size": 64, "max_zoom": 1.5, "batch_size": 8, "keep_coarse": True}
    ref = stts(ArrayPlane(x), FunctionPredictor(smooth), FunctionPredictor(smooth), **kw)
    with TiffPlane(path, spec=DTYPE, channels_want=1) as plane:
        lazy = stts(plane, FunctionPredictor(smooth), FunctionPredictor(smooth), lazy=True, spill_dir=tmp_path,
                    prefetch=True, **kw)
        np.testing.assert_array_equal(np.asarray(lazy.labels), ref.labels)
    assert ref.info["boxes_tiled"] >= 1 and ref.info["crops"] > 3
    lazy.labels.store.close()


def test_bounded_path_equals_in_memory_path_api(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", size=32, normalization=DTYPE)
    img = mosaic(600, 700)
    tifffile.imwrite(tmp_path / "m.tif", img, tile=(128, 128), compression="zlib",
                     resolution=(10000, 10000), resolutionunit=3)
    common = {"method": "stts", "max_downscale": 8, "max_zoom": 4}
    mem = Segmenter(bundle, **common).predict_file(tmp_path / "m.tif", tmp_path / "mem.tif")
    lazy = Segmenter(bundle, lazy_pixels=0, pyramid=True, tile_size=256, **common).predict_file(tmp_path / "m.tif",
                                                                                 tmp_path / "lazy.tif")
    assert mem.status == lazy.status == "ok", (mem.error, lazy.error)
    assert lazy.info["bounded_memory"] and "bounded_memory" not in mem.info
    a, b = tifffile.imread(tmp_path / "mem.tif"), tifffile.imread(tmp_path / "lazy.tif")
    np.testing.assert_array_equal(a, b)
    assert mem.voxel_counts == lazy.voxel_counts and mem.area_mm2 == pytest.approx(lazy.area_mm2)
    with tifffile.TiffFile(tmp_path / "lazy.tif") as tif:
        assert tif.pages[0].tags["XResolution"].value == (10000, 1)
        assert len(tif.series[0].levels) == 2


def test_whole_image_method_on_a_too_big_image_fails_clearly(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", size=32, normalization=DTYPE)
    tifffile.imwrite(tmp_path / "big.tif", mosaic(800, 800), tile=(256, 256), compression="zlib")
    rep = Segmenter(bundle, method="direct", max_memory="300MB").predict_file(tmp_path / "big.tif",
                                                                              tmp_path / "o.tif")
    assert rep.status == "failed"
    assert "big.tif" in rep.error and "--method direct" in rep.error and "stts" in rep.error
    assert "\n" not in rep.error and "MB" in rep.error
    assert not (tmp_path / "o.tif").exists()
    # stts takes the bounded path. The budget bounds the whole process, and this one is pytest's (torch and
    # all): the budget is what it holds now plus room for the plan (segcli.memplan).
    from segcli.memplan import rss_now

    ok = Segmenter(bundle, method="stts", max_memory=rss_now() + 300 * 10**6, lazy_pixels=0).predict_file(
        tmp_path / "big.tif", tmp_path / "o.tif")
    assert ok.status == "ok" and ok.info["bounded_memory"], ok.error


def test_quantized_fusion_gives_the_labels_of_float_fusion() -> None:
    rng = np.random.default_rng(0)
    for t in (0.5, 0.3, 0.9):
        q = Quantizer(t)
        p = np.concatenate([rng.random(10000), [t, np.nextafter(t, 1), np.nextafter(t, 0), 0, 1]]).astype(np.float32)
        codes = q.encode(p)
        np.testing.assert_array_equal(codes >= 128, p > np.float32(t))
        np.testing.assert_array_equal(q.decode(codes) > t, p > np.float32(t))
        assert np.abs(q.decode(codes) - p).max() < 1 / 100
        assert np.all(np.diff(q.encode(np.sort(p)).astype(int)) >= 0)  # monotone: max commutes
    # the labels-only codes (no probabilities will be read: a photo's in-memory stts) give the same labels and
    # coverage, and refuse to pose as probabilities
    stores = [FuseStore((300, 300), 2, 0.5, tile=64, spill_dir=".", cache_bytes=1),
              FuseStore((300, 300), 2, 0.5, tile=64, labels_only=True)]
    ref = np.zeros((300, 300), np.float32)
    cov = np.zeros((300, 300), bool)
    for _ in range(30):
        y, x, s = rng.integers(0, 250), rng.integers(0, 250), rng.integers(5, 50)
        p = rng.random((s, s)).astype(np.float32)
        cov[y : y + s, x : x + s] = True
        for store in stores:
            store.fuse((y, x, y + s, x + s), np.stack([1 - p, p]))
        np.maximum(ref[y : y + s, x : x + s], p, out=ref[y : y + s, x : x + s])
    for store in stores:
        np.testing.assert_array_equal(store.labels((0, 0, 300, 300)), (ref > 0.5).astype(np.uint8))
        np.testing.assert_array_equal(store.covered(store.read((0, 0, 300, 300))), cov)
    with pytest.raises(RuntimeError, match="no probabilities"):
        stores[1].probs((0, 0, 300, 300))
    stores[0].close()


def test_zoom_tiles_partition_big_boxes() -> None:
    boxes = np.array([[0, 0, 100, 100], [50, 60, 1050, 900]])
    crops, writes, n = zoom_tiles(boxes, 64, 4.0)
    assert n == 1 and len(crops) > 2
    assert np.all((crops[:, 2] - crops[:, 0]) <= 256) and np.all((crops[:, 3] - crops[:, 1]) <= 256)
    cover = np.zeros((1100, 1000), np.int32)
    for w, c in zip(writes[1:], crops[1:], strict=True):
        assert c[0] <= w[0] and c[1] <= w[1] and w[2] <= c[2] and w[3] <= c[3]
        cover[w[0] : w[2], w[1] : w[3]] += 1
    assert np.all(cover[50:1050, 60:900] == 1) and cover.sum() == 1000 * 840


def test_rough_pass_is_tiled_above_max_downscale() -> None:
    img = np.ones((1, 1000, 1200), np.float32)
    img[0, 100:130, 200:230] = 0.0
    coarse = FunctionPredictor(identity_probs)
    res = stts(ArrayPlane(img), coarse, FunctionPredictor(identity_probs), size=64, max_downscale=4)
    assert res.info["rough_tiled"] and res.info["rough_shape"] == [250, 300] and coarse.items > 1
    assert res.labels[100:130, 200:230].all() and res.labels.sum() == 900
    small = stts(ArrayPlane(img), FunctionPredictor(identity_probs), FunctionPredictor(identity_probs), size=64)
    assert not small.info["rough_tiled"]


def test_volume_slices_are_normalised_like_the_whole_volume(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", size=32, normalization={"kind": "percentile", "lower": 1, "upper": 99})
    vol = np.random.default_rng(0).normal(100, 30, (6, 40, 50, 1)).astype(np.float32)
    seg = Segmenter(bundle, method="direct")
    b = seg.bundle_for("volume")
    fn = slice_normalizer(vol, b)
    from segcli import normalize as norm

    whole = norm.normalize(vol, b.normalization)
    np.testing.assert_array_equal(fn(vol[2]), whole[2])
    # Slicing along a non-first axis (coarsest spacing on Y) gives a mask of the volume's shape.
    res, _ = seg.segment_array(vol, kind="volume", spacing=(1.0, 5.0, 1.0))
    assert res.labels.shape == (6, 40, 50) and res.info["slice_axis"] == 1


def test_parse_size() -> None:
    assert memory.parse_size("2GB") == 2 * 10**9
    assert memory.parse_size("1.5g") == 1_500_000_000
    assert memory.parse_size("512MiB") == 512 * 2**20
    assert memory.parse_size(None) is None and memory.parse_size("auto") is None
    with pytest.raises(UsageError):
        memory.parse_size("lots")


def test_stats_on_the_bounded_path_equal_whole_mask_stats(tmp_path: Path) -> None:
    """--stats for a TIFF read by region: gathered tile by tile while the mask streams out."""
    from segcli.stats import label_stats

    img = np.full((1100, 1300), 235, np.uint8)  # bright glass; objects are dark (see identity_probs)
    for i, (y, x, s) in enumerate([(40, 60, 30), (250, 250, 200), (700, 1000, 120), (1000, 100, 60)]):
        img[y : y + s, x : x + s] = 10 + i * 10
    img[600:606, 0:1300] = 5  # a thin line crossing every tile column
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, img, tile=(256, 256), compression="zlib")
    bundle = make_bundle(tmp_path / "b", size=64, normalization={"kind": "dtype"})
    seg = Segmenter(bundle, lazy_pixels=0, tile_size=128)
    b = seg.bundle_for("2d")
    for role in ("coarse", "fine"):
        seg.set_predictor(b, role, FunctionPredictor(identity_probs))
    rep = seg.predict_file(src, tmp_path / "m.tif", stats=True)
    assert rep.status == "ok" and rep.info["bounded_memory"]
    mask = tifffile.imread(tmp_path / "m.tif")
    want = label_stats(mask, b.classes, None)
    assert rep.stats == want and want[0]["components"] >= 3 and want[0]["voxels"] > 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
def test_mask_tiles_encoded_by_segcli_read_back_with_libtiff(tmp_path, dtype):
    """write_tiled encodes a mask's tiles itself (an empty tile once, edge tiles padded): tifffile and
    OpenSlide (libtiff) read back the exact labels, glass tiles, edge tiles and the pyramid included."""
    import openslide  # a test dependency (pyproject's test extra)

    H, W = 1100, 1300
    a = np.zeros((H, W), dtype)
    a[600:, 700:] = (np.arange(500 * 600).reshape(500, 600) % (250 if dtype == np.uint8 else 70000)) + 1
    path = write_tiled(tmp_path / "m.tif", (H, W), lambda b: a[b[0] : b[2], b[1] : b[3]], dtype=dtype, tile=512,
                       pyramid=True)
    with tifffile.TiffFile(path) as tif:
        assert np.array_equal(tif.pages[0].asarray(), a)
        assert np.array_equal(tif.series[0].levels[1].asarray(), a[::2, ::2])
    if dtype == np.uint8:
        s = openslide.OpenSlide(str(path))
        assert np.array_equal(np.asarray(s.read_region((0, 0), 0, (W, H)))[..., 0], a)


def test_spilled_tiles_written_by_a_thread_read_back_exactly_and_a_failed_write_is_never_read_as_empty(
        tmp_path, monkeypatch) -> None:
    """A TileStore whose budget holds more than its two-row cache writes evicted tiles in a thread: whatever the
    order of writes, reads and re-writes, it returns what a store held in memory returns; a write that fails
    (a full disk) is raised by the next use of the store."""
    import errno

    import segcli.tiles as tiles

    rng = np.random.default_rng(3)
    ref = np.zeros((2, 640, 640), np.float32)
    # 64² tiles, 10 a row: a cache of 22 tiles and 8 more for writes in flight
    store = tiles.TileStore((640, 640), 2, np.float32, 0.0, tile=64, spill_dir=tmp_path, cache_bytes=30 * 2 * 64 * 64 * 4)
    assert store.cache_tiles == 22 and store._spare == 8
    for _ in range(400):  # boxes anywhere: tiles are evicted, taken back while written, written again
        y, x, s = rng.integers(0, 600), rng.integers(0, 600), rng.integers(4, 120)
        v = rng.random((2, min(s, 640 - y), min(s, 640 - x))).astype(np.float32)
        store.add((y, x, y + v.shape[1], x + v.shape[2]), v)
        ref[:, y : y + v.shape[1], x : x + v.shape[2]] += v
    assert store._writes or store._slots  # it did spill
    np.testing.assert_allclose(store.read((0, 0, 640, 640)), ref, rtol=1e-6)
    store.close()

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = tiles.TileStore((640, 640), 2, np.float32, 0.0, tile=64, spill_dir=tmp_path, cache_bytes=30 * 2 * 64 * 64 * 4)
    monkeypatch.setattr(tiles.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        for y in range(0, 640, 64):  # row after row: tiles of the first rows are evicted and fail to write
            store.add((y, 0, y + 64, 640), np.ones((2, 64, 640), np.float32))
        store.read((0, 0, 640, 640))
    store.close()


def test_a_tile_taken_back_and_written_again_is_never_read_from_its_first_write(tmp_path, monkeypatch) -> None:
    """A tile evicted, taken back, changed and evicted again while its first write is slow: once that first write
    is done, the tile is read from memory until its second write is, never from the file in between."""
    import time

    import segcli.tiles as tiles

    real = tiles.os.pwrite

    def slow(fd, data, offset):  # the bytes land at once, the call returns late
        n = real(fd, data, offset)
        time.sleep(0.05)
        return n

    monkeypatch.setattr(tiles.os, "pwrite", slow)
    # 64² float32 tiles, one row of 2: two rows + 2 = 6 cached, 2 more in flight
    store = tiles.TileStore((64, 128), 1, np.float32, 0.0, tile=64, spill_dir=tmp_path, cache_bytes=8 * 64 * 64 * 4)
    store.cache_tiles, store._spare = 1, 2  # one tile cached: every other tile is evicted at once
    one = np.ones((1, 64, 64), np.float32)
    store.add((0, 0, 64, 64), one)          # tile A
    store.add((0, 64, 64, 128), one)        # tile B: A evicted, first write of A starts (slow)
    store.add((0, 0, 64, 64), one)          # A taken back from the pending set (2 now), B evicted
    store.add((0, 64, 64, 128), one)        # B taken back, A evicted again: second write of A queued
    time.sleep(0.08)                         # A's first write done (the tile as it was then); B's in flight
    store._reap()                            # A's first write reaped: A must stay pending
    np.testing.assert_array_equal(store.read((0, 0, 64, 64)), 2 * one)
    store.close()
