"""What every lazy slide reader shares: :class:`RegionPlane` (normalisation, pyramid level choice, the
streamed area-averaged overview, region reads) and :class:`SpilledOverview`.

:class:`~segcli.io.bigtiff.TiffPlane` (tifffile) and :class:`~segcli.io.openslide_reader.OpenSlidePlane`
(OpenSlide) only open levels and implement ``read_raw(box, level)``; everything else is here once.
"""

from __future__ import annotations

import abc
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli import normalize as norm
from segcli.errors import EmptyImageError, InputError
from segcli.resize import downscale_by_bands, resize_weights

# Kinds whose normalisation needs no per-image statistics: they can run on each decoded band.
_STATELESS = ("scale", "ct_window")
_SAMPLE = 2_000_000


class RegionPlane(abc.ABC):
    """What every lazy slide reader shares (the engines' ``Plane`` protocol over a level pyramid).

    A subclass sets ``path``, ``levels`` (objects with ``height``, ``width``, ``seg`` (segment h, w),
    ``channels``, ``dtype``), ``resolution``, ``ome``, ``spacing``, ``mpp``, ``magnification``,
    ``meta`` and ``notes``, implements ``read_raw(box, level)`` and ``close()``, then calls
    :meth:`_setup`. Normalisation, pyramid level choice, the streamed overview and region reads
    live here once.
    """

    path: Path
    levels: list[Any]
    resolution: dict[str, Any]
    ome: dict[str, Any]
    spacing: tuple[float, float] | None
    mpp: tuple[float, float] | None
    magnification: float | None
    meta: dict[str, Any]
    notes: list[str]

    def _setup(
        self, spec: dict[str, Any], channels_want: int | None, channel_mode: str, cache_bytes: int
    ) -> None:
        self.spec = spec
        self.channel_mode = channel_mode
        lv0 = self.levels[0]
        self.shape = (lv0.height, lv0.width)
        self.raw_channels = lv0.channels
        self.dtype = lv0.dtype
        self.channels = int(channels_want) if channels_want is not None else lv0.channels
        if channels_want is not None and channels_want != lv0.channels:
            # Fail now, with the in-memory path's message, rather than on the first region.
            norm.convert_channels(
                np.zeros((1, 1, lv0.channels), lv0.dtype), channels_want, channel_mode, self.path
            )
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._caching = True
        self._io = threading.Lock()
        self._cache_lock = threading.Lock()
        self.segments_decoded = 0
        self.bytes_decoded = 0
        self.decoded_by_level: dict[int, int] = {}
        self.level_reads: list[int] = []
        self._stats: dict[str, float] | None = None
        self._spec_eff: dict[str, Any] | None = None
        self._overviews: dict[tuple[int, int], np.ndarray] = {}
        self._conv_dtype = self._convert(np.zeros((1, 1, lv0.channels), lv0.dtype)).dtype
        kind = spec["kind"]
        # Stateless kinds normalise each region on its own exactly as the whole image would be.
        self._stateless = kind in _STATELESS or (kind == "dtype" and self._conv_dtype.kind != "f")

    # -- bookkeeping ------------------------------------------------------------------------------------
    def close(self) -> None:
        self._cache.clear()
        self._overviews.clear()

    def __enter__(self) -> RegionPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def read_raw(self, box: tuple[int, int, int, int] | np.ndarray, level: int = 0) -> np.ndarray:
        """Channel-last raw pixels of ``box`` (level-0 coordinates) read from ``level``: each reader's own."""

    @property
    def factors(self) -> list[float]:
        """Downscale factor of each level relative to level 0."""
        H, W = self.shape
        return [max(H / lv.height, W / lv.width) for lv in self.levels]

    def choose_level(self, out_hw: tuple[int, int]) -> int:
        """The coarsest level still at least as fine as ``out_hw`` (never coarser than asked)."""
        H, W = self.shape
        want = min(H / max(out_hw[0], 1), W / max(out_hw[1], 1))
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.height >= out_hw[0] and lv.width >= out_hw[1] and self.factors[i] <= want * (1 + 1e-9):
                best = i if self.factors[i] >= self.factors[best] else best
        return best

    def _count(self, level: int, segments: int, nbytes: int) -> None:
        self.segments_decoded += segments
        self.bytes_decoded += int(nbytes)
        self.decoded_by_level[level] = self.decoded_by_level.get(level, 0) + segments

    # -- normalisation ----------------------------------------------------------------------------------
    def _convert(self, raw: np.ndarray) -> np.ndarray:
        return norm.convert_channels(raw, self.channels, self.channel_mode, self.path)

    def _normalize(self, a: np.ndarray) -> np.ndarray:
        """Channel-last converted pixels → normalised float32, with this image's statistics."""
        if self._stateless:
            return norm.normalize(a, self.spec)
        if self._spec_eff is None:
            # lazy: brings scipy
            from segcli.geometry import fit_aspect

            self.downscaled(fit_aspect(self.shape, 1024))  # statistics from an (ideally pyramid) overview
        return norm.normalize(a, self._spec_eff, self._stats)  # type: ignore[arg-type]

    def _finish_stats(self, sample: np.ndarray, lo: float, hi: float, conv_dtype: np.dtype) -> None:
        kind = self.spec["kind"]
        if kind == "dtype" and conv_dtype.kind == "f":
            # In memory, float 'dtype' input outside [0, 1] is min-max scaled over the whole image.
            outside = lo < 0 or hi > 1
            self._spec_eff = {"kind": "minmax"}
            self._stats = {"lo": lo if outside else 0.0, "hi": hi if outside else 1.0}
        elif kind in ("percentile", "minmax", "zscore"):
            self._spec_eff = self.spec
            self._stats = norm.image_stats(sample, self.spec)
            if kind == "minmax":
                self._stats = {"lo": lo, "hi": hi}
        else:
            self._spec_eff = self.spec
            self._stats = None

    # -- Plane protocol ---------------------------------------------------------------------------------
    def region(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        """``(C, h, w)`` float32 of a full-resolution box."""
        a = self._normalize(self._convert(self.read_raw(box, 0)))
        return np.ascontiguousarray(np.moveaxis(a, -1, 0))

    def _chunks(self, li: int) -> Iterator[tuple[int, int, int, int]]:
        """The overview pass's pieces of level ``li``, in raster order: one row of segments at a time
        (several rows of short strips), split into runs of whole tiles of about ``_CHUNK`` bytes of
        float32, so the working set is independent of the slide's size. Strips are never split across
        (each column piece would decode the whole strip again)."""
        lv = self.levels[li]
        sh, sw = lv.seg
        px_bytes = max(self.channels, lv.channels) * 4
        if sw >= lv.width:  # strips: as many as fit, at least one
            rows = max(sh, (_CHUNK // max(lv.width * px_bytes, 1)) // sh * sh)
            cols = lv.width
        else:
            rows = sh
            cols = max(1, _CHUNK // max(sh * sw * px_bytes, 1)) * sw
        for r0 in range(0, lv.height, rows):
            for c0 in range(0, lv.width, cols):
                yield r0, c0, min(lv.height, r0 + rows), min(lv.width, c0 + cols)

    def _overview_rows(self, out_hw: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
        """Finished rows ``(o0, (C, n, w) float32)`` of the area-averaged view at ``out_hw``, top to bottom.

        The best pyramid level is read in pieces (:meth:`_chunks`): each is decoded (not cached: the
        overview never revisits a tile), averaged into the few output rows and columns it covers, and
        dropped; an output row is handed out as soon as the last input row it averages has been read.
        Stateless normalisations are applied before averaging (the in-memory order); for the others the
        rows are raw averages, and the statistics of this pass are set (``_finish_stats``) when it ends,
        for :meth:`_normalize_view`. Memory: one piece and a few output rows, whatever the slide's size.
        """
        li = self.choose_level(out_hw)
        self.level_reads.append(li)
        lv = self.levels[li]
        ry, rx = _area_weights(lv.height, out_hw[0]), _area_weights(lv.width, out_hw[1])
        if isinstance(ry, Block):
            last_in = np.minimum((np.arange(out_hw[0]) + 1) * ry.k, lv.height) - 1
        else:
            ryr = ry.tocsr()
            last_in = np.maximum.reduceat(ryr.indices, ryr.indptr[:-1])  # last input row of each output row
        step = max(1, int(math.sqrt(lv.height * lv.width / _SAMPLE)))
        samples: list[np.ndarray] = []
        lo, hi = np.inf, -np.inf
        start = 0  # the first output row not handed out yet
        window = np.zeros((self.channels, 0, out_hw[1]), np.float32)  # output rows start, start + 1, ...
        self._caching = False
        try:
            for r0, r1, pieces in self._rows_of_chunks(li):
                wy, o0, o1 = _window(ry, r0, r1)
                if o1 - start > window.shape[1]:
                    grow = np.zeros((self.channels, o1 - start - window.shape[1], out_hw[1]), np.float32)
                    window = np.concatenate([window, grow], axis=1)
                for c0, c1 in pieces:
                    a = self._convert(self.read_raw((r0, c0, r1, c1), li))
                    fin = a[np.isfinite(a)] if a.dtype.kind == "f" else a
                    if fin.size:
                        lo, hi = min(lo, float(fin.min())), max(hi, float(fin.max()))
                    if not self._stateless and self._spec_eff is None:
                        sub = a[(-r0) % step :: step, (-c0) % step :: step]
                        samples.append(np.ascontiguousarray(sub).reshape(-1))
                    y = (
                        norm.normalize(a, self.spec)
                        if self._stateless
                        else np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    )
                    del a
                    wx, q0, q1 = _window(rx, c0, c1)
                    window[:, o0 - start : o1 - start, q0:q1] += _average(y, wy, wx)
                    del y
                done = int(np.searchsorted(last_in, r1, side="left"))  # rows whose inputs are all read
                if done > start:
                    yield start, window[:, : done - start]
                    window = window[:, done - start :].copy()
                    start = done
        finally:
            self._caching = True
        if start < out_hw[0]:  # pragma: no cover - every row's last input is read by the end
            yield start, window[:, : out_hw[0] - start]
        if not np.isfinite(lo):
            raise InputError("image holds no finite values (all NaN or infinite)", self.path)
        if lo == hi:
            raise EmptyImageError(f"image is constant (every pixel = {lo:g}); nothing to segment", self.path)
        if not self._stateless and self._spec_eff is None:
            self._finish_stats(np.concatenate(samples), lo, hi, self._conv_dtype)

    def _rows_of_chunks(self, li: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        """:meth:`_chunks` grouped by row band: ``(r0, r1, [(c0, c1), ...])``."""
        rows: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r0, c0, r1, c1 in self._chunks(li):
            if rows and (r0, r1) not in rows:
                ((p0, p1), pieces), = rows.items()
                yield p0, p1, pieces
                rows.clear()
            rows.setdefault((r0, r1), []).append((c0, c1))
        for (p0, p1), pieces in rows.items():
            yield p0, p1, pieces

    def _normalize_view(self, rows: np.ndarray) -> np.ndarray:
        """Raw averaged ``(C, n, w)`` overview rows → normalised (a no-op for stateless kinds)."""
        if self._stateless:
            return rows
        out = norm.normalize(np.moveaxis(rows, 0, -1), self._spec_eff, self._stats)  # type: ignore[arg-type]
        return np.ascontiguousarray(np.moveaxis(out, -1, 0), dtype=np.float32)

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        """``(C, h, w)`` area-averaged view, from the best pyramid level, streamed piece by piece
        (:meth:`_overview_rows`). Peak memory is one piece plus the output, whatever the slide's size;
        :meth:`overview_plane` does without the output too."""
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        if out_hw in self._overviews:
            return self._overviews[out_hw].copy()
        out = np.empty((self.channels, *out_hw), np.float32)
        for o0, rows in self._overview_rows(out_hw):
            out[:, o0 : o0 + rows.shape[1]] = rows
        out = self._normalize_view(out)
        if out.nbytes > _KEEP_OVERVIEW:
            # A big overview (the tiled rough pass of a huge slide) is handed over, not kept as well:
            # a second copy would make peak memory grow with the slide.
            self._overviews = {}
            return out
        self._overviews = {out_hw: out}
        return out.copy()

    def level_view(self, out_hw: tuple[int, int]) -> LevelView | None:
        """The view :meth:`downscaled` would return, computed region by region on demand (:class:`LevelView`);
        None when the normalisation needs a whole pass's statistics."""
        return LevelView(self, (int(out_hw[0]), int(out_hw[1]))) if self._stateless else None

    def overview_plane(self, out_hw: tuple[int, int], spill_dir: Path | str | None = None) -> SpilledOverview:
        """The view :meth:`downscaled` would return, as a Plane kept in a temporary file (read back by
        region), so a huge slide's rough pass never holds its whole overview in memory. Close it."""
        return SpilledOverview(self, (int(out_hw[0]), int(out_hw[1])), spill_dir)


class SpilledOverview:
    """A :class:`RegionPlane`'s area-averaged overview as a Plane: rows written to a temporary file as
    they are finished, ``region`` reads rows back with ``pread`` (no memory map, so pages read stay out
    of this process's resident set) and normalises them. ``region(box)`` equals
    ``plane.downscaled(shape)[:, y0:y1, x0:x1]``."""

    def __init__(self, plane: RegionPlane, out_hw: tuple[int, int], spill_dir: Path | str | None = None) -> None:
        self.plane = plane
        self.shape = out_hw
        self.channels = plane.channels
        fd, name = tempfile.mkstemp(prefix="segcli-overview-", suffix=".f32", dir=spill_dir)
        os.unlink(name)  # gone from the folder at once; the space is freed when fd closes
        self._fd = fd
        self._row_bytes = out_hw[1] * self.channels * 4
        try:
            for o0, rows in plane._overview_rows(out_hw):
                data = np.ascontiguousarray(np.moveaxis(rows, 0, -1), dtype=np.float32)  # (n, w, C)
                os.pwrite(fd, data.tobytes(), o0 * self._row_bytes)
        except BaseException:
            os.close(fd)
            raise

    def region(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        n = (y1 - y0) * self._row_bytes
        raw = os.pread(self._fd, n, y0 * self._row_bytes)
        rows = np.frombuffer(raw, np.float32).reshape(y1 - y0, self.shape[1], self.channels)[:, x0:x1]
        return self.plane._normalize_view(np.ascontiguousarray(np.moveaxis(rows, -1, 0)))

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        """By bands of rows read back from the file: the overview is never held whole (the glass is found on a
        quarter of it this way, segcli.engines.stts)."""
        return downscale_by_bands(self.region, self.shape, self.channels, out_hw)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SpilledOverview:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LevelView:
    """A :class:`RegionPlane`'s area-averaged view at ``out_hw``, region by region: ``region(box)`` decodes
    only the pyramid level's pixels under the box and averages them with the whole view's own weights, so it
    equals ``plane.downscaled(out_hw)[:, y0:y1, x0:x1]`` (up to float rounding) without the whole view ever
    being made: a rough pass that looks at a few parts of a slide decodes only those. Stateless
    normalisations only (:meth:`RegionPlane.level_view`)."""

    def __init__(self, plane: RegionPlane, out_hw: tuple[int, int]) -> None:
        self.plane = plane
        self.shape = out_hw
        self.channels = plane.channels
        self.level = plane.choose_level(out_hw)
        lv = plane.levels[self.level]
        self._ry = resize_weights(lv.height, out_hw[0], "area").astype(np.float32).tocsr()
        self._rx = resize_weights(lv.width, out_hw[1], "area").astype(np.float32).tocsr()
        plane.level_reads.append(self.level)

    def region(self, box: np.ndarray | tuple[int, int, int, int]) -> np.ndarray:
        """The view's ``box``, from the level read in bands of whole segment rows (:func:`band_rows`): a
        rough window of a slide without a pyramid covers 2000² level pixels, 48 MB as float32 at once."""
        y0, x0, y1, x1 = (int(v) for v in box)
        ry, rx = self._ry[y0:y1], self._rx[x0:x1]
        ly0, ly1 = int(ry.indices.min()), int(ry.indices.max()) + 1
        lx0, lx1 = int(rx.indices.min()), int(rx.indices.max()) + 1
        p = self.plane
        wy, wx = ry[:, ly0:ly1].tocsc(), rx[:, lx0:lx1]
        rows = np.zeros((y1 - y0, lx1 - lx0, self.channels), np.float32)
        seg_h = p.levels[self.level].seg[0]
        for b0, b1 in band_rows(ly0, ly1, seg_h, (lx1 - lx0) * self.channels * 4):
            a = norm.normalize(p._convert(p.read_raw((b0, lx0, b1, lx1), self.level)), p.spec)
            rows += _rows(a, wy[:, b0 - ly0 : b1 - ly0])
            del a
        return _columns(rows, wx)

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        return self.plane.downscaled(out_hw)

    def close(self) -> None:
        pass


# Bytes of float32 work per overview piece (a run of tiles of one tile row).
_CHUNK = 16 * 2**20
# Overviews up to this size are kept for a repeated request (statistics, then the rough pass).
_KEEP_OVERVIEW = 16 * 2**20


#: Bytes of float32 a :class:`LevelView` region holds per band of level rows.
_BAND = 4 * 2**20


def band_rows(r0: int, r1: int, seg_h: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    """Rows ``r0:r1`` in bands of about :data:`_BAND` bytes (``row_bytes`` each), cut on segment rows
    (``seg_h``), so no tile or strip is decoded twice for one region."""
    step = max(seg_h, (_BAND // max(row_bytes, 1)) // seg_h * seg_h)
    b0 = r0
    while b0 < r1:
        b1 = min(r1, (b0 // seg_h) * seg_h + step)
        yield b0, b1
        b0 = b1


class Block:
    """The area weights of a reduction by a whole factor ``k`` (1: the identity), rows ``i0:i1`` of the input once
    cut by :func:`_window`: each output pixel is the mean of ``k`` inputs, so no matrix is built and scipy.sparse
    is not imported (0.06-0.1 s of a slide run's start): a 16000² SVS's ×16 level is its 1000² tissue
    thumbnail, an 8000² one's ×4 level four times it."""

    def __init__(self, k: int, i0: int = 0, i1: int = 0) -> None:
        self.k, self.i0, self.i1 = int(k), int(i0), int(i1)

    def reduce(self, a: np.ndarray, axis: int) -> np.ndarray:
        """float32 ``a`` (inputs ``i0:i1`` along ``axis``) averaged into its outputs (partial at the ends: the
        caller sums the pieces of an output, as it does the sparse products)."""
        a = np.asarray(a, np.float32)
        if self.k == 1:
            return a
        out = np.arange(self.i0, self.i1) // self.k
        starts = np.flatnonzero(np.concatenate([[True], out[1:] != out[:-1]]))
        return np.add.reduceat(a, starts, axis=axis) * np.float32(1.0 / self.k)


def _area_weights(n_in: int, n_out: int) -> Any:
    """A :class:`Block` for a whole factor, else the sparse area weights (CSC) of :func:`resize_weights`."""
    return Block(n_in // n_out) if n_in % n_out == 0 else resize_weights(n_in, n_out, "area").tocsc()


def _rows(a: np.ndarray, wy: Any) -> np.ndarray:
    """Channel-last ``(r, c, C)`` pixels averaged over rows by ``wy`` (o × r, or a :class:`Block`): ``(o, c, C)``
    float32. Rows first: the product reads ``a`` in its own order, and the rest of the work is ``o / r`` as big."""
    if isinstance(wy, Block):
        return wy.reduce(a, 0)
    r, c, C = a.shape
    out = wy @ np.ascontiguousarray(a, np.float32).reshape(r, c * C)
    return np.asarray(out, np.float32).reshape(-1, c, C)


def _columns(rows: np.ndarray, wx: Any) -> np.ndarray:
    """``(o, c, C)`` averaged over columns by ``wx`` (q × c, or a :class:`Block`): ``(C, o, q)`` float32."""
    if isinstance(wx, Block):
        return np.ascontiguousarray(wx.reduce(rows, 1).transpose(2, 0, 1))
    o, c, C = rows.shape
    t = wx @ np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(c, o * C)
    return np.ascontiguousarray(np.asarray(t, np.float32).reshape(-1, o, C).transpose(2, 1, 0))


def _average(a: np.ndarray, wy: Any, wx: Any) -> np.ndarray:
    """Channel-last ``(r, c, C)`` pixels → their ``(C, o, q)`` area average by ``wy`` (o × r) and ``wx`` (q × c)."""
    return _columns(_rows(a, wy), wx)


def _window(weights: Any, i0: int, i1: int) -> tuple[Any, int, int]:
    """Columns ``i0:i1`` of a CSC weight matrix (or a :class:`Block`) cut to the output rows they touch:
    (block, o0, o1)."""
    if isinstance(weights, Block):
        return Block(weights.k, i0, i1), i0 // weights.k, -(-i1 // weights.k)
    block = weights[:, i0:i1]
    if block.nnz == 0:
        return block[:0], 0, 0
    o0, o1 = int(block.indices.min()), int(block.indices.max()) + 1
    return block[o0:o1].tocsr(), o0, o1
