"""Whole-slide images as scanners write them: JPEG / JPEG 2000 / LZW tiles, the Aperio layout, OpenSlide.

Every slide here is a tiny file made in the test (no real slide is committed, no shared data).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcli.errors import InputError
from segcli.io import bigtiff, lazyplane
from segcli.io import openslide_reader as osr
from segcli.io.bigtiff import TiffPlane, tiff_header
from segcli.resize import resize
from tests.conftest import run_cli

imagecodecs = pytest.importorskip("imagecodecs")  # a core dependency: always there where segcli is installed

DTYPE = {"kind": "dtype"}
TILE = 128
H, W = 700, 1000


def tissue(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    """H&E-like RGB: near-white glass, a pink band of tissue and purple nuclei (smooth, so JPEG keeps it)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[h // 5 : 4 * h // 5, w // 6 : 5 * w // 6] = (225, 160, 200)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(40):
        y, x, r = rng.integers(h // 5, 4 * h // 5), rng.integers(w // 6, 5 * w // 6), rng.integers(5, 12)
        img[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = (90, 40, 140)
    return img


def _split_jpeg(stream: bytes) -> tuple[bytes, bytes]:
    """(tables, abbreviated stream): the DQT/DHT segments moved out, as Aperio's JPEGTables tag holds them."""
    assert stream[:2] == b"\xff\xd8"
    i, tables, body = 2, b"", b""
    while stream[i : i + 2] != b"\xff\xda":  # up to the start of scan
        n = struct.unpack(">H", stream[i + 2 : i + 4])[0]
        segment = stream[i : i + 2 + n]
        if stream[i : i + 2] in (b"\xff\xdb", b"\xff\xc4"):
            tables += segment
        else:
            body += segment
        i += 2 + n
    return b"\xff\xd8" + tables + b"\xff\xd9", b"\xff\xd8" + body + stream[i:]


def _write_jpeg_tiles(tw: tifffile.TiffWriter, img: np.ndarray, description: str, **kw) -> None:
    """One tiled page of abbreviated JPEG tiles sharing one JPEGTables tag (YCbCr 4:2:0, like Aperio)."""
    h, w = img.shape[:2]
    bodies, tables = [], set()
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            t = np.zeros((TILE, TILE, 3), np.uint8)
            part = img[y : y + TILE, x : x + TILE]
            t[: part.shape[0], : part.shape[1]] = part
            tab, body = _split_jpeg(bytes(imagecodecs.jpeg8_encode(t, level=90)))
            tables.add(tab)
            bodies.append(body)
    assert len(tables) == 1
    tab = tables.pop()
    tw.write(iter(bodies), shape=img.shape, dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
             photometric="ycbcr", subsampling=(2, 2), description=description, metadata=None,
             extratags=[(347, 7, len(tab), tab, True)], **kw)


def write_svs(path: Path, img: np.ndarray, factors=(4, 16), mpp: float = 0.25, mag: int = 40) -> Path:
    """The Aperio SVS layout: baseline, thumbnail (stripped), reduced levels, then label (LZW) and macro."""
    h, w = img.shape[:2]
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q=90"
    tags = f"|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SS1234|MPP = {mpp:.4f}|Left = 25.1|Top = 18.2"
    with tifffile.TiffWriter(path) as tw:
        _write_jpeg_tiles(tw, img, head + tags)
        thumb = img[::8, ::8]
        tw.write(thumb, compression="jpeg", photometric="rgb", metadata=None,
                 description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - {tags}")
        for f in factors:
            lv = img[::f, ::f]
            _write_jpeg_tiles(tw, lv, f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {lv.shape[1]}x{lv.shape[0]} - {tags}")
        tw.write(np.full((120, 100, 3), 250, np.uint8), compression="lzw", photometric="rgb", subfiletype=1,
                 metadata=None, description="Aperio Image Library v12.0.15 \r\nlabel 100x120")
        tw.write(np.full((160, 400, 3), 200, np.uint8), compression="jpeg", photometric="rgb", subfiletype=9,
                 metadata=None, description="Aperio Image Library v12.0.15 \r\nmacro 400x160")
    return path


@pytest.fixture(scope="module")
def svs(tmp_path_factory) -> tuple[Path, np.ndarray]:
    img = tissue()
    return write_svs(tmp_path_factory.mktemp("slides") / "slide.svs", img), img


def close_to(a: np.ndarray, b: np.ndarray, mean: float = 3.0) -> bool:
    """Equal up to JPEG loss."""
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()) < mean


# -- tifffile + imagecodecs --------------------------------------------------------------------------------

def test_svs_levels_skip_thumbnail_label_and_macro(svs) -> None:
    path, _ = svs
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        assert [(lv.height, lv.width) for lv in plane.levels] == [(700, 1000), (175, 250), (44, 63)]
        assert plane.factors[1] == pytest.approx(4.0)
        assert plane.meta["compression"] == "JPEG" and plane.meta["is_svs"]


def test_svs_mpp_magnification_and_resolution(svs) -> None:
    path, _ = svs
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        assert plane.mpp == pytest.approx((0.25, 0.25))
        assert plane.magnification == 40
        assert plane.spacing == pytest.approx((0.00025, 0.00025))  # mm
        assert plane.meta["mpp_source"] == "aperio" and plane.meta["mpp"] == plane.mpp
        # Tags that say the same thing, for the mask: 40,000 px per cm.
        assert plane.resolution["ResolutionUnit"] == 3
        xr = plane.resolution["XResolution"]
        assert xr[0] / xr[1] == pytest.approx(40000)


def test_jpeg_tiles_read_by_region_decode_only_touched_tiles(svs) -> None:
    path, img = svs
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        a = plane.read_raw((130, 140, 250, 250), 0)  # inside tile (1, 1)
        assert plane.segments_decoded == 1 and plane.decoded_by_level == {0: 1}
        assert close_to(a, img[130:250, 140:250])
        plane.read_raw((100, 100, 140, 140), 0)  # tiles (0,0) (0,1) (1,0) (1,1); (1,1) is cached
        assert plane.segments_decoded == 4
        r = plane.region(np.array([640, 896, 700, 1000]))  # the partial corner tile
        assert r.shape == (3, 60, 104) and plane.segments_decoded == 5
        assert close_to(r * 255, np.moveaxis(img[640:, 896:], -1, 0))


def test_jpeg_levels_read_by_level_and_overview_from_the_pyramid(svs) -> None:
    path, img = svs
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        lv1 = plane.read_raw((0, 0, 175, 250), 1)
        assert close_to(lv1, img[::4, ::4])
        assert set(plane.decoded_by_level) == {1}
        plane.segments_decoded = 0
        plane.decoded_by_level.clear()
        assert plane.downscaled((40, 60)).shape == (3, 40, 60)
        assert plane.level_reads == [2] and set(plane.decoded_by_level) == {2}  # 44×63 is fine enough
        plane.downscaled((50, 70))
        assert plane.level_reads == [2, 1] and 0 not in plane.decoded_by_level  # 44×63 would be coarser


def test_in_memory_reader_finds_aperio_mpp(svs) -> None:
    from segcli.io import open_image

    path, img = svs
    loaded = open_image(path)
    assert loaded.array.shape == img.shape and close_to(loaded.array, img)
    assert loaded.spacing == pytest.approx((0.00025, 0.00025))
    assert loaded.meta["mpp"] == pytest.approx((0.25, 0.25)) and loaded.meta["magnification"] == 40


CODECS = {
    "lzw": ("LZW", 0.0),
    "jpeg2000": ("JPEG2K", 0.0),  # tifffile writes it lossless (reversible) by default
    "webp": ("WEBP", 4.0),
    "jpegxl": ("JPEGXL", 4.0),
    "jpegxr": ("JPEGXR", 4.0),
}


@pytest.mark.parametrize("compression", sorted(CODECS))
def test_other_tile_codecs(tmp_path: Path, compression: str) -> None:
    codec, tolerance = CODECS[compression]
    # imagecodecs is a dependency so that these tiles read: a build without the codec is a failure, not a skip
    assert getattr(imagecodecs, codec).available, f"this imagecodecs build has no {codec}"
    img = tissue(300, 400)
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, img, tile=(TILE, TILE), compression=compression, photometric="rgb")
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        a = plane.read_raw((130, 130, 250, 250), 0)
        assert plane.segments_decoded == 1
        if tolerance == 0.0 and compression == "lzw":
            np.testing.assert_array_equal(a, img[130:250, 130:250])
        else:
            assert close_to(a, img[130:250, 130:250], max(tolerance, 1.0))


# -- OpenSlide ---------------------------------------------------------------------------------------------

def test_openslide_opens_the_same_svs(svs) -> None:
    pytest.importorskip("openslide", reason="openslide-python/openslide-bin not installable on this platform")
    path, img = svs
    assert osr.vendor(path) == "aperio" and osr.slide_header(path) == ((700, 1000), 3, 1)
    with osr.OpenSlidePlane(path, spec=DTYPE, channels_want=3) as plane, TiffPlane(path, spec=DTYPE) as tp:
        assert plane.shape == (700, 1000) and plane.channels == 3
        assert [(lv.height, lv.width) for lv in plane.levels] == [(lv.height, lv.width) for lv in tp.levels]
        assert plane.mpp == pytest.approx((0.25, 0.25)) and plane.magnification == 40
        assert plane.spacing == pytest.approx(tp.spacing) and plane.resolution == tp.resolution
        assert plane.meta["vendor"] == "aperio" and "label" in plane.meta["associated_images"]
        a = plane.read_raw((130, 140, 250, 250), 0)
        assert plane.levels[0].seg == (TILE, TILE) and plane.segments_decoded == 1
        assert close_to(a, tp.read_raw((130, 140, 250, 250), 0), 1.0)
        assert close_to(plane.read_raw((10, 20, 100, 200), 1), tp.read_raw((10, 20, 100, 200), 1), 1.0)
        view = plane.downscaled((70, 100))
        assert set(plane.decoded_by_level) == {0, 1} and plane.level_reads[-1] == 1
        np.testing.assert_allclose(view, tp.downscaled((70, 100)), atol=0.02)


def test_open_plane_routes_by_extension_and_content(svs, tmp_path: Path) -> None:
    pytest.importorskip("openslide", reason="openslide-python/openslide-bin not installable on this platform")
    path, _ = svs
    with osr.open_plane(path, spec=DTYPE) as plane:
        assert isinstance(plane, TiffPlane)
    vendor_named = tmp_path / "slide.scn"  # a vendor extension goes to OpenSlide (which sniffs the content)
    vendor_named.write_bytes(path.read_bytes())
    assert osr.wants_openslide(vendor_named) and not osr.wants_openslide(path)
    with osr.open_plane(vendor_named, spec=DTYPE) as plane:
        assert isinstance(plane, osr.OpenSlidePlane)
    junk = tmp_path / "junk.mrxs"
    junk.write_text("not a slide")
    with pytest.raises(InputError, match="OpenSlide cannot open"):
        osr.open_plane(junk, spec=DTYPE)


def test_missing_openslide_names_the_file_and_the_extra(svs, tmp_path: Path, monkeypatch) -> None:
    path, _ = svs
    monkeypatch.setitem(sys.modules, "openslide", None)  # `import openslide` now raises ImportError
    mrxs = tmp_path / "case 7.mrxs"
    mrxs.write_bytes(b"MIRAX index")
    with pytest.raises(InputError) as info:
        osr.open_plane(mrxs, spec=DTYPE)
    message = str(info.value)
    assert "\n" not in message and str(mrxs) in message and 'pip install "segcli[slides]"' in message
    assert osr.vendor(path) is None and not osr.is_slide(mrxs) and osr.is_slide(path)
    with osr.open_plane(path, spec=DTYPE) as plane:  # a TIFF never needs OpenSlide
        assert isinstance(plane, TiffPlane)


# -- headers, levels, overview memory ----------------------------------------------------------------------

def test_tiff_header(tmp_path: Path, svs) -> None:
    path, _ = svs
    assert tiff_header(path) == ((700, 1000), 3, 1)
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((30, 40), np.uint16))
    assert tiff_header(tmp_path / "g.tif") == ((30, 40), 1, 2)
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((4, 30, 40), np.float32), photometric="minisblack",
                     planarconfig="separate")
    assert tiff_header(tmp_path / "p.tif") == ((30, 40), 4, 4)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 6, 30, 40), np.uint8))
    assert tiff_header(tmp_path / "stack.tif") is None
    (tmp_path / "x.tif").write_bytes(b"II*\x00garbage")
    assert tiff_header(tmp_path / "x.tif") is None


def test_is_reduction() -> None:
    assert bigtiff.is_reduction((700, 1000), (175, 250), (700, 1000))
    assert bigtiff.is_reduction((700, 1000), (44, 63), (175, 250))
    assert not bigtiff.is_reduction((700, 1000), (120, 100), (175, 250))  # a label
    assert not bigtiff.is_reduction((700, 1000), (160, 400), (700, 1000))  # a macro
    assert not bigtiff.is_reduction((700, 1000), (175, 250), (175, 250))  # not smaller


def test_multipage_pyramid_without_subifds_is_used(tmp_path: Path) -> None:
    """Reduced pages as plain main IFDs (NewSubfileType 1) after the baseline, plus a label page."""
    img = tissue(512, 768)
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(TILE, TILE), compression="zlib", metadata=None)
        tw.write(img[::2, ::2], tile=(TILE, TILE), compression="zlib", subfiletype=1, metadata=None)
        tw.write(np.zeros((64, 64, 3), np.uint8), tile=(16, 16), subfiletype=1, metadata=None,
                 description="label")
        tw.write(img[::4, ::4], tile=(TILE, TILE), compression="zlib", subfiletype=1, metadata=None)
    with TiffPlane(path, spec=DTYPE) as plane:
        assert [(lv.height, lv.width) for lv in plane.levels] == [(512, 768), (256, 384), (128, 192)]
        plane.downscaled((128, 192))
        assert set(plane.decoded_by_level) == {2}


def test_overview_streams_runs_of_tiles_without_caching(tmp_path: Path, monkeypatch) -> None:
    """No pyramid: the overview is built from pieces of a few tiles of one tile row, each dropped after
    use, and equals the whole-image area average."""
    img = np.random.default_rng(3).integers(0, 256, (600, 1100, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, img, tile=(64, 64), compression="zlib")
    monkeypatch.setattr(lazyplane, "_CHUNK", 64 * 64 * 3 * 4 * 3)  # three tiles per piece
    with TiffPlane(path, spec=DTYPE, channels_want=3) as plane:
        pieces = list(plane._chunks(0))
        assert all(y1 - y0 <= 64 and x1 - x0 <= 3 * 64 for y0, x0, y1, x1 in pieces)
        view = plane.downscaled((55, 100))
        assert plane._cached == 0 and not plane._cache  # the overview never fills the region cache
        assert plane.segments_decoded == 10 * 18  # every tile exactly once
    full = np.moveaxis(img.astype(np.float32) / 255.0, -1, 0)
    np.testing.assert_allclose(view, resize(full, (55, 100), "area"), atol=1e-5)


# -- end to end ---------------------------------------------------------------------------------------------

def _px_per_cm(path: Path) -> tuple[float, float, int]:
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        xr, yr = tags["XResolution"].value, tags["YResolution"].value
        return xr[0] / xr[1], yr[0] / yr[1], int(tags["ResolutionUnit"].value)


def test_cli_predict_svs_writes_mask_with_the_slide_mpp(svs, rgb_bundle, tmp_path: Path) -> None:
    path, _ = svs
    r = run_cli("predict", path, "-o", f"{tmp_path}/", "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "slide_seg.tif"
    mask = tifffile.imread(out)
    assert mask.shape == (700, 1000) and mask.dtype == np.uint8
    x, y, unit = _px_per_cm(out)
    assert (x, y, unit) == (pytest.approx(40000), pytest.approx(40000), 3)  # 0.25 µm/px


def test_bounded_path_keeps_the_slide_mpp(svs, rgb_bundle, tmp_path: Path) -> None:
    from segcli.api import Segmenter

    path, _ = svs
    rep = Segmenter(rgb_bundle, lazy_pixels=0).predict_file(path, tmp_path / "m.tif")
    assert rep.status == "ok", rep.error
    assert rep.info.get("bounded_memory") and rep.spacing == pytest.approx([0.00025, 0.00025])
    x, y, unit = _px_per_cm(tmp_path / "m.tif")
    assert (x, y, unit) == (pytest.approx(40000), pytest.approx(40000), 3)


def test_ome_physical_size_units_and_objective(tmp_path: Path) -> None:
    """OME-XML PhysicalSizeX/Y in nm and the objective's NominalMagnification; the tags follow the OME size."""
    img = tissue(256, 384)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Instrument ID="Instrument:0"><Objective ID="Objective:0" NominalMagnification="20.0"/></Instrument>'
        '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="384" SizeY="256" '
        'SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="500" PhysicalSizeXUnit="nm" PhysicalSizeY="500" '
        'PhysicalSizeYUnit="nm"><Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
        '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>'
    )
    path = tmp_path / "s.ome.tif"
    # Resolution tags that disagree (72 dpi from an editor): OME wins and the tags are made to agree.
    tifffile.imwrite(path, img, tile=(TILE, TILE), photometric="rgb", description=xml, metadata=None,
                     resolution=(72, 72), resolutionunit=2)
    with TiffPlane(path, spec=DTYPE) as plane:
        assert plane.meta["is_ome"] and plane.meta["mpp_source"] == "ome"
        assert plane.mpp == pytest.approx((0.5, 0.5)) and plane.magnification == 20
        xr = plane.resolution["XResolution"]
        assert plane.resolution["ResolutionUnit"] == 3 and xr[0] / xr[1] == pytest.approx(20000)


def test_plain_tiff_resolution_tags_give_mpp(tmp_path: Path) -> None:
    path = tmp_path / "r.tif"
    tifffile.imwrite(path, tissue(256, 256), tile=(TILE, TILE), resolution=(25400 / 0.5, 25400 / 0.5),
                     resolutionunit=2, photometric="rgb")  # pixels per inch at 0.5 µm/px
    with TiffPlane(path, spec=DTYPE) as plane:
        assert plane.meta["mpp_source"] == "tiff" and plane.mpp == pytest.approx((0.5, 0.5), rel=1e-4)
        assert plane.magnification is None
        assert plane.resolution["ResolutionUnit"] == 2  # the file's own tags agree: kept as they are


@pytest.mark.parametrize("spec", [DTYPE, {"kind": "percentile", "lower": 1, "upper": 99}])
@pytest.mark.parametrize("layout", ["tiled", "striped"])
def test_spilled_overview_equals_downscaled(tmp_path: Path, monkeypatch, spec: dict, layout: str) -> None:
    img = np.random.default_rng(5).integers(0, 256, (500, 900, 3), dtype=np.uint8)
    path = tmp_path / f"{layout}.tif"
    if layout == "tiled":
        tifffile.imwrite(path, img, tile=(64, 64), compression="zlib")
    else:
        tifffile.imwrite(path, img, rowsperstrip=24, compression="zlib")
    monkeypatch.setattr(lazyplane, "_CHUNK", 64 * 64 * 3 * 4 * 3)
    with TiffPlane(path, spec=spec, channels_want=3) as a, TiffPlane(path, spec=spec, channels_want=3) as b:
        want = a.downscaled((47, 83))
        with b.overview_plane((47, 83), spill_dir=tmp_path) as view:
            assert view.shape == (47, 83) and view.channels == 3
            assert not list(tmp_path.glob("segcli-overview-*"))  # unlinked at once
            np.testing.assert_allclose(view.region((0, 0, 47, 83)), want, atol=1e-6)
            np.testing.assert_allclose(view.region((10, 20, 30, 70)), want[:, 10:30, 20:70], atol=1e-6)
        # Later full-resolution regions of the spilled plane are normalised with the same statistics.
        np.testing.assert_allclose(b.region((5, 5, 60, 80)), a.region((5, 5, 60, 80)), atol=1e-6)
