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

Tracing. The objects of one class in a tile are drawn into a grid of twice the resolution in which
pixel ``(i, j)`` covers the closed 3×3 block of lattice points around ``(2i + 1, 2j + 1)``: its corners,
edge midpoints and centre. OpenCV's border following (``cv2.findContours``, outer rings and holes) then
walks lattice points that lie exactly on pixel edges; where it cuts a corner diagonally (between two edge
midpoints) the skipped pixel corner is put back, and only pixel corners where the direction turns are
kept. The result is exact: the polygons rasterised at pixel centres give back the mask. In that grid two
objects that touch at a corner would share a lattice point, so such objects are traced in separate passes
(a greedy colouring of the corner-contact graph; nearly always one or two passes per tile). All rings of
a pass are post-processed together in numpy, and their JSON text is written by numpy too.

Streaming. :meth:`GeoJSONWriter.add_tile` takes tiles in raster order (a row of tiles left to right,
then the next row), as :func:`segcli.io.bigtiff.write_tiled` hands them to ``on_tile``. An object that
touches no tile edge is written at once. A piece that touches a tile edge is kept (its rings only) and
joined, through a union-find, with the pieces it meets across the seam: the writer keeps the bottom line
of piece ids of the tile row above (one int64 per image column) and the right column of the previous
tile. A joined object is written as soon as none of its pieces lies on a seam that a tile still to come
can reach; its pieces are merged with ``shapely.union_all`` (pixel-exact rings merge exactly along the
shared edges). Memory is thus the open pieces along one row of tiles, plus whole objects that are still
growing: a vessel or tissue region spanning many tiles keeps its pieces (int32 rings, about the size of
its own output) until it ends, and every 256 new pieces are merged among themselves so that the final
union stays one cascaded union. ``summary["max_open_objects"]`` and ``["max_open_vertices"]`` say how
much was held at most. The union-find keeps one small entry per edge piece ever made.

The file is written to a hidden partial name beside the output and renamed when :meth:`close` succeeds.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from segcli.drawing import class_colour
from segcli.io.atomic import StreamedText
from segcli.io.contours import contact_layers, from_rings, polygon_texts, ring_list, trace_all

__all__ = ["CONNECTIVITY", "GeoJSONWriter", "default_colours", "write_geojson"]

CONNECTIVITY = 4
_CHUNK = 256  # the pieces of a growing object are merged (among themselves) once this many have gathered


def default_colours(classes: list[str]) -> dict[str, list[int]]:
    """The colours segcli's previews draw each class in (``segcli.drawing.class_colour``)."""
    return {name: list(class_colour(i)) for i, name in enumerate(classes) if i > 0}


class _Piece:
    """An edge-touching part of an object (or several parts already merged) that is still open."""

    __slots__ = ("area", "chunks", "cls", "geoms", "vertices")

    def __init__(self, cls: int, area: int, geoms: list[Any]) -> None:
        self.cls, self.area, self.geoms = cls, area, geoms  # geoms: rings of pieces (int32 arrays)
        self.chunks: list[Any] = []  # shapely polygons, each the union of _CHUNK pieces
        self.vertices = sum(len(r) for g in geoms for r in g)


class GeoJSONWriter(StreamedText):
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
        self.summary: dict[str, Any] | None = None
        self._busy = 0.0
        # ids: UUID version 4 strings, a random prefix per file and the feature number in the last group
        r = secrets.token_hex(10)
        self._uid = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{'89ab'[int(r[15], 16) & 3]}{r[16:19]}-"
        self._enc = json.JSONEncoder(separators=(",", ":")).encode
        self._count: dict[int, int] = {}
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
        self.max_open_objects = 0  # objects with a piece on a seam, at most, after any tile
        self.max_open_vertices = 0  # their vertices (rings kept as int32 [x, y]: 8 bytes each)
        self._open_vertices = 0
        StreamedText.__init__(self, path, newline="\n")
        self._fh.write('{"type":"FeatureCollection","features":[\n')

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

    def _write(self, c: int, area: int, rings: list[Any] | None, coords: str | None = None,
               kind: str = "Polygon") -> None:
        """One Feature: ``rings`` (closed lists, exterior first), or its ``coords`` as JSON text."""
        props = self._props.get(c) or self._class_props(c)
        if coords is None:
            coords = self._enc(rings)
        geometry = '{"type":"' + kind + '","coordinates":' + coords + "}"
        meas = f'"Area (px)":{area}'
        if self._um2 is not None:
            meas += f',"Area (\u00b5m\u00b2)":{round(area * self._um2, 4)!r}'
        sep = ",\n" if self._n else ""
        self._fh.write(f'{sep}{{"type":"Feature","id":"{self._uid}{self._n:012x}",'
                       f'"geometry":{geometry},"properties":{{{props},"measurements":{{{meas}}}}}}}')
        self._n += 1
        self._count[c] = self._count.get(c, 0) + 1

    def _emit_roots(self, roots: list[int]) -> None:
        """Write the objects of these union-find roots, now complete: one piece as it is, two pieces merged
        with one vectorised ``shapely.union`` over all such pairs, more with ``union_all`` each."""
        # lazy: shapely costs ~0.15 s to import
        import shapely

        pieces = []
        for r in roots:
            piece = self._open.pop(r)
            self._front.pop(r, None)
            self._open_vertices -= piece.vertices
            pieces.append(piece)
        coords: list[str | None] = [None] * len(pieces)
        kinds = ["Polygon"] * len(pieces)
        merged: list[Any] = [None] * len(pieces)
        pairs = [i for i, p in enumerate(pieces) if not p.chunks and len(p.geoms) == 2]
        if pairs:
            polys = from_rings([g for i in pairs for g in pieces[i].geoms])
            for i, u in zip(pairs, shapely.union(polys[0::2], polys[1::2]), strict=True):
                merged[i] = u
        for i, p in enumerate(pieces):
            if merged[i] is None and (p.chunks or len(p.geoms) > 1):
                merged[i] = self._merge(p.geoms, p.chunks)
        todo = [i for i, m in enumerate(merged) if m is not None]
        if todo:
            geoms = shapely.orient_polygons(np.array([merged[i] for i in todo], dtype=object))
            simple = shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON
            if simple.any():
                _, flat, (ring_off, poly_off) = shapely.to_ragged_array(geoms[simple])
                for i, text in zip(np.asarray(todo)[simple].tolist(), polygon_texts(flat, ring_off, poly_off),
                                   strict=True):
                    coords[i] = text
            for i, g in zip(np.asarray(todo)[~simple].tolist(), geoms[~simple], strict=True):
                kinds[i], coords[i] = self._shapely_coords(g)
        for i, p in enumerate(pieces):
            if coords[i] is None:  # a single piece: its rings are exact and oriented already
                self._write(p.cls, p.area, [r.tolist() for r in p.geoms[0]])
            else:
                self._write(p.cls, p.area, None, coords[i], kinds[i])

    @staticmethod
    def _merge(geoms: list[Any], chunks: list[Any]) -> Any:
        # lazy: shapely costs ~0.15 s to import
        import shapely

        polys = chunks + (list(from_rings(geoms)) if geoms else [])
        return polys[0] if len(polys) == 1 else shapely.union_all(polys)

    def _shapely_coords(self, geom: Any) -> tuple[str, str]:
        # lazy: shapely costs ~0.15 s to import
        import shapely

        geom = shapely.orient_polygons(geom)
        parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        polys = []
        for p in parts:
            polys.append([ring_list(p.exterior.coords)] + [ring_list(h.coords) for h in p.interiors])
        if len(polys) == 1:  # never a one-element MultiPolygon
            return "Polygon", self._enc(polys[0])
        # Pieces joined across a seam share an edge, so this is not expected; kept rather than lost.
        return "MultiPolygon", self._enc(polys)

    def _name(self, c: int) -> str:
        return self.classes[c] if c < len(self.classes) else f"class {c}"

    @property
    def counts(self) -> dict[str, int]:
        """Objects written so far, per class name (every foreground class, 0 where none)."""
        out = {name: 0 for name in self.classes[1:]}
        for c, k in sorted(self._count.items()):
            out[self._name(c)] = out.get(self._name(c), 0) + k
        return out

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
        pa.chunks.extend(pb.chunks)
        pa.vertices += pb.vertices
        if len(pa.geoms) >= _CHUNK:
            # Only the new pieces are merged, never again the chunks already made: the cost stays that of
            # one cascaded union, however many tiles the object spans.
            import shapely

            chunk = self._merge(pa.geoms, [])
            delta = int(shapely.get_num_coordinates(chunk)) - sum(len(r) for g in pa.geoms for r in g)
            self._open_vertices += delta
            pa.vertices += delta
            pa.chunks.append(chunk)
            pa.geoms = []
        self._front[ra] = self._front.get(ra, 0) + self._front.pop(rb, 0)

    def _new_piece(self, cls: int, area: int, rings: list[Any]) -> int:
        g = len(self._parent)
        self._parent.append(g)
        if g >= len(self._pcls):
            self._pcls = np.concatenate([self._pcls, np.zeros(len(self._pcls), np.int64)])
        self._pcls[g] = cls
        piece = _Piece(cls, area, [rings])
        self._open[g] = piece
        self._open_vertices += piece.vertices
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
        top_value = int(t.max()) if t.size else 0
        present = [top_value] if top_value <= 1 else np.flatnonzero(np.bincount(t.ravel())).tolist()
        for c in present:
            if c > 0:
                self._pieces_of_class(t, int(c), y0, x0, (top, bot, lcol, rcol), new)
        # Join pieces across the seams, then move the seams on.
        self._link(top, above)
        if left is not None:
            self._link(lcol, left)
        self._count_front(above, -1, touched)  # those seams are now covered
        if left is not None:
            self._count_front(left, -1, touched)
        self._count_front(bot, 1, touched)
        self._count_front(rcol, 1, touched)
        self._bottom[c0:c1] = bot
        self._right = rcol
        touched.update(new)
        self._emit_roots([r for r in sorted({self._find(g) for g in touched})
                          if r in self._open and self._front.get(r, 0) == 0])
        self._track_memory()
        self._busy += time.perf_counter() - t0

    def _pieces_of_class(self, t: np.ndarray, c: int, y0: int, x0: int,
                         edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], new: list[int]) -> None:
        # lazy: scipy costs ~0.4 s to import
        from scipy import ndimage

        lab, n = ndimage.label(t == c)  # the default structure is the 4-neighbour cross
        if n == 0:
            return
        on_edge = np.zeros(n + 1, bool)
        for line in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
            on_edge[line] = True
        on_edge[0] = False
        areas = np.bincount(lab.ravel(), minlength=n + 1).tolist()
        gid = np.zeros(n + 1, np.int64)
        ox, oy = x0 + self.off_x, y0 + self.off_y
        on_edge_l = on_edge.tolist()
        for layer in contact_layers(lab, n, lab > 0):
            traced = trace_all(layer, (ox, oy))
            if traced is None:
                continue
            ks = lab[traced.first_y, traced.first_x].tolist()
            for k, rings in zip(ks, traced.rings, strict=True):
                if on_edge_l[k]:
                    g = self._new_piece(c, areas[k], traced.arrays(rings))
                    gid[k] = g
                    new.append(g)
                else:
                    self._write(c, areas[k], None, traced.coordinates(rings))
        top, bot, lcol, rcol = edges
        for mine, line in ((top, lab[0]), (bot, lab[-1]), (lcol, lab[:, 0]), (rcol, lab[:, -1])):
            hit = line > 0
            mine[hit] = gid[line[hit]]

    def _track_memory(self) -> None:
        self.max_open_objects = max(self.max_open_objects, len(self._open))
        self.max_open_vertices = max(self.max_open_vertices, self._open_vertices)

    # -- finishing -------------------------------------------------------------------------------
    def close(self) -> dict[str, Any]:
        """Write the objects still open, finish the file, move it into place; returns a summary."""
        if self._closed:
            raise ValueError("GeoJSONWriter is already closed")
        t0 = time.perf_counter()
        try:
            rest = sorted(self._open)
            for i in range(0, len(rest), 4096):
                self._emit_roots(rest[i : i + 4096])
        except BaseException:
            self.abort()
            raise
        self._finish("\n]}\n")
        self._busy += time.perf_counter() - t0
        self.summary = {
            "path": str(self.path),
            "objects": self.counts,
            "features": self._n,
            "connectivity": CONNECTIVITY,
            "seconds": round(self._busy, 3),
            "max_open_objects": self.max_open_objects,
            "max_open_vertices": self.max_open_vertices,
        }
        return self.summary


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
