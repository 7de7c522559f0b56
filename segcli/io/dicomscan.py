"""Which files of a folder are DICOM, and which series they form, from light header reads.

Files are grouped by SeriesInstanceUID; files without one (anonymised exports) by their series
number, size, orientation and pixel spacing, as dcm2niix groups them, with a warning. Non-image
objects (structured reports, presentation states, key object selections, raw data...) are skipped
and named for what they are, never mistaken for truncated slices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DICOMDIR = "1.2.840.10008.1.3.10"


def floats(value: Any, n: int) -> np.ndarray | None:
    """``n`` finite floats from a DICOM multi-value, else None."""
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size == n and np.all(np.isfinite(out)) else None


def has_dicom_magic(path: str | Path) -> bool:
    """The preamble magic ``DICM``, or a bare data set starting with group 0002/0008 (no preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def _looks_dicom(path: str, name: str) -> bool:
    return name.lower().endswith(".dcm") or has_dicom_magic(path)


def dicom_files(folder: Path) -> list[str]:
    """The non-hidden regular files directly in ``folder`` that look like DICOM, sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            if not entry.name.startswith(".") and entry.is_file() and _looks_dicom(entry.path, entry.name):
                out.append(entry.path)
        except OSError:
            continue
    return sorted(out)


def may_hold_dicom(folder: Path) -> bool:
    """A .dcm file, or a file with the DICOM preamble magic, directly in ``folder``."""
    return bool(dicom_files(folder))


_NON_IMAGE = {  # SOP class UID (or prefix ending in ".") -> what the object is
    "1.2.840.10008.5.1.4.1.1.88.59": "key object selection (KO)",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state (PR)",
    "1.2.840.10008.5.1.4.1.1.66": "raw data (RAW)",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.104.1": "encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object (RT)",
    "1.3.12.2.1107.5.9.1": "Siemens CSA non-image object",
    DICOMDIR: "DICOMDIR",
}
_NON_IMAGE_MODALITY = {"SR": "structured report (SR)", "PR": "presentation state (PR)",
                       "KO": "key object selection (KO)", "RAW": "raw data (RAW)"}


def non_image_kind(sop_class: str, modality: str = "", has_pixels: bool = True) -> str | None:
    """What a non-image object is (SR, PR, KO, RAW...), or None for an image."""
    for uid, what in _NON_IMAGE.items():
        if sop_class == uid or (uid.endswith(".") and sop_class.startswith(uid)):
            return what
    return None if has_pixels else _NON_IMAGE_MODALITY.get(modality.upper())


_KEY_TAGS = ["SeriesInstanceUID", "SOPClassUID", "Modality", "Rows", "Columns", "ImageOrientationPatient",
             "PixelSpacing", "SeriesNumber", "PixelData"]


def _series_key(path: str) -> tuple[str, str | None, np.ndarray | None]:
    """(series id, non-image kind, ImageOrientationPatient) from a light header read; "" when the file names
    no series.

    A file without SeriesInstanceUID but with an image grid gets a stand-in id built from its
    SeriesNumber, size, orientation and pixel spacing, as dcm2niix groups anonymised exports."""
    # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=False, force=True, specific_tags=_KEY_TAGS, defer_size=64)
    has_pixels = "PixelData" in ds
    kind = non_image_kind(str(ds.get("SOPClassUID", "") or ""), str(ds.get("Modality", "") or ""), has_pixels)
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    iop = floats(ds.get("ImageOrientationPatient"), 6)
    if uid or kind:
        return uid, kind, iop
    rows, cols = ds.get("Rows"), ds.get("Columns")
    ps = floats(ds.get("PixelSpacing"), 2)
    if not has_pixels or not rows or not cols or iop is None:
        return "", None, None
    spacing = "x".join(f"{v:.4g}" for v in ps) if ps is not None else "-"
    normal = "".join("+" if v > 1e-3 else "-" if v < -1e-3 else "0" for v in np.round(iop, 3))
    return f"{NO_UID_PREFIX}{ds.get('SeriesNumber', '') or 0}-{cols}x{rows}-{spacing}mm-{normal}", None, iop


NO_UID_PREFIX = "no-uid:series-"
#: A series whose images lie in several planes (a localizer) is split into one series per plane, as dcm2niix
#: writes one NIfTI per plane: ``<SeriesInstanceUID>#plane<k>``.
PLANE_SEP = "#plane"
PLANE_TOL = 1e-4  # direction cosines; the series check uses the same tolerance


def _split_planes(uid: str, members: list[tuple[str, np.ndarray | None]]) -> dict[str, list[str]]:
    """``{uid: files}``, or one entry per plane (``uid#plane1``, ...) when the orientations differ."""
    planes: list[tuple[np.ndarray | None, list[str]]] = []
    for path, iop in members:
        for orientation, files in planes:
            same = (iop is None and orientation is None) or (
                iop is not None and orientation is not None and np.allclose(iop, orientation, atol=PLANE_TOL, rtol=0))
            if same:
                files.append(path)
                break
        else:
            planes.append((iop, [path]))
    if len(planes) == 1:
        return {uid: planes[0][1]}
    return {f"{uid}{PLANE_SEP}{k}": files for k, (_o, files) in enumerate(planes, 1)}


@dataclass
class FolderScan:
    """What a folder holds: image series by id, files naming no series, and skipped non-image objects."""

    series: dict[str, list[str]]
    orphans: list[str]
    skipped: dict[str, list[str]]  # kind -> file names


def scan_folder(folder: Path) -> FolderScan:
    """Group the DICOM files of ``folder`` into series, read with pydicom.

    pydicom rather than GDCM: GDCM leaves out files it cannot parse without a word (a truncated
    slice would silently disappear) and prints decoder messages on stderr while it scans.
    """
    scan = FolderScan({}, [], {})
    grouped: dict[str, list[tuple[str, np.ndarray | None]]] = {}
    for path in dicom_files(folder):
        try:
            uid, kind, iop = _series_key(path)
        except Exception:  # pydicom raises many types on damaged files
            uid, kind, iop = "", None, None
        if kind is not None:
            if kind != "DICOMDIR":
                scan.skipped.setdefault(kind, []).append(Path(path).name)
        elif uid:
            grouped.setdefault(uid, []).append((path, iop))
        elif Path(path).name.upper() != "DICOMDIR":
            scan.orphans.append(path)
    for uid, members in grouped.items():
        scan.series.update(_split_planes(uid, members))
    return scan


def scan_warnings(scan: FolderScan) -> list[str]:
    """One warning per kind of skipped object, and one for series grouped without a SeriesInstanceUID."""
    out = [f"skipped {len(names)} non-image object{'s' if len(names) > 1 else ''}: {kind} ({', '.join(names[:3])}"
           f"{', ...' if len(names) > 3 else ''})" for kind, names in sorted(scan.skipped.items())]
    return out


def dicom_series(folder: Path) -> dict[str, list[str]]:
    """SeriesInstanceUID -> the files of that series directly in ``folder`` (sorted by name)."""
    return scan_folder(folder).series
