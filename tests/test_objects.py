"""Instances as objects: one GeoJSON detection and one CSV row per instance, with known measurements."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from segcli.errors import SegcliError
from segcli.instances import split_touching
from segcli.objects import describe, measure, outlines, stain_od


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _two_touching_discs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = _disc((64, 96), 32, 30, 14), _disc((64, 96), 32, 56, 14)  # centres 26 px apart: they overlap
    return a | b, a, b


def _raster(geometry: dict, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the GeoJSON geometry (an independent reader: shapely)."""
    import shapely

    g = shapely.geometry.shape(geometry)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return shapely.contains_xy(g, xx.ravel() + 0.5, yy.ravel() + 0.5).reshape(shape)


def test_two_touching_discs_become_two_features_with_their_own_pixels(tmp_path):
    from segcli.objects import ObjectSink

    fg, a, b = _two_touching_discs()
    inst = split_touching(fg)
    assert inst.max() == 2
    path = tmp_path / "o.geojson"
    sink = ObjectSink(["background", "nucleus"], path, tmp_path / "o.csv", input_name="x.png")
    sink.add(describe(inst, fg.astype(np.uint8), spacing=(0.0005, 0.0005)))
    summary = sink.close()
    assert summary["geojson"]["features"] == 2 and summary["objects_csv"]["rows"] == 2
    doc = json.loads(path.read_text())
    feats = doc["features"]
    assert len(feats) == 2
    for f in feats:
        p = f["properties"]
        assert p["objectType"] == "detection" and p["classification"]["name"] == "nucleus"
        i = int(p["metadata"]["instance"])
        pix = inst == i
        assert np.array_equal(_raster(f["geometry"], fg.shape), pix)  # the polygon is exactly the instance
        m = p["measurements"]
        assert m["Area px"] == int(pix.sum())
        assert m["Area \u00b5m^2"] == pytest.approx(pix.sum() * 0.25)  # 0.5 µm pixels
        assert 0.5 < m["Solidity"] <= 1.0 and 0 < m["Circularity"] <= 1.0 and m["Perimeter \u00b5m"] > 0
    # the two halves together are the two discs' union, split near the middle
    areas = sorted(f["properties"]["measurements"]["Area px"] for f in feats)
    assert sum(areas) == int(fg.sum()) and areas[1] - areas[0] < 0.05 * areas[1]
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert [int(r["area_px"]) for r in sorted(rows, key=lambda r: int(r["id"]))] == \
        [int((inst == 1).sum()), int((inst == 2).sum())]
    assert not list(tmp_path.glob(".*"))  # no partial file left


def test_measurements_of_a_disc_and_a_square_have_known_answers():
    inst = np.zeros((80, 80), np.uint32)
    inst[_disc((80, 80), 20, 20, 10)] = 1
    inst[50:70, 40:60] = 2  # a 20 x 20 square
    rows = {r["id"]: r for r in measure(inst, offset=(100, 1000))}
    disc, sq = rows[1], rows[2]
    assert disc["area_px"] == int((inst == 1).sum()) and disc["area_um2"] is None and disc["perimeter_unit"] == "px"
    assert (disc["centroid_x"], disc["centroid_y"]) == (1020.5, 120.5)  # QuPath's frame: pixel centres at +0.5
    assert (disc["bbox_x0"], disc["bbox_y0"], disc["bbox_x1"], disc["bbox_y1"]) == (1010, 110, 1031, 131)
    assert disc["circularity"] > 0.9 and 0.9 < disc["solidity"] < 1.0  # a digital disc's staircase is not convex
    assert sq["area_px"] == 400 and sq["solidity"] == 1.0
    assert sq["perimeter"] == pytest.approx(80, abs=4)  # regionprops' estimate of a 20-px square's outline
    assert sq["circularity"] == pytest.approx(4 * np.pi * 400 / sq["perimeter"] ** 2, abs=1e-3)
    assert sq["hematoxylin_od_mean"] is None
    ell = np.zeros((4, 4), np.uint32)
    ell[1, 1] = ell[1, 2] = ell[2, 1] = 5  # three pixel squares: hull 2 x 2 less half a pixel
    assert measure(ell)[0]["solidity"] == pytest.approx(3 / 3.5, abs=1e-4)


def test_stain_od_follows_ruifrok_johnston():
    """A pixel of pure haematoxylin colour (OD along the H vector) unmixes to H only, in OD units."""
    from skimage.color import rgb_from_hed

    h_vec = rgb_from_hed[0]  # Ruifrok-Johnston's haematoxylin OD vector (unit length)
    rgb = 255.0 * 10 ** (-0.8 * h_vec)  # OD 0.8 of haematoxylin
    h, e = stain_od(rgb.reshape(1, 1, 3))
    assert float(h[0, 0]) == pytest.approx(0.8, abs=1e-3) and abs(float(e[0, 0])) < 1e-3
    white = np.full((1, 1, 3), 255, np.uint8)
    assert float(stain_od(white)[0][0, 0]) == 0.0
    as_bytes = np.rint(rgb).astype(np.uint8).reshape(1, 1, 3)  # the 8-bit lookup path agrees
    assert float(stain_od(as_bytes)[0][0, 0]) == pytest.approx(0.8, abs=0.01)
    # A 16-bit slide is measured against its own white (65535), not the 8-bit scale (OD 0 above 255 before).
    as_words = np.rint(rgb * 257).astype(np.uint16).reshape(1, 1, 3)
    assert float(stain_od(as_words)[0][0, 0]) == pytest.approx(0.8, abs=1e-3)
    assert float(stain_od(np.full((1, 1, 3), 65535, np.uint16))[0][0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(stain_od((rgb / 255).reshape(1, 1, 3))[0][0, 0]) == pytest.approx(0.8, abs=1e-3)  # 0-1 floats
    with pytest.raises(SegcliError, match="white level is unknown"):
        stain_od(np.full((1, 1, 3), 4000.0))


def test_an_instance_of_corner_joined_parts_is_one_multipolygon():
    inst = np.zeros((6, 6), np.uint32)
    inst[1, 1] = inst[2, 2] = 7  # two pixels of one id meeting at a corner
    inst[1, 2] = 3  # and a neighbour of another id between them
    geo = outlines(inst)
    assert geo[7][0] == "MultiPolygon" and geo[3][0] == "Polygon"
    assert len(json.loads(geo[7][1])) == 2


def test_predict_instances_geojson_and_stats_agree_with_the_label_image(tmp_path, rgb_bundle):
    """Through the CLI: one feature and one CSV row per instance; every polygon rasterises to its instance."""
    import tifffile
    from PIL import Image

    from tests.conftest import run_cli

    rng = np.random.default_rng(1)
    img = (rng.random((80, 96, 3)) * 60 + 180).astype(np.uint8)
    fg, _, _ = _two_touching_discs()
    img[16:80][fg] = (90, 40, 140)
    src = tmp_path / "he.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "out"
    r = run_cli("predict", src, "-o", out, "--model", rgb_bundle, "--instances", "--geojson",
                "--stats", tmp_path / "stats.csv", "--json")
    assert r.returncode == 0, r.stderr
    inst = tifffile.imread(out / "he_seg_instances.tif")
    doc = json.loads((out / "he_seg.geojson").read_text())
    ids = sorted(int(f["properties"]["metadata"]["instance"]) for f in doc["features"])
    assert ids == list(range(1, int(inst.max()) + 1))
    for f in doc["features"]:
        i = int(f["properties"]["metadata"]["instance"])
        assert np.array_equal(_raster(f["geometry"], inst.shape), inst == i)
    rows = list(csv.DictReader((out / "he_seg_objects.csv").open()))
    assert len(rows) == int(inst.max())
    assert all(int(r["area_px"]) == int((inst == int(r["id"])).sum()) for r in rows)
    rep = json.loads(r.stdout)["files"][0]
    assert rep["info"]["objects_csv"]["rows"] == len(rows)


def test_whole_image_measurements_equal_scikit_image_regionprops():
    """measure() computes area, box, centroid and perimeter of all objects in whole-image passes: they equal
    skimage.measure.regionprops' per-object values, touching objects and image edges included."""
    from skimage.measure import regionprops

    rng = np.random.default_rng(5)
    inst = np.zeros((120, 150), np.uint32)
    for k in range(1, 40):  # overlapping discs: later ids cut into earlier ones, some reach the edges
        inst[_disc(inst.shape, *rng.uniform((0, 0), inst.shape), rng.uniform(3, 14))] = k
    rows = {r["id"]: r for r in measure(inst)}
    props = regionprops(inst)
    assert sorted(rows) == [p.label for p in props]
    for p in props:
        r = rows[p.label]
        assert r["area_px"] == p.area
        assert (r["bbox_y0"], r["bbox_x0"], r["bbox_y1"], r["bbox_x1"]) == tuple(p.bbox)
        assert r["perimeter"] == round(p.perimeter, 4)
        assert (r["centroid_y"], r["centroid_x"]) == pytest.approx((p.centroid[0] + 0.5, p.centroid[1] + 0.5), abs=1e-3)
