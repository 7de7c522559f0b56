"""Per-class statistics of a label map: the ``--stats`` CSV (TotalSegmentator's ``--statistics``).

Volume in ml needs the spacing; component counts and bounding boxes are what a reviewer checks first
when a mask looks wrong (one blob or fifty?), so they are reported per class.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ["input", "class", "voxels", "volume_ml", "area_mm2", "components", "bbox"]


def label_stats(labels: np.ndarray, classes: list[str], spacing: tuple[float, ...] | None) -> list[dict[str, Any]]:
    """One row per foreground class: voxel count, volume (3D) or area (2D), components, bounding box.

    The bounding box is ``[start..., stop...]`` in array index order, half-open.
    """
    # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
    from scipy import ndimage

    unit = float(np.prod(spacing)) if spacing else None
    rows = []
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for cid, name in enumerate(classes):
        if cid == 0:
            continue
        m = labels == cid
        n = int(m.sum())
        row: dict[str, Any] = {"class": name, "voxels": n, "volume_ml": None, "area_mm2": None, "components": 0,
                               "bbox": None}
        if unit is not None:
            if labels.ndim == 3:
                row["volume_ml"] = n * unit / 1000.0
            else:
                row["area_mm2"] = n * unit
        if n:
            _, row["components"] = ndimage.label(m, structure=structure)
            # From one projection per axis: np.nonzero would hold 8 bytes per axis and foreground voxel.
            spans = [np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != ax))) for ax in range(m.ndim)]
            row["bbox"] = [int(s[0]) for s in spans] + [int(s[-1]) + 1 for s in spans]
        rows.append(row)
    return rows


class TileStats:
    """:func:`label_stats` of a 2D label map seen one tile at a time, in raster order (a streamed mask).

    Counts and boxes add up; 8-connected components are labelled per tile and merged across tile
    edges with a union-find, using the previous tile row's bottom line and the left tile's right
    column, so the numbers equal those of the whole map without ever holding it.
    """

    def __init__(self, classes: list[str], spacing: tuple[float, ...] | None, width: int) -> None:
        self.classes, self.spacing, self.width = classes, spacing, int(width)
        k = len(classes)
        self.voxels = np.zeros(k, np.int64)
        self.lo = np.full((k, 2), np.iinfo(np.int64).max, np.int64)
        self.hi = np.full((k, 2), -1, np.int64)
        self.parent: list[list[int]] = [[] for _ in range(k)]
        self.real: list[list[int]] = [[] for _ in range(k)]  # ids that are components (not tile bases)
        self.above = np.zeros((k, self.width), np.int64)  # global ids (0 = none) of the line above this tile row
        self.below = np.zeros((k, self.width), np.int64)  # this tile row's bottom line, filled as tiles come
        self.left: np.ndarray | None = None  # (k, h) right column of the previous tile in this row
        self._row_y = -1

    def _find(self, c: int, a: int) -> int:
        p = self.parent[c]
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def _union(self, c: int, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self._find(c, x), self._find(c, y)
            if rx != ry:
                self.parent[c][max(rx, ry)] = min(rx, ry)

    def add(self, tile: np.ndarray, box: tuple[int, int, int, int]) -> None:
        """Account for ``tile`` (uint8 class ids) at ``box`` = (y0, x0, y1, x1)."""
        # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
        from scipy import ndimage

        y0, x0, y1, x1 = (int(v) for v in box)
        h, w = tile.shape
        if y0 != self._row_y:  # a new row of tiles starts at the left edge
            self._row_y, self.left = y0, None
            self.above, self.below = self.below, self.above
            self.below[:] = 0
        counts = np.bincount(tile.ravel(), minlength=len(self.classes))[: len(self.classes)]
        self.voxels += counts
        structure = np.ones((3, 3), bool)
        new_left = np.zeros((len(self.classes), h), np.int64)
        for c in np.flatnonzero(counts):
            if c == 0:
                continue
            m = tile == c
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            self.lo[c] = np.minimum(self.lo[c], (y0 + rows[0], x0 + cols[0]))
            self.hi[c] = np.maximum(self.hi[c], (y0 + rows[-1] + 1, x0 + cols[-1] + 1))
            lab, n = ndimage.label(m, structure=structure)
            base = len(self.parent[c])
            self.parent[c].extend(range(base, base + n + 1))  # id base stands for background: never used
            self.real[c].extend(range(base + 1, base + n + 1))
            glob = np.where(lab > 0, lab + base, 0)
            # merge with the line above (x - 1 .. x + 1: 8-connectivity, also across tile corners)
            top = glob[0]
            for dx in (-1, 0, 1):
                xs = np.arange(w) + x0 + dx
                ok = (xs >= 0) & (xs < self.width) & (top > 0)
                nb = np.zeros(w, np.int64)
                nb[ok] = self.above[c, xs[ok]]
                hit = ok & (nb > 0)
                self._union(c, top[hit], nb[hit])
            if self.left is not None:  # merge with the left tile's right column
                col = glob[:, 0]
                for dy in (-1, 0, 1):
                    ys = np.arange(h) + dy
                    ok = (ys >= 0) & (ys < h) & (col > 0)
                    nb = np.zeros(h, np.int64)
                    nb[ok] = self.left[c, ys[ok]]
                    hit = ok & (nb > 0)
                    self._union(c, col[hit], nb[hit])
            self.below[c, x0:x1] = glob[-1]
            new_left[c] = glob[:, -1]
        self.left = new_left

    def rows(self) -> list[dict[str, Any]]:
        unit = float(np.prod(self.spacing)) if self.spacing else None
        out = []
        for c, name in enumerate(self.classes):
            if c == 0:
                continue
            n = int(self.voxels[c])
            comps = len({self._find(c, a) for a in self.real[c]})
            out.append({"class": name, "voxels": n, "volume_ml": None,
                        "area_mm2": n * unit if unit is not None else None, "components": comps if n else 0,
                        "bbox": ([int(v) for v in self.lo[c]] + [int(v) for v in self.hi[c]]) if n else None})
        return out


def write_stats_csv(path: Path, reports: list[Any]) -> None:
    """Write every report's stats rows to one CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    for rep in reports:
        for row in rep.stats or []:
            r = dict(row, input=rep.input)
            r["bbox"] = " ".join(map(str, r["bbox"])) if r["bbox"] else ""
            w.writerow(r)
    tmp = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(buf.getvalue())
    tmp.replace(path)
