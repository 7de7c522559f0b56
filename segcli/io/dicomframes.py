"""A mask on dcm2niix's grid put back on the frames of the enhanced multi-frame file it was read from.

An enhanced (multi-frame) MR or CT file keeps each frame's position, orientation and pixel spacing in
its functional groups; dcm2niix stacks the frames into a NIfTI grid of its own order. A DICOM SEG that
viewers overlay must reference the source frames one by one (ReferencedFrameNumber), so the mask is
sampled back onto each frame's own pixel grid: frame pixel (r, c) lies at
``IPP + c * column spacing * row cosine + r * row spacing * column cosine`` and must fall on a voxel
centre of the mask's grid (to 1 % of a voxel), or nothing is written. Nothing is interpolated.

What a SEG cannot reference is said before any work (:func:`multiframe_seg_refusal`): several
multi-frame files, or frames that repeat their positions (a 4D file: echoes, phases, diffusion
directions), where a SEG of the one volume segmented would reference only some of the frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import InputError

#: Two frames closer than this along the normal share a position (the file then holds several volumes).
SAME_POSITION_MM = 1e-3
#: How far (in voxels) a frame pixel may fall from a voxel centre of the mask's grid.
ON_GRID_VOXELS = 0.01


@dataclass
class FrameGeometry:
    """Per-frame plane geometry of a multi-frame file (LPS, mm)."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient
    orientations: np.ndarray  # (n, 6) ImageOrientationPatient (row cosine, column cosine)
    spacings: np.ndarray  # (n, 2) PixelSpacing (between rows, between columns)
    rows: int
    columns: int


def _group_value(groups: list[Any], seq: str, key: str, n: int) -> np.ndarray | None:
    """``key`` of the first item of ``seq`` in the first group holding it, as ``n`` floats."""
    for group in groups:
        if group is None or seq not in group or not group[seq].value:
            continue
        item = group[seq].value[0]
        if key in item:
            try:
                out = np.array([float(v) for v in item[key].value], dtype=np.float64)
            except (TypeError, ValueError):
                return None
            return out if out.size == n and np.all(np.isfinite(out)) else None
    return None


def frame_geometry(path: str | Path) -> FrameGeometry:
    """Each frame's position, orientation and pixel spacing from the functional groups (per-frame first,
    then shared); InputError naming the first frame without them."""
    # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many types on damaged files
        raise InputError(f"cannot read DICOM header ({type(exc).__name__})", Path(path)) from None
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    n = int(ds.get("NumberOfFrames", len(per)) or len(per))
    if not per or len(per) != n:
        raise InputError(f"multi-frame file lists {len(per)} per-frame groups for {n} frames", Path(path))
    positions, orientations, spacings = [], [], []
    for k, group in enumerate(per, 1):
        pos = _group_value([group, shared], "PlanePositionSequence", "ImagePositionPatient", 3)
        iop = _group_value([group, shared], "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        ps = _group_value([group, shared], "PixelMeasuresSequence", "PixelSpacing", 2)
        if pos is None or iop is None or ps is None:
            what = "a position" if pos is None else "an orientation" if iop is None else "a pixel spacing"
            raise InputError(f"frame {k} of the multi-frame file has no {what} in its functional groups; "
                             "a DICOM SEG cannot reference it", Path(path))
        positions.append(pos)
        orientations.append(iop)
        spacings.append(ps)
    return FrameGeometry(np.array(positions), np.array(orientations), np.array(spacings),
                         int(ds.Rows), int(ds.Columns))


def multiframe_seg_refusal(files: list[str]) -> str | None:
    """Why a DICOM SEG cannot reference the frames of these multi-frame files (said before any work), or None."""
    if len(files) != 1:
        return (f"the series is {len(files)} enhanced multi-frame files; segcli's DICOM SEG references the frames "
                "of one multi-frame file; write NIfTI (the default)")
    try:
        geo = frame_geometry(files[0])
    except InputError as exc:
        return exc.message
    iop = geo.orientations[0]
    if not np.allclose(geo.orientations, iop, atol=1e-4, rtol=0):
        return "the frames of the multi-frame file lie in several planes; write NIfTI (the default)"
    depth = geo.positions @ np.cross(iop[:3], iop[3:])
    unique = np.unique(np.round(depth / SAME_POSITION_MM))
    if unique.size != depth.size:
        return (f"the multi-frame file holds {depth.size} frames at {unique.size} positions (4D); a DICOM SEG of "
                "one volume would reference only some of its frames; write NIfTI (the default)")
    return None


def frame_planes(mask: np.ndarray, geometry: dict[str, Any], path: str | Path) -> np.ndarray:
    """``mask`` (on-disk order z, y, x, on the ITK grid ``geometry``) sampled at every frame's pixels:
    ``(frames, rows, columns)`` in the file's frame order, for a SEG that references each frame."""
    geo = frame_geometry(path)
    spacing = np.asarray(geometry["spacing"], np.float64)
    to_index = np.linalg.inv(np.asarray(geometry["direction"], np.float64).reshape(3, 3) * spacing[None, :])
    origin = np.asarray(geometry["origin"], np.float64)
    size = np.asarray(geometry["size"][:3], np.int64)
    out = np.zeros((len(geo.positions), geo.rows, geo.columns), dtype=mask.dtype)
    r = np.arange(geo.rows)[:, None]
    c = np.arange(geo.columns)[None, :]
    for k, (pos, iop, ps) in enumerate(zip(geo.positions, geo.orientations, geo.spacings, strict=True)):
        start = to_index @ (pos - origin)  # ITK index (x, y, z) of frame pixel (0, 0)
        step_c = to_index @ (iop[:3] * ps[1])  # one column along the row
        step_r = to_index @ (iop[3:] * ps[0])  # one row down the column
        exact = [start, step_c, step_r]
        rounded = [np.rint(v) for v in exact]
        if any(np.max(np.abs(v - w)) > ON_GRID_VOXELS for v, w in zip(exact, rounded, strict=True)):
            raise InputError(f"frame {k + 1} of the multi-frame file does not lie on the mask's voxel grid; "
                             "no DICOM SEG written", Path(path))
        s, dc, dr = (v.astype(np.int64) for v in rounded)
        idx = [s[a] + r * dr[a] + c * dc[a] for a in range(3)]  # per ITK axis, (rows, columns)
        if any(i.min() < 0 or i.max() >= size[a] for a, i in enumerate(idx)):
            raise InputError(f"frame {k + 1} of the multi-frame file lies outside the mask's grid; "
                             "no DICOM SEG written", Path(path))
        out[k] = mask[idx[2], idx[1], idx[0]]
    return out
