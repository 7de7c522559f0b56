"""Volumes read slab by slab, so a 512×512×1000 CT is never decoded whole.

A :class:`StreamedVolume` reads only its header up front (the same refusals as a whole read) and works
out the canonical (LPS) orientation from the direction cosines alone; :meth:`StreamedVolume.block`
then decodes the slab of file slices that covers a range of canonical slices and reorients just that
slab. ITK streams NIfTI (plain and gzip: a forward read, so slabs in order cost one decompression
per pass) and uncompressed MetaImage; other formats go through the whole-volume reader.

:class:`ArrayVolume` gives an in-memory array the same interface, so the volume engines and the
normalisation pre-pass have one code path for both.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from segcli import io
from segcli.errors import InputError
from segcli.io import dicomseries, medical
from segcli.io.dicompixels import read_pixels
from segcli.io.medical import metaimage_compressed, metaimage_fields
from segcli.memory import SLAB_BYTES


class VolumeSource(Protocol):
    """Canonical ``(Z, Y, X, C)`` voxels served in blocks along one axis."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype

    def block(self, axis: int, i0: int, i1: int) -> np.ndarray:
        """Canonical voxels ``i0:i1`` along spatial ``axis`` (all of the other axes), channel-last."""
        ...


class ArrayVolume:
    """An in-memory canonical ``(Z, Y, X, C)`` array as a :class:`VolumeSource` (blocks are views)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)  # type: ignore[assignment]
        self.dtype = array.dtype

    def block(self, axis: int, i0: int, i1: int) -> np.ndarray:
        index: list[Any] = [slice(None)] * 4
        index[axis] = slice(i0, i1)
        return self.array[tuple(index)]


def slab_length(shape: tuple[int, ...], axis: int, itemsize: int, slab_bytes: int | None = None) -> int:
    """Slices per slab along ``axis`` so that one slab holds about ``slab_bytes`` (SLAB_BYTES) decoded bytes."""
    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    per_slice = itemsize * math.prod(s for i, s in enumerate(shape) if i != axis)
    return int(max(1, min(shape[axis], slab_bytes // max(per_slice, 1))))


class SlabCache:
    """Slices of a :class:`VolumeSource` along ``axis``, decoding one slab at a time.

    Engines walk the slices in order (once for the rough pass, once for the fine pass), so holding
    the current slab means each slab is decoded once per pass. ``convert`` (channel conversion) is
    applied to the slab as it is read.
    """

    def __init__(self, source: VolumeSource, axis: int, convert=None, slab: int | None = None) -> None:
        self.source, self.axis, self.convert = source, axis, convert
        self.n = source.shape[axis]
        self.slab = slab or slab_length(source.shape, axis, source.dtype.itemsize)
        self._range = (0, 0)
        self._block: np.ndarray | None = None
        self.slabs_read = 0

    def __call__(self, index: int) -> np.ndarray:
        """The ``(H, W, C)`` slice ``index`` (canonical voxels, channel conversion applied)."""
        j0, j1 = self._range
        if self._block is None or not j0 <= index < j1:
            self._block = None  # drop the old slab before decoding the next
            j0 = (index // self.slab) * self.slab
            j1 = min(self.n, j0 + self.slab)
            block = self.source.block(self.axis, j0, j1)
            self._block = self.convert(block) if self.convert is not None else block
            self._range = (j0, j1)
            self.slabs_read += 1
        return np.take(self._block, index - j0, axis=self.axis)

    def release(self) -> None:
        """Drop the slab held for the engine (before another pass over the volume)."""
        self._block = None
        self._range = (0, 0)

    def blocks(self, axis: int = 0, slab_bytes: int | None = None):
        """Every voxel once, as converted blocks along ``axis`` (for whole-volume statistics).

        A consumer that drops its block before asking for the next keeps one block alive at a time.
        """
        step = slab_length(self.source.shape, axis, self.source.dtype.itemsize, slab_bytes)
        for j0 in range(0, self.source.shape[axis], step):
            block = self.source.block(axis, j0, min(self.source.shape[axis], j0 + step))
            if self.convert is not None:
                block = self.convert(block)
            yield j0, block
            del block


# ------------------------------------------------------------------------------------------ streamed files
def streamable(path: Path, content: str) -> bool:
    """Formats whose ITK reader decodes a region without the rest: NIfTI and raw MetaImage."""
    name = path.name.lower()
    if content == "nifti":
        return name.endswith(".nii")
    if content == "nifti-gz":
        return name.endswith(".nii.gz")
    if content == "metaimage" and name.endswith((".mha", ".mhd")):
        source = metaimage_fields(path)[1].get("elementdatafile", "").upper()
        return not metaimage_compressed(path) and not source.startswith("LIST") and "%" not in source
    return False


class StreamedVolume:
    """A volume file opened by header only; ``block`` decodes canonical slabs on demand.

    Has the attributes the writers and reports use from a LoadedImage (``path``, ``kind``,
    ``spacing``, ``meta``, ``spatial_shape``, ``channels``, ``ndim``), but no ``array``.
    """

    kind = "volume"
    ndim = 3

    def __init__(self, path: Path, reader: Any, warnings: list[str], *, geometry: dict[str, Any] | None = None,
                 files: list[str] | None = None, source: dict[str, Any] | None = None) -> None:
        """``reader``: an ImageFileReader with its header read. DICOM series pass the series ``geometry``
        and their sorted slice ``files`` (a slab is then a run of files)."""
        # lazy: SimpleITK costs ~0.2 s to import
        import SimpleITK as sitk

        self.path = path
        self.reader = reader
        self._files = files
        self._gz = files is None and path.name.lower().endswith(".nii.gz")
        self._tmp: Path | None = None
        if geometry is None:
            size = list(reader.GetSize())
            if len(size) == 4:
                size = size[:3]  # a trailing time axis of length 1 (longer ones were refused)
            self._dim = reader.GetDimension()
            direction = tuple(reader.GetDirection())
            if self._dim == 4:  # 4x4 direction of a 3D+t image: keep the spatial 3x3
                d = np.array(direction).reshape(4, 4)[:3, :3]
                direction = tuple(d.ravel().tolist())
            geometry = {"size": tuple(size), "spacing": tuple(reader.GetSpacing()[:3]),
                        "origin": tuple(reader.GetOrigin()[:3]), "direction": direction}
        else:
            size, direction, self._dim = list(geometry["size"]), tuple(geometry["direction"]), 3
        self._size = size
        medical.check_geometry(geometry["spacing"], geometry["direction"], path)
        code = medical.orientation_code(direction)
        dummy = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        dummy.SetDirection(direction)
        canon = dummy if code == medical.CANONICAL else sitk.DICOMOrient(dummy, medical.CANONICAL)
        perm = medical.signed_permutation(direction, canon.GetDirection(), code, path)
        # canonical sitk axis b is fed by original sitk axis a = feed[b], flipped when flip[b]
        self._feed = [int(np.flatnonzero(perm[:, b])[0]) for b in range(3)]
        self._flip = [bool(perm[self._feed[b], b] < 0) for b in range(3)]
        csize = [size[self._feed[b]] for b in range(3)]
        cspacing = [geometry["spacing"][self._feed[b]] for b in range(3)]
        self.channels = max(1, int(reader.GetNumberOfComponents()))
        self.dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).dtype)
        if self.dtype.kind == "c":
            raise InputError(f"complex pixels ({self.dtype}) are not supported; save the magnitude (or phase) "
                             "as a real image first", path)
        self.shape = (csize[2], csize[1], csize[0], self.channels)
        self.spatial_shape = self.shape[:3]
        self.spacing = tuple(float(s) for s in reversed(cspacing))
        self.meta: dict[str, Any] = {"format": "sitk", "geometry": geometry, "warnings": warnings,
                                     **(source or {"source": "file"}), "orientation": code,
                                     "signed_perm": perm.tolist(), "streamed": True}
        self.voxels_read = 0
        self.largest_block = 0

    def _inflate(self) -> None:
        """A .nii.gz is decompressed once into a temporary .nii that ITK then reads by region.

        gzip cannot seek, so each region read of a .nii.gz would decompress from the start of the file:
        quadratic in the number of slabs, times the engine's passes. The temporary file holds the raw
        voxels (the volume's size on disk, never in memory) and is deleted by :meth:`close`.
        """
        fd, name = tempfile.mkstemp(prefix=".segcli-", suffix=".nii")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(self.path, "rb") as src:
                shutil.copyfileobj(src, out, 4 * 2**20)
        except (OSError, EOFError) as exc:
            os.unlink(name)
            raise InputError(f"cannot decompress: {exc}", self.path) from None
        self._tmp = Path(name)
        try:  # the checks run on the copy, but every message names the user's file
            reader = medical.open_reader(self._tmp, self._tmp)
        except InputError as exc:
            self.close()
            raise InputError(exc.message, self.path) from None
        self.reader = reader

    def close(self) -> None:
        """Delete the temporary decompressed copy, if any."""
        tmp, self._tmp = getattr(self, "_tmp", None), None
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def __del__(self) -> None:  # pragma: no cover - safety net
        self.close()

    def no_finite_values(self) -> bool:
        """ITK's NIfTI reader turns NaN/Inf into 0: an all-zero float NIfTI may really be all NaN."""
        return self.path.name.lower().endswith((".nii", ".nii.gz")) and medical.nifti_no_finite(self.path)

    def _dicom_block(self, a: int, lo: int, hi: int) -> Any:
        """Original-axis range ``lo:hi`` along sitk axis ``a`` of a DICOM series, as a sitk image.

        Along the slice axis that is a run of files. Across it (a sagittal or coronal series whose
        engine slices another way) every file is decoded, a run of files at a time, and only the
        rows or columns of the range are kept, so memory stays one run plus the block."""
        # lazy: SimpleITK costs ~0.2 s to import
        import SimpleITK as sitk

        syntax = self.meta.get("transfer_syntax")
        if a == 2:
            image = read_pixels(self.path, self._files[lo:hi], syntax)
        else:
            run = slab_length((len(self._files), self._size[1], self._size[0]), 0, self.dtype.itemsize)
            parts = []
            for j in range(0, len(self._files), run):
                arr = sitk.GetArrayFromImage(read_pixels(self.path, self._files[j:j + run], syntax))
                parts.append(np.ascontiguousarray(arr[:, lo:hi] if a == 1 else arr[:, :, lo:hi]))
                del arr
            image = sitk.GetImageFromArray(np.concatenate(parts, axis=0), isVector=self.channels > 1)
        image.SetSpacing(self.meta["geometry"]["spacing"])
        image.SetDirection(self.meta["geometry"]["direction"])
        return image

    def block(self, axis: int, i0: int, i1: int) -> np.ndarray:
        """Decode canonical slices ``i0:i1`` along numpy ``axis`` and return them canonical, channel-last."""
        # lazy: SimpleITK costs ~0.2 s to import
        import SimpleITK as sitk

        b = 2 - axis  # canonical sitk axis
        a = self._feed[b]
        n = self._size[a]
        lo, hi = (n - i1, n - i0) if self._flip[b] else (i0, i1)
        if self._files is not None:  # a DICOM series: the slab is a run of slice files
            image = self._dicom_block(a, lo, hi)
        else:
            if self._gz and getattr(self, "_tmp", None) is None:
                self._inflate()
            index = [0] * len(self._size)
            extent = list(self._size)
            index[a], extent[a] = lo, hi - lo
            if self._dim == 4:
                index, extent = [*index, 0], [*extent, 0]  # collapse the time axis
            self.reader.SetExtractIndex(index)
            self.reader.SetExtractSize(extent)
            try:
                with medical.itk_quiet():
                    image = self.reader.Execute()
            except RuntimeError as exc:
                raise InputError(f"cannot read image data (truncated or corrupt?): {medical.itk_message(exc)}",
                                 self.path) from None
        if self.meta["orientation"] != medical.CANONICAL:
            image = sitk.DICOMOrient(image, medical.CANONICAL)
        arr = sitk.GetArrayFromImage(image)
        del image
        if arr.ndim == 3:
            arr = arr[..., None]
        self.voxels_read += arr.size // self.channels
        self.largest_block = max(self.largest_block, arr.size // self.channels)
        return arr


def open_streamed(path: Path, content: str | None = None, series_id: str | None = None) -> StreamedVolume | None:
    """A :class:`StreamedVolume` for a 3D NIfTI, raw MetaImage or DICOM series, else None (read it whole).

    ``content``: the kind :func:`segcli.io.sniff` already found for a file.
    """
    if path.is_dir():
        return _open_dicom(path, series_id)
    if not path.is_file():
        return None
    if content is None:
        try:
            content = io.sniff(path)
        except InputError:
            return None  # the whole reader gives the precise error
    if content is None or not streamable(path, content):
        return None
    # lazy: brings scipy
    from segcli.geometry import slice_axis

    warnings: list[str] = []
    reader = medical.open_reader(path, path, warnings)  # every header refusal of the whole reader
    if reader.GetDimension() not in (3, 4):
        return None
    vol = StreamedVolume(path, reader, warnings, source=medical.source_fields(path, path))
    if content == "nifti-gz" and vol._feed[2 - slice_axis(vol.spacing)] != 2:
        return None  # slabs across the file's slices would each decompress the whole file: read it once
    return vol


def _open_dicom(folder: Path, series_id: str | None = None) -> StreamedVolume | None:
    """A DICOM series streamed file run by file run, when the engine slices along its slice axis.

    The whole series is checked first (:func:`segcli.io.dicomseries.check_series`: an irregular
    series is refused here, with the same message as the whole reader) and its grid comes from every
    file's position. A single file goes to the whole reader.
    """
    # lazy: brings scipy
    from segcli.geometry import slice_axis

    if not dicomseries.may_hold_dicom(folder):
        return None
    plan, chosen, warnings, n_series = dicomseries.plan_folder(folder, series_id)
    if plan.geometry is None or plan.convert is not None or plan.scale is not None or plan.unknown_space:
        return None  # one file, a series dcm2niix places, or Philips float scaling: the whole reader
    info = dicomseries.header_reader(plan, folder)
    source = {"source": "dicom", "series_id": chosen, "files": plan.files, "n_series": n_series,
              "notes": list(plan.notes), "transfer_syntax": plan.transfer_syntax}
    vol = StreamedVolume(folder, info, warnings, geometry=dict(plan.geometry), files=plan.files, source=source)
    if vol._feed[2 - slice_axis(vol.spacing)] != 2:
        return None  # sliced across the files: every slab would need every file
    return vol
