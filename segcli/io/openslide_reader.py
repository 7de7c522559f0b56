"""Whole-slide formats that tifffile cannot cut into regions, through OpenSlide (optional extra ``slides``).

MIRAX (``.mrxs``), Hamamatsu VMS/VMU, Leica SCN, Ventana BIF, Sakura SVSlide and the other vendor
formats OpenSlide knows are read with ``openslide-python`` and the ``openslide-bin`` wheel (no system
library needed): ``pip install "segcli[slides]"``. :class:`OpenSlidePlane` has the interface of
:class:`~segcli.io.bigtiff.TiffPlane` (``levels``, ``shape``, ``spacing``, ``mpp``,
``magnification``, ``resolution``, ``meta``, ``read_raw(box, level)``, ``region``, ``downscaled``,
``close`` and the decode counters), so the bounded-memory path uses it unchanged.

Which reader (:func:`open_plane`): a file whose extension is one of OpenSlide's own formats
(:func:`wants_openslide`) goes to OpenSlide; a TIFF by content goes to tifffile first (Aperio SVS,
NDPI, OME-TIFF, generic pyramids) and to OpenSlide only when tifffile cannot read it by region and
OpenSlide's own sniffing (``detect_format``) names a vendor format for it.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError
from segcli.io.bigtiff import TiffPlane, is_tiff
from segcli.io.lazyplane import RegionPlane
from segcli.io.tiff import consistent_resolution

# Formats whose pixels live outside a plain TIFF layout (several files, overlapping tiles, or several
# images per file): tifffile would read the wrong thing or nothing.
OPENSLIDE_EXTENSIONS = (".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
# A virtual segment for the overview's piece size and the decode counters (OpenSlide keeps its own cache).
_SEGMENT = 512


def missing_message() -> str:
    return 'reading this slide format needs OpenSlide: pip install "segcli[slides]"'


def _import_openslide(path: Path) -> Any:
    try:
        # lazy: OpenSlide is optional (segcli[slides]) and needs its C library
        import openslide
    except (ImportError, OSError):  # OSError: the Python package without its shared library
        raise InputError(missing_message(), path) from None
    return openslide


def vendor(path: Path | str) -> str | None:
    """OpenSlide's name for the file's format (``aperio``, ``mirax``, ``generic-tiff``, …), or None when
    OpenSlide is missing or does not know the file."""
    try:
        # lazy: OpenSlide is optional (segcli[slides]) and needs its C library
        import openslide
    except (ImportError, OSError):
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def wants_openslide(path: Path | str) -> bool:
    """True for a file only OpenSlide reads right: one of its vendor extensions (MIRAX ``.mrxs`` and
    Hamamatsu ``.vms`` are not TIFFs at all; Leica ``.scn`` and Ventana ``.bif`` are TIFFs that tifffile
    would read wrongly). Goes by the name only and never imports OpenSlide; TIFFs by any other name go
    to tifffile first (see :func:`open_plane`)."""
    return Path(path).suffix.lower() in OPENSLIDE_EXTENSIONS


def is_slide(path: Path | str) -> bool:
    """True when :func:`open_plane` can read ``path`` lazily: a TIFF, or a file OpenSlide
    recognises (False for such a file while OpenSlide is not installed: use :func:`wants_openslide`
    to tell the user which extra is missing)."""
    return is_tiff(path) or (wants_openslide(path) and vendor(path) is not None)


def slide_header(path: Path | str) -> tuple[tuple[int, int], int, int] | None:
    """``((H, W), 3, 1)`` of an OpenSlide slide's level 0 (RGB uint8) without reading pixels, else None."""
    try:
        # lazy: OpenSlide is optional (segcli[slides]) and needs its C library
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.dimensions
    except Exception:
        return None
    return (int(h), int(w)), 3, 1


class _SlideLevel:
    """One OpenSlide level in the shape :class:`~segcli.io.lazyplane.RegionPlane` expects."""

    def __init__(self, width: int, height: int, downsample: float, tile: tuple[int, int]) -> None:
        self.height, self.width = int(height), int(width)
        self.downsample = float(downsample)
        self.seg = tile
        self.channels = 3
        self.dtype = np.dtype(np.uint8)
        self.samples = [3]

    @property
    def nbytes(self) -> int:
        return self.height * self.width * 3


def _float(props: Any, key: str) -> float | None:
    try:
        v = float(props.get(key))
    except (TypeError, ValueError):
        return None
    return v if 0 < v < 1e6 and math.isfinite(v) else None


def _tile_size(props: Any, level: int) -> tuple[int, int]:
    try:
        th = int(props[f"openslide.level[{level}].tile-height"])
        tw = int(props[f"openslide.level[{level}].tile-width"])
    except (KeyError, TypeError, ValueError):
        return (_SEGMENT, _SEGMENT)
    return (th, tw) if th > 0 and tw > 0 else (_SEGMENT, _SEGMENT)


class OpenSlidePlane(RegionPlane):
    """A slide read through OpenSlide, with :class:`~segcli.io.bigtiff.TiffPlane`'s interface.

    Pixels are RGB uint8: OpenSlide's RGBA is composited onto white (areas a scanner did not image are
    transparent there, and glass is white). ``segments_decoded`` counts the slide's tiles (or virtual
    512² tiles) each read touched; OpenSlide caches decoded tiles itself.
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
        self.path = Path(path)
        openslide = _import_openslide(self.path)
        self.notes: list[str] = []
        try:
            self.slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise InputError(f"OpenSlide cannot open this slide ({' '.join(str(exc).split())})", self.path) from None
        try:
            props = self.slide.properties
            self.levels = [
                _SlideLevel(w, h, d, _tile_size(props, i))
                for i, ((w, h), d) in enumerate(
                    zip(self.slide.level_dimensions, self.slide.level_downsamples, strict=True)
                )
            ]
            mx, my = _float(props, "openslide.mpp-x"), _float(props, "openslide.mpp-y")
            if mx and not my:
                my = mx
            self.mpp = (my, mx) if mx and my else None
            self.magnification = _float(props, "openslide.objective-power")
            self.spacing = (self.mpp[0] / 1000.0, self.mpp[1] / 1000.0) if self.mpp else None
            self.resolution = consistent_resolution({}, self.spacing)
            self.ome: dict[str, Any] = {}
            self.meta = {
                "format": "openslide",
                "vendor": props.get("openslide.vendor"),
                "resolution": self.resolution,
                "ome": self.ome,
                "is_ome": False,
                "levels": len(self.levels),
                "axes": "YXS",
                "mpp": self.mpp,
                "magnification": self.magnification,
                "mpp_source": "openslide" if self.mpp else None,
                "associated_images": sorted(self.slide.associated_images),
                "lazy": True,
                "warnings": [],
            }
            if min(self.levels[0].height, self.levels[0].width) < 2:
                raise InputError("slide is too small to segment", self.path)
        except BaseException:
            self.slide.close()
            raise
        self._read_lock = threading.Lock()
        self._setup(spec, channels_want, channel_mode, cache_bytes)

    def close(self) -> None:
        self.slide.close()
        super().close()

    def read_raw(self, box: tuple[int, int, int, int] | np.ndarray, level: int = 0) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``box`` in ``level`` coordinates (one OpenSlide ``read_region``)."""
        y0, x0, y1, x1 = (int(v) for v in box)
        lv = self.levels[level]
        if not (0 <= y0 < y1 <= lv.height and 0 <= x0 < x1 <= lv.width):
            raise ValueError(f"box {(y0, x0, y1, x1)} outside level {level} of shape {(lv.height, lv.width)}")
        # read_region takes the top-left corner in level-0 pixels and the size in level pixels.
        corner = (int(round(x0 * lv.downsample)), int(round(y0 * lv.downsample)))
        try:
            rgba = np.asarray(self.slide.read_region(corner, level, (x1 - x0, y1 - y0)))
        except Exception as exc:
            raise InputError(f"OpenSlide cannot read level {level} ({' '.join(str(exc).split())})", self.path) from None
        alpha = rgba[..., 3:4].astype(np.uint16)
        if bool((alpha == 255).all()):
            rgb = np.ascontiguousarray(rgba[..., :3])
        else:  # unscanned areas are transparent: white glass
            rgb = ((rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        sh, sw = lv.seg
        touched = ((y1 - 1) // sh - y0 // sh + 1) * ((x1 - 1) // sw - x0 // sw + 1)
        with self._read_lock:
            self._count(level, touched, rgb.nbytes)
        return rgb


def open_plane(
    path: Path | str,
    *,
    spec: dict[str, Any],
    channels_want: int | None = None,
    channel_mode: str = "keep",
    cache_bytes: int = 128 * 2**20,
) -> RegionPlane:
    """The lazy reader for a slide: :class:`~segcli.io.bigtiff.TiffPlane` for what tifffile reads by
    region, else :class:`OpenSlidePlane` (MIRAX, Leica SCN, Ventana BIF, Hamamatsu VMS, …).

    The rule: :func:`wants_openslide` (vendor extension, or not a TIFF by content) → OpenSlide, with
    the ``pip install "segcli[slides]"`` error when it is missing; otherwise tifffile, falling back to
    OpenSlide when tifffile cannot read the TIFF by region and OpenSlide names a vendor format for it.
    """
    path = Path(path)
    kw: dict[str, Any] = {
        "spec": spec,
        "channels_want": channels_want,
        "channel_mode": channel_mode,
        "cache_bytes": cache_bytes,
    }
    if wants_openslide(path):
        return OpenSlidePlane(path, **kw)
    try:
        return TiffPlane(path, **kw)
    except InputError:
        # A TIFF-based vendor format that tifffile cannot cut into regions: OpenSlide, when it knows it.
        if vendor(path) not in (None, "generic-tiff"):
            return OpenSlidePlane(path, **kw)
        raise
