"""Huge TIFFs without holding them: a lazy, region-reading :class:`TiffPlane` and a streamed tiled writer.

Reading. A 40,000² RGB slide is 4.8 GB decoded; segment-then-segment only needs a rough view and
the crops, so :class:`TiffPlane` (the engines' ``Plane`` protocol) never decodes level 0 whole:

* ``downscaled(hw)`` reads the pyramid level (OME/SubIFD, SVS, NDPI or multi-page pyramid; a label,
  macro or thumbnail image is never taken for a level) closest to, and not coarser than, the
  requested scale; without a suitable level it streams the level in pieces (a run of tiles of one
  tile row, or a chunk of strips) through exact area-averaging weights, so memory is one piece plus
  the output; ``overview_plane(hw)`` keeps even the output in a temporary file (:class:`SpilledOverview`);
* ``region(box)`` decodes only the tiles/strips the box touches (``page.decode`` on the raw segment
  bytes, with JPEG tables / NDPI JPEG headers; zlib/deflate/packbits/none natively, JPEG, JPEG 2000,
  LZW, WebP, JPEG XR/XL through ``imagecodecs``), through a byte-bounded LRU cache, because
  neighbouring stts crops share tiles;
* the pixel size (``mpp``, ``spacing``) and ``magnification`` come from the slide's own metadata
  (:func:`segcli.io.tiff.physical_size`: OME, Aperio ``MPP``/``AppMag``, NDPI, resolution tags);
* pixels are normalised per region with statistics from the rough-level pass (``image_stats`` once
  per image), so every region is scaled the same way. For affine normalisations (dtype, scale,
  zscore) and ct_window on stateless kinds the rough view equals that of the in-memory path; for
  percentile/minmax the rough view is normalised after averaging, which differs only where one rough
  pixel mixes values on both sides of a clipping bound.

Writing. :func:`write_tiled` streams a mask (or K probability planes) into a tiled, zlib-compressed
BigTIFF tile by tile from a ``read(box)`` callable, keeps the resolution tags (and OME PhysicalSize
for OME input), and optionally adds a pyramid as SubIFDs (each level /2, nearest — labels must not be
averaged) built from spilled per-level tile stores, never from a full-size array. It writes to a hidden
partial name beside the output and renames (``atomic_path``).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli import normalize as norm
from segcli.errors import EmptyImageError, InputError

# Kinds whose normalisation needs no per-image statistics: they can run on each decoded band.
_STATELESS = ("scale", "ct_window")
_SAMPLE = 2_000_000


def is_tiff(path: Path | str) -> bool:
    """TIFF magic bytes (classic or BigTIFF, either byte order)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _hw_channels(axes: str, shape: tuple[int, ...]) -> tuple[tuple[int, int], int] | None:
    """``((H, W), channels)`` for the 2D layouts the readers handle (YX, YXS, SYX/CYX), else None."""
    if axes == "YX":
        return (int(shape[0]), int(shape[1])), 1
    if axes == "YXS":
        return (int(shape[0]), int(shape[1])), int(shape[2])
    if len(axes) == 3 and axes[0] in "SC" and axes[1:] == "YX":
        return (int(shape[1]), int(shape[2])), int(shape[0])
    return None


def tiff_header(path: Path | str) -> tuple[tuple[int, int], int, int] | None:
    """``((H, W), channels, itemsize)`` of series 0 level 0 from the IFDs alone, or None if not a 2D TIFF.

    Decodes no pixels; None also for an unreadable file (the regular reader then gives the precise error).
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            level = tif.series[0].levels[0]
            found = _hw_channels(level.axes, level.shape)
            return None if found is None else (found[0], found[1], level.dtype.itemsize)
    except Exception:
        return None


class _Level:
    """One resolution level: its pages (one per channel group) and its segment geometry."""

    def __init__(self, pages: list[Any], path: Path) -> None:
        self.pages = pages
        p0 = pages[0]
        if int(getattr(p0, "imagedepth", 1) or 1) != 1:
            raise InputError("volumetric (tiled-depth) TIFF pages are not supported by the lazy reader", path)
        self.height, self.width = int(p0.imagelength), int(p0.imagewidth)
        self.samples = [int(p.samplesperpixel) for p in pages]
        self.channels = sum(self.samples)
        self.dtype = np.dtype(p0.dtype)
        self.planar = [int(p.planarconfig) == 2 and int(p.samplesperpixel) > 1 for p in pages]
        if p0.is_tiled:
            self.seg = (int(p0.tilelength), int(p0.tilewidth))
        else:
            self.seg = (min(int(p0.rowsperstrip or self.height), self.height), self.width)
        self.down = math.ceil(self.height / self.seg[0])
        self.across = math.ceil(self.width / self.seg[1])
        for p, planar in zip(pages, self.planar, strict=True):
            want = (int(p.samplesperpixel) if planar else 1) * self.down * self.across
            if len(p.dataoffsets) != want:
                raise InputError(
                    f"TIFF page has {len(p.dataoffsets)} segments, expected {want}; cannot read it by region",
                    path,
                )

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.channels * self.dtype.itemsize


def is_reduction(base_hw: tuple[int, int], hw: tuple[int, int], previous_hw: tuple[int, int]) -> bool:
    """True when ``hw`` is a proper pyramid level of ``base_hw``: smaller than ``previous_hw`` and the same
    aspect ratio (within rounding), so a slide's label or macro image is never taken for a level."""
    (H, W), (h, w) = base_hw, hw
    if h <= 0 or w <= 0 or h > previous_hw[0] or w > previous_hw[1] or (h, w) == tuple(previous_hw):
        return False
    f = W / w
    return abs(h - H / f) <= max(2.0, 0.01 * h)


_ASSOCIATED = ("label", "macro", "thumbnail", "overview")


def _extra_levels(tif: Any, base: _Level) -> list[list[Any]]:
    """Reduced-resolution pages stored as separate main IFDs after a one-level series 0 (a multi-page
    pyramid that tifffile does not group): tiled, same samples and dtype, same aspect; label, macro
    and thumbnail images (by NewSubfileType or description) are skipped."""
    found: list[list[Any]] = []
    p0 = base.pages[0]
    if len(base.pages) != 1 or not p0.is_tiled:
        return found
    previous = (base.height, base.width)
    for page in itertools.islice(tif.pages, 64):  # a pyramid has a few pages, a stack may have thousands
        if not hasattr(page, "is_tiled") or page is p0 or not page.is_tiled:
            continue
        description = str(getattr(page, "description", "") or "").lower()
        if int(page.subfiletype) & ~1 or any(word in description[:200] for word in _ASSOCIATED):
            continue
        if int(page.samplesperpixel) != int(p0.samplesperpixel) or np.dtype(page.dtype) != base.dtype:
            continue
        hw = (int(page.imagelength), int(page.imagewidth))
        if is_reduction((base.height, base.width), hw, previous):
            found.append([page])
            previous = hw
    return found


class RegionPlane:
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

    def read_raw(self, box: tuple[int, int, int, int] | np.ndarray, level: int = 0) -> np.ndarray:
        raise NotImplementedError

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
        from segcli.engines.base import resize_weights

        li = self.choose_level(out_hw)
        self.level_reads.append(li)
        lv = self.levels[li]
        ry = resize_weights(lv.height, out_hw[0], "area").tocsc()
        rx = resize_weights(lv.width, out_hw[1], "area").tocsc()
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
                    y2 = np.moveaxis(y, -1, 0).reshape(self.channels * (r1 - r0), c1 - c0)
                    t = np.asarray((wx @ y2.T).T).reshape(self.channels, r1 - r0, q1 - q0)  # columns first
                    for c in range(self.channels):
                        window[c, o0 - start : o1 - start, q0:q1] += np.asarray(wy @ t[c], dtype=np.float32)
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
        import os
        import tempfile

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
        import os

        y0, x0, y1, x1 = (int(v) for v in box)
        n = (y1 - y0) * self._row_bytes
        raw = os.pread(self._fd, n, y0 * self._row_bytes)
        rows = np.frombuffer(raw, np.float32).reshape(y1 - y0, self.shape[1], self.channels)[:, x0:x1]
        return self.plane._normalize_view(np.ascontiguousarray(np.moveaxis(rows, -1, 0)))

    def downscaled(self, out_hw: tuple[int, int]) -> np.ndarray:
        from segcli.engines.base import ArrayPlane

        return ArrayPlane(self.region((0, 0, *self.shape))).downscaled(out_hw)

    def close(self) -> None:
        import os

        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SpilledOverview:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Bytes of float32 work per overview piece (a run of tiles of one tile row).
_CHUNK = 16 * 2**20
# Overviews up to this size are kept for a repeated request (statistics, then the rough pass).
_KEEP_OVERVIEW = 16 * 2**20


def _window(weights: Any, i0: int, i1: int) -> tuple[Any, int, int]:
    """Columns ``i0:i1`` of a CSC weight matrix cut to the output rows they touch: (block, o0, o1)."""
    block = weights[:, i0:i1]
    if block.nnz == 0:
        return block[:0], 0, 0
    o0, o1 = int(block.indices.min()), int(block.indices.max()) + 1
    return block[o0:o1].tocsr(), o0, o1


class TiffPlane(RegionPlane):
    """A TIFF (series 0) as a :class:`~segcli.engines.base.Plane`: region reads and pyramid-aware overviews.

    ``channels_want``/``channel_mode`` follow ``--channels``; ``spec`` is the bundle's normalisation.
    ``segments_decoded``/``bytes_decoded`` count what was decoded (per level in ``decoded_by_level``),
    so tests and reports can prove level 0 was never read whole. ``mpp`` ((y, x) µm),
    ``magnification`` and ``spacing`` ((y, x) mm) come from the slide's metadata
    (:func:`segcli.io.tiff.physical_size`); ``resolution`` holds tags that agree with them.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        spec: dict[str, Any],
        channels_want: int | None = None,
        channel_mode: str = "keep",
        cache_bytes: int = 128 * 2**20,
    ) -> None:
        import tifffile

        from segcli.io import tiff as tiffio

        self.path = Path(path)
        self.notes: list[str] = []
        try:
            self.tif = tifffile.TiffFile(self.path)
        except Exception as exc:
            raise InputError(f"not a readable TIFF ({exc})", self.path) from None
        try:
            with tiffio.collect_log(self.notes):
                self._open_levels(tiffio)
        except BaseException:
            self.tif.close()
            raise
        self._setup(spec, channels_want, channel_mode, cache_bytes)

    def _open_levels(self, tiffio: Any) -> None:
        if not self.tif.series:
            raise InputError("TIFF holds no image series", self.path)
        series = self.tif.series[0]
        axes = series.levels[0].axes
        if _hw_channels(axes, series.levels[0].shape) is None:
            raise InputError(f"the lazy TIFF reader handles 2D images (axes YX, YXS, CYX), not {axes}", self.path)
        tiffio.check_level(series.levels[0], self.path)
        levels = [_Level([p for p in lvl.pages if p is not None], self.path) for lvl in series.levels]
        # Keep only proper reductions, in order (never a label or macro image that a writer put in).
        self.levels = [levels[0]]
        dropped = 0
        for lv in levels[1:]:
            prev = self.levels[-1]
            same = lv.channels == prev.channels and lv.dtype == prev.dtype
            if same and is_reduction(self.shape0, (lv.height, lv.width), (prev.height, prev.width)):
                self.levels.append(lv)
            else:
                dropped += 1
        if len(levels) == 1:
            self.levels += [_Level(pages, self.path) for pages in _extra_levels(self.tif, levels[0])]
        for lv in self.levels:  # tifffile builds each page's decoder lazily, not thread-safely: now, here
            for page in lv.pages:
                page.decode  # noqa: B018
        if dropped:
            self.notes.append(f"{dropped} pyramid level(s) with another size ratio or pixel type ignored")
        page0 = self.levels[0].pages[0]
        if int(page0.photometric) == 3:  # palette: let the in-memory reader map colours
            raise InputError("palette TIFFs are not supported by the lazy reader", self.path)
        resolution = tiffio.resolution_of(page0)
        self.ome = tiffio.ome_pixels(self.tif)
        phys = tiffio.physical_size(self.tif, page0, resolution, self.ome)
        self.spacing = phys["spacing"]
        self.mpp = phys["mpp"]
        self.magnification = phys["magnification"]
        self.resolution = tiffio.consistent_resolution(resolution, self.spacing)
        self.meta = {
            "format": "tiff",
            "resolution": self.resolution,
            "ome": self.ome,
            "is_ome": bool(self.tif.is_ome),
            "is_bigtiff": bool(self.tif.is_bigtiff),
            "is_svs": bool(getattr(self.tif, "is_svs", False)),
            "levels": len(self.levels),
            "axes": axes,
            "compression": getattr(page0.compression, "name", str(page0.compression)),
            "mpp": self.mpp,
            "magnification": self.magnification,
            "mpp_source": phys["mpp_source"],
            "lazy": True,
            "warnings": [],
        }

    @property
    def shape0(self) -> tuple[int, int]:
        return (self.levels[0].height, self.levels[0].width)

    def close(self) -> None:
        self.tif.close()
        super().close()

    # -- raw segment access -----------------------------------------------------------------------------
    def _segment(self, li: int, pi: int, si: int) -> np.ndarray:
        """Decoded segment ``(seg_h, seg_w, s)`` (strips cropped at the image bottom), cached."""
        key = (li, pi, si)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        page = self.levels[li].pages[pi]
        offset, count = int(page.dataoffsets[si]), int(page.databytecounts[si])
        lv = self.levels[li]
        samples = 1 if lv.planar[pi] else lv.samples[pi]
        if count == 0:
            arr = np.zeros((*lv.seg, samples), lv.dtype)
        else:
            with self._io:
                fh = self.tif.filehandle
                fh.seek(offset)
                data = fh.read(count)
            try:
                # JPEG tiles may share their tables (Aperio writes JPEGTables once per page) or, in NDPI,
                # be restart-marker runs of one big JPEG whose header tifffile keeps (``jpegheader``);
                # page.decode applies them and the YCbCr → RGB conversion through imagecodecs.
                jpeg = {"jpegtables": getattr(page, "jpegtables", None)}
                if getattr(page, "jpegheader", None) is not None:
                    jpeg["jpegheader"] = page.jpegheader
                decoded, _, _ = page.decode(data, si, **jpeg)
            except Exception as exc:
                raise InputError(
                    f"cannot decode TIFF segment {si} of level {li} ({exc})", self.path
                ) from None
            arr = np.asarray(decoded).reshape(decoded.shape[-3:])
        self._count(li, 1, arr.nbytes)
        with self._cache_lock:
            if self._caching and arr.nbytes <= self.cache_bytes // 4:
                self._cache[key] = arr
                self._cached += arr.nbytes
                while self._cached > self.cache_bytes and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return arr

    def read_raw(self, box: tuple[int, int, int, int] | np.ndarray, level: int = 0) -> np.ndarray:
        """Raw pixels ``(h, w, C)`` of ``box`` in ``level`` coordinates, decoding only the segments it touches."""
        y0, x0, y1, x1 = (int(v) for v in box)
        lv = self.levels[level]
        if not (0 <= y0 < y1 <= lv.height and 0 <= x0 < x1 <= lv.width):
            raise ValueError(f"box {(y0, x0, y1, x1)} outside level {level} of shape {(lv.height, lv.width)}")
        out = np.empty((y1 - y0, x1 - x0, lv.channels), lv.dtype)
        sh, sw = lv.seg
        c0 = 0
        for pi, page_samples in enumerate(lv.samples):
            planes = page_samples if lv.planar[pi] else 1
            for plane in range(planes):
                for ty in range(y0 // sh, (y1 - 1) // sh + 1):
                    for tx in range(x0 // sw, (x1 - 1) // sw + 1):
                        si = (plane * lv.down + ty) * lv.across + tx
                        seg = self._segment(level, pi, si)
                        a0, a1 = max(y0, ty * sh), min(y1, (ty + 1) * sh)
                        b0, b1 = max(x0, tx * sw), min(x1, (tx + 1) * sw)
                        src = seg[a0 - ty * sh : a1 - ty * sh, b0 - tx * sw : b1 - tx * sw]
                        if lv.planar[pi]:
                            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, c0 + plane] = src[..., 0]
                        else:
                            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, c0 : c0 + page_samples] = src
            c0 += page_samples
        return out


# -- writing --------------------------------------------------------------------------------------------

ReadFn = Callable[[tuple[int, int, int, int]], np.ndarray]


def write_tiled(
    path: Path | str,
    shape: tuple[int, ...],
    read: ReadFn,
    *,
    dtype: Any = np.uint8,
    tile: int = 512,
    resolution: dict[str, Any] | None = None,
    spacing: tuple[float, ...] | None = None,
    ome: dict[str, Any] | None = None,
    pyramid: bool = False,
    spill_dir: Path | str | None = None,
    on_tile: Callable[[np.ndarray, tuple[int, int, int, int]], None] | None = None,
) -> Path:
    """Stream ``read(box)`` tiles into a tiled zlib BigTIFF at ``path`` (atomically); see the module doc.

    ``shape`` is ``(H, W)`` for a mask or ``(K, H, W)`` for probability planes (``read`` then returns
    ``(K, h, w)``). ``on_tile(tile, box)`` sees every level-0 tile once, in raster order (e.g. to count
    labels or gather statistics).
    """
    import tifffile

    from segcli.engines.base import TileStore
    from segcli.io.atomic import atomic_path
    from segcli.io.tiff import resolution_tags

    path = Path(path)
    planes = len(shape) == 3
    K = int(shape[0]) if planes else 1
    H, W = int(shape[-2]), int(shape[-1])
    dtype = np.dtype(dtype)
    n_levels = 1
    if pyramid:
        while max(H, W) / 2**n_levels >= tile and n_levels < 12:
            n_levels += 1
    kw: dict[str, Any] = {"compression": "zlib", "photometric": "minisblack", "tile": (tile, tile)}
    use_ome = bool(ome and "PhysicalSizeX" in ome)
    kw_meta: dict[str, Any] = {
        "metadata": {"axes": "CYX" if planes else "YX", **(ome or {})} if use_ome else None
    }
    spill = spill_dir if spill_dir is not None else path.parent
    stores: list[TileStore] = []

    def level_tiles(lvl: int, h: int, w: int, src: ReadFn) -> Iterator[np.ndarray]:
        # Each level-l tile is also halved (nearest) into the next level's spilled store.
        nxt = stores[lvl] if lvl < len(stores) else None
        for k in range(K):
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    box = (y, x, min(y + tile, h), min(x + tile, w))
                    t = src(box)
                    t2 = t[k] if planes else t
                    if lvl == 0 and on_tile is not None and k == 0:
                        on_tile(t, box)
                    if nxt is not None:
                        half = t2[::2, ::2]
                        nxt.maximum(
                            (
                                k * ((h + 1) // 2) + y // 2,
                                x // 2,
                                k * ((h + 1) // 2) + y // 2 + half.shape[0],
                                x // 2 + half.shape[1],
                            ),
                            half[None],
                        )
                    yield np.ascontiguousarray(t2, dtype=dtype)

    try:
        dims = [(H, W)]
        for _ in range(1, n_levels):
            ph, pw = dims[-1]
            dims.append(((ph + 1) // 2, (pw + 1) // 2))
        for h, w in dims[1:]:
            empty = -np.inf if dtype.kind == "f" else 0
            stores.append(
                TileStore((K * h, w), 1, dtype, empty, tile=tile, spill_dir=spill, cache_bytes=16 * 2**20)
            )
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=use_ome) as tw:
            full_shape = (K, H, W) if planes else (H, W)
            tw.write(
                level_tiles(0, H, W, read),
                shape=full_shape,
                dtype=dtype,
                subifds=n_levels - 1,
                **kw,
                **kw_meta,
                **resolution_tags(resolution, spacing),
            )
            for lvl in range(1, n_levels):
                h, w = dims[lvl]
                store = stores[lvl - 1]

                def src(box: tuple[int, int, int, int], store: TileStore = store, h: int = h) -> np.ndarray:
                    y0, x0, y1, x1 = box
                    if not planes:
                        return store.read(box)[0]
                    return np.stack([store.read((k * h + y0, x0, k * h + y1, x1))[0] for k in range(K)])

                tw.write(
                    level_tiles(lvl, h, w, src),
                    shape=(K, h, w) if planes else (h, w),
                    dtype=dtype,
                    subfiletype=1,
                    **kw,
                    **resolution_tags(resolution, spacing, 2.0**lvl),
                )
    finally:
        for s in stores:
            s.close()
    return path
