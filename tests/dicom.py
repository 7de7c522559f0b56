"""One DICOM-series writer for every test and the bad-input corpus (SimpleITK's DicomSeriesFromArray pattern)."""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(folder: Path, image: sitk.Image, uid: str, prefix: str = "slice",
                       description: str = "segcli test") -> None:
    """One file per slice with position, orientation and spacing tags that reproduce ``image``'s geometry.

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
