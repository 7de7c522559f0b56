"""SimpleITK-backed volumes (NIfTI, MetaImage, NRRD, DICOM): canonical orientation in, exact geometry out.

Volumes are handed to the rest of segcli in one canonical orientation (LPS: array axes S/I, A/P, L/R)
so models see anatomy the same way whatever the scanner wrote; ``meta`` keeps the signed axis
permutation that undoes it, so masks are written back with the input's exact size, spacing, origin
and direction.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import InputError, OutputError, UsageError
from segcli.io import niftihdr
from segcli.io.atomic import atomic_path, write_failure_reason
from segcli.io.types import LoadedImage

if TYPE_CHECKING:
    import SimpleITK as sitk

    from segcli.io.types import LoadedImage

MAX_VOXELS = 10**10
# Deflate cannot compress better than ~1032:1, so a header promising more than this many bytes per
# byte of file is lying (or the file is truncated) whatever the compression.
MAX_EXPANSION = 2000
CANONICAL = "LPS"


def itk_message(exc: BaseException) -> str:
    """One line out of ITK's multi-line exception text (the 'Description:' line when there is one)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Description:"):
            return ln.removeprefix("Description:").strip()[:200]
    for ln in lines:
        if "ERROR:" in ln:
            message = re.sub(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", ln.split("ERROR:", 1)[1])
            if message.endswith(":") and lines[-1] != ln:  # NRRD puts the reason on the last line
                message = f"{message} {lines[-1]}"
            return message[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def data_file_size(path: Path) -> int:
    """Bytes on disk holding the image, counting a .mhd/.nhdr header's detached data file."""
    size = path.stat().st_size
    if path.suffix.lower() not in (".mhd", ".nhdr"):
        return size
    with open(path, "rb") as fh:
        header = fh.read(65536).decode("latin-1", "replace")
    for line in header.splitlines():
        key, sep, value = line.partition("=") if "=" in line else line.partition(":")
        if sep and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
            data = path.parent / value.strip()
            if data.is_file():
                size += data.stat().st_size
    return size


def check_header(
    reader: sitk.ImageFileReader, path: Path, n_files: int = 1, file_bytes: int | None = None
) -> None:
    """Refuse 4D, tiny and absurdly sized images from the header alone, before any pixel is allocated."""
    size = list(reader.GetSize())
    if n_files > 1:
        size = [*size[:2], n_files]
    dim = len(size)
    if dim > 3:
        extra = size[3:]
        if any(s > 1 for s in extra):
            raise InputError(
                f"4D images are not supported (size {'x'.join(map(str, size))}); split the time/channel axis first",
                path,
            )
    if dim < 2 or min(size[:2]) < 2:
        raise InputError(
            f"image is too small ({'x'.join(map(str, size))}); need at least 2 pixels per side", path
        )
    if min(size) < 1:
        raise InputError(f"image has no voxels (size {'x'.join(map(str, size))})", path)
    check_geometry(reader.GetSpacing(), reader.GetDirection(), path)
    voxels = int(np.prod(size, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise InputError(
            f"header declares {voxels:.3g} voxels, more than the {MAX_VOXELS:.0e} supported", path
        )
    if file_bytes is not None:
        # lazy: SimpleITK costs ~0.2 s to import
        import SimpleITK as sitk

        pixel_bytes = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
        declared = voxels * pixel_bytes * max(1, reader.GetNumberOfComponents())
        if declared > MAX_EXPANSION * max(file_bytes, 1):
            raise InputError(
                f"header declares {declared:.3g} bytes of pixels but the file holds only {file_bytes} bytes "
                "(corrupt header or truncated file)",
                path,
            )


def check_geometry(spacing: tuple[float, ...], direction: tuple[float, ...], path: Path) -> None:
    """Refuse a header whose spacing or orientation cannot be written back (NaN, zero, singular)."""
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.size and not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise InputError(f"header holds an invalid voxel spacing {tuple(float(v) for v in sp)}", path)
    d = np.asarray(direction, dtype=np.float64)
    n = int(round(np.sqrt(d.size)))
    if n * n != d.size or n == 0:
        return
    d = d.reshape(n, n)
    if not np.all(np.isfinite(d)) or abs(np.linalg.det(d)) < 1e-6:
        raise InputError(
            "header holds an invalid orientation (direction matrix not finite or singular)", path
        )


def check_nifti_header(path: Path, warnings: list[str] | None = None) -> None:
    """Refuse NIfTI geometry fields that ITK would mishandle, in segcli's words.

    Non-finite values: ITK 5.4 can hang for ever on an sform holding inf (it spins in the sform
    decomposition), and NaN ones give a meaningless orientation. A zero voxel size (pixdim) where the
    qform or pixdim defines the geometry: ITK silently takes 1 mm. On an axis of one voxel that is
    harmless and only noted; otherwise refused. Differing qform and sform are noted in ``warnings``.
    """
    fields = niftihdr.parse(niftihdr.read_raw(path))
    if fields is None:
        return  # not NIfTI, or too short: the reader reports it
    ndim = max(0, min(int(fields["dim"][0]), 7))
    pixdim, qform, sform = fields["pixdim"], fields["qform_code"], fields["sform_code"]
    values = {"pixdim": pixdim[1 : 1 + ndim]}
    if qform > 0:
        values["qform"] = (pixdim[0], *fields["quatern"], *fields["qoffset"])
    if sform > 0:
        values["sform"] = fields["srow"]
    bad = [name for name, v in values.items() if not all(math.isfinite(x) for x in v)]
    if bad:
        raise InputError(f"corrupt NIfTI header: non-finite values in {' and '.join(bad)}", path)
    if qform > 0 or sform <= 0:  # pixdim is part of the geometry ITK uses
        for k in range(1, min(ndim, 3) + 1):
            if pixdim[k] != 0:  # a negative size is ITK's |pixdim| (old Analyze flips); only 0 is unknown
                continue
            if int(fields["dim"][k]) > 1:
                raise InputError(f"NIfTI header gives voxel size {pixdim[k]:g} along axis {k} (pixdim[{k}]); "
                                 "the voxel spacing is unknown, fix the header first", path)
            if warnings is not None:
                warnings.append(f"NIfTI pixdim[{k}] is {pixdim[k]:g} on an axis of one voxel; taken as 1 mm")
    if warnings is not None and niftihdr.transforms_disagree(fields):
        warnings.append(f"NIfTI qform (code {qform}) and sform (code {sform}) place the voxels differently; "
                        "a NIfTI mask keeps both exactly as in the input (other output formats hold only one of them)")


def metaimage_fields(path: Path) -> tuple[bytes | None, dict[str, str], int | None]:
    """The first 64 KiB, the header's key = value fields (lower-case keys) and where the pixel data starts."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError:
        return None, {}, None
    fields: dict[str, str] = {}
    data_start = None
    offset = 0
    for raw in head.splitlines(keepends=True):
        line = raw.decode("latin-1")
        offset += len(raw)
        key, sep, value = line.partition("=")
        if not sep:
            continue
        fields[key.strip().lower()] = value.strip()  # lower-case: refuse even what MetaIO might skip
        if key.strip().lower() == "elementdatafile":
            data_start = offset
            break
    return head, fields, data_start


def metaimage_compressed(path: Path) -> bool:
    """MetaIO's own test: the first character of CompressedData (T, t or 1)."""
    return metaimage_fields(path)[1].get("compresseddata", "")[:1] in ("T", "t", "1")


def check_metaimage_header(path: Path) -> None:
    """Refuse MetaImage headers that crash or hang ITK's MetaIO before it sees them.

    ``NDims`` that is not a small integer (e.g. ``1e30``) segfaults it, and a compressed data stream
    whose zlib header asks for a preset dictionary (one flipped bit) makes it loop for ever.
    """
    head, fields, data_start = metaimage_fields(path)
    if head is None:
        return
    ndims = fields.get("ndims")
    if ndims is not None and not re.fullmatch(r"[1-9]", ndims):
        raise InputError(f"corrupt MetaImage header: NDims = {ndims[:20]!r}", path)
    data_file = fields.get("elementdatafile", "")
    if data_file and data_file.upper() not in ("LOCAL", "LIST") and not data_file.upper().startswith("LIST "):
        # A header may name any file as its pixel data; an untrusted header must not read /etc/passwd.
        first_name = data_file.split()[0]
        try:
            target = (path.parent / first_name).resolve()
        except (ValueError, OSError):  # a NUL byte or an impossible name
            raise InputError(f"corrupt MetaImage header: ElementDataFile {first_name[:40]!r}", path) from None
        base = path.parent.resolve()
        if os.path.isabs(first_name) or (target != base and base not in target.parents):
            raise InputError(f"MetaImage ElementDataFile {first_name!r} lies outside the header's folder; refused", path)
    if fields.get("compresseddata", "")[:1] not in ("T", "t", "1") or data_start is None:
        return  # MetaIO's own test: only the first character counts
    source = fields.get("elementdatafile", "")
    try:
        if source.upper() == "LOCAL":
            first = head[data_start : data_start + 2]
        elif source and " " not in source and "%" not in source:  # one detached data file
            with open(path.parent / source, "rb") as fh:
                first = fh.read(2)
        else:
            return
    except (OSError, ValueError):  # unreadable or an impossible name (NUL byte): MetaIO will say so
        return
    if len(first) == 2 and first[0] & 0x0F == 8 and first[1] & 0x20:
        raise InputError("corrupt compressed pixel data (the zlib stream asks for a preset dictionary)", path)


def truncated(path: Path, declared: int, held: int, what: str = "voxels") -> InputError:
    """The one message for data shorter than its header says."""
    return InputError(f"truncated: header says {declared} bytes of {what}, file holds {held}", path)


def check_gzip_complete(path: Path) -> None:
    """Fail on a truncated or short .nii.gz: ITK silently zero-fills a partly filled volume.

    A complete single-member stream whose size field (ISIZE) equals the header's promise is accepted
    without decompressing it; otherwise the stream is decompressed once and its length compared.
    """
    with open(path, "rb") as fh:
        head = gzip.GzipFile(fileobj=fh)
        try:
            hdr = head.read(540)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"truncated or corrupt gzip data ({exc})", path) from None
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    fields = niftihdr.parse(hdr)
    offset = niftihdr.vox_offset(fields) if fields else None
    need = niftihdr.expected_voxel_bytes(fields) if fields else None
    if offset is not None and need is not None and (offset + need) % 2**32 == isize:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 24):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"file is truncated or corrupt ({exc})", path) from None
    if offset is not None and need is not None and total < offset + need:
        raise truncated(path, need, max(0, total - offset))


def check_nifti_complete(path: Path) -> None:
    """Fail on a truncated uncompressed .nii: ITK reads it without complaint."""
    with open(path, "rb") as fh:
        fields = niftihdr.parse(fh.read(540))
    offset = niftihdr.vox_offset(fields) if fields else None
    need = niftihdr.expected_voxel_bytes(fields) if fields else None
    size = path.stat().st_size
    if offset is not None and need is not None and size < offset + need:
        raise truncated(path, need, max(0, size - offset))


_MET_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4, "MET_INT": 4,
              "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8}


def check_metaimage_complete(path: Path) -> None:
    """Fail on uncompressed MetaImage data shorter than the header says, before MetaIO prints its own lines."""
    head, fields, data_start = metaimage_fields(path)
    if head is None or data_start is None or metaimage_compressed(path):
        return
    try:
        dims = [int(v) for v in fields.get("dimsize", "").split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
    except ValueError:
        return
    width = _MET_BYTES.get(fields.get("elementtype", "").upper())
    if not dims or width is None or int(fields.get("headersize", "0") or 0) != 0:
        return
    need = math.prod(dims) * width * max(channels, 1)
    source = fields.get("elementdatafile", "")
    if source.upper() == "LOCAL":
        held = path.stat().st_size - data_start
    elif source and " " not in source and "%" not in source and not source.upper().startswith("LIST"):
        try:
            held = (path.parent / source).stat().st_size
        except (OSError, ValueError):
            return  # MetaIO names the missing file
    else:
        return
    if held < need:
        raise truncated(path, need, held)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_no_finite(path: Path) -> bool:
    """True when a float NIfTI-1 file's raw voxels hold no finite value at all."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            hdr = fh.read(348)
            for endian in "<>":
                if len(hdr) == 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
                    break
            else:
                return False
            code = struct.unpack(endian + "h", hdr[70:72])[0]
            if code not in _NIFTI_FLOATS:
                return False
            dtype = np.dtype(endian + _NIFTI_FLOATS[code])
            fh.read(max(int(struct.unpack(endian + "f", hdr[108:112])[0]) - 348, 0))
            while chunk := fh.read(1 << 22):
                usable = len(chunk) - len(chunk) % dtype.itemsize
                if np.isfinite(np.frombuffer(chunk[:usable], dtype)).any():
                    return False
    except (EOFError, OSError, zlib.error, ValueError, struct.error):
        return False
    return True


def orientation_code(direction: tuple[float, ...]) -> str:
    """Three-letter orientation code (e.g. ``LPS``, ``RAS``) of a 3x3 direction matrix, as ITK names it."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)


def signed_permutation(original: tuple[float, ...], canonical: tuple[float, ...], code: str, path: Path) -> np.ndarray:
    """P with canonical = original . P (sitk x, y, z index order), a signed permutation.

    DICOMOrient only permutes and flips axes; P undoes it exactly on write. A direction it cannot
    express (degenerate cosines) is refused now, not after segmenting.
    """
    d0 = np.array(original).reshape(3, 3)
    d1 = np.array(canonical).reshape(3, 3)
    try:
        solved = np.linalg.solve(d0, d1) if np.all(np.isfinite(d1)) else np.full((3, 3), np.nan)
    except np.linalg.LinAlgError:
        solved = np.full((3, 3), np.nan)
    perm = np.rint(np.nan_to_num(solved, nan=9.0)).astype(int)
    if not (
        set(perm.ravel().tolist()) <= {-1, 0, 1}
        and np.array_equal(np.abs(perm).sum(0), [1, 1, 1])
        and np.array_equal(np.abs(perm).sum(1), [1, 1, 1])
    ):
        raise InputError(f"cannot reorient the image (direction {code or 'unknown'} is not usable)", path)
    return perm


def to_loaded(image: sitk.Image, path: Path, warnings: list[str], source: dict[str, Any]) -> LoadedImage:
    """Canonicalise a SimpleITK image into a LoadedImage whose meta can restore the original geometry."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    dim = image.GetDimension()
    geometry = {
        "size": tuple(image.GetSize()),
        "spacing": tuple(image.GetSpacing()),
        "origin": tuple(image.GetOrigin()),
        "direction": tuple(image.GetDirection()),
    }
    check_geometry(geometry["spacing"], geometry["direction"], path)
    meta: dict[str, Any] = {"format": "sitk", "geometry": geometry, "warnings": warnings, **source}
    if dim == 2:
        array = sitk.GetArrayFromImage(image)
        array = array[..., None] if image.GetNumberOfComponentsPerPixel() == 1 else array
        spacing = tuple(reversed(geometry["spacing"]))
        return LoadedImage(path, "medical2d", array, spacing, meta)

    code = orientation_code(geometry["direction"])
    meta["orientation"] = code
    canonical = image if code == CANONICAL else sitk.DICOMOrient(image, CANONICAL)
    signed_perm = signed_permutation(geometry["direction"], canonical.GetDirection(), code, path)
    meta["signed_perm"] = signed_perm.tolist()
    array = sitk.GetArrayFromImage(canonical)
    array = array[..., None] if canonical.GetNumberOfComponentsPerPixel() == 1 else array
    spacing = tuple(reversed(canonical.GetSpacing()))
    meta["canonical"] = {"origin": tuple(canonical.GetOrigin()), "direction": tuple(canonical.GetDirection())}
    return LoadedImage(path, "volume", array, spacing, meta)


def to_original_axes(array: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Undo the canonical reorientation of a (Z,Y,X[,...]) array, giving the on-disk index order."""
    perm = np.array(meta["signed_perm"])
    axes, flips = [], []
    for k in range(3):  # numpy axis k of the original array is sitk axis a = 2 - k
        a = 2 - k
        b = int(np.flatnonzero(perm[a])[0])  # canonical sitk axis feeding it
        axes.append(2 - b)
        flips.append(perm[a, b] < 0)
    out = np.transpose(array, axes + list(range(3, array.ndim)))
    for k, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=k)
    return np.ascontiguousarray(out)


@contextlib.contextmanager
def itk_quiet() -> Iterator[None]:
    """ITK's warning blocks off while a reader runs (segcli says what matters in its own words)."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def open_reader(path: Path, read_as: Path, warnings: list[str] | None = None) -> sitk.ImageFileReader:
    """An ImageFileReader with its header read and every header-level refusal applied, no pixels yet.

    ``path`` is the user's file (named in every message); ``read_as`` the name ITK opens (an alias
    with the right extension, or a decompressed copy).
    """
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    name = read_as.name.lower()
    # Headers that make ITK crash the process or hang are refused before ITK sees them.
    if name.endswith((".nii", ".nii.gz")):
        check_nifti_header(path, warnings)
    elif name.endswith((".mha", ".mhd")):
        check_metaimage_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(read_as))
    try:
        with itk_quiet():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        if name.endswith((".nii", ".nii.gz")) and (niftihdr.parse(niftihdr.read_raw(path)) or {}).get("version") == 2:
            raise InputError("NIfTI-2 files cannot be read by the SimpleITK in use; save it as NIfTI-1 "
                             "(nibabel: nib.Nifti1Image.from_image)", path) from None
        raise InputError(f"cannot read image header: {itk_message(exc)}", path) from None
    check_header(reader, path, file_bytes=data_file_size(read_as.resolve()))
    if name.endswith(".nii.gz"):
        check_gzip_complete(path)
    elif name.endswith(".nii"):
        check_nifti_complete(path)
    elif name.endswith((".mha", ".mhd")):
        check_metaimage_complete(read_as)
    return reader


def source_fields(path: Path, read_as: Path) -> dict[str, Any]:
    """``meta`` entries of a file source: for NIfTI, the header geometry the writers copy back."""
    source: dict[str, Any] = {"source": "file"}
    if read_as.name.lower().endswith((".nii", ".nii.gz")):
        geometry = niftihdr.geometry_fields(path)
        if geometry is not None:
            source["nifti_geometry"] = geometry
    return source


def _data_error(exc: RuntimeError, path: Path) -> InputError:
    """ITK's read failure in segcli's words; NRRD's short-data messages become the truncation message."""
    message = itk_message(exc)
    found = re.search(r"expected (\d+) bytes but received (\d+)", message)
    if found:
        return truncated(path, int(found[1]), int(found[2]))
    found = re.search(r"fread got only (\d+) (\d+)-sized things, not (\d+)", message)
    if found:
        return truncated(path, int(found[3]) * int(found[2]), int(found[1]) * int(found[2]))
    return InputError(f"cannot read image data (truncated or corrupt?): {message}", path)


def file_order_buffer(meta: dict[str, Any], dtype: Any = np.uint8) -> np.ndarray:
    """A zeroed array in the file's own numpy axis order (sitk size reversed), for a mask."""
    return np.zeros(tuple(reversed(meta["geometry"]["size"][:3])), dtype)


def canonical_view(buffer: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The canonical (Z, Y, X) view of a file-order ``buffer``: the inverse of :func:`to_original_axes`.

    Writing a mask through this view fills ``buffer`` in file order, so ``to_original_axes`` of the
    view is ``buffer`` itself, with no copy.
    """
    perm = np.array(meta["signed_perm"])
    axes, flips = [], []
    for k in range(3):
        a = 2 - k
        b = int(np.flatnonzero(perm[a])[0])
        axes.append(2 - b)
        flips.append(perm[a, b] < 0)
    view = buffer[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.transpose(view, np.argsort(axes))


def read_file(path: Path, read_as: Path, warnings: list[str]) -> LoadedImage:
    """Read one SimpleITK-readable file; ``read_as`` may be a correctly named alias of a misnamed file."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    reader = open_reader(path, read_as, warnings)
    try:
        with itk_quiet():
            image = reader.Execute()
    except RuntimeError as exc:
        raise _data_error(exc, path) from None
    # ITK's NIfTI reader turns NaN/Inf into 0, so an all-NaN volume would look like a constant one
    # (an empty mask instead of an error). Only an all-zero float result needs the second look at the
    # raw values; it is then handed on as all-NaN, as the other readers do.
    all_nan = (
        read_as.name.lower().endswith((".nii", ".nii.gz"))
        and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
        and not sitk.GetArrayViewFromImage(image).any()
        and nifti_no_finite(path)
    )
    if image.GetDimension() == 4:  # a trailing time axis of length 1
        size = list(image.GetSize())
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    loaded = to_loaded(image, path, warnings, source_fields(path, read_as))
    if all_nan:
        loaded.array = np.full_like(loaded.array, np.nan)
    return loaded


def _geometry_image(array: np.ndarray, like: LoadedImage, vector: bool) -> sitk.Image:
    """A SimpleITK image of ``array`` (spatial axes in like's layout) with like's original geometry."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    meta = like.meta
    if meta.get("format") != "sitk":
        # TIFF/raster input written as NIfTI/MHA: 2D image with the known pixel size.
        image = sitk.GetImageFromArray(array, isVector=vector)
        if like.spacing is not None:
            image.SetSpacing(tuple(float(s) for s in reversed(like.spacing)))
        return image
    if like.kind == "volume":
        array = to_original_axes(array, meta)
    image = sitk.GetImageFromArray(array, isVector=vector)
    geometry = meta["geometry"]
    if tuple(image.GetSize()) != tuple(geometry["size"]):
        raise ValueError(f"array does not match the input geometry {geometry['size']}")
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    image.SetDirection(geometry["direction"])
    return image


def write_image(image: sitk.Image, path: Path, nifti_geometry: dict[str, Any] | None = None) -> None:
    """Write with compression; .mhd writes its .raw beside it, so both are moved into place together.

    ``nifti_geometry`` (a NIfTI input's header fields) is written into a NIfTI output's header, so the
    output keeps the input's qform and sform exactly (ITK would set both from one of them).
    """
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    try:
        if path.suffix.lower() == ".mhd":
            _write_mhd(image, path)
            return
        with atomic_path(path) as tmp:
            with itk_quiet():
                sitk.WriteImage(image, str(tmp), useCompression=True)
            if nifti_geometry is not None and path.name.lower().endswith((".nii", ".nii.gz")):
                niftihdr.patch_file(tmp, nifti_geometry)
    except RuntimeError as exc:  # ITK hides the errno: say what the folder's state explains, if anything

        reason = write_failure_reason(path)
        if reason is not None:
            raise OutputError(f"cannot write: {reason}", path) from None
        raise UsageError(f"cannot write image: {itk_message(exc)}", path) from None


def _write_mhd(image: sitk.Image, path: Path) -> None:
    """A .mhd header names its data file, so write into a hidden folder under the final names, then move."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.partial-", dir=path.parent))
    try:
        sitk.WriteImage(image, str(tmpdir / path.name), useCompression=True)
        written = sorted(tmpdir.iterdir(), key=lambda p: p.suffix.lower() == ".mhd")  # header last
        for item in written:
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_mask(mask: np.ndarray, like: LoadedImage, path: Path) -> None:
    """Mask (spatial shape of ``like``) -> SimpleITK file with the input's exact geometry."""
    write_image(_geometry_image(mask, like, vector=False), path, like.meta.get("nifti_geometry"))


def write_probabilities(probs: np.ndarray, like: LoadedImage, path: Path) -> None:
    """(K, *spatial) float32 -> one vector image whose K components are the class probabilities."""
    write_image(_geometry_image(np.moveaxis(probs, 0, -1), like, vector=True), path, like.meta.get("nifti_geometry"))


def describe_geometry(like: LoadedImage) -> dict[str, Any]:
    """Geometry as stored on disk (not canonical), for ``segcli info``."""
    geometry = like.meta["geometry"]
    out: dict[str, Any] = {
        "origin": list(geometry["origin"]),
        "direction": list(geometry["direction"]),
        "size_on_disk": list(geometry["size"]),
    }
    if "orientation" in like.meta:
        out["orientation"] = like.meta["orientation"]
    if like.meta.get("source") == "dicom":
        out["dicom_series"] = like.meta["series_id"]
        out["dicom_files"] = len(like.meta["files"])
    return out
