"""DICOM-series writers for the tests and the bad-input corpus: SimpleITK's DicomSeriesFromArray pattern, and
a pydicom one for what SimpleITK cannot write (oblique planes, descending numbering, JPEG 2000, chosen UIDs)."""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(folder: Path, image: sitk.Image, uid: str, prefix: str = "slice",
                       description: str = "segcli test", frame_of_reference: str | None = None,
                       study: str | None = None) -> None:
    """One file per slice with position, orientation and spacing tags that reproduce ``image``'s geometry.

    ``frame_of_reference`` adds a FrameOfReferenceUID (a DICOM SEG needs one; GDCM writes none) and
    ``study`` one StudyInstanceUID for every slice (GDCM makes a new one per file otherwise).

    SimpleITK's DICOM writer switches the process to the C locale; the caller's locale is restored.
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        d = image.GetDirection()
        tags = [
            ("0008|0031", "120000"),
            ("0008|0021", "20240101"),
            ("0008|0008", "DERIVED\\SECONDARY"),
            ("0020|000e", uid),
            ("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7])))),
            ("0008|103e", description),
            ("0008|0060", "CT"),
        ]
        if frame_of_reference:
            tags.append(("0020|0052", frame_of_reference))
        if study:
            tags.append(("0020|000d", study))
        for i in range(image.GetDepth()):
            slice_i = image[:, :, i]
            for tag, value in tags:
                slice_i.SetMetaData(tag, value)
            slice_i.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, i)))))
            slice_i.SetMetaData("0020|0013", str(i))
            slice_i.SetMetaData("0028|0030", f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}")
            writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
            writer.Execute(slice_i)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_pydicom_series(
    folder: Path,
    volume,
    *,
    origin=(0.0, 0.0, 0.0),
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    spacing=(1.0, 1.0, 2.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    prefix: str = "img",
    descending: bool = False,
    series_number: int = 3,
    jpeg2000: bool = False,
    patient: dict | None = None,
) -> list[Path]:
    """A CT series written with pydicom, one file per plane of ``volume`` (slices, rows, cols), int16.

    Slice ``k`` lies at ``origin + k * spacing[2] * (row_dir x col_dir)``; ``spacing`` is (row spacing,
    column spacing, slice spacing) and ``row_dir`` is the direction along a row (increasing column).
    ``descending`` numbers the files and InstanceNumbers from the last slice down. ``jpeg2000`` stores
    the pixels JPEG 2000 lossless (needs pylibjpeg-openjpeg). Returns the files in slice order (k = 0..).
    """
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume, dtype=np.int16)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    patient = {"PatientName": "Test^Segcli", "PatientID": "SEGCLI-001", "PatientBirthDate": "19700101",
               "PatientSex": "O", **(patient or {})}
    files = []
    n = volume.shape[0]
    for k in range(n):
        number = n - k if descending else k + 1
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in patient.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, number
        ds.Manufacturer = "segcli-tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin, float) + k * spacing[2] * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        ds.SliceThickness = f"{spacing[2]:g}"
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = volume[k].tobytes()
        if jpeg2000:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = folder / f"{prefix}{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
