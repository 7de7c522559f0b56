"""GeoJSON writer: polygons rasterised back equal the mask, objects across tile edges are one feature, schema."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("cv2")
shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402

from segcli.io.geojson import GeoJSONWriter, write_geojson  # noqa: E402

# RFC 7946 structure, as far as this writer uses it: a FeatureCollection of Features whose geometry is a
# Polygon (or a MultiPolygon), each ring a closed list of at least four [x, y] positions.
_POSITION = {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "number"}}
_RING = {"type": "array", "minItems": 4, "items": _POSITION}
_POLYGON = {
    "type": "object",
    "required": ["type", "coordinates"],
    "properties": {"type": {"const": "Polygon"}, "coordinates": {"type": "array", "minItems": 1, "items": _RING}},
}
_MULTIPOLYGON = {
    "type": "object",
    "required": ["type", "coordinates"],
    "properties": {
        "type": {"const": "MultiPolygon"},
        "coordinates": {"type": "array", "minItems": 2, "items": {"type": "array", "minItems": 1, "items": _RING}},
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": ["string", "number"]},
                    "geometry": {"oneOf": [_POLYGON, _MULTIPOLYGON]},
                    "properties": {
                        "type": "object",
                        "required": ["objectType", "classification"],
                        "properties": {
                            "objectType": {"enum": ["annotation", "detection"]},
                            "classification": {
                                "type": "object",
                                "required": ["name", "color"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "color": {"type": "array", "minItems": 3, "maxItems": 3,
                                              "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                                },
                            },
                            "measurements": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}


@functools.cache
def _validator():
    """One checked validator for the session: ``jsonschema.validate`` re-checks the schema on every call and
    ranks every error it finds (a second of CPU per document)."""
    jsonschema = pytest.importorskip("jsonschema")
    cls = jsonschema.validators.validator_for(SCHEMA)
    cls.check_schema(SCHEMA)
    return cls(SCHEMA)


def validate(doc: dict) -> None:
    """JSON Schema validation, plus what a schema cannot say: every ring is closed."""
    _validator().validate(doc)
    for f in doc["features"]:
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        for poly in polys:
            for ring in poly:
                assert ring[0] == ring[-1], "ring not closed"


def rasterise(geometry: dict, shape_hw: tuple[int, int]) -> np.ndarray:
    """Fill a pixel-edge polygon at pixel centres (even-odd over all rings, so holes stay empty).

    Every edge must be axis-aligned between integer corners; each vertical edge at x toggles the pixels
    from column x on, in the rows whose centres (y + 0.5) it spans.
    """
    H, W = shape_hw
    toggles = np.zeros((H, W + 1), np.int64)
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    for poly in polys:
        for ring in poly:
            r = np.asarray(ring)
            assert r.dtype.kind == "i", "coordinates must be integer pixel corners"
            for (xa, ya), (xb, yb) in zip(r[:-1], r[1:], strict=True):
                assert xa == xb or ya == yb, "edge not along a pixel edge"
                if xa == xb and ya != yb:
                    lo, hi = sorted((ya, yb))
                    toggles[lo:hi, xa] += 1
    return (np.cumsum(toggles, axis=1)[:, :W] % 2).astype(bool)


def load(path: Path) -> dict:
    doc = json.loads(path.read_text(encoding="utf-8"))
    validate(doc)
    return doc


def check_roundtrip(labels: np.ndarray, classes: list[str], doc: dict) -> None:
    """Each 4-connected object of each class is exactly one feature that rasterises back to it."""
    H, W = labels.shape
    by_name = {n: i for i, n in enumerate(classes)}
    feats = doc["features"]
    covered = np.zeros(labels.shape, np.int64)
    seen: set[tuple[int, int]] = set()
    comps = {}
    for c in range(1, len(classes)):
        comps[c] = ndimage.label(labels == c)
    assert len(feats) == sum(n for _, n in comps.values())
    for f in feats:
        g = f["geometry"]
        assert g["type"] == "Polygon", "a connected object must be one Polygon"
        poly = shape(g)
        assert poly.is_valid, shapely.is_valid_reason(poly)
        assert poly.exterior.is_ccw and not any(h.is_ccw for h in poly.interiors)  # RFC 7946 / shapely orient
        c = by_name[f["properties"]["classification"]["name"]]
        r = rasterise(g, (H, W))
        lab, _ = comps[c]
        ids, n = np.unique(lab[r], return_counts=True)
        k = int(ids[np.argmax(n)])
        assert k > 0
        obj = lab == k
        iou = (obj & r).sum() / (obj | r).sum()
        assert iou >= 0.99, iou
        assert iou == 1.0  # the tracing is exact
        assert (c, k) not in seen, "object written twice"
        seen.add((c, k))
        assert f["properties"]["measurements"]["Area (px)"] == int(obj.sum()) == poly.area
        covered += r
    assert covered.max(initial=0) <= 1
    assert int(covered.sum()) == int((labels > 0).sum())


def blobs(shape_hw: tuple[int, int], n: int, seed: int, n_classes: int = 2, rmax: int = 9) -> np.ndarray:
    """Random discs and rings (with holes) of several classes."""
    rng = np.random.default_rng(seed)
    H, W = shape_hw
    lab = np.zeros(shape_hw, np.uint8)
    yy, xx = np.mgrid[:H, :W]
    for _ in range(n):
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        r = rng.integers(1, rmax + 1)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        disc = d2 <= r * r
        if r >= 4 and rng.random() < 0.4:
            disc &= d2 > (r // 2) ** 2
        lab[disc] = rng.integers(1, n_classes + 1)
    return lab


@pytest.mark.parametrize("tile", [5, 16, 33, 1024])
def test_roundtrip_blobs(tmp_path: Path, tile: int) -> None:
    classes = ["background", "tumor", "nucleus"]
    labels = blobs((96, 130), 60, seed=tile)
    out = tmp_path / "m.geojson"
    summary = write_geojson(out, labels, classes, tile=tile, detection_classes={"nucleus"})
    doc = load(out)
    check_roundtrip(labels, classes, doc)
    assert summary["features"] == len(doc["features"])
    assert sum(summary["objects"].values()) == len(doc["features"])
    assert summary["connectivity"] == 4


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tile", [3, 8])
def test_roundtrip_noise(tmp_path: Path, seed: int, tile: int) -> None:
    """Salt-and-pepper masks: corner-touching pixels, holes touching at corners, objects across many tiles."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((40, 45)) < [0.35, 0.5, 0.6, 0.75][seed]).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] *= 2
    classes = ["bg", "a", "b"]
    out = tmp_path / "n.geojson"
    write_geojson(out, labels, classes, tile=tile)
    check_roundtrip(labels, classes, load(out))


def test_one_pixel_is_unit_square(tmp_path: Path) -> None:
    labels = np.zeros((4, 5), np.uint8)
    labels[1, 3] = 1
    write_geojson(tmp_path / "p.geojson", labels, ["bg", "dot"])
    (f,) = load(tmp_path / "p.geojson")["features"]
    ring = f["geometry"]["coordinates"][0]
    assert len(f["geometry"]["coordinates"]) == 1
    assert sorted(map(tuple, ring[:-1])) == [(3, 1), (3, 2), (4, 1), (4, 2)]
    assert shape(f["geometry"]).area == 1


def test_hole_is_inner_ring(tmp_path: Path) -> None:
    labels = np.zeros((30, 30), np.uint8)
    yy, xx = np.mgrid[:30, :30]
    d2 = (yy - 15) ** 2 + (xx - 14) ** 2
    labels[(d2 <= 100) & (d2 > 16)] = 1
    for tile in (64, 10):  # inside one tile, and cut into nine pieces
        out = tmp_path / f"ring{tile}.geojson"
        write_geojson(out, labels, ["bg", "gland"], tile=tile)
        (f,) = load(out)["features"]
        rings = f["geometry"]["coordinates"]
        assert len(rings) == 2, "one exterior and one hole"
        r = rasterise(f["geometry"], labels.shape)
        assert np.array_equal(r, labels == 1)
        assert not r[15, 14]  # the hole stays empty
        assert shape(f["geometry"]).area == (labels == 1).sum()


def test_hole_touching_exterior_at_a_corner(tmp_path: Path) -> None:
    # the background pixel (1, 1) is enclosed; it touches the outside (2, 2) only at a corner point
    labels = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.uint8)
    write_geojson(tmp_path / "c.geojson", labels, ["bg", "x"])
    doc = load(tmp_path / "c.geojson")
    check_roundtrip(labels, ["bg", "x"], doc)
    assert len(doc["features"][0]["geometry"]["coordinates"]) == 2


def test_corner_touching_pixels_are_separate_objects(tmp_path: Path) -> None:
    labels = np.eye(6, dtype=np.uint8)  # a diagonal line: six objects under 4-connectivity
    write_geojson(tmp_path / "d.geojson", labels, ["bg", "x"], tile=4)
    doc = load(tmp_path / "d.geojson")
    assert len(doc["features"]) == 6
    check_roundtrip(labels, ["bg", "x"], doc)


def test_object_across_tile_edges_counted_once(tmp_path: Path) -> None:
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 28:40] = 1  # crosses the vertical edge at x = 32
    labels[26:38, 26:38] = 1  # crosses the tile corner (32, 32): four tiles
    labels[3:5, 3:5] = 1  # inside one tile
    out = tmp_path / "e.geojson"
    summary = write_geojson(out, labels, ["bg", "cell"], tile=32)
    doc = load(out)
    assert len(doc["features"]) == 3
    assert summary["objects"] == {"cell": 3}
    check_roundtrip(labels, ["bg", "cell"], doc)
    areas = sorted(shape(f["geometry"]).area for f in doc["features"])
    assert areas == [4, 120, 144]
    for f in doc["features"]:  # merged pieces leave no vertices on the seams: a rectangle has four corners
        assert len(f["geometry"]["coordinates"][0]) == 5


def test_shapes_that_join_and_split_across_tiles(tmp_path: Path) -> None:
    """A U (two pieces that meet rows later), an upside-down U, a long snake, a frame around many tiles."""
    labels = np.zeros((80, 90), np.uint8)
    labels[5:40, 5:9] = 1
    labels[5:40, 25:29] = 1
    labels[36:40, 5:29] = 1  # U: arms joined at the bottom
    labels[45:75, 5:30] = 2
    labels[50:75, 10:25] = 0  # upside-down U
    for y in range(2, 78, 6):  # snake
        labels[y : y + 2, 35:88] = 3
        x = 86 if (y // 6) % 2 == 0 else 35
        labels[y : y + 6, x : x + 2] = 3
    labels[78:, :] = 0
    out = tmp_path / "s.geojson"
    classes = ["bg", "u", "n", "snake"]
    for tile in (7, 12, 40):
        write_geojson(out, labels, classes, tile=tile)
        doc = load(out)
        names = sorted(f["properties"]["classification"]["name"] for f in doc["features"])
        assert names == ["n", "snake", "u"]
        check_roundtrip(labels, classes, doc)


def test_big_region_over_many_tiles_with_holes(tmp_path: Path) -> None:
    labels = np.ones((200, 210), np.uint8)
    labels[:, :3] = 0
    labels[20:30, 20:30] = 0  # holes, two of them crossing tile edges
    labels[60:70, 45:55] = 0
    labels[100:130, 100:130] = 2  # an island of another class inside the region
    labels[110:120, 110:120] = 1  # and an island of the first class inside that
    classes = ["bg", "tissue", "tumor"]
    w = GeoJSONWriter(tmp_path / "t.geojson", classes)
    for y in range(0, 200, 16):
        for x in range(0, 210, 16):
            box = (y, x, min(y + 16, 200), min(x + 16, 210))
            w.add_tile(labels[box[0] : box[2], box[1] : box[3]], box)
    summary = w.close()
    doc = load(tmp_path / "t.geojson")
    assert summary["objects"] == {"tissue": 2, "tumor": 1}
    check_roundtrip(labels, classes, doc)
    tissue = max((f for f in doc["features"]), key=lambda f: shape(f["geometry"]).area)
    assert len(tissue["geometry"]["coordinates"]) == 4  # exterior + 2 holes + the tumor's hole
    assert summary["max_open_objects"] <= 14  # the region, and pieces of its holes' islands


def test_chunked_merging_of_a_huge_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object over many tiles is merged in chunks as it grows; the polygon is the same."""
    import segcli.io.geojson as gj

    labels = blobs((120, 120), 30, seed=11, n_classes=1, rmax=12)
    labels[10:110, 10:110] |= 1
    labels[30:40, 30:40] = 0
    ref = tmp_path / "ref.geojson"
    write_geojson(ref, labels, ["bg", "x"], tile=8)
    monkeypatch.setattr(gj, "_CHUNK", 5)
    summary = write_geojson(tmp_path / "chunked.geojson", labels, ["bg", "x"], tile=8)
    doc = load(tmp_path / "chunked.geojson")
    check_roundtrip(labels, ["bg", "x"], doc)
    assert sorted(shapely.normalize(shape(f["geometry"])).wkt for f in doc["features"]) == sorted(
        shapely.normalize(shape(f["geometry"])).wkt for f in load(ref)["features"])
    assert summary["max_open_vertices"] > 0


def test_two_classes_names_colours_and_object_types(tmp_path: Path) -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6] = 1
    labels[2:6, 6:10] = 2  # touching, but another class: two objects
    out = tmp_path / "k.geojson"
    write_geojson(out, labels, ["bg", "nucleus", "stroma"], detection_classes={"nucleus"},
                  colours={"stroma": (1, 2, 3)}, spacing=(0.0005, 0.00025))
    doc = load(out)
    props = {f["properties"]["classification"]["name"]: f["properties"] for f in doc["features"]}
    assert set(props) == {"nucleus", "stroma"}
    assert props["nucleus"]["objectType"] == "detection"
    assert props["stroma"]["objectType"] == "annotation"
    assert props["stroma"]["classification"]["color"] == [1, 2, 3]
    assert props["nucleus"]["classification"]["color"] != [1, 2, 3]
    assert props["nucleus"]["measurements"]["Area (px)"] == 16
    assert props["nucleus"]["measurements"]["Area (µm²)"] == pytest.approx(16 * 0.5 * 0.25)
    assert len({f["id"] for f in doc["features"]}) == 2


def test_offset_shifts_coordinates(tmp_path: Path) -> None:
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0] = 1
    write_geojson(tmp_path / "o.geojson", labels, ["bg", "x"], offset=(100, 7))
    (f,) = load(tmp_path / "o.geojson")["features"]
    assert shape(f["geometry"]).bounds == (7, 100, 8, 101)


def test_empty_mask_is_valid_empty_collection(tmp_path: Path) -> None:
    out = tmp_path / "empty.geojson"
    summary = write_geojson(out, np.zeros((50, 40), np.uint8), ["bg", "x"], tile=16)
    doc = load(out)
    assert doc == {"type": "FeatureCollection", "features": []}
    assert summary["objects"] == {"x": 0}
    with GeoJSONWriter(tmp_path / "none.geojson", ["bg", "x"]):
        pass  # no tile at all
    assert load(tmp_path / "none.geojson")["features"] == []


def test_atomic_and_order_checked(tmp_path: Path) -> None:
    out = tmp_path / "a.geojson"
    out.write_text("old")
    with pytest.raises(ValueError, match="raster order"), GeoJSONWriter(out, ["bg", "x"]) as w:
        w.add_tile(np.ones((4, 4), np.uint8), (0, 0, 4, 4))
        w.add_tile(np.ones((4, 4), np.uint8), (4, 4, 8, 8))  # skips (0, 4)
    assert out.read_text() == "old"  # the old file stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]  # no partial file left behind
    with pytest.raises(ValueError, match="does not fit"):
        GeoJSONWriter(tmp_path / "b.geojson", ["bg", "x"]).add_tile(np.ones((3, 4), np.uint8), (0, 0, 4, 4))


def test_streams_interior_objects(tmp_path: Path) -> None:
    """Objects inside a tile are written as the tile comes; only edge pieces wait."""
    labels = np.zeros((256, 256), np.uint8)
    labels[2::8, 2::8] = 1  # 1024 one-pixel objects, none on a 32-px tile edge
    labels[30:34, :] = 1  # one long object across a whole row of tiles
    out = tmp_path / "s.geojson"
    w = GeoJSONWriter(out, ["bg", "x"])
    written = []
    for y in range(0, 256, 32):
        for x in range(0, 256, 32):
            w.add_tile(labels[y : y + 32, x : x + 32], (y, x, y + 32, x + 32))
            written.append(w._n)
    summary = w.close()
    assert written[0] == 16  # the first tile's objects are out before the second tile comes
    assert summary["features"] == 1024 - 32 + 1
    assert summary["max_open_objects"] <= 2
    check_roundtrip(labels, ["bg", "x"], load(out))


def test_on_tile_of_write_tiled(tmp_path: Path) -> None:
    """The writer as ``write_tiled``'s ``on_tile`` callback gives the same objects as the in-memory path."""
    from segcli.io.bigtiff import write_tiled

    labels = blobs((150, 170), 40, seed=3, rmax=14)
    classes = ["background", "a", "b"]
    out = tmp_path / "w.geojson"
    with GeoJSONWriter(out, classes) as w:
        write_tiled(tmp_path / "m.tif", labels.shape, lambda b: labels[b[0] : b[2], b[1] : b[3]], tile=64,
                    on_tile=w.add_tile)
    doc = load(out)
    check_roundtrip(labels, classes, doc)
    write_geojson(tmp_path / "ref.geojson", labels, classes)
    ref = load(tmp_path / "ref.geojson")

    def geoms(d: dict) -> list:
        return sorted(shapely.normalize(shape(f["geometry"])).wkt for f in d["features"])

    assert geoms(doc) == geoms(ref)


def test_objects_on_seams_are_written_when_complete(tmp_path: Path) -> None:
    """Objects across vertical and horizontal tile edges wait for one tile (or one tile row) only."""
    T, n = 16, 8
    labels = np.zeros((T * n, T * n), np.uint8)
    for ty in range(n):
        for tx in range(1, n):  # a square across every vertical edge, in the middle of the tile row
            labels[ty * T + 6 : ty * T + 9, tx * T - 2 : tx * T + 2] = 1
        if ty:  # and one across the horizontal edge above, inside tile column 0
            labels[ty * T - 2 : ty * T + 2, 5:8] = 1
    w = GeoJSONWriter(tmp_path / "q.geojson", ["bg", "x"])
    after_row = []
    for ty in range(n):
        for tx in range(n):
            box = (ty * T, tx * T, ty * T + T, tx * T + T)
            w.add_tile(labels[box[0] : box[2], box[1] : box[3]], box)
            assert len(w._open) <= n + 1
        after_row.append(w._n)
    summary = w.close()
    # after tile row r, the vertical-edge squares of rows 0..r and the horizontal ones above row r are out
    assert after_row == [(n - 1) * (r + 1) + r for r in range(n)]
    assert summary["features"] == (n - 1) * n + (n - 1)
    check_roundtrip(labels, ["bg", "x"], load(tmp_path / "q.geojson"))


def test_roundtrip_property(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any small mask, any tile size: the polygons are the mask."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    hnp = pytest.importorskip("hypothesis.extra.numpy")
    out = tmp_path_factory.mktemp("prop") / "p.geojson"

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14),
                                 elements=st.integers(0, 2)),
                      st.integers(1, 9), st.integers(1, 9))
    def check(labels: np.ndarray, th: int, tw: int) -> None:
        H, W = labels.shape
        with GeoJSONWriter(out, ["bg", "a", "b"]) as w:
            for y in range(0, H, th):
                for x in range(0, W, tw):
                    box = (y, x, min(y + th, H), min(x + tw, W))
                    w.add_tile(labels[box[0] : box[2], box[1] : box[3]], box)
        check_roundtrip(labels, ["bg", "a", "b"], load(out))

    check()


def test_step_by_step_tracing_gives_the_same_rings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compressed trace (the fast path) and the step-by-step one (its fallback) agree."""
    import cv2

    labels = blobs((70, 90), 40, seed=7)
    rng = np.random.default_rng(7)
    labels[40:70, 60:90] = (rng.random((30, 30)) < 0.5) * 2
    write_geojson(tmp_path / "fast.geojson", labels, ["bg", "a", "b"], tile=32)
    monkeypatch.setattr(cv2, "CHAIN_APPROX_SIMPLE", cv2.CHAIN_APPROX_NONE)
    write_geojson(tmp_path / "slow.geojson", labels, ["bg", "a", "b"], tile=32)
    fast, slow = load(tmp_path / "fast.geojson"), load(tmp_path / "slow.geojson")
    assert [f["geometry"] for f in fast["features"]] == [f["geometry"] for f in slow["features"]]
    check_roundtrip(labels, ["bg", "a", "b"], slow)
