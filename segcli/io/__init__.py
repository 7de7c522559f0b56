"""Image I/O: one entry point that reads any supported image by its content, and writers that put the
mask back with the input's exact geometry.

Readers are chosen from the file's magic bytes, not its name, so a misnamed file is still read (with a
warning) and a non-image gets a one-line error naming what it looks like. Heavy libraries
(SimpleITK, tifffile, Pillow) are imported only when a file needs them.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError, UsageError
from segcli.io import medical, raster
from segcli.io.atomic import split_extension
from segcli.io.dicomconvert import read_converted
from segcli.io.dicomscan import has_dicom_magic
from segcli.io.dicomseg import describe_dicom_seg, is_dicom_seg
from segcli.io.dicomseries import (
    MULTIFRAME,
    check_one_volume,
    check_single_file,
    converter_reason,
    dicom_series,
    read_dicom_folder,
    read_header,
)
from segcli.io.medical import data_file_size, describe_geometry
from segcli.io.raster import read_raster
from segcli.io.tiff import read_tiff, write_pages
from segcli.io.types import LoadedImage

__all__ = [
    "LoadedImage",
    "default_output_path",
    "describe",
    "is_dicom_series",
    "is_multiframe_dicom",
    "is_image_path",
    "list_images",
    "open_image",
    "sniff",
    "write_mask",
    "write_probabilities",
]

# Output extensions by writer.
_SITK_OUT = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
_TIFF_OUT = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
_RASTER_OUT = (".png", ".bmp")

# Extension -> the content kind it promises.
_EXT_KIND = {
    ".nii": "nifti",
    ".nii.gz": "nifti-gz",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".dcm": "dicom",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".ome.tif": "tiff",
    ".ome.tiff": "tiff",
    ".btf": "tiff",
    ".svs": "tiff",
    ".ndpi": "tiff",
    # whole-slide formats only OpenSlide reads (segcli.io.openslide_reader): always by region
    ".mrxs": "slide",
    ".vms": "slide",
    ".vmu": "slide",
    ".scn": "slide",
    ".bif": "slide",
    ".svslide": "slide",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
}
# SimpleITK content kind -> the mask extension that keeps its geometry.
_SITK_CONTENT_OUT = {
    "nifti": ".nii.gz",
    "nifti-gz": ".nii.gz",
    "metaimage": ".mha",
    "nrrd": ".nrrd",
    "dicom": ".nii.gz",
}
# Content kind -> extension SimpleITK needs to pick its reader.
_SITK_ALIAS = {"nifti": ".nii", "nifti-gz": ".nii.gz", "metaimage": ".mha", "nrrd": ".nrrd", "dicom": ".dcm"}
_OTHER_SIGNATURES = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file"),
    (b"GIF8", "a GIF image (unsupported)"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image (unsupported)"),
    (b"BZh", "bzip2-compressed data"),
    (b"\xfd7zXZ", "xz-compressed data"),
)


def _extension(path: Path) -> str:
    return split_extension(path.name)[1].lower()


def _looks_like(head: bytes) -> str:
    """Human words for content no reader accepts, for the error message."""
    for magic, words in _OTHER_SIGNATURES:
        if head.startswith(magic):
            return words
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image (unsupported)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "text" if all(c.isprintable() or c in "\r\n\t" for c in text) else "binary data"


def _nifti_magic(head: bytes) -> bool:
    return len(head) >= 4 and (
        struct.unpack("<i", head[:4])[0] in (348, 540) or struct.unpack(">i", head[:4])[0] in (348, 540)
    )


def sniff_input(path: Path) -> str | None:
    """The content kind of an input file, or None for a folder or a file that cannot be sniffed.

    The pipeline sniffs each input once and hands the kind to the output namer and the readers;
    None makes them sniff again themselves, so a bad file still gets its precise error.
    """
    try:
        return sniff(path) if Path(path).is_file() else None
    except (OSError, InputError):
        return None


def sniff(path: Path) -> str | None:
    """Content kind from magic bytes, or None when no supported reader recognises it."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block this open until a writer came
        raise InputError("is not a regular file (a FIFO, socket or device)", path)
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(4)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"truncated or corrupt gzip data ({exc})", path) from None
        if _nifti_magic(inner):
            return "nifti-gz"
        raise InputError("gzip-compressed file that is not a NIfTI image (only .nii.gz is supported)", path)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 348 and _nifti_magic(head) and head[344:347] in (b"n+1", b"ni1", b"n+2"):
        return "nifti"
    if b"ObjectType" in head or (b"NDims" in head and b"ElementType" in head):
        return "metaimage"
    return None


@contextlib.contextmanager
def _sitk_name(path: Path, content: str) -> Iterator[Path]:
    """A path whose extension SimpleITK recognises for ``content``: the file itself or a temporary alias."""
    want = _SITK_ALIAS[content]
    ext = _extension(path)
    if ext == want or (content == "metaimage" and ext == ".mhd") or (content == "nrrd" and ext == ".nhdr"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="segcli-") as tmp:
        alias = Path(tmp) / f"image{want}"
        try:
            os.symlink(path.resolve(), alias)
        except OSError:
            shutil.copyfile(path, alias)
        yield alias


def open_image(path: Path | str, series_id: str | None = None, content: str | None = None,
               volume: int | None = None) -> LoadedImage:
    """Read any supported image (file or DICOM folder) into a :class:`LoadedImage`, by content.

    ``content``: the kind :func:`sniff` already found, so the file is not sniffed twice. ``volume``
    (1-based) picks one volume of a 4D DICOM series; for any other input only 1 is accepted.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_folder(path, series_id, volume)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        if path.stat().st_size == 0:
            raise InputError("file is empty (0 bytes)", path)
        if content is None:
            content = sniff(path)
    except PermissionError:
        raise InputError("permission denied", path) from None
    warnings: list[str] = []
    ext = _extension(path)
    if content is None:
        if ext == ".dcm":  # DICOM without the 128-byte preamble: let GDCM try
            content = "dicom"
        else:
            with open(path, "rb") as fh:
                head = fh.read(64)
            raise InputError(f"not a recognised image (content looks like {_looks_like(head)})", path)
    claimed = _EXT_KIND.get(ext)
    if claimed is not None and claimed != content and {claimed, content} != {"nifti", "nifti-gz"}:
        # Warnings carry no path: the CLI and `segcli info` print them under the input's name.
        warnings.append(f"extension {ext} does not match the content ({content}); read as {content}")
    if content == "tiff":
        return _checked(read_tiff(path, warnings))
    if content in ("png", "jpeg", "bmp"):
        return _checked(read_raster(path, warnings))
    if content == "dicom":  # a lone file: mosaic or multi-frame to dcm2niix; short pixel data named

        reason = converter_reason([read_header(str(path))])
        if reason is not None:
            return _checked(read_converted(path, [str(path)], reason, volume, warnings))
        check_single_file(path)
    check_one_volume(volume, path)
    with _sitk_name(path, content) as readable:
        return _checked(medical.read_file(path, readable, warnings))


def header_size(path: Path, content: str) -> tuple[tuple[int, ...], int, int] | None:
    """``(spatial shape, channels, bytes per value)`` of an ITK-format file from its header alone, or None.

    Lets the caller refuse, with an estimate, a compressed NRRD or MetaImage too big for the memory budget
    before a single voxel is decoded (those are read whole).
    """
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    if content not in _SITK_ALIAS or path.is_dir():
        return None
    try:
        with _sitk_name(path, content) as readable:
            reader = medical.open_reader(path, readable)
    except (InputError, OSError, RuntimeError):
        return None  # the regular reader gives the precise error
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    itemsize = sitk.GetArrayViewFromImage(one).dtype.itemsize
    return tuple(int(v) for v in reversed(reader.GetSize())), int(reader.GetNumberOfComponents()), itemsize


def _checked(image: LoadedImage) -> LoadedImage:
    """Last checks common to every reader: pixel types segcli can normalise, and at least one pixel."""
    kind = image.array.dtype.kind
    if kind == "c":
        raise InputError(
            f"complex pixels ({image.array.dtype}) are not supported; save the magnitude (or phase) as a "
            "real image first",
            image.path,
        )
    if kind not in "biuf":
        raise InputError(f"unsupported pixel type {image.array.dtype}", image.path)
    if image.array.size == 0:
        raise InputError(f"image has no pixels (shape {image.array.shape})", image.path)
    return image


def _check_array(array: np.ndarray, like: LoadedImage, leading: int = 0) -> None:
    shape = tuple(array.shape[leading:])
    if shape != like.spatial_shape:
        raise ValueError(f"array spatial shape {shape} does not match the input's {like.spatial_shape}")


def write_mask(mask: np.ndarray, like: LoadedImage, path: Path | str) -> Path:
    """Write a uint8 mask with ``like``'s exact geometry, atomically; the format follows ``path``."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        raise ValueError(f"masks must be uint8, got {mask.dtype}")
    _check_array(mask, like)
    ext = _extension(path)
    if ext in _SITK_OUT:
        medical.write_mask(mask, like, path)
    elif ext in _TIFF_OUT:
        write_pages(mask, like, path)
    elif ext in _RASTER_OUT:
        raster.write_mask(mask, like, path)
    elif ext in (".jpg", ".jpeg"):
        raise UsageError(
            "masks are never written as JPEG (lossy compression corrupts labels); use .png", path
        )
    else:
        raise UsageError(f"unsupported output extension {ext or '(none)'!r}", path)
    return path


def write_probabilities(probs: np.ndarray, like: LoadedImage, path: Path | str) -> Path:
    """Write float32 (K, *spatial) class probabilities with ``like``'s geometry, atomically."""
    path = Path(path)
    probs = np.asarray(probs, dtype=np.float32)
    _check_array(probs, like, leading=1)
    ext = _extension(path)
    if ext in _SITK_OUT:
        medical.write_probabilities(probs, like, path)
    elif ext in _TIFF_OUT:
        write_pages(probs, like, path)
    else:
        raise UsageError(
            f"probabilities are written as .nii.gz/.mha/.nrrd or .tif, not {ext or '(none)'!r}", path
        )
    return path


def _output_extension(input_path: Path, content: str | None = None, is_dir: bool = False) -> str:
    """Mask extension for an input: same family, but never JPEG and never a detached .mhd/.raw pair."""
    if is_dir:
        return ".nii.gz"
    ext = _extension(input_path)
    mapped = {
        ".mhd": ".mha",
        ".nhdr": ".nrrd",
        ".dcm": ".nii.gz",
        ".jpg": ".png",
        ".jpeg": ".png",
        ".btf": ".tif",
        ".svs": ".tif",
        ".ndpi": ".tif",
        **dict.fromkeys((".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"), ".tif"),
    }
    if content is None:
        with contextlib.suppress(OSError, InputError):
            content = sniff(input_path)
    if content in _SITK_CONTENT_OUT and _EXT_KIND.get(ext) not in (None, *_SITK_CONTENT_OUT):
        # A volume misnamed as .png/.tif: its mask needs a format that keeps 3D geometry, so it
        # follows the content (which open_image reads, with a warning), not the misleading name.
        return _SITK_CONTENT_OUT[content]
    if ext in mapped:
        return mapped[ext]
    if ext in _SITK_OUT or ext in _TIFF_OUT or ext in _RASTER_OUT:
        return ext
    if content == "tiff":  # unknown name: go by content
        return ".tif"
    if content in ("png", "jpeg", "bmp"):
        return ".png"
    return _SITK_CONTENT_OUT.get(content or "", ".nii.gz")


def default_output_path(
    input_path: Path | str,
    out: Path | str | None = None,
    suffix: str = "_seg",
    is_dir_input_root: Path | str | None = None,
    content: str | None = None,
) -> Path:
    """Where the mask for ``input_path`` goes: beside it, inside ``out`` (mirroring a walked tree), or ``out``."""
    input_path = Path(input_path)
    is_dir = input_path.is_dir()
    ext = _output_extension(input_path, content, is_dir)
    stem = input_path.name if is_dir else split_extension(input_path.name)[0]
    name = f"{stem}{suffix}{ext}"
    if out is None:
        return input_path.parent / name
    out_is_dir = str(out).endswith(("/", os.sep)) or Path(out).is_dir()
    out = Path(out)
    if not out_is_dir and _extension(out) in (*_SITK_OUT, *_TIFF_OUT, *_RASTER_OUT, ".jpg", ".jpeg", ".dcm"):
        return out
    if is_dir_input_root is not None:
        if input_path.parent == Path(is_dir_input_root):  # a file at the walked root: no realpath needed
            return out / name
        with contextlib.suppress(ValueError):
            rel = input_path.parent.resolve().relative_to(Path(is_dir_input_root).resolve())
            return out / rel / name
    return out / name


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_dir(folder: Path, files: list[Path] | None = None) -> bool:
    """A folder holding .dcm files, or files with DICOM magic that GDCM groups into a series."""
    if files is None:
        try:
            files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        except OSError:
            return False
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    candidates = [p for p in files if _extension(p) not in _EXT_KIND]
    if not any(_is_dicom_file(p) for p in candidates[:8]):
        return False

    return bool(dicom_series(folder))


def is_multiframe_dicom(p: Path | str) -> bool:
    """A lone DICOM file dcm2niix places as an enhanced multi-frame image."""
    path = Path(p)
    if not path.is_file() or not (has_dicom_magic(path) or path.suffix.lower() == ".dcm"):
        return False

    try:
        return converter_reason([read_header(str(path))]) == MULTIFRAME
    except InputError:
        return False


def is_dicom_series(p: Path | str) -> bool:
    """True for a folder holding a DICOM series (what ``--output-type dicom-seg`` can reference)."""
    p = Path(p)
    return p.is_dir() and _is_dicom_dir(p)


def is_image_path(p: Path | str) -> bool:
    """True for a non-hidden file with a supported image extension, or a DICOM series folder."""
    p = Path(p)
    if p.name.startswith("."):
        return False
    if p.is_dir():
        return _is_dicom_dir(p)
    return p.is_file() and _extension(p) in _EXT_KIND


def list_images(root: Path | str) -> list[Path]:
    """All images under ``root`` (DICOM folders as single entries), sorted; safe on symlink loops."""
    root = Path(root)
    if not root.is_dir():
        return [root] if is_image_path(root) else []
    found: list[Path] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        files, dirs = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    dirs.append(entry)
                elif entry.is_file():
                    files.append(entry)
            except OSError:
                continue
        dicom = _is_dicom_dir(folder, files)
        if dicom:
            found.append(folder)
        for f in files:
            if _extension(f) not in _EXT_KIND or (dicom and _extension(f) == ".dcm"):
                continue
            real_file = os.path.realpath(f)
            if real_file not in seen_files:
                seen_files.add(real_file)
                found.append(f)
        stack.extend(reversed(dirs))
    return sorted(found)


def _intensity(array: np.ndarray) -> dict[str, float | int | None]:
    """min/max/mean over the finite values (None when there are none, so --json stays valid JSON)."""
    values = array[np.isfinite(array)] if array.dtype.kind in "fc" else array
    out: dict[str, float | int | None] = {"min": None, "max": None, "mean": None}
    if values.size:
        out.update(
            min=float(values.min()), max=float(values.max()), mean=float(values.mean(dtype=np.float64))
        )
    if values.size != array.size:
        out["non_finite"] = int(array.size - values.size)
    return out


def describe(path: Path | str, series_id: str | None = None) -> dict[str, Any]:
    """Facts for ``segcli info``: geometry, dtype, intensity range and container details."""
    path = Path(path)

    if is_dicom_seg(path):
        return describe_dicom_seg(path)
    image = open_image(path, series_id)
    array = image.array
    info: dict[str, Any] = {
        "path": str(path),
        "kind": image.kind,
        "spatial_shape": list(image.spatial_shape),
        "channels": image.channels,
        "dtype": str(array.dtype),
        "spacing": list(image.spacing) if image.spacing is not None else None,
        "intensity": _intensity(array),
        "warnings": list(image.meta.get("warnings", [])),
    }
    if image.meta.get("format") == "sitk":
        info.update(describe_geometry(image))
        files = image.meta.get("files") or [path]
        info["file_size"] = sum(data_file_size(Path(f)) for f in files)
    else:
        info["file_size"] = path.stat().st_size
    if image.kind == "tiff":
        meta = image.meta
        keys = (
            "pages",
            "series",
            "levels",
            "axes",
            "is_ome",
            "is_bigtiff",
            "compression",
            "resolution",
            "ome",
        )
        info["tiff"] = {k: meta[k] for k in keys}
    if image.kind == "raster":
        info["format"] = image.meta["pil_format"]
        info["mode"] = image.meta["mode"]
        info["dpi"] = image.meta["dpi"]
    return info
