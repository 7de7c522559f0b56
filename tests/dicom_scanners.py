"""DICOM as scanners write it, generated with pydicom for the tests: a Siemens mosaic with a minimal CSA
header, an enhanced multi-frame MR file with per-frame functional groups, a multi-echo (4D) series, a
series without UIDs and a structured report. Pixel values encode the slice (and volume) they belong to,
so a test can check placement voxel by voxel with an independent reader."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``tags``: name -> (VR, item strings)."""
    out = bytearray(b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77))
    for name, (vr, items) in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), len(items), vr.encode(), 0, len(items), 77)
        for item in items:
            raw = item.encode() + b"\x00"
            out += struct.pack("<4i", len(raw), len(raw), 77, len(raw))
            out += raw + b"\x00" * (-len(raw) % 4)
    return bytes(out)


def _base(sop_class: str, series_uid: str | None, study_uid: str | None, modality: str = "MR"):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Scanner", "SCANNER-1", modality
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber = "20240101", "120000", 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def _fmt(values) -> list[str]:
    return [f"{float(v):.6f}" for v in values]


def write_mosaic(path: Path, tiles: np.ndarray, *, row_dir, col_dir, origin, spacing=(2.0, 2.0, 3.0)) -> None:
    """One Siemens mosaic file of ``tiles`` (n, rows, cols) laid out on a ceil(sqrt(n)) square.

    ``origin``: the true position of voxel (0, 0) of slice 0; the file stores the mosaic's own corner,
    as the scanner does (half the padding further out along the row and column directions)."""
    from pydicom.uid import generate_uid

    n, r, c = tiles.shape
    m = int(np.ceil(np.sqrt(n)))
    sheet = np.zeros((m * r, m * c), np.uint16)
    for k in range(n):
        sheet[(k // m) * r:(k // m + 1) * r, (k % m) * c:(k % m + 1) * c] = tiles[k]
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    stored = (np.asarray(origin, float) - row_dir * spacing[1] * (m * c - c) / 2
              - col_dir * spacing[0] * (m * r - r) / 2)
    ds = _base(MR, generate_uid(), generate_uid())
    ds.Manufacturer = "SIEMENS"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.AcquisitionMatrix = [0, c, r, 0]
    ds.ImagePositionPatient = _fmt(stored)
    ds.ImageOrientationPatient = _fmt((*row_dir, *col_dir))
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.SliceThickness = ds.SpacingBetweenSlices = f"{spacing[2]:g}"
    ds.InstanceNumber, ds.AcquisitionNumber = 1, 1
    ds.EchoTime, ds.RepetitionTime = "30", "2000"
    ds.Rows, ds.Columns = sheet.shape
    ds.add_new((0x0029, 0x0010), "LO", "SIEMENS CSA HEADER")
    ds.add_new((0x0029, 0x1010), "OB", csa2({
        "NumberOfImagesInMosaic": ("US", [str(n)]),
        "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal]),
        "AcquisitionMatrixText": ("SH", [f"{r}*{c}"]),
    }))
    ds.add_new((0x0019, 0x0010), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100A), "US", n)
    ds.PixelData = sheet.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_enhanced(path: Path, volumes: np.ndarray, *, row_dir, col_dir, origin, spacing=(1.5, 1.0, 2.5),
                   frame_order=None) -> list[np.ndarray]:
    """One enhanced MR file of ``volumes`` (t, n, rows, cols); frame ``f`` is (volume, slice) ``frame_order[f]``.

    Returns the ImagePositionPatient of slice k = 0..n-1 (the independent placement to check)."""
    import pydicom
    from pydicom.uid import generate_uid

    t, n, r, c = volumes.shape
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    positions = [np.asarray(origin, float) + k * spacing[2] * normal for k in range(n)]
    order = frame_order or [(v, k) for v in range(t) for k in range(n)]
    ds = _base(ENHANCED_MR, generate_uid(), generate_uid())
    ds.FrameOfReferenceUID = generate_uid()
    ds.Manufacturer = "Philips"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(order), r, c
    ds.InstanceNumber = 1
    shared = pydicom.Dataset()
    measures, orient = pydicom.Dataset(), pydicom.Dataset()
    measures.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    measures.SliceThickness = measures.SpacingBetweenSlices = f"{spacing[2]:g}"
    orient.ImageOrientationPatient = _fmt((*row_dir, *col_dir))
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orient]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for v, k in order:
        item, pos, content = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
        pos.ImagePositionPatient = _fmt(positions[k])
        content.StackID, content.InStackPositionNumber = "1", k + 1
        content.TemporalPositionIndex = v + 1
        content.DimensionIndexValues = [1, k + 1, v + 1]
        item.PlanePositionSequence = [pos]
        item.FrameContentSequence = [content]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack([volumes[v, k] for v, k in order]).astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return positions


def write_classic(folder: Path, volumes: np.ndarray, *, row_dir=(1, 0, 0), col_dir=(0, 1, 0), origin=(0, 0, 0),
                  spacing=(1.0, 1.0, 2.0), uids: bool = True, echo_times=None,
                  philips: tuple[float, float] | None = None) -> list[Path]:
    """Single-frame MR files, one per (volume, slice) of ``volumes`` (t, n, rows, cols).

    ``echo_times``: one per volume (a multi-echo series); ``uids=False`` writes no Study, Series or SOP
    Instance UID (an anonymised export); ``philips`` = (RescaleSlope, ScaleSlope) writes a Philips series
    with the private ScaleSlope (2005,100E)."""
    from pydicom.uid import generate_uid

    t, n, r, c = volumes.shape
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    series, study = (generate_uid(), generate_uid()) if uids else (None, None)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for v in range(t):
        for k in range(n):
            ds = _base(MR, series, study)
            if not uids:
                del ds.SOPInstanceUID
            ds.Manufacturer = "segcli-tests"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            ds.ImagePositionPatient = _fmt(np.asarray(origin, float) + k * spacing[2] * normal)
            ds.ImageOrientationPatient = _fmt((*row_dir, *col_dir))
            ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
            ds.SliceThickness = f"{spacing[2]:g}"
            ds.InstanceNumber = v * n + k + 1
            ds.AcquisitionNumber = 1
            if echo_times is not None:
                ds.EchoTime, ds.EchoNumbers = f"{echo_times[v]:g}", v + 1
            ds.Rows, ds.Columns = r, c
            if philips is not None:
                ds.Manufacturer = "Philips Medical Systems"
                ds.RescaleSlope, ds.RescaleIntercept = f"{philips[0]:g}", "0"
                ds.add_new((0x2005, 0x0010), "LO", "Philips MR Imaging DD 001")
                ds.add_new((0x2005, 0x100E), "FL", philips[1])
            ds.PixelData = volumes[v, k].astype(np.uint16).tobytes()
            path = folder / f"im{v * n + k + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=uids)
            files.append(path)
    return files


def write_sr(path: Path, series_uid: str | None = None) -> None:
    """A basic text structured report (no pixel data)."""
    from pydicom.uid import generate_uid

    ds = _base(BASIC_SR, series_uid or generate_uid(), generate_uid(), modality="SR")
    for key in ("SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                "PixelRepresentation"):
        delattr(ds, key)
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.save_as(path, enforce_file_format=True)


def coded(t: int, n: int, r: int, c: int) -> np.ndarray:
    """Values that name their voxel: 1000 * volume + 100 * slice + a row/column ramp (all distinct per slice)."""
    v, k, y, x = np.meshgrid(range(t), range(n), range(r), range(c), indexing="ij")
    return (1000 * v + 100 * k + 2 * y + (x % 2) + 1).astype(np.uint16)
