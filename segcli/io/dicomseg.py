"""DICOM SEG out and in: a segcli mask on a DICOM series becomes a BINARY Segmentation that viewers overlay.

Writing (:func:`write_dicom_seg`) takes the mask on the SOURCE grid, one plane per source file:
``labels[i]`` is the mask of ``source_files[i]``, with ``labels[i, r, c]`` the pixel at row ``r`` and
column ``c`` of that file. That is the file-order array of segcli's DICOM reader, so a caller holding
a :class:`~segcli.io.LoadedImage` of a DICOM series passes ``medical.to_original_axes(mask, meta)``
(or the file-order buffer it already filled) and ``meta["files"]``. Nothing is resampled: each SEG
frame takes the ImagePositionPatient of its own source file, so the file order does not matter.

The Segmentation is built with highdicom from the source headers only (pixel data is never decoded,
so JPEG 2000 sources cost nothing). One segment per foreground class present (class id 0 is the
background and never a segment), frames without foreground omitted, patient and study attributes
copied from the source. highdicom allows no RLE or JPEG-LS for 1-bit BINARY pixel data, and the
common web viewers read neither RLE with 1-bit packing nor JPEG 2000 SEGs, so the default encoding is
the 1-bit packed pixel data in a Deflated Explicit VR Little Endian file (lossless zlib over the
whole data set, read by DCMTK, GDCM, dcm4che, pydicom and dcmjs).

Reading (:func:`read_dicom_seg`) rebuilds a label volume on the regular grid spanned by the SEG's
frames; :func:`align_dicom_seg` puts it back on the source series' own files by position.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError, UsageError
from segcli.io.messages import log_reader_failure, one_line

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
_SEG_CLASSES = (SEG_SOP_CLASS_UID, LABELMAP_SEG_SOP_CLASS_UID)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

#: ``compress`` value -> (transfer syntax the SEG is built with, the one it is saved with, report name)
_ENCODINGS: dict[str, tuple[str, str, str]] = {
    "deflate": (EXPLICIT_LE, DEFLATED_LE, "deflate"),
    "none": (EXPLICIT_LE, EXPLICIT_LE, "none"),
    "jpeg2000": (JPEG2000_LOSSLESS, JPEG2000_LOSSLESS, "jpeg2000-lossless"),
}

#: The generic code for a class the bundle gives no codes for (DICOM CID 7150 / 7151: SCT 85756007).
GENERIC_CODE = {"scheme": "SCT", "value": "85756007", "meaning": "Tissue"}

# Type 2 patient/study attributes highdicom reads from the source: an absent one is written empty
# (the standard's "unknown"), never made up.
_TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName",
)
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
             "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")

_POSITION_TOL_MM = 1e-3  # DS values carry 16 characters; positions matched closer than this are equal


# ------------------------------------------------------------------------------------------- helpers
def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("DICOM SEG needs pydicom and highdicom: pip install highdicom") from None
    return pydicom


def _highdicom():
    try:
        import highdicom
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("DICOM SEG output needs highdicom: pip install highdicom") from None
    return highdicom


def is_dicom_seg(path: str | os.PathLike[str]) -> bool:
    """True for a readable DICOM file whose SOP Class is Segmentation (or Label Map Segmentation)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] != b"DICM" and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    uid = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
    return uid in _SEG_CLASSES


def _read_header(path: str | os.PathLike[str]):
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        log_reader_failure(path, exc)
        raise InputError(f"cannot read DICOM header: {one_line(exc)}", path) from None


def _floats(value: Any, n: int, what: str, path: Any) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(f"{what} is not {n} finite numbers", path)
    return out


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def _code(spec: Mapping[str, str] | None):
    from pydicom.sr.coding import Code

    spec = spec or GENERIC_CODE
    return Code(value=str(spec["value"]), scheme_designator=str(spec["scheme"]), meaning=str(spec["meaning"]))


def _code_text(spec: Mapping[str, str] | None) -> str:
    spec = spec or GENERIC_CODE
    return f"{spec['scheme']}:{spec['value']}:{spec['meaning']}"


def _lo(text: str) -> str:
    """A value for an LO element: at most 64 characters, no backslash or control characters."""
    text = "".join(c if c.isprintable() and c != "\\" else " " for c in str(text))
    return text[:64]


def _encoding(compress: bool | str) -> tuple[str, str, str]:
    if isinstance(compress, bool):
        key = "deflate" if compress else "none"
    else:
        key = {"auto": "deflate"}.get(str(compress).lower(), str(compress).lower())
    if key not in _ENCODINGS:
        raise UsageError(f"unknown DICOM SEG compression {compress!r} (use True, False, 'deflate', 'none' or 'jpeg2000')")
    return _ENCODINGS[key]


# --------------------------------------------------------------------------------------------- write
def _source_headers(
    source_files: Sequence[str | os.PathLike[str]], shape: tuple[int, ...]
) -> tuple[list[Any], float | None]:
    """Headers of the source slices, checked to form one single-frame series with one orientation,
    and the median distance between neighbouring slices (None for one slice)."""
    headers = []
    for f in source_files:
        ds = _read_header(f)
        missing = [k for k in _REQUIRED if k not in ds or ds[k].value in (None, "")]
        if missing:
            raise InputError(f"DICOM slice lacks {', '.join(missing)}: cannot place a DICOM SEG on it", f)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise InputError("multi-frame DICOM sources are not supported for DICOM SEG output", f)
        if (int(ds.Rows), int(ds.Columns)) != shape[1:]:
            raise UsageError(
                f"mask plane is {shape[1]}x{shape[2]} but this slice is {ds.Rows}x{ds.Columns} (rows x columns)", f
            )
        headers.append(ds)
    first, path0 = headers[0], source_files[0]
    iop0 = _floats(first.ImageOrientationPatient, 6, "ImageOrientationPatient", path0)
    for ds, f in zip(headers[1:], source_files[1:], strict=True):
        for key, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "frame of reference")):
            if ds[key].value != first[key].value:
                raise InputError(f"slice belongs to another {what} than {Path(path0).name}; pass one series", f)
        iop = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", f)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise InputError(f"slice orientation differs from {Path(path0).name}; a DICOM SEG needs one orientation", f)
    normal = _normal(iop0)
    dist = [float(_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", f) @ normal)
            for ds, f in zip(headers, source_files, strict=True)]
    order = np.argsort(dist)
    gaps = np.diff(np.asarray(dist)[order])
    if gaps.size and gaps.min() < _POSITION_TOL_MM:
        i = int(order[int(np.argmin(gaps)) + 1])
        raise InputError("two slices of the series share one position; cannot write a DICOM SEG", source_files[i])
    return headers, (float(np.median(gaps)) if gaps.size else None)


def _for_highdicom(ds: Any, slice_spacing: float | None, path: Any) -> tuple[Any, list[str], bool]:
    """A copy of a source header that highdicom accepts: absent Type 2 attributes present but empty, and
    an absent or empty SliceThickness (Type 2 in CT/MR) taken as the distance between the slices."""
    out = ds.copy()
    empty = []
    for key in _TYPE2_COPIED:
        if key not in out:
            setattr(out, key, None)
            empty.append(key)
    thickness_derived = False
    try:
        ok = float(out.get("SliceThickness")) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        if slice_spacing is None:
            raise InputError("slice has no SliceThickness and no neighbour to measure it from", path)
        out.SliceThickness = f"{slice_spacing:.6g}"
        thickness_derived = True
    return out, empty, thickness_derived


def write_dicom_seg(
    out_path: str | os.PathLike[str],
    labels: np.ndarray,
    source_files: Sequence[str | os.PathLike[str]],
    *,
    classes: Sequence[str],
    codes: Mapping[str, Mapping[str, Mapping[str, str]]] | None = None,
    bundle_name: str,
    bundle_version: str,
    segcli_version: str,
    compress: bool | str = True,
    series_description: str | None = None,
    series_number: int | None = None,
) -> dict[str, Any]:
    """Write ``labels`` as a BINARY DICOM SEG referencing the series of ``source_files``.

    ``labels``: integer class ids, shape ``(len(source_files), rows, cols)``; plane ``i`` lies exactly on
    the pixel grid of ``source_files[i]`` (row, column). Files may come in any order. ``classes``: the
    bundle's class names (id -> name); ``codes``: the bundle's optional per-class codes
    (``{name: {"category": code, "type": code, "region": code}}`` with ``code = {"scheme", "value",
    "meaning"}``); a class without codes gets the generic "Tissue" code. ``compress``: ``True``
    (= ``"deflate"``), ``False`` (= ``"none"``) or ``"jpeg2000"``.

    Returns a report: ``written`` (False when the mask has no foreground: then no file is written and
    ``status`` says so), ``path``, ``segments``, ``frames``, ``compression``, ``transfer_syntax``, UIDs.
    """
    out_path = Path(out_path)
    files = [str(f) for f in source_files]
    labels = np.asarray(labels)
    if labels.ndim == 2 and len(files) == 1:
        labels = labels[None]
    if labels.ndim != 3 or labels.shape[0] != len(files) or not files:
        raise UsageError(
            f"labels must be (n_files, rows, cols) with n_files = {len(files)} source files, got shape {labels.shape}"
        )
    if labels.dtype.kind not in "ui" and labels.dtype != bool:
        raise UsageError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    built_ts, saved_ts, encoding = _encoding(compress)
    present = [int(v) for v in np.unique(labels) if v != 0]
    bad = [v for v in present if v < 0 or v >= len(classes)]
    if bad:
        raise UsageError(f"label value {bad[0]} has no class (the bundle has {len(classes)} classes)")
    headers, slice_spacing = _source_headers(files, labels.shape)
    base = {
        "path": None,
        "format": "dicom-seg",
        "referenced_series_instance_uid": str(headers[0].SeriesInstanceUID),
        "source_slices": len(files),
        "segments": [],
        "frames": 0,
    }
    if not present:
        return {**base, "written": False, "status": "empty",
                "message": "no foreground voxels: no DICOM SEG written"}

    hd = _highdicom()
    from pydicom.sr.codedict import codes as dcm_codes

    codes = codes or {}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(bundle_name), family=dcm_codes.cid7162.ArtificialIntelligence, version=_lo(bundle_version),
    )
    descriptions, segments = [], []
    lut = np.zeros(max(int(labels.max()) + 1, len(classes)), dtype=np.uint8)
    for number, class_id in enumerate(present, start=1):
        name = str(classes[class_id])
        spec = codes.get(name) or {}
        region = spec.get("region")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=_lo(name),
            segmented_property_category=_code(spec.get("category")),
            segmented_property_type=_code(spec.get("type")),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[_code(region)] if region else None,
        ))
        segments.append({"number": number, "class_id": class_id, "label": name,
                         "category": _code_text(spec.get("category")), "type": _code_text(spec.get("type")),
                         **({"region": _code_text(region)} if region else {}),
                         "voxels": int(np.count_nonzero(labels == class_id))})
        lut[class_id] = number
    seg_array = lut[labels.astype(np.intp, copy=False)]

    sources, emptied, thickness_derived = [], set(), False
    for ds, f in zip(headers, files, strict=True):
        copy, empty, derived = _for_highdicom(ds, slice_spacing, f)
        sources.append(copy)
        emptied.update(empty)
        thickness_derived = thickness_derived or derived
    first = headers[0]
    if series_number is None:
        try:
            series_number = int(first.get("SeriesNumber") or 0) + 1000
        except (TypeError, ValueError):
            series_number = 1000
    series_number = min(max(int(series_number), 1), 2**31 - 1)
    description = series_description or f"segcli {bundle_name} {bundle_version}"
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=seg_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="segcli",
            manufacturer_model_name="segcli",
            software_versions=_lo(segcli_version),
            device_serial_number="0",
            content_description=_lo(f"{bundle_name} {bundle_version} by segcli {segcli_version}"),
            content_label="SEGCLI",
            series_description=_lo(description),
            transfer_syntax_uid=built_ts,
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"cannot build a DICOM SEG on this series: {one_line(exc)}", files[0]) from None
    if saved_ts != built_ts:
        seg.file_meta.TransferSyntaxUID = saved_ts

    from segcli.io.atomic import atomic_path

    try:
        with atomic_path(out_path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        raise UsageError(f"cannot write DICOM SEG: {one_line(exc)}", out_path) from None
    n_frames = int(seg.NumberOfFrames)
    return {
        **base,
        "written": True,
        "status": "written",
        "path": str(out_path),
        "segments": segments,
        "frames": n_frames,
        "slices_with_foreground": int(np.count_nonzero(labels.reshape(len(files), -1).any(axis=1))),
        "compression": encoding,
        "transfer_syntax": saved_ts,
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "study_instance_uid": str(seg.StudyInstanceUID),
        "frame_of_reference_uid": str(seg.FrameOfReferenceUID),
        "empty_type2_attributes": sorted(emptied),
        "slice_thickness_from_spacing": thickness_derived,
        "bytes": out_path.stat().st_size,
    }


# ---------------------------------------------------------------------------------------------- read
def _frame_items(ds: Any, path: Any) -> list[tuple[np.ndarray, int, str | None]]:
    """(ImagePositionPatient, segment number, referenced source SOP Instance UID) of every frame."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if per_frame is None or len(per_frame) != n_frames:
        raise InputError("DICOM SEG has no per-frame functional groups for each frame", path)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    labelmap = ds.SOPClassUID == LABELMAP_SEG_SOP_CLASS_UID
    items = []
    for i, item in enumerate(per_frame):
        pos_seq = item.get("PlanePositionSequence") or (shared.get("PlanePositionSequence") if shared else None)
        if not pos_seq:
            raise InputError(f"DICOM SEG frame {i + 1} has no PlanePositionSequence", path)
        pos = _floats(pos_seq[0].ImagePositionPatient, 3, "ImagePositionPatient", path)
        if labelmap:
            number = 0
        else:
            ident = item.get("SegmentIdentificationSequence") or (
                shared.get("SegmentIdentificationSequence") if shared else None
            )
            if not ident:
                raise InputError(f"DICOM SEG frame {i + 1} names no segment", path)
            number = int(ident[0].ReferencedSegmentNumber)
        ref = None
        with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
            ref = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        items.append((pos, number, ref))
    return items


def _shared_value(ds: Any, seq: str, key: str, path: Any) -> Any:
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if group in ds and len(ds[group].value) and seq in ds[group].value[0]:
            inner = ds[group].value[0][seq].value
            if len(inner) and key in inner[0]:
                return inner[0][key].value
    raise InputError(f"DICOM SEG lacks {key}", path)


def _segment_class_ids(ds: Any, classes: Sequence[str] | None, path: Any) -> tuple[dict[int, int], list[str]]:
    """Segment number -> class id, and the class names: the caller's (matched by label) or the SEG's own."""
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}"))
                for s in ds.get("SegmentSequence", [])}
    if classes is None:
        numbers = sorted(n for n in segments if n > 0)
        names = ["background"] + [segments[n] for n in numbers]
        return {n: i for i, n in enumerate(numbers, start=1)}, names
    lookup = {str(c).strip().lower(): i for i, c in enumerate(classes)}
    mapping = {}
    for number, label in segments.items():
        if number == 0:
            continue
        key = label.strip().lower()
        if key not in lookup:
            raise InputError(f"DICOM SEG segment {number} {label!r} is none of the classes {list(classes)}", path)
        mapping[number] = lookup[key]
    return mapping, list(classes)


def read_dicom_seg(
    path: str | os.PathLike[str], classes: Sequence[str] | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A DICOM SEG as a uint8 label volume ``(Z, Y, X)`` on the regular grid spanned by its frames.

    Z runs along the slice normal (row direction x column direction), ascending; Y along the columns
    of a frame (its rows), X along its rows (its columns). ``meta`` holds the SimpleITK-style geometry
    of that grid (``origin`` of voxel (0, 0, 0), ``spacing`` (x, y, z), ``direction`` row-major 3x3
    with columns x, y, z), the ``classes``, the segments, the referenced series and the ``positions``
    of the grid's slices. The grid covers the slices that have frames (a SEG omits empty ones); use
    :func:`align_dicom_seg` with the source files for the full series, or resample with
    :func:`to_sitk_image`. With ``classes`` (the bundle's), segment labels are matched to class names
    (case-insensitive) and voxels carry those class ids; without, segment ``k``-th gets id ``k``.
    Overlapping segments: the later segment wins (``meta["overlap"]`` is True).
    """
    volume, meta, _ = _read(path, classes)
    return volume, meta


def _read(
    path: str | os.PathLike[str], classes: Sequence[str] | None, grid: bool = True
) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """Volume (empty when ``grid`` is False and the frames are irregular), meta and the raw frames."""
    path = Path(path)
    if not is_dicom_seg(path):
        raise InputError("not a DICOM SEG (SOP Class is not Segmentation)", path)
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
    except Exception as exc:
        log_reader_failure(path, exc)
        raise InputError(f"cannot read DICOM SEG: {one_line(exc)}", path) from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = np.asarray(frames).reshape(-1, rows, cols)
    items = _frame_items(ds, path)
    if len(items) != frames.shape[0]:
        raise InputError("DICOM SEG frame count does not match its pixel data", path)
    iop = _floats(_shared_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient", path), 6,
                  "ImageOrientationPatient", path)
    pixel_spacing = _floats(_shared_value(ds, "PixelMeasuresSequence", "PixelSpacing", path), 2, "PixelSpacing", path)
    normal = _normal(iop)
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = (int(ds.get("MaximumFractionalValue", 255)) / 2.0) if fractional else 0
    mapping, names = _segment_class_ids(ds, classes, path)

    dists = np.array([float(pos @ normal) for pos, _, _ in items]) if items else np.zeros(0)
    unique: list[float] = []
    for d in np.sort(dists):
        if not unique or d - unique[-1] > _POSITION_TOL_MM:
            unique.append(float(d))
    slice_spacing = None
    with contextlib.suppress(InputError, TypeError, ValueError):
        slice_spacing = float(_shared_value(ds, "PixelMeasuresSequence", "SpacingBetweenSlices", path))
    steps = np.diff(unique)
    if slice_spacing is None or slice_spacing <= 0:
        slice_spacing = float(steps.min()) if steps.size else 1.0
        if not steps.size:
            with contextlib.suppress(InputError, TypeError, ValueError):
                slice_spacing = float(_shared_value(ds, "PixelMeasuresSequence", "SliceThickness", path) or 1.0)
    regular = True
    if steps.size:
        k = steps / slice_spacing
        regular = not np.any(np.abs(k - np.rint(k)) > 1e-2)
        if not regular and grid:
            raise InputError("DICOM SEG frames are not on a regular slice grid; align it to the source series", path)
    n_slices = int(round((unique[-1] - unique[0]) / slice_spacing)) + 1 if unique and regular else 0
    volume = np.zeros((n_slices, rows, cols), dtype=np.uint8)
    positions: list[list[float] | None] = [None] * n_slices
    overlap = False
    for (pos, number, _), frame in zip(items, frames, strict=True):
        if number != 0 and number not in mapping:
            raise InputError(f"DICOM SEG frame refers to undescribed segment {number}", path)
        if not regular:
            continue
        z = int(round((float(pos @ normal) - unique[0]) / slice_spacing))
        positions[z] = [float(v) for v in pos]
        if number == 0:  # a LABELMAP SEG: pixel values are segment numbers
            for seg_number, class_id in mapping.items():
                volume[z][frame == seg_number] = class_id
            continue
        mask = frame > threshold
        overlap = overlap or bool(np.any(volume[z][mask]))
        volume[z][mask] = mapping[number]
    origin_pos = items[int(np.argmin(dists))][0] if items else np.zeros(3)
    # The in-plane origin of every frame lies on one line along the normal for a SEG built on a series;
    # the grid's origin is the lowest frame's position.
    for z in range(n_slices):
        if positions[z] is None:
            positions[z] = [float(v) for v in origin_pos + normal * z * slice_spacing]
    direction = np.stack([iop[:3], iop[3:], normal], axis=1)
    refs = ds.get("ReferencedSeriesSequence") or []
    meta = {
        "format": "dicom-seg",
        "path": str(path),
        "classes": names,
        "segments": [
            {"number": int(s.SegmentNumber), "label": str(s.get("SegmentLabel", "")),
             "class_id": mapping.get(int(s.SegmentNumber))}
            for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) > 0
        ],
        "spacing": (float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_spacing)),
        "origin": tuple(float(v) for v in origin_pos),
        "direction": tuple(float(v) for v in direction.ravel()),
        "positions": positions,
        "frames": len(items),
        "overlap": overlap,
        "segmentation_type": str(ds.get("SegmentationType", "")),
        "threshold": threshold,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "referenced_series_instance_uid": str(refs[0].SeriesInstanceUID) if len(refs) else None,
        "frame_references": [ref for _, _, ref in items],
        "frame_positions": [[float(v) for v in pos] for pos, _, _ in items],
        "frame_segments": [number for _, number, _ in items],
    }
    return volume, meta, frames


def to_sitk_image(labels: np.ndarray, meta: Mapping[str, Any]):
    """A SimpleITK image of :func:`read_dicom_seg`'s volume with its geometry (for resampling or NIfTI)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    image.SetSpacing(tuple(meta["spacing"]))
    image.SetOrigin(tuple(meta["origin"]))
    image.SetDirection(tuple(meta["direction"]))
    return image


def dicom_seg_on_grid(path: str | os.PathLike[str], reference, classes: Sequence[str] | None = None) -> np.ndarray:
    """The SEG's labels resampled (nearest neighbour) onto a SimpleITK ``reference`` image's grid.

    For scoring a SEG against a NIfTI/MHA/NRRD ground truth: returns the label array in the
    reference's numpy order (``sitk.GetArrayFromImage`` layout); voxels outside the SEG's frames
    are background. On the source series' own lattice the values are exact, not interpolated.
    """
    import SimpleITK as sitk

    labels, meta = read_dicom_seg(path, classes)
    if labels.size == 0:
        return np.zeros(tuple(reversed(reference.GetSize())), np.uint8)
    moved = sitk.Resample(to_sitk_image(labels, meta), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                          sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


def align_dicom_seg(
    seg: str | os.PathLike[str],
    source_files: Sequence[str | os.PathLike[str]],
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """The SEG's labels on the source series' own grid: ``(len(source_files), rows, cols)`` in file order.

    Each SEG frame goes to the source slice at its ImagePositionPatient (same orientation, rows and
    columns and frame of reference required); slices without a frame are background. This is the
    inverse of :func:`write_dicom_seg`: ``align_dicom_seg(out, files)`` gives back its ``labels``.
    """
    _, meta, frames = _read(seg, classes, grid=False)
    seg_path = meta["path"]
    files = [str(f) for f in source_files]
    if not files:
        raise UsageError("no source files to align the DICOM SEG to")
    rows, cols = frames.shape[1:]
    mapping = {s["number"]: s["class_id"] for s in meta["segments"]}
    threshold = meta["threshold"]
    iop = np.array(meta["direction"]).reshape(3, 3)[:, :2].T.ravel()
    out = np.zeros((len(files), rows, cols), dtype=np.uint8)
    positions = []
    for f in files:
        src = _read_header(f)
        if (int(src.Rows), int(src.Columns)) != (rows, cols):
            raise InputError(f"slice is {src.Rows}x{src.Columns} but the DICOM SEG is {rows}x{cols}", f)
        if meta["frame_of_reference_uid"] and str(src.get("FrameOfReferenceUID", "")) != meta["frame_of_reference_uid"]:
            raise InputError(f"slice is in another frame of reference than the DICOM SEG {Path(seg_path).name}", f)
        src_iop = _floats(src.ImageOrientationPatient, 6, "ImageOrientationPatient", f)
        if not np.allclose(src_iop, iop, atol=1e-4):
            raise InputError(f"slice orientation differs from the DICOM SEG {Path(seg_path).name}", f)
        positions.append(_floats(src.ImagePositionPatient, 3, "ImagePositionPatient", f))
    positions_arr = np.stack(positions)
    for pos, number, frame in zip(meta["frame_positions"], meta["frame_segments"], frames, strict=True):
        d = np.linalg.norm(positions_arr - np.asarray(pos), axis=1)
        i = int(np.argmin(d))
        if d[i] > max(_POSITION_TOL_MM, 1e-3 * float(meta["spacing"][2])):
            raise InputError(
                f"DICOM SEG frame at {[round(v, 3) for v in pos]} matches no slice of the source series", seg_path
            )
        if number == 0:
            for seg_number, class_id in mapping.items():
                out[i][frame == seg_number] = class_id
        elif number in mapping:
            out[i][frame > threshold] = mapping[number]
    return out


def describe_dicom_seg(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts for ``segcli info`` on a DICOM SEG: its grid, segments, frames and the series it references."""
    labels, meta = read_dicom_seg(path)
    p = Path(path)
    return {
        "path": str(p),
        "kind": "dicom-seg",
        "spatial_shape": list(labels.shape),
        "channels": 1,
        "dtype": str(labels.dtype),
        "spacing": [float(v) for v in reversed(meta["spacing"])],
        "origin": [float(v) for v in meta["origin"]],
        "direction": [round(float(v), 6) for v in meta["direction"]],
        "segments": [{k: s.get(k) for k in ("number", "label", "class_id")} for s in meta["segments"]],
        "voxels_per_class": {name: int((labels == i).sum()) for i, name in enumerate(meta["classes"]) if i},
        "referenced_series_instance_uid": meta.get("referenced_series_instance_uid"),
        "file_size": p.stat().st_size,
        "warnings": [],
    }


def algorithm_name(path: str | os.PathLike[str]) -> str | None:
    """The AlgorithmName of a SEG's first segment (segcli writes its bundle's name there), or None."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        return str(item.AlgorithmName) or None
    except (AttributeError, IndexError, KeyError, OSError, ValueError):
        return None
