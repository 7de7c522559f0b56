"""Label masks as GeoJSON objects for QuPath, written tile by tile in bounded memory.

One Feature per connected object per class: a ``Polygon`` in level-0 pixel coordinates, ``[x, y]``, whose
edges are pixel edges (a one-pixel object is the unit square ``[[x, y], [x + 1, y], [x + 1, y + 1],
[x, y + 1], [x, y]]``), with holes as inner rings. The exterior ring runs counter-clockwise and holes
clockwise in the numbers of the coordinates (positive signed area, as ``shapely.orient_polygons`` gives;
on screen, with y pointing down, this looks clockwise).

Connectivity is **4** (pixels sharing an edge). That is the connectivity for which the union of an
object's pixel squares is always one polygon: two pixels touching only at a corner would join two
squares at a single point, which no valid Polygon can describe. A hole may touch its exterior, or
another hole, at a single corner point (valid in the OGC/GeoJSON model); background is 8-connected.

Tracing. Each object's pixels are drawn into a grid of twice the resolution in which pixel ``(i, j)``
covers the closed 3×3 block of lattice points around ``(2i + 1, 2j + 1)``: its corners, edge midpoints
and centre. OpenCV's border following (``cv2.findContours``) then walks lattice points that lie exactly
on pixel edges; where it cuts a corner diagonally (between two edge midpoints) the skipped pixel corner
is put back, and only pixel corners where the direction turns are kept. The result is exact: the
polygons rasterised at pixel centres give back the mask.

Streaming. :meth:`GeoJSONWriter.add_tile` takes tiles in raster order (a row of tiles left to right,
then the next row), as :func:`segcli.io.bigtiff.write_tiled` hands them to ``on_tile``. An object that
touches no tile edge is written at once. A piece that touches a tile edge is kept (its rings only) and
joined, through a union-find, with the pieces it meets across the seam: the writer keeps the bottom line
of piece ids of the tile row above (one int64 per image column) and the right column of the previous
tile. A joined object is written as soon as none of its pieces lies on a seam that a tile still to come
can reach; its pieces are merged with ``shapely.union_all`` (pixel-exact rings merge exactly along the
shared edges). Memory is thus the open pieces along one row of tiles, plus whole objects that are still
growing (a vessel or tissue region spanning many tiles keeps its pieces until it ends; they are merged
into one polygon every 32 pieces so the list stays short).

The file is written to a hidden partial name beside the output and renamed when :meth:`close` succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONNECTIVITY", "GeoJSONWriter", "default_colours", "write_geojson"]

CONNECTIVITY = 4
_MERGE_EVERY = 32  # pieces of one growing object merged into one polygon this often
_K3 = None  # the 3x3 dilation kernel, made when OpenCV is first needed


def default_colours(classes: list[str]) -> dict[str, list[int]]:
    """segcli's preview palette (class 1 red, 2 green, 3 yellow, ...), cycled past ten classes."""
    from segcli.viz import PALETTE

    pal = PALETTE.astype(int).tolist()
    return {name: pal[1 + (i - 1) % (len(pal) - 1)] for i, name in enumerate(classes) if i > 0}


def _cv2() -> Any:
    global _K3
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("GeoJSON output needs OpenCV: pip install opencv-python-headless") from exc
    if _K3 is None:
        _K3 = np.ones((3, 3), np.uint8)
    return cv2


def _ring_area2(r: np.ndarray) -> int:
    """Twice the signed area of an open ring of integer points (positive: counter-clockwise in x, y)."""
    x, y = r[:, 0], r[:, 1]
    return int(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _corners(c: np.ndarray) -> np.ndarray:
    """Lattice contour (padded doubled grid, (x, y)) → the open ring of pixel corners where it turns."""
    p = c.reshape(-1, 2).astype(np.int64)
    q = np.roll(p, -1, axis=0)
    diag = (p[:, 0] != q[:, 0]) & (p[:, 1] != q[:, 1])
    # A diagonal step joins two edge midpoints; of its two candidate corners, the one with both
    # coordinates odd (a pixel corner in the padded grid) is the one on the object's edge.
    first = ((p[:, 0] & 1) == 1) & ((q[:, 1] & 1) == 1)
    corner = np.where(first[:, None], np.column_stack([p[:, 0], q[:, 1]]), np.column_stack([q[:, 0], p[:, 1]]))
    both = np.empty((2 * len(p), 2), np.int64)
    both[0::2], both[1::2] = p, corner
    keep = np.ones(2 * len(p), bool)
    keep[1::2] = diag
    pts = both[keep]
    pts = pts[((pts[:, 0] & 1) == 1) & ((pts[:, 1] & 1) == 1)]
    return _turns((pts - 1) // 2)


def _turns(pts: np.ndarray) -> np.ndarray:
    """Drop repeated and collinear points of an open ring."""
    pts = pts[(np.roll(pts, -1, axis=0) != pts).any(axis=1)]
    d1 = pts - np.roll(pts, 1, axis=0)
    d2 = np.roll(pts, -1, axis=0) - pts
    return pts[d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0] != 0]


def _trace(mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """One 4-connected object (bool crop) → exterior (CCW) and hole (CW) rings, open, in crop pixels."""
    cv2 = _cv2()
    h, w = mask.shape
    d = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    d[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = mask
    d = cv2.dilate(d, _K3)
    found = cv2.findContours(d, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    contours, hier = found[-2], found[-1]
    ext: np.ndarray | None = None
    holes: list[np.ndarray] = []
    for c, hrow in zip(contours, hier[0], strict=True):
        r = _corners(c)
        if hrow[3] < 0:
            if ext is not None:  # cannot happen for one 4-connected component
                raise AssertionError("a 4-connected object traced as several outer contours")
            ext = r if _ring_area2(r) > 0 else r[::-1]
        else:
            holes.append(r if _ring_area2(r) < 0 else r[::-1])
    assert ext is not None
    return ext, holes


def _closed(r: np.ndarray) -> list[list[int]]:
    out = r.tolist()
    out.append(out[0])
    return out


class _Piece:
    """An edge-touching part of an object (or several parts already merged) that is still open."""

    __slots__ = ("area", "cls", "geoms")

    def __init__(self, cls: int, area: int, geoms: list[Any]) -> None:
        self.cls, self.area, self.geoms = cls, area, geoms


class GeoJSONWriter:
    """Stream a label mask, tile by tile in raster order, into a QuPath-ready GeoJSON FeatureCollection.

    ``classes`` names the label values (index 0 is background and is never written). ``colours`` maps a
    class name to ``[r, g, b]`` (default: segcli's preview palette). Classes in ``detection_classes`` are
    written with ``"objectType": "detection"`` (e.g. ``{"nucleus"}``), all others as ``"annotation"``.
    ``spacing`` is the pixel size ``(sy, sx)`` in **mm**, as segcli planes carry it; with it each object
    also gets its area in µm². ``offset`` ``(y, x)`` is added to every coordinate (a mask that covers a
    region of a larger slide). Coordinates stay in level-0 pixels, as QuPath expects.

    Use as a context manager, or call :meth:`close` (which renames the finished file into place and
    returns a summary) or :meth:`abort` (which deletes the partial file).
    """

    def __init__(
        self,
        path: Path | str,
        classes: list[str],
        *,
        colours: dict[str, Any] | None = None,
        detection_classes: set[str] | frozenset[str] | list[str] | None = None,
        spacing: tuple[float, ...] | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> None:
        from segcli.io.atomic import partial_name

        self.path = Path(path)
        self.classes = list(classes)
        pal = default_colours(self.classes)
        if colours:
            pal.update({k: [int(v) for v in list(c)[:3]] for k, c in colours.items()})
        self.colours = pal
        self.detection_classes = set(detection_classes or ())
        unknown = self.detection_classes - set(self.classes)
        if unknown:
            raise ValueError(f"detection_classes not among the classes: {sorted(unknown)}")
        self.spacing = tuple(float(s) for s in spacing[-2:]) if spacing is not None else None
        self._um2 = self.spacing[0] * self.spacing[1] * 1e6 if self.spacing else None
        self.off_y, self.off_x = (int(v) for v in offset)
        self._props: dict[int, str] = {}
        self.counts: dict[str, int] = {name: 0 for name in self.classes[1:]}
        self.summary: dict[str, Any] | None = None
        self._t0 = time.perf_counter()
        self._busy = 0.0
        self._uuid_base = secrets.randbits(128)
        self._n = 0
        # union-find over piece ids (0 = no piece); seams hold piece ids
        self._parent: list[int] = [0]
        self._pcls = np.zeros(1024, np.int64)
        self._open: dict[int, _Piece] = {}  # root -> the pieces of an object still open
        self._front: dict[int, int] = {}  # root -> number of seam pixels (bottom line + right column) it holds
        self._bottom = np.zeros(0, np.int64)  # per image column: piece id on the last tile row's bottom line
        self._right: np.ndarray | None = None  # the previous tile's right column
        self._row: tuple[int, int] | None = None
        self._x_start = 0
        self._next_x = 0
        self.max_open_pieces = 0
        self.max_open_vertices = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / partial_name(self.path)
        self._fh: Any = open(self._tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 20)  # noqa: SIM115
        self._fh.write('{"type":"FeatureCollection","features":[\n')
        self._closed = False

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- output ----------------------------------------------------------------------------------
    def _class_props(self, c: int) -> str:
        s = self._props.get(c)
        if s is None:
            name = self.classes[c] if c < len(self.classes) else f"class {c}"
            colour = self.colours.get(name, [255, 0, 0])
            kind = "detection" if name in self.detection_classes else "annotation"
            s = ('"objectType":' + json.dumps(kind) + ',"classification":'
                 + json.dumps({"name": name, "color": colour}, ensure_ascii=False, separators=(",", ":")))
            self._props[c] = s
        return s

    def _write(self, c: int, area: int, geometry: str) -> None:
        props = self._class_props(c)
        meas = f'"Area (px)":{area}'
        if self._um2 is not None:
            meas += f',"Area (\u00b5m\u00b2)":{round(area * self._um2, 4)!r}'
        uid = uuid.UUID(int=(self._uuid_base + self._n) % (1 << 128), version=4)
        sep = ",\n" if self._n else ""
        self._fh.write(f'{sep}{{"type":"Feature","id":"{uid}","geometry":{geometry},'
                       f'"properties":{{{props},"measurements":{{{meas}}}}}}}')
        self._n += 1
        name = self.classes[c] if c < len(self.classes) else f"class {c}"
        self.counts[name] = self.counts.get(name, 0) + 1

    @staticmethod
    def _polygon_json(ext: np.ndarray, holes: list[np.ndarray]) -> str:
        rings = [_closed(ext)] + [_closed(h) for h in holes]
        return '{"type":"Polygon","coordinates":' + json.dumps(rings, separators=(",", ":")) + "}"

    def _emit_root(self, root: int) -> None:
        piece = self._open.pop(root)
        self._front.pop(root, None)
        geoms = piece.geoms
        if len(geoms) == 1 and isinstance(geoms[0], tuple):
            self._write(piece.cls, piece.area, self._polygon_json(*geoms[0]))
            return
        self._write(piece.cls, piece.area, self._shapely_json(self._merge(geoms)))

    @staticmethod
    def _merge(geoms: list[Any]) -> Any:
        import shapely
        from shapely.geometry import Polygon

        polys = [Polygon(g[0], g[1]) if isinstance(g, tuple) else g for g in geoms]
        return polys[0] if len(polys) == 1 else shapely.union_all(polys)

    def _shapely_json(self, geom: Any) -> str:
        import shapely

        geom = shapely.orient_polygons(geom)
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        polys = []
        for p in parts:
            ext = _turns(np.rint(np.asarray(p.exterior.coords)[:-1]).astype(np.int64))
            holes = [_turns(np.rint(np.asarray(h.coords)[:-1]).astype(np.int64)) for h in p.interiors]
            polys.append([_closed(ext)] + [_closed(h) for h in holes])
        if len(polys) == 1:  # never a one-element MultiPolygon
            return '{"type":"Polygon","coordinates":' + json.dumps(polys[0], separators=(",", ":")) + "}"
        # Pieces joined across a seam share an edge, so this is not expected; kept rather than lost.
        return '{"type":"MultiPolygon","coordinates":' + json.dumps(polys, separators=(",", ":")) + "}"

    # -- union-find ------------------------------------------------------------------------------
    def _find(self, a: int) -> int:
        p = self._parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self._parent[rb] = ra
        pa, pb = self._open[ra], self._open.pop(rb)
        pa.area += pb.area
        pa.geoms.extend(pb.geoms)
        if len(pa.geoms) > _MERGE_EVERY:
            pa.geoms = [self._merge(pa.geoms)]
        self._front[ra] = self._front.get(ra, 0) + self._front.pop(rb, 0)

    def _new_piece(self, cls: int, area: int, ext: np.ndarray, holes: list[np.ndarray]) -> int:
        g = len(self._parent)
        self._parent.append(g)
        if g >= len(self._pcls):
            self._pcls = np.concatenate([self._pcls, np.zeros(len(self._pcls), np.int64)])
        self._pcls[g] = cls
        self._open[g] = _Piece(cls, area, [(ext, holes)])
        return g

    def _count_front(self, ids: np.ndarray, sign: int, touched: set[int]) -> None:
        ids = ids[ids > 0]
        if not len(ids):
            return
        u, n = np.unique(ids, return_counts=True)
        for g, k in zip(u.tolist(), n.tolist(), strict=True):
            r = self._find(g)
            self._front[r] = self._front.get(r, 0) + sign * k
            touched.add(r)

    def _link(self, mine: np.ndarray, theirs: np.ndarray) -> None:
        ok = (mine > 0) & (theirs > 0)
        if not ok.any():
            return
        a, b = mine[ok], theirs[ok]
        same = self._pcls[a] == self._pcls[b]
        if not same.any():
            return
        pairs = np.unique(np.column_stack([a[same], b[same]]), axis=0)
        for x, y in pairs.tolist():
            self._union(x, y)

    # -- tiles -----------------------------------------------------------------------------------
    def add_tile(self, tile: np.ndarray, box: tuple[int, int, int, int]) -> None:
        """Add one tile of class ids at ``box = (y0, x0, y1, x1)`` (level-0 pixels, end exclusive).

        Tiles must come in raster order: a row of tiles from left to right, then the row below, each
        row starting at the same x and each row directly below the previous one (``write_tiled``'s order).
        """
        if self._closed:
            raise ValueError("GeoJSONWriter is closed")
        t0 = time.perf_counter()
        t = np.asarray(tile)
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        y0, x0, y1, x1 = (int(v) for v in box)
        if t.ndim != 2 or t.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"tile of shape {t.shape} does not fit box {box}")
        if t.dtype.kind not in "ui" and t.dtype != bool:
            raise ValueError(f"tile must hold integer class ids, not {t.dtype}")
        touched: set[int] = set()
        # Where this tile sits: continue the row, or start the next one.
        if self._row is None:
            self._row, self._x_start = (y0, y1), x0
            left = None
        elif (y0, y1) == self._row and x0 == self._next_x:
            left = self._right
        elif y0 == self._row[1] and x0 == self._x_start:
            self._row = (y0, y1)
            left = None
            if self._right is not None:  # the last tile of the row above had nothing to its right
                self._count_front(self._right, -1, touched)
        else:
            raise ValueError(f"tiles must come in raster order; got box {box} after row {self._row} "
                             f"ending at x={self._next_x}")
        self._next_x = x1
        self._right = None
        h, w = t.shape
        c0, c1 = x0 - self._x_start, x1 - self._x_start
        if c1 > len(self._bottom):
            self._bottom = np.concatenate([self._bottom, np.zeros(c1 - len(self._bottom), np.int64)])
        above = self._bottom[c0:c1].copy()

        top, bot = np.zeros(w, np.int64), np.zeros(w, np.int64)
        lcol, rcol = np.zeros(h, np.int64), np.zeros(h, np.int64)
        new: list[int] = []
        present = np.flatnonzero(np.bincount(t.ravel()))
        for c in present.tolist():
            if c == 0:
                continue
            self._pieces_of_class(t, int(c), y0, x0, (top, bot, lcol, rcol), new)
        # Join pieces across the seams, then move the seams on.
        self._link(top, above)
        if left is not None:
            self._link(lcol, left)
        self._count_front(above, -1, touched)
        self._count_front(bot, 1, touched)
        self._count_front(rcol, 1, touched)
        self._bottom[c0:c1] = bot
        self._right = rcol
        touched.update(new)
        for r in sorted({self._find(g) for g in touched}):
            if r in self._open and self._front.get(r, 0) == 0:
                self._emit_root(r)
        self._track_memory()
        self._busy += time.perf_counter() - t0

    def _pieces_of_class(self, t: np.ndarray, c: int, y0: int, x0: int,
                         edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], new: list[int]) -> None:
        from scipy import ndimage

        lab, n = ndimage.label(t == c)  # the default structure is the 4-neighbour cross
        if n == 0:
            return
        on_edge = np.zeros(n + 1, bool)
        for line in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
            on_edge[line] = True
        on_edge[0] = False
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        gid = np.zeros(n + 1, np.int64)
        ox, oy = x0 + self.off_x, y0 + self.off_y
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            ext, holes = _trace(lab[sl] == k)
            shift = np.array([sl[1].start + ox, sl[0].start + oy], np.int64)
            ext = ext + shift
            holes = [hr + shift for hr in holes]
            if on_edge[k]:
                gid[k] = self._new_piece(c, int(areas[k]), ext, holes)
                new.append(int(gid[k]))
            else:
                self._write(c, int(areas[k]), self._polygon_json(ext, holes))
        top, bot, lcol, rcol = edges
        for mine, line in ((top, lab[0]), (bot, lab[-1]), (lcol, lab[:, 0]), (rcol, lab[:, -1])):
            hit = line > 0
            mine[hit] = gid[line[hit]]

    def _track_memory(self) -> None:
        n = len(self._open)
        if n > self.max_open_pieces:
            self.max_open_pieces = n

    @property
    def open_vertices(self) -> int:
        """Vertices held by the objects still open (a measure of the writer's memory)."""
        total = 0
        for p in self._open.values():
            for g in p.geoms:
                if isinstance(g, tuple):
                    total += len(g[0]) + sum(len(h) for h in g[1])
                else:
                    import shapely

                    total += int(shapely.get_num_coordinates(g))
        return total

    # -- finishing -------------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Write the objects still open, finish the file, move it into place; returns a summary."""
        if self._closed:
            raise ValueError("GeoJSONWriter is already closed")
        t0 = time.perf_counter()
        try:
            for r in sorted(self._open):
                self._emit_root(r)
            self._fh.write("\n]}\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._busy += time.perf_counter() - t0
        self.summary = {
            "path": str(self.path),
            "objects": dict(self.counts),
            "features": self._n,
            "connectivity": CONNECTIVITY,
            "seconds": round(self._busy, 3),
            "max_open_pieces": self.max_open_pieces,
        }
        return self.summary

    def abort(self) -> None:
        """Drop the partial file (after an error); the final path is left untouched."""
        if self._closed:
            return
        self._closed = True
        try:
            self._fh.close()
        finally:
            with contextlib.suppress(OSError):
                self._tmp.unlink()


def write_geojson(
    path: Path | str,
    labels: np.ndarray,
    classes: list[str],
    *,
    tile: int = 1024,
    **kwargs: Any,
) -> dict[str, Any]:
    """Write an in-memory 2-D label mask as GeoJSON (through :class:`GeoJSONWriter`, ``tile``-px tiles).

    Keyword arguments are those of :class:`GeoJSONWriter`; returns its summary.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    H, W = labels.shape
    with GeoJSONWriter(path, classes, **kwargs) as w:
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                box = (y, x, min(y + tile, H), min(x + tile, W))
                w.add_tile(labels[box[0] : box[2], box[1] : box[3]], box)
    assert w.summary is not None
    return w.summary
