"""DICOM series folders: grouping, a check of the whole series before any pixel is decoded, and pixel
reads that name the file at fault.

ITK's series reader takes the slice spacing from the slice positions it is given, and GDCM's grouping
drops files it cannot parse, so a series with a missing, duplicated, truncated or tilted slice would be read
as a regular grid in the wrong place. :func:`check_series` reads every file's header (pydicom,
pixel data not loaded) and either refuses the series with one line naming the problem and the
slice positions, or returns the files in slice order with the grid they define:

- every ImageOrientationPatient equal to the first within ``ORIENTATION_TOL``;
- Rows, Columns and PixelSpacing equal; one frame per file (no enhanced multi-frame file);
- positions projected on the slice normal (row × column cosines) sorted ascending; no two closer
  than ``DUPLICATE_MM``; every gap equal to the median gap within ``spacing_tolerance`` (1 % of the
  median gap or 0.01 mm, whichever is larger); a gap of about k median gaps is reported as missing
  slices;
- no in-plane shift between neighbouring slices beyond the same tolerance (a gantry tilt or a
  sheared acquisition: refused, segcli does not resample tilted series);
- no DICOM-looking file in the folder that names no series (a truncated or unreadable file), and no
  slice whose uncompressed pixel data is shorter than its header says.

What was corrected (slices reordered because the file names do not follow their positions) is
listed in the plan's ``notes``; :func:`read_dicom_folder` puts them in ``meta["notes"]`` and in
``meta["warnings"]``, which the report and stderr show.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import InputError
from segcli.io.dicomconvert import read_converted
from segcli.io.dicomframes import SAME_POSITION_MM, frame_geometry, multiframe_seg_refusal
from segcli.io.dicompixels import captured_native_stderr, read_pixels, rescaled
from segcli.io.dicomscan import DICOMDIR as _DICOMDIR
from segcli.io.dicomscan import NO_UID_PREFIX, PLANE_SEP, scan_folder, scan_warnings
from segcli.io.dicomscan import dicom_files as dicom_files  # re-exported: callers import these from here
from segcli.io.dicomscan import dicom_series as dicom_series
from segcli.io.dicomscan import floats as _floats
from segcli.io.dicomscan import has_dicom_magic as has_dicom_magic
from segcli.io.dicomscan import may_hold_dicom as may_hold_dicom
from segcli.io.medical import check_header, itk_message, itk_quiet, to_loaded

if TYPE_CHECKING:
    import SimpleITK as sitk

    from segcli.io.types import LoadedImage

ORIENTATION_TOL = 1e-4  # direction cosines
MULTIFRAME = "an enhanced multi-frame DICOM"  # converter reasons (the 4D one names its counts)
MOSAIC = "a Siemens mosaic"
DUPLICATE_MM = 1e-3  # two slices closer than this along the normal are at the same position
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01
# Multi-frame SOP classes (enhanced CT/MR/PET/XA and the like) whose geometry lives in per-frame groups.
_ENHANCED = {
    "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4", "1.2.840.10008.5.1.4.1.1.130",
    "1.2.840.10008.5.1.4.1.1.128.1", "1.2.840.10008.5.1.4.1.1.12.1.1", "1.2.840.10008.5.1.4.1.1.12.2.1",
}


def spacing_tolerance(spacing: float) -> float:
    """How far a gap (or an in-plane shift) may differ from the series spacing: 1 % or 0.01 mm."""
    return max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * abs(spacing))


# ------------------------------------------------------------------------------------------- grouping
def choose_series(folder: Path, series: dict[str, list[str]], series_id: str | None) -> tuple[str, list[str]]:
    """The requested series, or the largest one with a warning when there are several."""
    warnings: list[str] = []
    if series_id is not None:
        if series_id not in series:
            raise InputError(
                f"no DICOM series {series_id!r} here (found: {', '.join(sorted(series))})", folder
            )
        return series_id, warnings
    chosen = max(sorted(series), key=lambda sid: len(series[sid]))
    base = chosen.split(PLANE_SEP)[0]
    planes = [sid for sid in series if sid.startswith(base + PLANE_SEP)]
    if len(planes) > 1:
        warnings.append(
            f"the images of series {base} lie in {len(planes)} planes (a localizer?); using plane "
            f"{chosen.split(PLANE_SEP)[1]} ({len(series[chosen])} image{'s' if len(series[chosen]) > 1 else ''}), "
            "as dcm2niix writes one volume per plane"
        )
    if len(series) > max(len(planes), 1):
        others = [f"{sid} ({len(series[sid])} file{'s' if len(series[sid]) > 1 else ''})"
                  for sid in sorted(series, key=lambda s: -len(series[s])) if sid != chosen]
        warnings.append(
            f"{len(series)} DICOM series found; using {chosen} ({len(series[chosen])} files); choose another "
            f"with --series ID: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
        )
    return chosen, warnings


# ------------------------------------------------------------------------------------------- the check
@dataclass
class SliceHeader:
    """What the check needs from one file's header."""

    path: str
    series_uid: str | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    rows: int
    columns: int
    frames: int
    pixel_spacing: tuple[float, ...] | None
    sop_class: str
    transfer_syntax: str
    pixel_bytes: int | None  # bytes the header declares for native (uncompressed) pixel data
    pixel_available: int | None  # bytes of it the file really holds
    has_pixels: bool
    image_type: str = ""  # ImageType joined with "\\" (MOSAIC marks a Siemens mosaic)
    sop_uid: str = ""
    series_number: str = ""
    mosaic_tiles: int = 0  # Siemens NumberOfImagesInMosaic (0019,100A), 0 when absent
    philips_float: float | None = None  # 1 / (RescaleSlope x Philips ScaleSlope (2005,100E)), when present
    instance_number: int | None = None
    bits: int = 16  # BitsAllocated
    samples: int = 1  # SamplesPerPixel

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class SeriesPlan:
    """Files in slice order (ascending along the normal), the grid they define, and what was corrected."""

    files: list[str]
    geometry: dict[str, Any] | None  # size, spacing, origin, direction (sitk order); None for one file
    notes: list[str] = field(default_factory=list)
    transfer_syntax: dict[str, str] = field(default_factory=dict)
    convert: str | None = None  # why the series goes to the converter (mosaic, multi-frame, 4D), else None
    scale: list[float] | None = None  # per file (in ``files`` order): Philips precise-float factors, else None
    unknown_space: bool = False  # no file has a patient position: stacked by InstanceNumber, no spatial transform
    headers: list[SliceHeader] = field(default_factory=list, repr=False)  # in ``files`` order


def read_header(path: str) -> SliceHeader:
    """One file's header (pixel data located, never loaded); InputError naming the file when unreadable."""
    # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
    import pydicom

    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=True)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise InputError(f"cannot read DICOM header ({type(exc).__name__}: {str(exc)[:120]})", Path(path)) from None
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    pixel_bytes = available = None
    has_pixels = False
    try:
        element = ds.get_item("PixelData") if "PixelData" in ds else None
    except Exception:
        element = None
    if element is not None:
        has_pixels = True
        length = getattr(element, "length", None)
        tell = getattr(element, "value_tell", None)
        if length is not None and tell is not None and length != 0xFFFFFFFF:  # native, not encapsulated
            available = max(0, min(length, os.path.getsize(path) - tell))
            try:
                bits = int(ds.get("BitsAllocated", 0) or 0)
                samples = int(ds.get("SamplesPerPixel", 1) or 1)
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                declared = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * samples * frames
                pixel_bytes = max(length, declared * bits // 8)
            except (TypeError, ValueError):
                pixel_bytes = length
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return SliceHeader(
        path=path, series_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0), frames=frames,
        pixel_spacing=tuple(spacing.tolist()) if spacing is not None else None,
        sop_class=str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or ""),
        transfer_syntax=syntax, pixel_bytes=pixel_bytes, pixel_available=available, has_pixels=has_pixels,
        image_type="\\".join(str(v) for v in _multi(ds.get("ImageType"))).upper(),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""), series_number=str(ds.get("SeriesNumber", "") or ""),
        mosaic_tiles=_mosaic_tiles(ds), philips_float=_philips_float(ds),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        bits=_int_or_none(ds.get("BitsAllocated")) or 16, samples=_int_or_none(ds.get("SamplesPerPixel")) or 1,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]


def _philips_float(ds: Any) -> float | None:
    """Philips "precise float" factor 1 / (RescaleSlope x ScaleSlope), as dcm2niix applies by default.

    Philips MR stores display values (RescaleSlope/Intercept) and, in the private ScaleSlope (2005,100E),
    the factor back to the scanner's floating-point values; dcm2niix writes those (its ``-p y``), so the
    model sees the same values only when segcli divides the display value by RescaleSlope x ScaleSlope."""
    try:
        if "PHILIPS" not in str(ds.get("Manufacturer", "") or "").upper():
            return None
        element = ds.get((0x2005, 0x100E))
        if element is None:
            return None
        value = element.value
        if isinstance(value, bytes):
            value = struct.unpack("<f", value[:4])[0]
        scale = float(value[0] if isinstance(value, (list, tuple)) else value)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        return 1.0 / (slope * scale) if scale > 0 and slope > 0 and np.isfinite(scale) else None
    except Exception:  # private tags come in any VR
        return None


def _mosaic_tiles(ds: Any) -> int:
    """Siemens NumberOfImagesInMosaic from the private tag (0019,100A), 0 when absent or unreadable."""
    try:
        element = ds.get((0x0019, 0x100A))
        if element is None:
            return 0
        value = element.value
        if isinstance(value, bytes):
            return int.from_bytes(value[:2], "little") if len(value) >= 2 else 0
        return int(value[0] if isinstance(value, (list, tuple)) else value)
    except Exception:  # private tags come in any VR
        return 0


def _check_file(h: SliceHeader, folder: Path) -> None:
    """Refusals that concern one file on its own."""
    if h.frames > 1 or h.sop_class in _ENHANCED:
        raise InputError(
            f"{h.name} is a multi-frame (enhanced) DICOM file with {h.frames} frames inside a series folder; "
            "segcli reads series of single-frame files (convert it with dcm2niix first)", folder)
    _check_pixels(h, folder)
    if h.position is None or h.orientation is None:
        missing = "ImagePositionPatient" if h.position is None else "ImageOrientationPatient"
        what = " (a secondary capture: a derived picture without patient geometry)" if h.sop_class.startswith(
            "1.2.840.10008.5.1.4.1.1.7") else ""
        raise InputError(f"{h.name} has no usable {missing}{what}; the slices cannot be placed", folder)


def _check_pixels(h: SliceHeader, folder: Path) -> None:
    """Pixel data present and as long as the header says (checked for every route, dcm2niix's too)."""
    if not h.has_pixels:
        raise InputError(f"{h.name} holds no pixel data (truncated file?)", folder)
    if h.pixel_bytes is not None and h.pixel_available is not None and h.pixel_available < h.pixel_bytes:
        raise InputError(f"truncated: header of {h.name} says {h.pixel_bytes} bytes of pixels, the file "
                         f"holds {h.pixel_available}", folder)


def check_one_volume(volume: int | None, path: Path) -> None:
    """``--volume N`` with N > 1 on an input that holds one volume is an error, not a silent volume 1."""
    if volume is not None and volume != 1:
        raise InputError(f"--volume {volume}: this input holds one volume", path)


def check_single_file(path: Path) -> None:
    """A lone DICOM file read as an image: refuse missing or short pixel data before ITK sees it."""
    h = read_header(str(path))
    if not h.has_pixels:
        raise InputError("DICOM file holds no pixel data (header only, or truncated)", path)
    if h.pixel_bytes is not None and h.pixel_available is not None and h.pixel_available < h.pixel_bytes:
        raise InputError(f"truncated: header says {h.pixel_bytes} bytes of pixels, file holds {h.pixel_available}",
                         path)


def _left_out(folder: Path, orphans: list[str]) -> None:
    """Refuse the series when a file of its folder looks like DICOM but cannot be placed in any series."""
    for path in orphans:
        try:
            h = read_header(path)
        except InputError as exc:
            raise InputError(f"{Path(path).name} cannot be read as DICOM ({exc.message}); "
                             "a truncated or corrupt file in the series folder", folder) from None
        if h.sop_class == _DICOMDIR:
            continue
        _check_file(h, folder)  # names the truncation or the multi-frame file when that is why
        raise InputError(f"{h.name} names no series (no SeriesInstanceUID): a truncated or foreign file in the "
                         "series folder; remove it or move the series", folder)


def _pos(z: float) -> str:
    return f"z={z:.6g}"


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _check_alike(headers: list[SliceHeader], folder: Path) -> None:
    """Every slice the size, orientation and pixel spacing of the first."""
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise InputError(f"slices of different sizes: {h.name} is {h.columns}x{h.rows} pixels, "
                             f"{first.name} is {first.columns}x{first.rows}", folder)
        if not np.allclose(h.orientation, first.orientation, atol=ORIENTATION_TOL, rtol=0):
            raise InputError(f"slice orientation differs: {h.name} has ImageOrientationPatient "
                             f"{_vec(h.orientation)}, {first.name} {_vec(first.orientation)} (a localizer with "
                             "several planes?)", folder)
        if (h.pixel_spacing is None) != (first.pixel_spacing is None) or (
                h.pixel_spacing is not None and not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-4)):
            raise InputError(f"pixel spacing differs: {h.name} has {h.pixel_spacing}, "
                             f"{first.name} {first.pixel_spacing}", folder)


def _check_grid(headers: list[SliceHeader], depth: np.ndarray, normal: np.ndarray, folder: Path) -> None:
    """Slices sorted along the normal (``depth``) form one regular line: no duplicate, gap or tilt."""
    gaps = np.diff(depth)
    duplicates = np.flatnonzero(gaps < DUPLICATE_MM)
    if duplicates.size:
        i, n = int(duplicates[0]), int(duplicates.size)
        raise InputError(f"duplicate slice position: {headers[i].name} and {headers[i + 1].name} are both at "
                         f"{_pos(depth[i])} ({n} duplicate{'s' if n > 1 else ''}; several echoes, phases "
                         "or acquisitions in one series?)", folder)
    spacing = float(np.median(gaps))
    tol = spacing_tolerance(spacing)
    bad = np.flatnonzero(np.abs(gaps - spacing) > tol)
    if bad.size:
        i = int(bad[0])
        k = round(gaps[i] / spacing)
        more = f" (and {bad.size - 1} more uneven gap{'s' if bad.size > 2 else ''})" if bad.size > 1 else ""
        where = (f"gap of {gaps[i]:.6g} mm between {_pos(depth[i])} ({headers[i].name}) and "
                 f"{_pos(depth[i + 1])} ({headers[i + 1].name}) where spacing is {spacing:.6g} mm{more}")
        if k >= 2 and abs(gaps[i] - k * spacing) <= tol * k:
            raise InputError(f"missing slice(s): {where}", folder)
        raise InputError(f"uneven slice spacing: {where}", folder)
    steps = np.diff(np.array([h.position for h in headers]), axis=0)
    shifts = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)  # in-plane part of each step
    if shifts.max() > tol:
        i = int(np.argmax(shifts))
        angle = float(np.degrees(np.arctan2(shifts[i], spacing)))
        raise InputError(f"gantry tilt or sheared slices: {headers[i + 1].name} is shifted {shifts[i]:.3g} mm "
                         f"in-plane from {headers[i].name} ({_pos(depth[i])} to {_pos(depth[i + 1])}, about "
                         f"{angle:.2g} degrees); segcli does not resample tilted series: correct it first "
                         "(dcm2niix does)", folder)


def is_mosaic(h: SliceHeader) -> bool:
    """A Siemens mosaic: one file holding every slice of a volume as tiles of one plane."""
    return "MOSAIC" in h.image_type.split("\\") or h.mosaic_tiles > 1


def converter_reason(headers: list[SliceHeader]) -> str | None:
    """Why a series cannot be stacked file by file (it then goes to dcm2niix), or None.

    A mosaic holds a volume per file, an enhanced file (every file of the series) holds its frames' geometry in functional
    groups, and a series whose slice positions all repeat the same number of times (distinct
    SOP instances) is 4D: echoes, phases, diffusion directions or time points."""
    multi = [h.frames > 1 or h.sop_class in _ENHANCED for h in headers]
    if all(multi):
        return MULTIFRAME
    if any(multi):
        return None  # a multi-frame file among single-frame slices: refused by the checks, named
    if any(is_mosaic(h) for h in headers):
        return MOSAIC
    if len(headers) < 2 or any(h.position is None or h.orientation is None for h in headers):
        return None
    first = headers[0].orientation
    if any(not np.allclose(h.orientation, first, atol=ORIENTATION_TOL, rtol=0) for h in headers):
        return None
    normal = np.cross(first[:3], first[3:])
    depth = np.round(np.array([h.position @ normal for h in headers]) / DUPLICATE_MM).astype(np.int64)
    _, counts = np.unique(depth, return_counts=True)
    uids = {h.sop_uid for h in headers}
    if counts.min() > 1 and counts.min() == counts.max() and len(uids) == len(headers) and "" not in uids:
        return f"a 4D series ({int(counts[0])} images at each of {counts.size} slice positions)"
    return None


def check_series(folder: Path, files: list[str], orphans: list[str] = (),
                 known: dict[str, SliceHeader] | None = None) -> SeriesPlan:
    """Every header of the series checked together; the files in slice order with their grid, or InputError.

    ``orphans``: files of the folder that look like DICOM but name no series (refused: they may be
    slices of this one); ``known``: headers already read."""
    _left_out(folder, list(orphans))
    known = known or {}
    headers = [known[f] if f in known else read_header(f) for f in files]
    syntax = {h.path: h.transfer_syntax for h in headers}
    reason = converter_reason(headers)
    if reason is not None:
        for h in headers:
            _check_pixels(h, folder)
        return SeriesPlan([h.path for h in headers], None, [], syntax, convert=reason, headers=headers)
    if headers and all(h.position is None for h in headers) and all(h.frames == 1 for h in headers):
        return _unknown_space_plan(headers, folder, syntax)
    for h in headers:
        _check_file(h, folder)
    _check_alike(headers, folder)
    first = headers[0]
    if len(headers) == 1:
        return SeriesPlan([first.path], None, [], syntax, headers=headers)
    row, col = first.orientation[:3], first.orientation[3:]
    if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
        raise InputError(f"ImageOrientationPatient {_vec(first.orientation)} is not two orthogonal unit "
                         "vectors", folder)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    depth = np.array([h.position @ normal for h in headers])
    order = np.argsort(depth, kind="stable")
    headers, depth = [headers[i] for i in order], depth[order]
    _check_grid(headers, depth, normal, folder)
    notes = []
    names = [h.name for h in headers]
    if names != sorted(names, key=_natural):
        how = "in descending order" if names == sorted(names, key=_natural, reverse=True) else "out of order"
        notes.append(f"DICOM file names run {how} of slice position; the {len(names)} slices were ordered by "
                     "ImagePositionPatient along the slice normal")
    ps = first.pixel_spacing
    geometry = {
        "size": (first.columns, first.rows, len(headers)),
        # PixelSpacing is (row spacing, column spacing) = (y, x); without it, ITK's in-plane spacing is used
        "spacing": (float(ps[1]) if ps else None, float(ps[0]) if ps else None,
                    float((depth[-1] - depth[0]) / (len(headers) - 1))),
        "origin": tuple(float(v) for v in headers[0].position),
        "direction": tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()),
    }
    scale = [h.philips_float for h in headers]
    if all(f is not None for f in scale) and any(abs(f - 1.0) > 1e-9 for f in scale):
        notes.append("Philips precise-float scaling applied (display value / (RescaleSlope x ScaleSlope)), "
                     "as dcm2niix does")
    else:
        scale = None
    return SeriesPlan([h.path for h in headers], geometry, notes, syntax, scale=scale, headers=headers)


def _unknown_space_plan(headers: list[SliceHeader], folder: Path, syntax: dict[str, str]) -> SeriesPlan:
    """A series none of whose files has a patient position (secondary captures, screen grabs of a
    colour map): stacked by InstanceNumber with no spatial transform, as dcm2niix does (its NIfTI says
    qform and sform code 0). Nothing places these pixels in the patient, so the mask cannot be either."""
    for h in headers:
        _check_pixels(h, folder)
    first = headers[0]
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise InputError(f"image size differs: {h.name} is {h.columns}x{h.rows}, {first.name} "
                             f"{first.columns}x{first.rows}", folder)
    numbers = [h.instance_number for h in headers]
    if None not in numbers and len(set(numbers)) == len(numbers):
        headers = [headers[i] for i in np.argsort(numbers, kind="stable")]
        order = "InstanceNumber"
    else:
        headers = sorted(headers, key=lambda h: _natural(h.name))
        order = "file name (no unique InstanceNumber)"
    ps = first.pixel_spacing
    geometry = {
        "size": (first.columns, first.rows, len(headers)),
        "spacing": (float(ps[1]) if ps else None, float(ps[0]) if ps else None, 1.0),
        "origin": (0.0, 0.0, 0.0),
        "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    }
    what = " (secondary captures)" if first.sop_class.startswith("1.2.840.10008.5.1.4.1.1.7") else ""
    note = (f"no file of the series has an ImagePositionPatient{what}: its {len(headers)} image"
            f"{'s are' if len(headers) > 1 else ' is'} stacked by {order}, and the mask has no place in the "
            "patient (NIfTI qform and sform code 0, rows bottom-up, as dcm2niix writes it)")
    return SeriesPlan([h.path for h in headers], geometry, [note], syntax, unknown_space=True, headers=headers)


def unknown_space_nifti(spacing: tuple[float, ...]) -> dict[str, Any]:
    """NIfTI geometry fields saying "no spatial transform" (qform and sform code 0), for ``meta["nifti_geometry"]``."""
    return {"qform_code": 0, "sform_code": 0, "quatern": [0.0, 0.0, 0.0], "qoffset": [0.0, 0.0, 0.0],
            "srow": [0.0] * 12, "pixdim": [1.0, *(float(v) for v in spacing[:3])], "space_units": 2, "version": 1}


def _vec(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.6g}" for x in v) + ")"


def plan_folder(folder: Path, series_id: str | None = None) -> tuple[SeriesPlan, str, list[str], int]:
    """(checked plan, chosen series id, warnings, number of series) for a folder; InputError when unusable."""
    scan = scan_folder(folder)
    series = scan.series
    if not series:
        skipped = sum(len(v) for v in scan.skipped.values())
        if skipped and not scan.orphans:
            raise InputError(f"folder holds no image series, only non-image DICOM objects: "
                             f"{'; '.join(f'{len(v)} {k}' for k, v in sorted(scan.skipped.items()))}", folder)
        if scan.orphans:
            _left_out(folder, scan.orphans)
        if any(name.lower().endswith(".dcm.gz") for name in os.listdir(folder)):
            raise InputError("folder holds gzip-compressed DICOM files (.dcm.gz); decompress them first "
                             "(gunzip *.dcm.gz)", folder)
        raise InputError("folder holds no readable DICOM series", folder)
    chosen, warnings = choose_series(folder, series, series_id)
    warnings = scan_warnings(scan) + warnings
    if chosen.startswith(NO_UID_PREFIX):
        warnings.append(f"the DICOM files carry no SeriesInstanceUID: {len(series[chosen])} files grouped by series "
                        "number, size, orientation and pixel spacing")
    plan = check_series(folder, series[chosen], scan.orphans)
    return plan, chosen, warnings + plan.notes, len(series)


def seg_refusal(folder: Path) -> str | None:
    """Why a DICOM SEG cannot reference this series (said before any work), or None.

    A SEG's frames reference single-frame source images by SOP Instance UID; a series dcm2niix places
    (mosaic, multi-frame, 4D) or one without UIDs has no such one-to-one reference here."""
    if folder.is_file():  # one enhanced multi-frame file
        return convert_seg_refusal(MULTIFRAME, [str(folder)])
    try:
        plan, chosen, _warnings, _n = plan_folder(folder)
    except InputError:
        return None  # the reader names the problem when the file is processed
    if plan.convert is not None:
        return convert_seg_refusal(plan.convert, plan.files)
    if chosen.startswith(NO_UID_PREFIX):
        return "the DICOM files carry no SeriesInstanceUID, so a DICOM SEG cannot reference them; write NIfTI"
    if plan.unknown_space:
        return ("no file of the series has an ImagePositionPatient, so a DICOM SEG has no plane to put its frames "
                "on; write NIfTI")
    return None


def decoded_size(path: Path, volume: int | None, series_id: str | None = None) -> tuple[tuple[int, ...], int, int] | None:
    """``(shape, channels, bytes per value)`` of what reading ``path`` (a series folder) whole decodes, from the
    headers alone, so a memory budget is checked before any pixel is: one volume of a 4D series, the tiles of a
    mosaic, the frames of an enhanced file at their distinct positions. None when the folder is unusable (the
    reader then names the problem)."""
    try:
        plan, _chosen, _w, _n = plan_folder(path, series_id)
    except InputError:
        return None
    hs = plan.headers
    if not hs:
        return None
    first = hs[0]
    itemsize = 4 if plan.scale is not None else max(1, first.bits // 8)
    rows, cols = first.rows, first.columns
    if plan.convert == MOSAIC:
        tiles = max(1, first.mosaic_tiles)
        grid = int(np.ceil(np.sqrt(tiles)))
        return (tiles, rows // grid, cols // grid), first.samples, itemsize
    if plan.convert == MULTIFRAME:
        frames = sum(h.frames for h in hs)
        if volume is not None and len(hs) == 1:
            try:
                geo = frame_geometry(first.path)
                normal = np.cross(geo.orientations[0][:3], geo.orientations[0][3:])
                frames = np.unique(np.round(geo.positions @ normal / SAME_POSITION_MM)).size
            except InputError:
                pass
        return (frames, rows, cols), first.samples, itemsize
    if plan.convert is not None:  # a 4D series: "(N images at each of M slice positions)"
        found = re.search(r"at each of (\d+) slice positions", plan.convert)
        depth = int(found.group(1)) if found and volume is not None else len(hs)
        return (depth, rows, cols), first.samples, itemsize
    return (len(hs), rows, cols), first.samples, itemsize


def convert_seg_refusal(reason: str, files: list[str]) -> str | None:
    """Why a DICOM SEG cannot reference a series dcm2niix places, or None (one 3D multi-frame file)."""
    if reason == MULTIFRAME:
        return multiframe_seg_refusal(files)
    if reason == MOSAIC:
        return ("a Siemens mosaic packs every slice into one image, so a DICOM SEG cannot reference its slices; "
                "write NIfTI (the default)")
    return f"{reason}: a DICOM SEG of one volume cannot reference the series; write NIfTI (the default)"


def header_reader(plan: SeriesPlan, folder: Path) -> sitk.ImageFileReader:
    """An ImageFileReader with the first slice's header read (pixel type, components), checked."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    info = sitk.ImageFileReader()
    info.SetFileName(plan.files[0])
    try:
        with itk_quiet(), captured_native_stderr():
            info.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM header of {Path(plan.files[0]).name}: {itk_message(exc)}",
                         folder) from None
    check_header(info, folder, n_files=len(plan.files))
    if plan.geometry is not None:  # no PixelSpacing: the in-plane spacing ITK found (ImagerPixelSpacing or 1)
        x, y, z = plan.geometry["spacing"]
        plan.geometry["spacing"] = (x or float(info.GetSpacing()[0]), y or float(info.GetSpacing()[1]), z)
    return info


def read_dicom_folder(folder: Path, series_id: str | None = None, volume: int | None = None) -> LoadedImage:
    """Read a checked DICOM series folder; with several series take the largest and say so.

    Mosaics, enhanced multi-frame files and 4D series go to dcm2niix (:mod:`segcli.io.dicomconvert`);
    ``volume`` (1-based) picks one volume of a 4D series."""
    plan, chosen, warnings, n_series = plan_folder(folder, series_id)
    if plan.convert is not None:
        return read_converted(folder, plan.files, plan.convert, volume, warnings,
                              {"series_id": chosen, "n_series": n_series})
    check_one_volume(volume, folder)
    header_reader(plan, folder)
    image = read_pixels(folder, plan.files, plan.transfer_syntax)
    if plan.scale is not None:
        image = rescaled(image, plan.scale)
    geometry = plan.geometry
    if plan.unknown_space:  # rows bottom-up, as in dcm2niix's NIfTI of it: masks overlay its conversion
        # lazy: SimpleITK costs ~0.2 s to import
        import SimpleITK as sitk

        image = sitk.Flip(image, [False, True, False])
    if geometry is not None:
        if tuple(image.GetSize()) != tuple(geometry["size"]):
            raise InputError(f"the series decodes to {image.GetSize()} voxels, its headers say "
                             f"{geometry['size']}", folder)
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
    source = {"source": "dicom", "series_id": chosen, "files": plan.files, "n_series": n_series,
              "notes": list(plan.notes)}
    if plan.unknown_space:
        source["nifti_geometry"] = unknown_space_nifti(image.GetSpacing())
        source["unknown_space"] = True
    return to_loaded(image, folder, warnings, source)
