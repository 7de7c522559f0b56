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
frames; :func:`align_dicom_seg` puts it back on the source series' own files by position. Both live in
:mod:`segcli.io.dicomseg_read` and are importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError, UsageError
from segcli.io.atomic import atomic_path
from segcli.io.dicomseg_read import (  # noqa: F401  (the reading side, importable from here as before)
    LABELMAP_SEG_SOP_CLASS_UID,
    POSITION_TOL_MM,
    SEG_SOP_CLASS_UID,
    algorithm_name,
    align_dicom_seg,
    describe_dicom_seg,
    dicom_floats,
    dicom_seg_on_grid,
    is_dicom_seg,
    plane_normal,
    read_dicom_seg,
    read_header,
    to_sitk_image,
)
from segcli.io.messages import one_line

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


# ------------------------------------------------------------------------------------------- helpers
def _highdicom():
    """highdicom, or a UsageError saying how to install it."""
    try:
        # lazy: highdicom costs ~0.4 s to import; only DICOM SEG output needs it
        import highdicom
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("DICOM SEG output needs highdicom: pip install highdicom") from None
    return highdicom


def _code(spec: Mapping[str, str] | None):
    """A pydicom Code from a bundle's code spec (the generic Tissue code when none)."""
    # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
    from pydicom.sr.coding import Code

    spec = spec or GENERIC_CODE
    return Code(value=str(spec["value"]), scheme_designator=str(spec["scheme"]), meaning=str(spec["meaning"]))


def _code_text(spec: Mapping[str, str] | None) -> str:
    """A code as scheme:value:meaning for the report."""
    spec = spec or GENERIC_CODE
    return f"{spec['scheme']}:{spec['value']}:{spec['meaning']}"


def _lo(text: str) -> str:
    """A value for an LO element: at most 64 characters, no backslash or control characters."""
    text = "".join(c if c.isprintable() and c != "\\" else " " for c in str(text))
    return text[:64]


def _encoding(compress: bool | str) -> tuple[str, str, str]:
    """(built, saved transfer syntax, report name) for a ``compress`` value."""
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
    if len(source_files) == 1 and int(read_header(source_files[0]).get("NumberOfFrames", 1) or 1) > 1:
        return _multiframe_header(source_files[0], shape), None
    headers = []
    for f in source_files:
        ds = read_header(f)
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
    iop0 = dicom_floats(first.ImageOrientationPatient, 6, "ImageOrientationPatient", path0)
    for ds, f in zip(headers[1:], source_files[1:], strict=True):
        for key, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "frame of reference")):
            if ds[key].value != first[key].value:
                raise InputError(f"slice belongs to another {what} than {Path(path0).name}; pass one series", f)
        iop = dicom_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", f)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise InputError(f"slice orientation differs from {Path(path0).name}; a DICOM SEG needs one orientation", f)
    normal = plane_normal(iop0)
    dist = [float(dicom_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", f) @ normal)
            for ds, f in zip(headers, source_files, strict=True)]
    order = np.argsort(dist)
    gaps = np.diff(np.asarray(dist)[order])
    if gaps.size and gaps.min() < POSITION_TOL_MM:
        i = int(order[int(np.argmin(gaps)) + 1])
        raise InputError("two slices of the series share one position; cannot write a DICOM SEG", source_files[i])
    return headers, (float(np.median(gaps)) if gaps.size else None)


def _multiframe_header(path: str | os.PathLike[str], shape: tuple[int, ...]) -> list[Any]:
    """The header of one enhanced multi-frame source, its frames checked against the label planes."""
    ds = read_header(path)
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
               if k not in ds or ds[k].value in (None, "")]
    if missing:
        raise InputError(f"multi-frame DICOM lacks {', '.join(missing)}: cannot place a DICOM SEG on it", path)
    frames = int(ds.NumberOfFrames)
    if (frames, int(ds.Rows), int(ds.Columns)) != tuple(shape):
        raise UsageError(f"labels are {shape} but the multi-frame file holds {frames} frames of "
                         f"{ds.Rows}x{ds.Columns}", path)
    return [ds]


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
    if int(out.get("NumberOfFrames", 1) or 1) > 1:  # thickness lives in each frame's PixelMeasuresSequence
        return out, empty, thickness_derived
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
    the pixel grid of ``source_files[i]`` (row, column). Files may come in any order. One enhanced
    multi-frame source file takes ``(frames, rows, cols)``, plane ``i`` on frame ``i + 1``
    (:func:`segcli.io.dicomframes.frame_planes`), and each SEG frame references its source frame. ``classes``: the
    bundle's class names (id -> name); ``codes``: the bundle's optional per-class codes
    (``{name: {"category": code, "type": code, "region": code}}`` with ``code = {"scheme", "value",
    "meaning"}``); a class without codes gets the generic "Tissue" code. ``compress``: ``True``
    (= ``"deflate"``), ``False`` (= ``"none"``) or ``"jpeg2000"``.

    Returns a report: ``written`` (False when the mask has no foreground: then no file is written and
    ``status`` says so), ``path``, ``segments``, ``frames``, ``compression``, ``transfer_syntax``, UIDs.
    """
    out_path = Path(out_path)
    files = [str(f) for f in source_files]
    labels = _checked_labels(labels, files)
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
        "source_slices": labels.shape[0],
        "segments": [],
        "frames": 0,
    }
    if not present:
        return {**base, "written": False, "status": "empty",
                "message": "no foreground voxels: no DICOM SEG written"}

    hd = _highdicom()
    descriptions, segments, seg_array = _segments(hd, labels, present, classes, codes or {}, bundle_name,
                                                  bundle_version)
    sources, emptied, thickness_derived = _highdicom_sources(headers, files, slice_spacing)
    description = series_description or f"segcli {bundle_name} {bundle_version}"
    seg = _build_seg(hd, sources, seg_array, descriptions, _series_number(headers[0], series_number), description,
                     f"{bundle_name} {bundle_version} by segcli {segcli_version}", segcli_version, built_ts, files[0])
    if saved_ts != built_ts:
        seg.file_meta.TransferSyntaxUID = saved_ts

    _save_seg(seg, out_path)
    n_frames = int(seg.NumberOfFrames)
    return {
        **base,
        "written": True,
        "status": "written",
        "path": str(out_path),
        "segments": segments,
        "frames": n_frames,
        "slices_with_foreground": int(np.count_nonzero(labels.reshape(labels.shape[0], -1).any(axis=1))),
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


def _checked_labels(labels: np.ndarray, files: list[str]) -> np.ndarray:
    """``labels`` as ``(n_files, rows, cols)`` integer class ids (one 2D plane for one file); else UsageError."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and len(files) == 1:
        labels = labels[None]
    if labels.ndim == 3 and len(files) == 1 and labels.shape[0] > 1:
        return _integer(labels)  # the frames of one multi-frame file: checked against its header
    if labels.ndim != 3 or labels.shape[0] != len(files) or not files:
        raise UsageError(
            f"labels must be (n_files, rows, cols) with n_files = {len(files)} source files, got shape {labels.shape}"
        )
    return _integer(labels)


def _integer(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind not in "ui" and labels.dtype != bool:
        raise UsageError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    return labels


def _segments(hd: Any, labels: np.ndarray, present: list[int], classes: Sequence[str],
              codes: Mapping[str, Mapping[str, Mapping[str, str]]], bundle_name: str,
              bundle_version: str) -> tuple[list[Any], list[dict[str, Any]], np.ndarray]:
    """One segment per class present (numbered 1.. in class order): highdicom descriptions, the report's
    entries, and the labels renumbered to segment numbers."""
    # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
    from pydicom.sr.codedict import codes as dcm_codes

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
    return descriptions, segments, lut[labels.astype(np.intp, copy=False)]


def _series_number(first: Any, series_number: int | None) -> int:
    """The SEG's SeriesNumber: the caller's, else the source's + 1000; within DICOM's IS range."""
    if series_number is None:
        try:
            series_number = int(first.get("SeriesNumber") or 0) + 1000
        except (TypeError, ValueError):
            series_number = 1000
    return min(max(int(series_number), 1), 2**31 - 1)


def _build_seg(hd: Any, sources: list[Any], seg_array: np.ndarray, descriptions: list[Any], series_number: int,
               description: str, content: str, segcli_version: str, built_ts: str, path0: str) -> Any:
    """The highdicom Segmentation (new series and instance UIDs); a series it refuses is an InputError."""
    try:
        return hd.seg.Segmentation(
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
            content_description=_lo(content),
            content_label="SEGCLI",
            series_description=_lo(description),
            transfer_syntax_uid=built_ts,
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"cannot build a DICOM SEG on this series: {one_line(exc)}", path0) from None


def _highdicom_sources(headers: list[Any], files: list[str],
                       slice_spacing: float | None) -> tuple[list[Any], set[str], bool]:
    """The source headers as highdicom accepts them, the Type 2 attributes written empty, and whether a
    SliceThickness was taken from the slice spacing."""
    sources, emptied, thickness_derived = [], set(), False
    for ds, f in zip(headers, files, strict=True):
        copy, empty, derived = _for_highdicom(ds, slice_spacing, f)
        sources.append(copy)
        emptied.update(empty)
        thickness_derived = thickness_derived or derived
    return sources, emptied, thickness_derived


def _save_seg(seg: Any, out_path: Path) -> None:
    """Save atomically (no partial file on a failure); an OS failure is a UsageError naming the output."""
    try:
        with atomic_path(out_path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        raise UsageError(f"cannot write DICOM SEG: {one_line(exc)}", out_path) from None
