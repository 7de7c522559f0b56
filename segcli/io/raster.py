"""PNG / JPEG / BMP through Pillow.

A photo's EXIF orientation is applied, so the mask matches the image as every viewer displays it (a phone
or endoscope frame stored sideways); the report says so. Frames after the first of an animated image are
named as ignored.
"""

from __future__ import annotations

import warnings as _warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import InputError, UsageError
from segcli.io.atomic import atomic_path
from segcli.io.messages import log_reader_failure, one_line
from segcli.io.types import LoadedImage

if TYPE_CHECKING:
    from segcli.io.types import LoadedImage

_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pixels(img: Any) -> np.ndarray:
    """(H, W, C) array in the image's own dtype; palettes expanded, 1-bit as 0/255."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    elif mode in _TO_RGB:
        img = img.convert("RGB")
    array = np.asarray(img)
    if mode in _16BIT:
        array = array.astype(np.uint16)
    elif array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array[..., None] if array.ndim == 2 else array


def _dpi(value: Any) -> tuple[float, float] | None:
    """(x, y) dots per inch when the file states a usable pair, else None (a corrupt pHYs is ignored)."""
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError, OverflowError):
        return None
    return (x, y) if 1e-6 < x < 1e9 and 1e-6 < y < 1e9 else None


def read_raster(path: Path, warnings: list[str]) -> LoadedImage:
    """Decode a PNG/JPEG/BMP fully, turning Pillow's bomb and truncation errors into InputError."""
    # lazy: Pillow loads only where a picture is read or written
    from PIL import Image

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                frames = int(getattr(img, "n_frames", 1) or 1)
                orientation = int(img.getexif().get(0x0112, 1) or 1)
                if orientation in range(2, 9):
                    from PIL import ImageOps  # lazy: 2-8 ms at start, for the few photos a camera rotated

                    shown = ImageOps.exif_transpose(img)
                else:
                    shown = img
                array = _pixels(shown)
                info = dict(img.info)
                fmt = img.format
                mode = img.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"image too large for a PNG/JPEG/BMP reader ({exc}); convert it to tiled TIFF", path
        ) from None
    except MemoryError:
        raise InputError("not enough memory to decode this image", path) from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data
        log_reader_failure(path, exc)
        raise InputError(f"cannot decode image (truncated or corrupt?): {one_line(exc)}", path) from None
    if array.ndim != 3 or min(array.shape[:2]) < 2:
        raise InputError(
            f"image is too small ({'x'.join(map(str, array.shape[:2]))}); need at least 2 pixels per side",
            path,
        )
    if orientation in range(2, 9):
        warnings.append(f"EXIF orientation {orientation} applied: the mask matches the image as displayed, "
                        "not its stored pixel order")
    if frames > 1:
        warnings.append(f"animated image: only the first of its {frames} frames is segmented")
    dpi = _dpi(info.get("dpi"))
    if dpi and orientation in (5, 6, 7, 8):  # rotated by 90 degrees: the axes swap
        dpi = (dpi[1], dpi[0])
    spacing = (25.4 / dpi[1], 25.4 / dpi[0]) if dpi else None
    meta = {"format": "raster", "pil_format": fmt, "mode": mode, "dpi": dpi, "warnings": warnings,
            "exif_orientation": orientation, "frames": frames}
    return LoadedImage(path, "raster", array, spacing, meta)


def write_mask(mask: np.ndarray, like: LoadedImage, path: Path) -> None:
    """A 2D uint8 mask as PNG/BMP, with the input's DPI when it had one (or one derived from spacing)."""
    # lazy: Pillow loads only where a picture is read or written
    from PIL import Image

    if mask.ndim != 2:
        raise UsageError(f"a {mask.ndim}D mask cannot be written as {path.suffix}; use .nii.gz or .tif", path)
    dpi = like.meta.get("dpi")
    if dpi is None and like.spacing is not None:
        dpi = (25.4 / like.spacing[-1], 25.4 / like.spacing[-2])
    kwargs = {"dpi": dpi} if dpi else {}
    with atomic_path(path) as tmp:
        Image.fromarray(mask).save(tmp, format="PNG" if path.suffix.lower() == ".png" else "BMP", **kwargs)
