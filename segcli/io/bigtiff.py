"""Huge TIFFs without holding them: a lazy, region-reading :class:`TiffPlane` and a streamed tiled writer.

Reading. A 40,000² RGB slide is 4.8 GB decoded; segment-then-segment only needs a rough view and
the crops, so :class:`TiffPlane` (the engines' ``Plane`` protocol, on the shared
:class:`~segcli.io.lazyplane.RegionPlane`) never decodes level 0 whole:

* ``downscaled(hw)`` reads the pyramid level (OME/SubIFD, SVS, NDPI or multi-page pyramid; a label,
  macro or thumbnail image is never taken for a level) closest to, and not coarser than, the
  requested scale; without a suitable level it streams the level in pieces (a run of tiles of one
  tile row, or a chunk of strips) through exact area-averaging weights, so memory is one piece plus
  the output; ``overview_plane(hw)`` keeps even the output in a temporary file
  (:class:`~segcli.io.lazyplane.SpilledOverview`);
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
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError
from segcli.io import tiff as tiffio
from segcli.io.atomic import atomic_path
from segcli.io.lazyplane import RegionPlane
from segcli.io.tiff import resolution_tags
from segcli.tiles import TileStore


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
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            level = tif.series[0].levels[0]
            found = _hw_channels(level.axes, level.shape)
            return None if found is None else (found[0], found[1], level.dtype.itemsize)
    except Exception:
        return None


def tiff_spacing(path: Path | str) -> tuple[float, ...] | None:
    """The (y, x) pixel size in mm a TIFF's own metadata gives (tags, OME, Aperio), without decoding pixels."""
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page0 = tif.series[0].levels[0].pages[0]
            return tiffio.physical_size(tif, page0, tiffio.resolution_of(page0), tiffio.ome_pixels(tif))["spacing"]
    except Exception:  # unreadable metadata: the reader reports it; here it only means "no pixel size"
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
        # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
        import tifffile

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
        if (note := tiffio.ignored_series_note(self.tif)) is not None:
            self.notes.append(note)
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


def _pyramid_dims(H: int, W: int, tile: int, pyramid: bool) -> list[tuple[int, int]]:
    """``(h, w)`` of level 0 and of each halved level down to one tile (12 levels at most)."""
    n_levels = 1
    if pyramid:
        while max(H, W) / 2**n_levels >= tile and n_levels < 12:
            n_levels += 1
    dims = [(H, W)]
    for _ in range(1, n_levels):
        ph, pw = dims[-1]
        dims.append(((ph + 1) // 2, (pw + 1) // 2))
    return dims


def _level_tiles(h: int, w: int, src: ReadFn, *, planes: int, tile: int, dtype: np.dtype, nxt: Any,
                 on_tile: Callable[[np.ndarray, tuple[int, int, int, int]], None] | None) -> Iterator[np.ndarray]:
    """One level's tiles in tifffile's order (plane, row, column). Each tile is also halved (nearest) into the
    next level's spilled store ``nxt``; ``on_tile`` sees each tile of the first plane (``planes`` = 0: a mask)."""
    for k in range(max(1, planes)):
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                box = (y, x, min(y + tile, h), min(x + tile, w))
                t = src(box)
                t2 = t[k] if planes else t
                if on_tile is not None and k == 0:
                    on_tile(t, box)
                if nxt is not None:
                    half = t2[::2, ::2]
                    y2 = k * ((h + 1) // 2) + y // 2
                    nxt.maximum((y2, x // 2, y2 + half.shape[0], x // 2 + half.shape[1]), half[None])
                yield np.ascontiguousarray(t2, dtype=dtype)


#: zlib level of a mask's tiles: level 1 encoded a 512² uint8 nuclei tile in 1.4 ms against 4.9 ms at tifffile's
#: default (6), a uint32 instance tile in 2.9 ms against 7.2 ms, for about 1.9× the bytes of those tiles.
MASK_ZLIB_LEVEL = 1


def _encoded(tiles: Iterator[np.ndarray], tile: int, dtype: np.dtype) -> Iterator[bytes]:
    """A mask's tiles zlib-encoded as the TIFF stores them (padded to the full tile with zeros, as tifffile
    pads them), an all-zero tile once per file: on a slide most tiles are glass, and zlib spent 3.5 ms on
    every empty 512² uint32 tile (0.9 ms for uint8)."""
    empty: bytes | None = None
    for t in tiles:
        if not t.any():
            if empty is None:
                empty = zlib.compress(np.zeros((tile, tile), dtype).tobytes(), MASK_ZLIB_LEVEL)
            yield empty
            continue
        if t.shape != (tile, tile):
            full = np.zeros((tile, tile), dtype)
            full[: t.shape[0], : t.shape[1]] = t
            t = full
        yield zlib.compress(np.ascontiguousarray(t, dtype).tobytes(), MASK_ZLIB_LEVEL)


def _store_reader(store: Any, h: int, planes: int) -> ReadFn:
    """``read(box)`` over a level's spilled store, whose planes are stacked along its rows."""
    def src(box: tuple[int, int, int, int]) -> np.ndarray:
        y0, x0, y1, x1 = box
        if not planes:
            return store.read(box)[0]
        return np.stack([store.read((k * h + y0, x0, k * h + y1, x1))[0] for k in range(planes)])

    return src


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
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    path = Path(path)
    planes = int(shape[0]) if len(shape) == 3 else 0
    K = max(1, planes)
    H, W = int(shape[-2]), int(shape[-1])
    dtype = np.dtype(dtype)
    dims = _pyramid_dims(H, W, tile, pyramid)
    kw: dict[str, Any] = {"compression": "zlib", "photometric": "minisblack", "tile": (tile, tile)}
    use_ome = bool(ome and "PhysicalSizeX" in ome)
    meta = {"axes": "CYX" if planes else "YX", **(ome or {})} if use_ome else None
    spill = spill_dir if spill_dir is not None else path.parent
    empty = -np.inf if dtype.kind == "f" else 0
    stores: list[TileStore] = []
    try:
        for h, w in dims[1:]:
            stores.append(TileStore((K * h, w), 1, dtype, empty, tile=tile, spill_dir=spill, cache_bytes=16 * 2**20))
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=use_ome) as tw:
            for lvl, (h, w) in enumerate(dims):
                src = read if lvl == 0 else _store_reader(stores[lvl - 1], h, planes)
                tiles = _level_tiles(h, w, src, planes=planes, tile=tile, dtype=dtype,
                                     nxt=stores[lvl] if lvl < len(stores) else None,
                                     on_tile=on_tile if lvl == 0 else None)
                shape_l = (K, h, w) if planes else (h, w)
                if not planes:  # a mask: tiles encoded here (segcli's own zlib level, empty tiles once)
                    tiles = _encoded(tiles, tile, dtype)  # type: ignore[assignment]
                if lvl == 0:
                    tw.write(tiles, shape=shape_l, dtype=dtype, subifds=len(dims) - 1, metadata=meta, **kw,
                             **resolution_tags(resolution, spacing))
                else:
                    tw.write(tiles, shape=shape_l, dtype=dtype, subfiletype=1, **kw,
                             **resolution_tags(resolution, spacing, 2.0**lvl))
    finally:
        for s in stores:
            s.close()
    return path
