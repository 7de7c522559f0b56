"""Exact pixel-edge contours of label masks: the tracing behind segcli's GeoJSON writer.

The objects of one class are drawn into a lattice of twice the resolution in which pixel ``(i, j)`` covers
the closed 3×3 block of lattice points around ``(2i + 1, 2j + 1)``. OpenCV's border following walks lattice
points on pixel edges; skipped pixel corners are put back and only corners where the direction turns are
kept, so the rings rasterised at pixel centres give back the mask exactly. Objects that touch at a corner
would share a lattice point, so they are traced in separate passes (:func:`contact_layers`). See
:mod:`segcli.io.geojson` for how tiles and objects across tile edges are handled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_K3 = None  # the 3x3 dilation kernel, made when OpenCV is first needed


def _cv2() -> Any:
    global _K3
    try:
        # lazy: OpenCV costs ~0.15 s to import
        import cv2
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("GeoJSON output needs OpenCV: pip install opencv-python-headless") from exc
    if _K3 is None:
        _K3 = np.ones((3, 3), np.uint8)
    return cv2


def _cyclic(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For points grouped by ring id ``seg`` (rings contiguous): ring starts, ends, and each point's
    previous and next point within its ring (cyclically)."""
    n = len(seg)
    new = np.ones(n, bool)
    new[1:] = seg[1:] != seg[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    nxt = np.arange(1, n + 1)
    nxt[ends - 1] = starts
    prv = np.arange(-1, n - 1)
    prv[starts] = ends - 1
    return starts, ends, prv, nxt


def _turns(pts: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated, then collinear points of rings (every edge axis-aligned)."""
    _, _, _, nxt = _cyclic(seg)
    keep = (pts[nxt] != pts).any(axis=1)
    pts, seg = pts[keep], seg[keep]
    _, _, prv, nxt = _cyclic(seg)
    d1, d2 = pts - pts[prv], pts[nxt] - pts
    keep = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0] != 0
    return pts[keep], seg[keep]


def trace_all(mask: np.ndarray, shift: tuple[int, int]) -> _Traced | None:
    """Every object of a 2-D bool mask: its exterior ring (counter-clockwise) and holes (clockwise) as
    pixel corners ``[x, y]`` shifted by ``shift`` = (x, y), and its first pixel in raster order (so the
    caller can look up its label); ``None`` for an empty mask.

    Objects here are the 8-connected regions of the closed pixel squares; for them to be 4-connected
    objects, no two 4-connected components of ``mask`` may touch at a corner only (the caller makes
    sure). All contours of the mask are post-processed at once, in numpy.
    """
    cv2 = _cv2()
    h, w = mask.shape
    d = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    d[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = mask
    d = cv2.dilate(d, _K3)
    # Straight runs come compressed (CHAIN_APPROX_SIMPLE). A run of several diagonal steps is not expected
    # in this grid (each diagonal step ends on an edge midpoint next to a pixel corner); if one shows up,
    # the mask is traced again step by step, where every diagonal step is handled on its own.
    for method in (cv2.CHAIN_APPROX_SIMPLE, cv2.CHAIN_APPROX_NONE):
        found = cv2.findContours(d, cv2.RETR_CCOMP, method)
        contours, hier = found[-2], found[-1]
        if not contours:
            return None
        lens = np.fromiter((len(c) for c in contours), np.int64, len(contours))
        p = np.concatenate(contours).reshape(-1, 2).astype(np.int64)  # (x, y) in the padded doubled grid
        seg = np.repeat(np.arange(len(lens)), lens)
        _, _, _, nxt = _cyclic(seg)
        q = p[nxt]
        step = np.abs(q - p)
        diag = (step[:, 0] > 0) & (step[:, 1] > 0)
        if not (step[diag] > 1).any():
            break
    # A diagonal step joins two edge midpoints and cuts a pixel corner; of its two candidate points the
    # one with both coordinates odd (a pixel corner in this grid) lies on the object's edge: put it back.
    first = ((p[:, 0] & 1) == 1) & ((q[:, 1] & 1) == 1)
    both = np.empty((2 * len(p), 2), np.int64)
    both[0::2] = p
    both[1::2, 0] = np.where(first, p[:, 0], q[:, 0])
    both[1::2, 1] = np.where(first, q[:, 1], p[:, 1])
    keep = np.ones(2 * len(p), bool)
    keep[1::2] = diag
    keep &= ((both[:, 0] & 1) == 1) & ((both[:, 1] & 1) == 1)  # pixel corners only
    pts, seg = _turns((both[keep] - 1) >> 1, np.repeat(seg, 2)[keep])
    starts, ends, _, nxt = _cyclic(seg)
    if len(starts) != len(contours):  # pragma: no cover - every traced ring has corners
        raise AssertionError("a traced contour vanished")
    x, y = pts[:, 0], pts[:, 1]
    area2 = np.add.reduceat(x * y[nxt] - x[nxt] * y, starts)
    outer = hier[0][:, 3] < 0
    # exterior counter-clockwise (positive area), holes clockwise: reverse the rings that are not
    flip = np.repeat(np.where(outer, area2 < 0, area2 > 0), ends - starts)
    idx = np.arange(len(pts))
    first_of, last_of = np.repeat(starts, ends - starts), np.repeat(ends - 1, ends - starts)
    pts = pts[np.where(flip, first_of + last_of - idx, idx)]
    # the first pixel of each object: its top-left corner is the ring's lowest (y, x)
    key = pts[:, 1] * (w + 1) + pts[:, 0]
    top = np.minimum.reduceat(key, starts)
    first_y, first_x = top // (w + 1), top % (w + 1)
    closed, text, spans = _close_rings(pts, starts, ends, shift)
    objs: list[list[tuple[int, int, int, int]]] = []
    where: dict[int, list[Any]] = {}
    parents = hier[0][:, 3]
    for i, (parent, span) in enumerate(zip(parents.tolist(), spans, strict=True)):
        if parent < 0:
            rings = [span]
            where[i] = rings
            objs.append(rings)
        else:
            where[parent].append(span)
    outer = parents < 0
    return _Traced(closed, text, objs, first_y[outer], first_x[outer])


def _close_rings(pts: np.ndarray, starts: np.ndarray, ends: np.ndarray, shift: tuple[int, int] = (0, 0),
                 ) -> tuple[np.ndarray, str, list[tuple[int, int, int, int]]]:
    """Open rings (``pts[starts[i]:ends[i]]``) → closed and shifted points, their JSON text, and per ring
    ``(first point, end point, first char, end char)`` in those (a ring's text is ``text[ca:cb]``)."""
    n_ring = ends - starts
    gather = np.repeat(starts, n_ring + 1) + np.arange(len(pts) + len(starts)) - np.repeat(
        starts + np.arange(len(starts)), n_ring + 1)
    at_end = np.zeros(len(gather), bool)
    at_end[np.cumsum(n_ring + 1) - 1] = True
    gather[at_end] = starts  # each ring's first point repeated at its end
    closed = pts[gather] + np.asarray(shift, np.int64)
    text, chars = _json_points(closed)
    c_starts = starts + np.arange(len(starts))
    c_ends = ends + np.arange(1, len(starts) + 1)
    spans = list(zip(c_starts.tolist(), c_ends.tolist(), chars[c_starts].tolist(),
                     (chars[c_ends] - 1).tolist(), strict=True))
    return closed, text, spans


def polygon_texts(coords: np.ndarray, ring_offsets: np.ndarray, poly_offsets: np.ndarray) -> list[str]:
    """Polygons as closed rings one after the other (``coords``, with shapely's ragged-array offsets) →
    each polygon's GeoJSON ``coordinates`` text, with repeated and collinear points dropped."""
    pts = np.rint(coords).astype(np.int64)
    ring_of = np.repeat(np.arange(len(ring_offsets) - 1), np.diff(ring_offsets))
    last = np.zeros(len(pts), bool)
    last[ring_offsets[1:] - 1] = True
    pts, seg = _turns(pts[~last], ring_of[~last])
    starts, ends, _, _ = _cyclic(seg)
    if len(starts) != len(ring_offsets) - 1:  # pragma: no cover - a ring always keeps its corners
        raise AssertionError("a ring vanished")
    _, text, spans = _close_rings(pts, starts, ends)
    out = []
    for a, b in zip(poly_offsets[:-1].tolist(), poly_offsets[1:].tolist(), strict=True):
        out.append("[" + ",".join(["[" + text[ca:cb] + "]" for _, _, ca, cb in spans[a:b]]) + "]")
    return out


class _Traced:
    """The rings of one traced mask: points (closed rings, one after the other), their JSON text, and per
    object its rings, each as ``(first point, end point, first char, end char)``, and its first pixel in
    raster order (``first_y``, ``first_x``, in mask pixels)."""

    __slots__ = ("first_x", "first_y", "pts", "rings", "text")

    def __init__(self, pts: np.ndarray, text: str, rings: list[Any], first_y: np.ndarray,
                 first_x: np.ndarray) -> None:
        self.pts, self.text, self.rings, self.first_y, self.first_x = pts, text, rings, first_y, first_x

    def coordinates(self, rings: list[tuple[int, int, int, int]]) -> str:
        """GeoJSON ``coordinates`` text of one polygon."""
        t = self.text
        return "[" + ",".join(["[" + t[ca:cb] + "]" for _, _, ca, cb in rings]) + "]"

    def arrays(self, rings: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        return [self.pts[a:b].astype(np.int32) for a, b, _, _ in rings]


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _json_points(v: np.ndarray) -> tuple[str, np.ndarray]:
    """Integer points (M, 2) → one string ``[x,y],[x,y],...[x,y],`` (each point followed by a comma) and
    each point's first character (M + 1 offsets), written with numpy rather than point by point."""
    m = len(v)
    neg = (v < 0).astype(np.int64)
    a = np.abs(v)
    nd = np.searchsorted(_POW10, a, side="right")  # decimal digits
    nd[a == 0] = 1
    lx, ly = nd[:, 0] + neg[:, 0], nd[:, 1] + neg[:, 1]
    length = lx + ly + 4  # "[" x "," y "]" ","
    off = np.zeros(m + 1, np.int64)
    np.cumsum(length, out=off[1:])
    buf = np.empty(int(off[-1]), np.uint8)
    o = off[:-1]
    buf[o] = ord("[")
    buf[o + 1 + lx] = ord(",")
    buf[o + 2 + lx + ly] = ord("]")
    buf[o + 3 + lx + ly] = ord(",")
    for col, start in ((0, o + 1), (1, o + 2 + lx)):
        n, s, val = nd[:, col], neg[:, col], a[:, col]
        if s.any():
            buf[start[s == 1]] = ord("-")
        first = start + s
        for j in range(int(n.max(initial=1))):
            sel = n > j
            digit = (val[sel] // _POW10[n[sel] - 1 - j]) % 10
            buf[first[sel] + j] = digit + ord("0")
    return buf.tobytes().decode("ascii"), off


def contact_layers(lab: np.ndarray, n: int, mask: np.ndarray) -> list[np.ndarray]:
    """Split 4-connected objects (``lab``, labels 1..n, ``mask = lab > 0``) into masks in which no two
    objects touch, not even at a corner, so that each mask can be traced in one pass. Usually one mask;
    objects that meet others corner to corner are spread over a few more (a greedy colouring of that
    contact graph)."""
    pairs = []
    m00, m11, m01, m10 = mask[:-1, :-1], mask[1:, 1:], mask[:-1, 1:], mask[1:, :-1]
    for (a, b, oy, ox), cross in (((m00, m11, 1, 1), m01 | m10), ((m01, m10, 1, -1), m00 | m11)):
        # two pixels meeting at a corner only (the other two of that 2x2 are not in the mask)
        ys, xs = np.nonzero(a & b & ~cross)
        if len(ys):
            x0 = xs if ox > 0 else xs + 1
            la, lb = lab[ys, x0], lab[ys + oy, x0 + ox]
            diff = la != lb
            if diff.any():
                pairs.append(np.column_stack([la[diff], lb[diff]]))
    if not pairs:
        return [mask]
    pr = np.sort(np.concatenate(pairs).astype(np.int64), axis=1)
    keys = np.unique(pr[:, 0] * (n + 1) + pr[:, 1])
    adj: dict[int, list[int]] = {}
    for a, b in zip((keys // (n + 1)).tolist(), (keys % (n + 1)).tolist(), strict=True):
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    colour = np.zeros(n + 1, np.uint8 if len(adj) < 255 else np.int64)
    done: dict[int, int] = {}
    for k in sorted(adj):
        used = {done[m] for m in adj[k] if m in done}
        col = 0
        while col in used:
            col += 1
        done[k] = col
    colour[list(done)] = list(done.values())
    n_layers = max(done.values()) + 1
    per_pixel = colour[lab]
    return [mask & (per_pixel == 0)] + [per_pixel == r for r in range(1, n_layers)]


def ring_list(coords: Any) -> list[list[int]]:
    """A shapely ring's coordinates → a closed list of integer [x, y] turning points."""
    pts = np.rint(np.asarray(coords)[:-1]).astype(np.int64)
    pts, _ = _turns(pts, np.zeros(len(pts), np.int64))
    out = pts.tolist()
    out.append(out[0])
    return out


def from_rings(polys: list[list[np.ndarray]]) -> np.ndarray:
    """Polygons given as lists of closed rings (exterior first) → an array of shapely Polygons, in one call."""
    # lazy: shapely costs ~0.15 s to import
    import shapely

    rings = [r for p in polys for r in p]
    ring_off = np.zeros(len(rings) + 1, np.int64)
    np.cumsum([len(r) for r in rings], out=ring_off[1:])
    poly_off = np.zeros(len(polys) + 1, np.int64)
    np.cumsum([len(p) for p in polys], out=poly_off[1:])
    coords = np.concatenate(rings).astype(np.float64)
    return shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
