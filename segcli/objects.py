"""Instances as objects: one outline and one row of measurements per object, as QuPath's detections carry.

Measurements (``measure``), per instance id of a uint32 label image:

- area in pixels, and in µm² where the pixel size is known;
- perimeter: scikit-image's ``regionprops`` estimate (boundary pixels weighted by their 4-neighbour pattern,
  closer to the true outline than the staircase length of the pixel-edge polygon), in µm where known;
- circularity ``4π·area / perimeter²`` (1 for a disc, clipped to 1 for the smallest objects whose
  estimated perimeter runs short) and solidity (area / area of the convex hull of its pixel squares, as QuPath
  computes it on an outline);
- for H&E, the mean haematoxylin and eosin optical density: OD = −log10(I / white) per channel (I ≥ 1),
  unmixed with Ruifrok and Johnston's stain vectors (Anal. Quant. Cytol. Histol. 23:291, 2001), the matrix
  of ``skimage.color.rgb2hed``, but kept in OD units as QuPath reports them (rgb2hed rescales by ln 10⁻⁶).

Outlines (``outlines``): each instance's pixels as exact pixel-edge rings (:mod:`segcli.io.contours`). Two
instances that touch share edges, so the 4-connected regions of one id are traced in layers in which no two
regions touch, not even at a corner (a greedy colouring of their contact graph); an instance made of several
such regions (pixels joined only at corners by the watershed) becomes one MultiPolygon.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segcli.errors import SegcliError
from segcli.io.contours import trace_all
from segcli.io.objects_io import ObjectsCSV, ObjectsGeoJSON

#: Columns of the per-object CSV (``--stats`` with ``--instances``), in order.
CSV_FIELDS = ["input", "id", "class", "centroid_x", "centroid_y", "area_px", "area_um2", "bbox_x0", "bbox_y0",
              "bbox_x1", "bbox_y1", "perimeter", "perimeter_unit", "circularity", "solidity",
              "hematoxylin_od_mean", "eosin_od_mean"]


def is_he(bundle: Any, kind: str, channels: int) -> bool:
    """H&E optical densities apply: an RGB image that a content check called H&E, or a bundle made for H&E."""
    modality = str(getattr(bundle, "info", {}).get("modality", ""))
    return channels == 3 and (kind == "he" or "H&E" in modality)


#: −log10(I / 255) of every 8-bit intensity (I = 0 counts as 1): optical density by lookup.
_OD = -np.log10(np.clip(np.arange(256, dtype=np.float64), 1.0, 255.0) / 255.0).astype(np.float32)


def white_level(x: np.ndarray) -> float:
    """The intensity of unstained glass: the integer type's full scale (a 16-bit slide's white is 65535, not
    255: read on the 8-bit scale, every pixel above 255 had an optical density of 0), 1 for 0-1 floats,
    255 for floats on the 8-bit scale; other floats are refused rather than measured against a guess."""
    if x.dtype.kind in "ui":
        return float(np.iinfo(x.dtype).max)
    top = float(np.nanmax(x, initial=0.0))
    if top <= 1.0:
        return 1.0
    if top <= 255.0:
        return 255.0
    raise SegcliError(f"optical density of float pixels up to {top:g}: their white level is unknown "
                      "(measure 8-bit, 16-bit or 0-1 images)")


def stain_od(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin optical density of RGB pixels (``(..., 3)``, any integer type at its full scale,
    or 0-1 / 0-255 floats), float32 each."""
    # lazy: scikit-image brings scipy (~0.4 s to import)
    from skimage.color import hed_from_rgb

    x = np.asarray(rgb)[..., :3]
    if x.dtype == np.uint8:
        od = _OD[x]
    else:
        white = white_level(x)
        od = -np.log10(np.clip(x.astype(np.float32) * np.float32(255.0 / white), 1.0, 255.0) / 255.0)
    hed = od.reshape(-1, 3) @ hed_from_rgb[:, :2].astype(np.float32)
    return hed[:, 0].reshape(od.shape[:-1]), hed[:, 1].reshape(od.shape[:-1])


def _mean_od(inst: np.ndarray, rgb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean H and E optical density of each instance in ``labels``, from its pixels only."""
    fg = inst > 0
    ids = inst[fg].astype(np.int64)
    h, e = stain_od(np.asarray(rgb)[fg])
    n = int(max(ids.max(initial=0), labels.max(initial=0))) + 1
    count = np.maximum(np.bincount(ids, minlength=n), 1)
    return (np.bincount(ids, h, minlength=n)[labels] / count[labels],
            np.bincount(ids, e, minlength=n)[labels] / count[labels])


def _solidity(corners: np.ndarray, area: int) -> float:
    """Area over the area of the convex hull of the object's pixel squares (QuPath's ROI definition);
    ``corners`` are the corners of its border pixels, whose hull is that of all its pixel squares."""
    # lazy: OpenCV costs ~0.15 s to import
    import cv2

    hull = cv2.convexHull(corners)
    return min(1.0, area / max(float(cv2.contourArea(hull)), 1.0))


#: scikit-image's perimeter weights (``skimage.measure.perimeter``, 4-neighbourhood) by neighbour code.
_PERIM_W = np.zeros(50)
_PERIM_W[[5, 7, 15, 17, 25, 27]] = 1
_PERIM_W[[21, 33]] = np.sqrt(2)
_PERIM_W[[13, 23]] = (1 + np.sqrt(2)) / 2
_NEIGHBOURS = [(-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2), (-1, -1, 10), (-1, 1, 10), (1, -1, 10), (1, 1, 10)]


def _borders(inst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every object's border pixels (a 4-neighbour is not the object) at once: their rows, columns and
    perimeter per id (scikit-image's ``regionprops`` perimeter, computed for all objects in one pass: each
    border pixel coded by which of its 8 neighbours are border pixels of the same object, codes weighted)."""
    pad = np.pad(inst, 1)
    c = pad[1:-1, 1:-1]
    border = (c > 0) & ((pad[:-2, 1:-1] != c) | (pad[2:, 1:-1] != c) | (pad[1:-1, :-2] != c) | (pad[1:-1, 2:] != c))
    ys, xs = np.nonzero(border)
    ids = c[ys, xs].astype(np.int64)
    bpad = np.pad(border, 1)
    code = np.ones(len(ys), np.int64)
    for dy, dx, w in _NEIGHBOURS:
        y2, x2 = ys + 1 + dy, xs + 1 + dx
        code += w * ((pad[y2, x2] == ids) & bpad[y2, x2])
    hist = np.bincount(ids * 50 + code, minlength=(n + 1) * 50).reshape(n + 1, 50)
    return ys, xs, hist @ _PERIM_W


def measure(inst: np.ndarray, *, ids: np.ndarray | None = None, classes: np.ndarray | None = None,
            rgb: np.ndarray | None = None, spacing: tuple[float, ...] | None = None,
            offset: tuple[int, int] = (0, 0)) -> list[dict[str, Any]]:
    """One dict per instance (``ids``, default all) of the label image ``inst``, in the CSV's columns.

    ``classes`` is a class-id map of the same shape (the semantic mask): an object's class is that of its
    first pixel. ``rgb`` (same height and width) gives the H&E optical densities. ``spacing`` is the pixel
    size ``(sy, sx)`` in mm. ``offset`` ``(y, x)`` places ``inst`` in the image (a tile of a slide): centroids
    and boxes are in the image's level-0 pixels; centroids in QuPath's frame, where pixel ``(i, j)`` spans
    ``[j, j + 1] × [i, i + 1]`` (so its centre is ``(j + 0.5, i + 0.5)``).

    Area, box, centroid, first pixel and perimeter of all objects come from whole-image passes (bincounts
    and one neighbour coding of the border pixels), the values ``skimage.measure.regionprops`` gives one
    object at a time at four times the cost; only the convex hull is per object.
    """
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
    from scipy import ndimage as ndi

    inst = np.asarray(inst)
    flat = inst.ravel()
    n = int(flat.max(initial=0))
    if n == 0:
        return []
    pos = np.flatnonzero(flat)
    lab = flat[pos].astype(np.int64)
    area_all = np.bincount(lab, minlength=n + 1)
    labels = np.flatnonzero(area_all[1:]) + 1
    if ids is not None:
        labels = np.intersect1d(labels, np.asarray(ids).ravel().astype(np.int64))
    if not len(labels):
        return []
    W = inst.shape[1]
    py, px = np.divmod(pos, W)
    cy_all = np.bincount(lab, py, minlength=n + 1) / np.maximum(area_all, 1)
    cx_all = np.bincount(lab, px, minlength=n + 1) / np.maximum(area_all, 1)
    uniq, first_at = np.unique(lab, return_index=True)  # pos is in raster order: the first pixel of each id
    first = np.zeros(n + 1, np.int64)
    first[uniq] = pos[first_at]
    boxes = ndi.find_objects(inst.astype(np.int32) if inst.dtype.kind != "i" else inst)
    bys, bxs, perim_all = _borders(inst, n)
    bid = inst[bys, bxs].astype(np.int64)
    order = np.argsort(bid, kind="stable")
    starts = np.searchsorted(bid[order], labels)
    stops = np.searchsorted(bid[order], labels, side="right")
    sy, sx = (float(spacing[-2]), float(spacing[-1])) if spacing is not None else (None, None)
    um2 = sy * sx * 1e6 if sy is not None else None
    um = (sy * sx) ** 0.5 * 1e3 if sy is not None else None
    h_od = e_od = None
    if rgb is not None:
        h_od, e_od = _mean_od(inst, rgb, labels)
    oy, ox = (int(v) for v in offset)
    square = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    rows = []
    for k, i in enumerate(labels.tolist()):
        area = int(area_all[i])
        sl = boxes[i - 1]
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        perim = float(perim_all[i])
        circ = min(1.0, 4.0 * np.pi * area / perim**2) if perim > 0 else 1.0
        sel = order[starts[k]:stops[k]]
        corners = (np.stack([bxs[sel], bys[sel]], axis=1)[:, None, :].astype(np.float32) + square).reshape(-1, 2)
        fy, fx = divmod(int(first[i]), W)
        rows.append({
            "id": i,
            "class": int(classes[fy, fx]) if classes is not None else 1,
            "centroid_x": round(float(cx_all[i]) + ox + 0.5, 3), "centroid_y": round(float(cy_all[i]) + oy + 0.5, 3),
            "area_px": area, "area_um2": round(area * um2, 4) if um2 is not None else None,
            "bbox_x0": x0 + ox, "bbox_y0": y0 + oy, "bbox_x1": x1 + ox, "bbox_y1": y1 + oy,
            "perimeter": round(perim * um if um is not None else perim, 4),
            "perimeter_unit": "um" if um is not None else "px",
            "circularity": round(circ, 4), "solidity": round(_solidity(corners, area), 4),
            "hematoxylin_od_mean": round(float(h_od[k]), 4) if h_od is not None else None,
            "eosin_od_mean": round(float(e_od[k]), 4) if e_od is not None else None,
        })
    return rows


def qupath_measurements(row: dict[str, Any]) -> dict[str, float]:
    """A :func:`measure` row as QuPath's ``measurements`` map (names in QuPath's own words and units)."""
    m: dict[str, float] = {"Area px": row["area_px"]}
    if row["area_um2"] is not None:
        m["Area \u00b5m^2"] = row["area_um2"]
    m["Perimeter \u00b5m" if row["perimeter_unit"] == "um" else "Perimeter px"] = row["perimeter"]
    m["Circularity"] = row["circularity"]
    m["Solidity"] = row["solidity"]
    if row["hematoxylin_od_mean"] is not None:
        m["Hematoxylin OD mean"] = row["hematoxylin_od_mean"]
        m["Eosin OD mean"] = row["eosin_od_mean"]
    return m


def _colour_layers(reg: np.ndarray, n: int) -> list[np.ndarray]:
    """Masks of the regions ``reg`` (1..n) in which no two regions touch at an edge or a corner."""
    pairs = []
    for a, b in ((reg[:, :-1], reg[:, 1:]), (reg[:-1, :], reg[1:, :]), (reg[:-1, :-1], reg[1:, 1:]),
                 (reg[:-1, 1:], reg[1:, :-1])):
        hit = (a != b) & (a > 0) & (b > 0)
        if hit.any():
            pairs.append(np.column_stack([a[hit], b[hit]]))
    fg = reg > 0
    if not pairs:
        return [fg]
    both = np.sort(np.concatenate(pairs).astype(np.int64), axis=1)
    codes = np.unique(both[:, 0] * (n + 1) + both[:, 1])  # one int per pair: a 1-D unique, not a row-wise one
    adj: dict[int, list[int]] = {}
    for a, b in zip((codes // (n + 1)).tolist(), (codes % (n + 1)).tolist(), strict=True):
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    colour = np.zeros(n + 1, np.int64)
    for k in sorted(adj):
        used = {colour[m] for m in adj[k] if m < k}
        c = 0
        while c in used:
            c += 1
        colour[k] = c
    per_pixel = colour[reg]
    return [fg & (per_pixel == c) for c in range(int(colour.max()) + 1)]


def outlines(inst: np.ndarray, shift: tuple[int, int] = (0, 0), ids: np.ndarray | None = None,
             ) -> dict[int, tuple[str, str]]:
    """Instance id → (GeoJSON geometry type, its ``coordinates`` as JSON text), pixel-exact.

    ``shift`` ``(x, y)`` is added to every coordinate; ``ids`` restricts the result to those instances.
    """
    # lazy: scikit-image brings scipy (~0.4 s to import)
    from skimage.measure import label as label_regions

    inst = np.asarray(inst)
    if ids is not None:
        inst = np.where(np.isin(inst, np.asarray(ids)), inst, 0)
    reg, n = label_regions(inst, background=0, connectivity=1, return_num=True)
    parts: dict[int, list[str]] = {}
    for layer in _colour_layers(reg, n):
        traced = trace_all(layer, shift)
        if traced is None:
            continue
        for y, x, rings in zip(traced.first_y.tolist(), traced.first_x.tolist(), traced.rings, strict=True):
            parts.setdefault(int(inst[y, x]), []).append(traced.coordinates(rings))
    out = {}
    for i, polys in parts.items():
        out[i] = ("Polygon", polys[0]) if len(polys) == 1 else ("MultiPolygon", "[" + ",".join(polys) + "]")
    return out


def describe(inst: np.ndarray, labels: np.ndarray, *, ids: np.ndarray | None = None, rgb: np.ndarray | None = None,
             spacing: tuple[float, ...] | None = None, offset: tuple[int, int] = (0, 0),
             want_outlines: bool = True) -> list[tuple[dict[str, Any], tuple[str, str] | None]]:
    """Measurements and outline of each instance (``ids``, default all) of ``inst`` placed at ``offset``."""
    rows = measure(inst, ids=ids, classes=labels, rgb=rgb, spacing=spacing, offset=offset)
    geoms = outlines(inst, (int(offset[1]), int(offset[0])), ids=ids) if want_outlines and rows else {}
    return [(r, geoms.get(r["id"])) for r in rows]


class ObjectSink:
    """Where finished objects go: the instance GeoJSON and the per-object CSV, either or both (or neither)."""

    def __init__(self, classes: list[str], geojson: Any = None, csv_path: Any = None, input_name: str = "") -> None:
        self.classes = classes
        self.geo = ObjectsGeoJSON(geojson, classes) if geojson is not None else None
        try:
            self.csv = ObjectsCSV(csv_path, CSV_FIELDS, input_name) if csv_path is not None else None
        except BaseException:
            if self.geo is not None:
                self.geo.abort()
            raise

    @property
    def wanted(self) -> bool:
        return self.geo is not None or self.csv is not None

    def add(self, objects: list[tuple[dict[str, Any], tuple[str, str] | None]]) -> None:
        for row, geom in objects:
            c = row["class"]
            if self.geo is not None and geom is not None:
                self.geo.add(row["id"], c, geom, qupath_measurements(row))
            if self.csv is not None:
                self.csv.add(row, self.classes[c] if 0 <= c < len(self.classes) else f"class {c}")

    def close(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.geo is not None:
            out["geojson"] = self.geo.close()
        if self.csv is not None:
            out["objects_csv"] = self.csv.close()
        return out

    def abort(self) -> None:
        for w in (self.geo, self.csv):
            if w is not None:
                w.abort()
