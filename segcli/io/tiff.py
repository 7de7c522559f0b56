"""TIFF / OME-TIFF / BigTIFF through tifffile, keeping resolution tags so masks overlay their slide.

All tifffile handle logic sits in :func:`_open` / :func:`_read_level` so lazy region reads and pyramid
levels can be added there without touching the rest of segcli.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import threading
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import InputError
from segcli.io.atomic import atomic_path
from segcli.io.messages import log_reader_failure, one_line
from segcli.io.types import LoadedImage

if TYPE_CHECKING:
    import tifffile

    from segcli.io.types import LoadedImage

MAX_PIXELS = 10**10
# Compressed TIFF data cannot honestly expand by more than this (zlib ~1000:1, LZW ~2700:1 on constant
# data, zstd more): a header declaring more pixel bytes per stored byte than this is lying.
MAX_EXPANSION = 100_000
TILE_ABOVE = 1024
BIGTIFF_ABOVE = 2 * 1024**3
# Resolution unit -> millimetres per unit.
_UNIT_MM = {2: 25.4, 3: 10.0}
_OME_UNIT_MM = {"m": 1e3, "cm": 10.0, "mm": 1.0, "µm": 1e-3, "um": 1e-3, "nm": 1e-6, "in": 25.4}
_CHANNEL_AXES = ("S", "C")


_collecting = threading.local()


class _CollectFilter(logging.Filter):
    """Routes tifffile's log warnings for the file this thread is reading into its warning list.

    Without it tifffile prints multi-line notes straight to stderr (``<tifffile.TiffPage 0 @8>
    incorrect StripByteCounts count``) next to segcli's one-line messages. Thread-local because the
    API reads the next file in a background thread.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_collecting, "sink", None)
        if sink is None:
            return True
        message = " ".join(record.getMessage().split())
        if message not in sink and len(sink) < 5:
            sink.append(message)
        return False


_FILTER = _CollectFilter()


@contextlib.contextmanager
def collect_log(sink: list[str]) -> Iterator[None]:
    """Within the block, tifffile's log messages of this thread go to ``sink`` (at most 5, deduplicated)."""
    logger = logging.getLogger("tifffile")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    previous = getattr(_collecting, "sink", None)
    _collecting.sink = sink
    try:
        yield
    finally:
        _collecting.sink = previous


def _open(path: Path) -> tifffile.TiffFile:
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
        raise InputError(f"not a readable TIFF ({one_line(exc)})", path) from None


def check_level(series: tifffile.TiffPageSeries, path: Path) -> None:
    """Refuse absurd sizes and truncated files from the IFDs alone, before allocating."""
    pixels = int(np.prod(series.shape, dtype=np.float64))
    if pixels > MAX_PIXELS:
        raise InputError(f"TIFF declares {pixels:.3g} pixels, more than the {MAX_PIXELS:.0e} supported", path)
    file_size = path.stat().st_size
    stored, bits = 0, 1
    compressed = False
    for page in series.pages:
        if page is None:
            continue
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
        if ends and max(ends) > file_size:
            raise InputError("TIFF is truncated (pixel data extends past the end of the file)", path)
        stored += int(sum(page.databytecounts))
        key = page.keyframe  # a TiffFrame shares its tags with its key page
        compressed = compressed or int(key.compression) != 1 or int(key.photometric) == 6  # YCbCr
        bits = max(bits, int(key.bitspersample))
    declared = pixels * bits / 8.0
    # Uncompressed strips must hold every declared byte; compressed ones at most MAX_EXPANSION:1.
    limit = MAX_EXPANSION * max(stored, 1) if compressed else stored
    if declared > limit + 8:
        raise InputError(
            f"TIFF declares {declared:.3g} bytes of pixels but its strips/tiles hold only {stored} bytes "
            "(corrupt header or truncated file)",
            path,
        )


def _read_level(tif: tifffile.TiffFile, path: Path) -> tuple[np.ndarray, str, Any]:
    """Pixels of series 0, level 0, with its axes string and first page."""
    series = tif.series[0]
    level = series.levels[0]
    check_level(level, path)
    try:
        data = level.asarray()
    except (ValueError, OSError, EOFError, zlib.error, RuntimeError, IndexError) as exc:
        raise InputError(
            f"cannot decode TIFF pixels (truncated or corrupt?): {one_line(exc)}", path
        ) from None
    return data, level.axes, level.pages[0]


def _to_hwc(data: np.ndarray, axes: str, page: Any, path: Path) -> np.ndarray:
    """(H, W, C) from tifffile's squeezed axes; stacks of planes are refused for now."""
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None and axes == "YX":
        cmap = np.asarray(page.colormap)
        cmap = (cmap // 257 if cmap.max() > 255 else cmap).astype(np.uint8)
        return np.ascontiguousarray(np.moveaxis(cmap[:, data], 0, -1))
    if axes == "YX":
        return data[..., None]
    if axes == "YXS":
        return data
    if len(axes) == 3 and axes[0] in _CHANNEL_AXES and axes[1:] == "YX":  # planar samples / OME channels
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    raise InputError(
        f"multi-page TIFF stacks are not supported yet (axes {axes}, shape {'x'.join(map(str, data.shape))})",
        path,
    )


def resolution_of(page: Any) -> dict[str, Any]:
    tags = page.tags
    out: dict[str, Any] = {}
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        # A corrupt tag is dropped (pixel size unknown) rather than making the pixels unreadable.
        with contextlib.suppress(AttributeError, TypeError, ValueError, OverflowError):
            value = tuple(int(v) for v in tag.value)
            if len(value) == 2 and all(0 < v < 2**32 for v in value):
                out[name] = value
    unit = tags.get("ResolutionUnit")
    out["ResolutionUnit"] = 2  # TIFF default is inch
    with contextlib.suppress(TypeError, ValueError, OverflowError, AttributeError):
        out["ResolutionUnit"] = int(unit.value) if int(unit.value) in (1, 2, 3) else 2
    return out


def ome_pixels(tif: tifffile.TiffFile) -> dict[str, Any]:
    """PhysicalSizeX/Y (+units) from the first OME Pixels element."""
    if not tif.is_ome or not tif.ome_metadata:
        return {}
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return {}
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            keys = ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeXUnit", "PhysicalSizeYUnit")
            return {k: element.attrib[k] for k in keys if k in element.attrib}
    return {}


def _spacing(resolution: dict[str, Any], ome: dict[str, Any]) -> tuple[float, float] | None:
    """(y, x) pixel size in mm: OME physical sizes first, else resolution tags in inch/cm."""
    if "PhysicalSizeX" in ome and "PhysicalSizeY" in ome:
        try:
            sx = float(ome["PhysicalSizeX"]) * _OME_UNIT_MM[ome.get("PhysicalSizeXUnit", "µm")]
            sy = float(ome["PhysicalSizeY"]) * _OME_UNIT_MM[ome.get("PhysicalSizeYUnit", "µm")]
        except (KeyError, ValueError):
            pass
        else:
            if 0 < sx < 1e6 and 0 < sy < 1e6:  # also refuses NaN and inf from a corrupt header
                return sy, sx
    mm = _UNIT_MM.get(resolution.get("ResolutionUnit", 1))
    xres, yres = resolution.get("XResolution"), resolution.get("YResolution")
    if mm is None or not xres or not yres or 0 in (*xres, *yres):
        return None
    sy, sx = mm * yres[1] / yres[0], mm * xres[1] / xres[0]
    return (sy, sx) if 0 < sx < 1e6 and 0 < sy < 1e6 else None


_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_APERIO_MAG = re.compile(r"\bAppMag\s*=\s*([0-9]*\.?[0-9]+)")


def _positive(value: Any, upper: float) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if 0 < v < upper else None  # also refuses NaN and inf


def _magnification(tif: tifffile.TiffFile, page: Any) -> float | None:
    """Objective magnification: Aperio ``AppMag``, NDPI ``Magnification`` tag, OME NominalMagnification."""
    description = str(getattr(page, "description", "") or "")
    if description.startswith("Aperio"):
        m = _APERIO_MAG.search(description)
        if m:
            return _positive(m.group(1), 1e4)
    if getattr(tif, "is_ndpi", False):
        with contextlib.suppress(Exception):
            return _positive(page.ndpi_tags.get("Magnification"), 1e4)
    if tif.is_ome and tif.ome_metadata:
        with contextlib.suppress(ET.ParseError):
            for element in ET.fromstring(tif.ome_metadata).iter():
                if element.tag.endswith("Objective") and "NominalMagnification" in element.attrib:
                    return _positive(element.attrib["NominalMagnification"], 1e4)
    return None


def physical_size(
    tif: tifffile.TiffFile, page: Any, resolution: dict[str, Any], ome: dict[str, Any]
) -> dict[str, Any]:
    """The slide's pixel size and magnification from its own metadata.

    Returns ``spacing`` ((y, x) mm or None), ``mpp`` ((y, x) µm or None), ``magnification`` (float or
    None) and ``mpp_source``: ``ome`` (PhysicalSizeX/Y with units), ``aperio`` (``MPP = …`` in the
    ImageDescription), ``ndpi`` or ``tiff`` (X/YResolution in inch or cm; NDPI writes them in cm).
    """
    spacing = _spacing(resolution, {})
    source = ("ndpi" if getattr(tif, "is_ndpi", False) else "tiff") if spacing else None
    description = str(getattr(page, "description", "") or "")
    if description.startswith("Aperio"):
        m = _APERIO_MPP.search(description)
        mpp = _positive(m.group(1), 1e6) if m else None
        if mpp is not None:
            spacing, source = (mpp / 1000.0, mpp / 1000.0), "aperio"
    if ome:
        from_ome = _spacing({}, ome)
        if from_ome is not None:
            spacing, source = from_ome, "ome"
    return {
        "spacing": spacing,
        "mpp": (spacing[0] * 1000.0, spacing[1] * 1000.0) if spacing else None,
        "magnification": _magnification(tif, page),
        "mpp_source": source,
    }


def _rational(value: float) -> tuple[int, int]:
    f = Fraction(value).limit_denominator(10_000)
    while f.numerator >= 2**32 or f.denominator >= 2**32:  # pragma: no cover - absurd sizes only
        f = Fraction(f.numerator // 2, max(1, f.denominator // 2))
    return (max(1, f.numerator), max(1, f.denominator))


def consistent_resolution(
    resolution: dict[str, Any], spacing: tuple[float, float] | None
) -> dict[str, Any]:
    """``resolution`` tags that say ``spacing``: the file's own when they agree (within 0.1 %), else
    pixels per cm derived from ``spacing`` (e.g. an Aperio slide whose only pixel size is ``MPP``)."""
    if spacing is None:
        return resolution
    own = _spacing(resolution, {})
    if own is not None and all(abs(a - b) <= 1e-3 * b for a, b in zip(own, spacing, strict=True)):
        return resolution
    sy, sx = spacing
    return {"XResolution": _rational(10.0 / sx), "YResolution": _rational(10.0 / sy), "ResolutionUnit": 3}


def read_tiff(path: Path, warnings: list[str]) -> LoadedImage:
    """Series 0, level 0 of a TIFF as (H, W, C) with resolution metadata."""
    notes: list[str] = []
    try:
        with collect_log(notes), _open(path) as tif:
            array, spacing, meta = _decode(tif, path, warnings)
    except InputError:
        raise
    except MemoryError:
        raise InputError("not enough memory to decode this TIFF", path) from None
    except Exception as exc:  # tifffile parses lazily: a corrupt IFD can fail anywhere, with anything
        log_reader_failure(path, exc)
        raise InputError(f"corrupt TIFF ({one_line(exc)})", path) from None
    if min(array.shape[:2]) < 2:
        raise InputError(
            f"image is too small ({array.shape[0]}x{array.shape[1]}); need at least 2 pixels per side", path
        )
    warnings.extend(f"tifffile: {note}" for note in notes)
    return LoadedImage(path, "tiff", array, spacing, meta)


def _decode(
    tif: tifffile.TiffFile, path: Path, warnings: list[str]
) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, Any]]:
    """Pixels (H, W, C), pixel size (mm) and meta of series 0, level 0."""
    if not tif.series:
        raise InputError("TIFF holds no image series", path)
    data, axes, page = _read_level(tif, path)
    array = _to_hwc(data, axes, page, path)
    if (note := ignored_series_note(tif)) is not None:
        warnings.append(note)
    resolution = resolution_of(page)
    ome = ome_pixels(tif)
    phys = physical_size(tif, page, resolution, ome)
    spacing = phys["spacing"]
    resolution = consistent_resolution(resolution, spacing)
    meta = {
        "format": "tiff",
        "warnings": warnings,
        "resolution": resolution,
        "ome": ome,
        "is_ome": bool(tif.is_ome),
        "is_bigtiff": bool(tif.is_bigtiff),
        "pages": len(tif.pages),
        "series": len(tif.series),
        "levels": len(tif.series[0].levels),
        "axes": axes,
        "compression": page.compression.name if hasattr(page.compression, "name") else str(page.compression),
        "mpp": phys["mpp"],
        "magnification": phys["magnification"],
        "mpp_source": phys["mpp_source"],
    }
    return array, spacing, meta


def ignored_series_note(tif: tifffile.TiffFile) -> str | None:
    """Names the series after the first, which segcli does not segment (OME images, slide label/macro)."""
    rest = tif.series[1:]
    if not rest:
        return None
    names = [(s.name or s.kind or f"series {i}").strip() for i, s in enumerate(rest, start=1)]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return f"only series 0 is segmented; {len(rest)} more series ignored ({shown})"


def resolution_tags(
    resolution: dict[str, Any] | None, spacing: tuple[float, ...] | None, scale: float = 1.0
) -> dict[str, Any]:
    """``resolution``/``resolutionunit`` keywords for ``tifffile`` writes: the one place masks get their tags.

    The input's own tags when it has them (divided by ``scale`` for a pyramid level ``scale`` times
    coarser), else tags derived from the pixel size in mm (pixels per cm), else none.
    """
    if resolution and "XResolution" in resolution:
        xr = resolution["XResolution"]
        yr = resolution.get("YResolution", xr)
        return {
            "resolution": (xr[0] / xr[1] / scale, yr[0] / yr[1] / scale) if scale != 1.0 else (xr, yr),
            "resolutionunit": resolution.get("ResolutionUnit", 2),
        }
    if spacing is not None:
        sy, sx = spacing[-2:]
        return {"resolution": (10.0 / sx / scale, 10.0 / sy / scale), "resolutionunit": 3}
    return {}


def _resolution_kwargs(like: LoadedImage) -> dict[str, Any]:
    """The input's resolution tags, or ones derived from its pixel size (pixels per cm)."""
    resolution = like.meta.get("resolution") if like.meta.get("format") == "tiff" else None
    return resolution_tags(resolution, like.spacing)


def write_pages(data: np.ndarray, like: LoadedImage, path: Path) -> None:
    """Write ``data`` (..., H, W) zlib-compressed, tiled when large, BigTIFF when needed, atomically."""
    # lazy: tifffile costs ~0.15 s to import; only TIFF files need it
    import tifffile

    height, width = data.shape[-2:]
    kwargs: dict[str, Any] = {
        "compression": "zlib",
        "photometric": "minisblack",
        "bigtiff": data.nbytes > BIGTIFF_ABOVE,
        **_resolution_kwargs(like),
    }
    if max(height, width) > TILE_ABOVE:
        kwargs["tile"] = (256, 256)
    ome = like.meta.get("ome") or {}
    if like.meta.get("is_ome") and "PhysicalSizeX" in ome:
        axes = "YX" if data.ndim == 2 else "CYX"  # OME input is 2D: a mask or K probability planes
        kwargs["ome"] = True
        kwargs["metadata"] = {"axes": axes, **ome}
    else:
        kwargs["ome"] = False
        kwargs["metadata"] = None
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
