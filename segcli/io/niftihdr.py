"""NIfTI-1/NIfTI-2 header fields read and written at the byte level.

SimpleITK keeps one geometry per image: on reading it chooses between the qform and the sform, and on
writing it sets both from that one choice. A mask written that way is misplaced for every tool that
reads the other transform (nibabel and FSL read the sform). segcli therefore records the input's
geometry fields here (:func:`geometry_fields`) and writes them back into the output header byte for
byte (:func:`patch_header`, :func:`patch_file`): qform_code, sform_code, quatern_b/c/d, qoffset_x/y/z,
srow_x/y/z, pixdim[0..3] and the spatial unit bits of xyzt_units. The voxel grid is the input's own,
so the input's transforms are exactly right for the mask.

This module also gives the number of voxel bytes a header promises (:func:`expected_voxel_bytes`),
for the truncation checks.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# Field layouts: name -> (offset, struct format of one value, count).
_N1 = {
    "dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1), "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1), "xyzt_units": (123, "B", 1), "qform_code": (252, "h", 1),
    "sform_code": (254, "h", 1), "quatern": (256, "f", 3), "qoffset": (268, "f", 3), "srow": (280, "f", 12),
}
_N2 = {
    "dim": (16, "q", 8), "datatype": (12, "h", 1), "bitpix": (14, "h", 1), "pixdim": (104, "d", 8),
    "vox_offset": (168, "q", 1), "xyzt_units": (500, "i", 1), "qform_code": (344, "i", 1),
    "sform_code": (348, "i", 1), "quatern": (352, "d", 3), "qoffset": (376, "d", 3), "srow": (400, "d", 12),
}
# The fields copied from the input header into the mask's (pixdim only 0..3: qfac and the voxel size).
GEOMETRY_FIELDS = ("qform_code", "sform_code", "quatern", "qoffset", "srow")


def _layout(raw: bytes) -> tuple[dict[str, tuple[int, str, int]], str] | None:
    """(field layout, byte order) of a NIfTI-1 or NIfTI-2 header, or None."""
    if len(raw) < 4:
        return None
    for endian in "<>":
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348 and len(raw) >= 348:
            return _N1, endian
        if size == 540 and len(raw) >= 540:
            return _N2, endian
    return None


def _get(raw: bytes, layout: dict, endian: str, name: str) -> Any:
    offset, fmt, count = layout[name]
    values = struct.unpack_from(f"{endian}{count}{fmt}", raw, offset)
    return values[0] if count == 1 else tuple(values)


def _put(raw: bytearray, layout: dict, endian: str, name: str, value: Any) -> None:
    offset, fmt, count = layout[name]
    values = (value,) if count == 1 else tuple(value)
    struct.pack_into(f"{endian}{count}{fmt}", raw, offset, *values)


def parse(raw: bytes) -> dict[str, Any] | None:
    """Every field this module knows, from the first bytes of a NIfTI file (None when not NIfTI)."""
    found = _layout(raw)
    if found is None:
        return None
    layout, endian = found
    out = {name: _get(raw, layout, endian, name) for name in layout}
    out["version"] = 1 if layout is _N1 else 2
    return out


def read_raw(path: Path) -> bytes:
    """The first 540 bytes of a NIfTI file, decompressed when it is gzip (fewer when it is shorter)."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gz else open)(path, "rb") as fh:
            return fh.read(540)
    except (EOFError, OSError, zlib.error):
        return b""


def expected_voxel_bytes(fields: dict[str, Any]) -> int | None:
    """Bytes of voxel data the header promises, or None when a field is not usable."""
    dims = fields["dim"]
    ndim = dims[0]
    if not 1 <= ndim <= 7 or fields["bitpix"] <= 0:
        return None
    n = math.prod(max(int(d), 1) for d in dims[1 : 1 + ndim])  # exact, no overflow
    return n * int(fields["bitpix"]) // 8


def vox_offset(fields: dict[str, Any]) -> int | None:
    value = fields["vox_offset"]
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)


def geometry_fields(path: Path) -> dict[str, Any] | None:
    """The input's geometry fields, JSON-able, for ``meta["nifti_geometry"]`` (None when not NIfTI)."""
    fields = parse(read_raw(path))
    if fields is None:
        return None
    out = {name: fields[name] for name in GEOMETRY_FIELDS}
    out["pixdim"] = list(fields["pixdim"][:4])
    out["space_units"] = int(fields["xyzt_units"]) & 0x07
    out["version"] = fields["version"]
    out["quatern"], out["qoffset"], out["srow"] = list(out["quatern"]), list(out["qoffset"]), list(out["srow"])
    return out


def patch_header(raw: bytearray, geometry: dict[str, Any]) -> None:
    """Write ``geometry`` (from :func:`geometry_fields`) into header bytes ``raw``, in place."""
    found = _layout(bytes(raw[:540]))
    if found is None:
        raise ValueError("not a NIfTI header")
    layout, endian = found
    for name in GEOMETRY_FIELDS:
        _put(raw, layout, endian, name, geometry[name])
    pixdim = list(_get(raw, layout, endian, "pixdim"))
    pixdim[:4] = geometry["pixdim"]
    _put(raw, layout, endian, "pixdim", pixdim)
    units = int(_get(raw, layout, endian, "xyzt_units"))
    _put(raw, layout, endian, "xyzt_units", (units & ~0x07) | int(geometry["space_units"]))


def patch_file(path: Path, geometry: dict[str, Any]) -> None:
    """Rewrite the header of a NIfTI file ITK has just written (``.nii`` in place, ``.nii.gz`` re-compressed)."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    if not gz:
        with open(path, "r+b") as fh:
            head = bytearray(fh.read(540))
            patch_header(head, geometry)
            fh.seek(0)
            fh.write(head)
        return
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.hdr-", dir=path.parent)
    try:
        with gzip.open(path, "rb") as peek:
            fields = parse(peek.read(540))
        # uint8 masks: level 6 (mostly zeros, cheap); float probabilities: level 1, as niftistream does
        level = 6 if fields is not None and fields["datatype"] == 2 else 1
        with (gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as raw_out,
              gzip.GzipFile(fileobj=raw_out, mode="wb", compresslevel=level, mtime=0) as out):
            head = bytearray(src.read(540))
            patch_header(head, geometry)
            out.write(head)
            shutil.copyfileobj(src, out, 4 * 2**20)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def qform_affine(fields: dict[str, Any]) -> np.ndarray:
    """The 4x4 qform (RAS, mm) from quatern_b/c/d, qoffset and pixdim, as the NIfTI standard defines it."""
    b, c, d = (float(v) for v in fields["quatern"])
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    pixdim = [float(v) for v in fields["pixdim"]]
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    out = np.eye(4)
    out[:3, :3] = rot * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]])
    out[:3, 3] = [float(v) for v in fields["qoffset"]]
    return out


def sform_affine(fields: dict[str, Any]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :] = np.array([float(v) for v in fields["srow"]]).reshape(3, 4)
    return out


def transforms_disagree(fields: dict[str, Any], tol: float = 1e-3) -> bool:
    """True when both transforms are set (codes > 0) and map voxels to different places."""
    if fields["qform_code"] <= 0 or fields["sform_code"] <= 0:
        return False
    q, s = qform_affine(fields), sform_affine(fields)
    return not np.allclose(q, s, atol=tol, rtol=0)
