"""NIfTI masks and probability maps written plane by plane, never assembled in memory.

SimpleITK can only write a whole image, and building one copies the array. A NIfTI-1 file is a
352-byte header followed by the voxels (x fastest, then y, z, then vector components), so segcli
lets ITK write the header of a ONE-slice image with the input's exact geometry (spacing, origin,
direction: ITK computes the qform and sform), patches the slice count into it (and, for a NIfTI input,
the input's own qform, sform, codes and voxel size: see :mod:`segcli.io.niftihdr`), and streams the
planes after it, gzip-compressed for ``.nii.gz``.

Probabilities of a streamed volume are spilled to a temporary file slice by slice as the engine
produces them (:class:`SpilledProbs`) and read back one plane at a time in file order.
"""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli.io import niftihdr
from segcli.io.atomic import atomic_path
from segcli.io.medical import to_original_axes


def nifti_header(meta: dict[str, Any], components: int, dtype: np.dtype) -> bytes:
    """Header bytes (through vox_offset) of a NIfTI-1 file with ``meta``'s geometry, from ITK."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    geometry = meta["geometry"]
    size = geometry["size"]
    shape = (1, size[1], size[0]) + ((components,) if components > 1 else ())
    one = sitk.GetImageFromArray(np.zeros(shape, dtype), isVector=components > 1)
    one.SetSpacing(geometry["spacing"])
    one.SetOrigin(geometry["origin"])
    one.SetDirection(geometry["direction"])
    with tempfile.TemporaryDirectory(prefix="segcli-hdr-") as tmp:
        path = Path(tmp) / "one.nii"
        sitk.WriteImage(one, str(path))
        raw = path.read_bytes()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    head = bytearray(raw[:vox_offset])
    if struct.unpack(endian + "h", head[46:48])[0] != 1:
        raise RuntimeError("unexpected NIfTI header from ITK (dim[3] of a one-slice image is not 1)")
    head[46:48] = struct.pack(endian + "h", int(size[2]))
    if meta.get("nifti_geometry") is not None:
        niftihdr.patch_header(head, meta["nifti_geometry"])
    return bytes(head)


def write_planes(path: Path, meta: dict[str, Any], components: int, dtype: Any, planes: Iterable[np.ndarray]) -> None:
    """Write ``components × Z`` file-order ``(Y, X)`` planes (component-major) as .nii or .nii.gz, atomically."""
    dtype = np.dtype(dtype)
    size = meta["geometry"]["size"]
    header = nifti_header(meta, components, dtype)
    expected = components * int(size[2])
    with atomic_path(path) as tmp:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        # Float probabilities barely compress better at level 6 (0.667 vs 0.697 of the raw size on CT
        # probabilities) but take twice as long; masks are mostly zeros and cheap at any level.
        level = 6 if dtype == np.uint8 else 1
        kwargs = {"compresslevel": level} if opener is gzip.open else {}
        n = 0
        with opener(tmp, "wb", **kwargs) as fh:  # type: ignore[operator]
            fh.write(header)
            for plane in planes:
                plane = np.ascontiguousarray(plane, dtype=dtype)
                if plane.shape != (size[1], size[0]):
                    raise ValueError(f"plane shape {plane.shape} is not {(size[1], size[0])}")
                fh.write(memoryview(plane).cast("B"))
                n += 1
        if n != expected:
            raise ValueError(f"wrote {n} planes, expected {expected}")


def write_mask(buffer: np.ndarray, meta: dict[str, Any], path: Path) -> None:
    """A uint8 mask already in file order (``(Z, Y, X)``, see ``medical.file_order_buffer``), no copy."""
    write_planes(path, meta, 1, np.uint8, (buffer[z] for z in range(buffer.shape[0])))


class SpilledProbs:
    """``(K, n, H, W)`` float32 probabilities of canonical slices, kept in a temporary file.

    ``put(z, probs)`` stores one slice as the engine produces it; ``plane(c, z)`` reads one back.
    The file is deleted by :meth:`close` (and when the object is collected).
    """

    def __init__(self, classes: int, n: int, hw: tuple[int, int], directory: Path | None = None) -> None:
        self._fd: int | None = None  # set first: close() and __del__ must work if mkstemp fails
        self.shape = (classes, n, int(hw[0]), int(hw[1]))
        self._plane = int(hw[0]) * int(hw[1]) * 4
        if directory is not None:  # the output's folder, which -o may name before it exists
            Path(directory).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".segcli-probs-", dir=directory)
        self._fd: int | None = fd
        self._name = name
        os.unlink(name)  # anonymous: gone with the descriptor, even after a crash
        os.ftruncate(fd, classes * n * self._plane)

    def put(self, z: int, probs: np.ndarray) -> None:
        assert self._fd is not None
        for c in range(self.shape[0]):
            os.pwrite(self._fd, np.ascontiguousarray(probs[c], np.float32).tobytes(), (c * self.shape[1] + z) * self._plane)

    def plane(self, c: int, z: int) -> np.ndarray:
        assert self._fd is not None
        raw = os.pread(self._fd, self._plane, (c * self.shape[1] + z) * self._plane)
        return np.frombuffer(raw, np.float32).reshape(self.shape[2:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - safety net
        self.close()


def file_order_planes(probs: SpilledProbs, meta: dict[str, Any], axis: int) -> Iterator[np.ndarray]:
    """The spilled canonical slices as NIfTI planes: component-major, file z ascending.

    Needs the slicing ``axis`` to be the file's slice axis (see :func:`streamable_probs`).
    """
    perm = np.array(meta["signed_perm"])
    flipped = perm[2, 2 - axis] < 0  # file sitk axis 2 feeds canonical sitk axis 2 - axis
    n = probs.shape[1]
    for c in range(probs.shape[0]):
        for j in range(n):
            s = probs.plane(c, n - 1 - j if flipped else j)
            yield to_original_axes(np.expand_dims(s, axis), meta)[0]


def streamable_probs(meta: dict[str, Any], axis: int, path: Path) -> bool:
    """True when probabilities can go to ``path`` plane by plane: a NIfTI output, sliced along the file's z."""
    if not path.name.lower().endswith((".nii", ".nii.gz")) or "signed_perm" not in meta:
        return False
    perm = np.array(meta["signed_perm"])
    return bool(perm[2, 2 - axis] != 0)
