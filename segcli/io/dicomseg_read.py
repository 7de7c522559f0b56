"""DICOM SEG in: :func:`read_dicom_seg` rebuilds a label volume on the regular grid spanned by the SEG's
frames; :func:`align_dicom_seg` puts it back on the source series' own files by position. Also the
DICOM basics the writer (:mod:`segcli.io.dicomseg`, which re-exports these names) shares: header
reading, number parsing, the slice normal.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError, UsageError
from segcli.io.dicomseries import has_dicom_magic
from segcli.io.messages import log_reader_failure, one_line

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.7"
_SEG_CLASSES = (SEG_SOP_CLASS_UID, LABELMAP_SEG_SOP_CLASS_UID)

POSITION_TOL_MM = 1e-3  # DS values carry 16 characters; positions matched closer than this are equal


# ------------------------------------------------------------------------------------------- helpers
def load_pydicom():
    """pydicom, or a UsageError saying how to install it."""
    try:
        # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
        import pydicom
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("DICOM SEG needs pydicom and highdicom: pip install highdicom") from None
    return pydicom


def is_dicom_seg(path: str | os.PathLike[str]) -> bool:
    """True for a readable DICOM file whose SOP Class is Segmentation (or Label Map Segmentation)."""
    p = Path(path)
    if not p.is_file() or not has_dicom_magic(p):
        return False
    pydicom = load_pydicom()
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    uid = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
    return uid in _SEG_CLASSES


def read_header(path: str | os.PathLike[str]):
    """A DICOM header without pixel data; an unreadable file is an InputError."""
    pydicom = load_pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        log_reader_failure(path, exc)
        raise InputError(f"cannot read DICOM header: {one_line(exc)}", path) from None


def dicom_floats(value: Any, n: int, what: str, path: Any) -> np.ndarray:
    """``n`` finite numbers from a DICOM multi-value; else an InputError naming the attribute."""
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        out = np.array([])
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(f"{what} is not {n} finite numbers", path)
    return out


def plane_normal(iop: np.ndarray) -> np.ndarray:
    """The unit slice normal (row direction x column direction) of an ImageOrientationPatient."""
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


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
        pos = dicom_floats(pos_seq[0].ImagePositionPatient, 3, "ImagePositionPatient", path)
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
    """A Shared (else first per-frame) functional group's value; InputError when absent."""
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
    ds, frames = _open_seg(path)
    rows, cols = frames.shape[1:]
    items = _frame_items(ds, path)
    if len(items) != frames.shape[0]:
        raise InputError("DICOM SEG frame count does not match its pixel data", path)
    iop = dicom_floats(_shared_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient", path), 6,
                       "ImageOrientationPatient", path)
    pixel_spacing = dicom_floats(_shared_value(ds, "PixelMeasuresSequence", "PixelSpacing", path), 2,
                                 "PixelSpacing", path)
    normal = plane_normal(iop)
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = (int(ds.get("MaximumFractionalValue", 255)) / 2.0) if fractional else 0
    mapping, names = _segment_class_ids(ds, classes, path)

    dists = np.array([float(pos @ normal) for pos, _, _ in items]) if items else np.zeros(0)
    unique, slice_spacing, regular = _slice_grid(ds, dists, path, grid)
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
    geometry = {
        "spacing": (float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_spacing)),
        "origin": tuple(float(v) for v in origin_pos),
        "direction": tuple(float(v) for v in direction.ravel()),
        "positions": positions,
    }
    return volume, _seg_meta(ds, path, names, mapping, geometry, items, overlap, threshold), frames


def _open_seg(path: Path) -> tuple[Any, np.ndarray]:
    """The SEG's data set and its frames as ``(n, rows, cols)``; InputError for anything else."""
    if not is_dicom_seg(path):
        raise InputError("not a DICOM SEG (SOP Class is not Segmentation)", path)
    pydicom = load_pydicom()
    try:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
    except Exception as exc:
        log_reader_failure(path, exc)
        raise InputError(f"cannot read DICOM SEG: {one_line(exc)}", path) from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    return ds, np.asarray(frames).reshape(-1, rows, cols)


def _slice_grid(ds: Any, dists: np.ndarray, path: Path, grid: bool) -> tuple[list[float], float, bool]:
    """The distinct frame distances along the normal, the slice spacing, and whether they form a regular grid."""
    unique: list[float] = []
    for d in np.sort(dists):
        if not unique or d - unique[-1] > POSITION_TOL_MM:
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
    return unique, slice_spacing, regular


def _seg_meta(ds: Any, path: Path, names: list[str], mapping: dict[int, int], geometry: dict[str, Any],
              items: list[tuple[np.ndarray, int, str | None]], overlap: bool, threshold: float) -> dict[str, Any]:
    """What :func:`read_dicom_seg` reports beside the volume: geometry, classes, segments, UIDs, frames."""
    refs = ds.get("ReferencedSeriesSequence") or []
    return {
        "format": "dicom-seg",
        "path": str(path),
        "classes": names,
        "segments": [
            {"number": int(s.SegmentNumber), "label": str(s.get("SegmentLabel", "")),
             "class_id": mapping.get(int(s.SegmentNumber))}
            for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) > 0
        ],
        **geometry,
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


def to_sitk_image(labels: np.ndarray, meta: Mapping[str, Any]):
    """A SimpleITK image of :func:`read_dicom_seg`'s volume with its geometry (for resampling or NIfTI)."""
    # lazy: SimpleITK costs ~0.2 s to import
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
    # lazy: SimpleITK costs ~0.2 s to import
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
        src = read_header(f)
        if (int(src.Rows), int(src.Columns)) != (rows, cols):
            raise InputError(f"slice is {src.Rows}x{src.Columns} but the DICOM SEG is {rows}x{cols}", f)
        if meta["frame_of_reference_uid"] and str(src.get("FrameOfReferenceUID", "")) != meta["frame_of_reference_uid"]:
            raise InputError(f"slice is in another frame of reference than the DICOM SEG {Path(seg_path).name}", f)
        src_iop = dicom_floats(src.ImageOrientationPatient, 6, "ImageOrientationPatient", f)
        if not np.allclose(src_iop, iop, atol=1e-4):
            raise InputError(f"slice orientation differs from the DICOM SEG {Path(seg_path).name}", f)
        positions.append(dicom_floats(src.ImagePositionPatient, 3, "ImagePositionPatient", f))
    positions_arr = np.stack(positions)
    for pos, number, frame in zip(meta["frame_positions"], meta["frame_segments"], frames, strict=True):
        d = np.linalg.norm(positions_arr - np.asarray(pos), axis=1)
        i = int(np.argmin(d))
        if d[i] > max(POSITION_TOL_MM, 1e-3 * float(meta["spacing"][2])):
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
    pydicom = load_pydicom()
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        return str(item.AlgorithmName) or None
    except (AttributeError, IndexError, KeyError, OSError, ValueError):
        return None
