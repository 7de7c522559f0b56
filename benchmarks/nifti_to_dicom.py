"""Write a NIfTI/MHA volume as a CT DICOM series (one file per axial slice), to try DICOM in → DICOM SEG out.

    python benchmarks/nifti_to_dicom.py models/covid-ct/sample/abdomen_ct.nii.gz /tmp/ct_dicom

Geometry comes from the volume (ITK's LPS origin, spacing, direction): slice k lies at the image's index
(0, 0, k) and every file carries ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness,
one Study, Series and Frame of Reference UID, and a synthetic patient ("Anonymous^Sample"). Pixels are int16 with
RescaleSlope 1 / Intercept 0, so the values are HU when the input is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def convert(src: Path, out: Path) -> list[Path]:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    img = sitk.ReadImage(str(src))
    if img.GetDimension() != 3:
        raise SystemExit(f"{src}: not a 3D volume")
    vol = sitk.GetArrayFromImage(img)  # (z, y, x)
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    row_dir, col_dir = d[:, 0], d[:, 1]
    sx, sy, sz = img.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(vol.shape[0]):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Anonymous^Sample", "SEGCLI-SAMPLE", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.SeriesDescription = f"{src.name} as DICOM"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(np.clip(vol[k], -32768, 32767).astype(np.int16)).tobytes()
        path = out / f"slice{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("volume", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    files = convert(args.volume, args.out)
    print(f"{len(files)} slices written to {args.out}")


if __name__ == "__main__":
    main()
