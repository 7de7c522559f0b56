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


# ------------------------------------------------------------------------------------- irregular series
# Each builder edits a regular series (written by ``regular_series``) the way scanners, exports and
# broken copies do; ``IRREGULAR`` maps a case name to its builder and the first words segcli must say.
def regular_series(folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.900", shape=(6, 24, 20),
                   spacing=(0.7, 0.8, 2.5), origin=(-10.0, 5.0, 30.0), direction=None) -> sitk.Image:
    """A regular series of ``shape[0]`` single-frame files named in slice order; returns the source image."""
    import numpy as np

    rng = np.random.default_rng(7)
    arr = rng.normal(0, 200, shape).astype(np.int16)
    arr[1:4, 6:16, 5:14] += 900
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    write_dicom_series(folder, image, uid)
    return image


def _edit(path: Path, **values) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _position(path: Path) -> list[float]:
    import pydicom

    return [float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient]


def make_missing(folder: Path) -> None:
    (folder / "slice002.dcm").unlink()


def make_duplicate(folder: Path) -> None:
    _edit(folder / "slice003.dcm", ImagePositionPatient=_position(folder / "slice002.dcm"))


def make_uneven(folder: Path) -> None:
    for i in range(3, 6):  # slices 3.. moved 0.7 mm further: one gap of 3.2 mm among gaps of 2.5 mm
        p = _position(folder / f"slice{i:03d}.dcm")
        _edit(folder / f"slice{i:03d}.dcm", ImagePositionPatient=[p[0], p[1], p[2] + 0.7])


def make_truncated(folder: Path) -> None:
    f = folder / "slice003.dcm"
    f.write_bytes(f.read_bytes()[:-100])


def make_truncated_header(folder: Path) -> None:
    f = folder / "slice005.dcm"  # the last slice: no gap betrays it
    f.write_bytes(f.read_bytes()[:300])


def make_tilt(folder: Path) -> None:
    for i in range(6):  # 0.5 mm along y per 2.5 mm slice: an 11 degree gantry tilt
        p = _position(folder / f"slice{i:03d}.dcm")
        _edit(folder / f"slice{i:03d}.dcm", ImagePositionPatient=[p[0], p[1] + 0.5 * i, p[2]])


def make_mixed_size(folder: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(folder / "slice003.dcm")
    ds.PixelData = ds.pixel_array[:16].tobytes()
    ds.Rows = 16
    ds.save_as(folder / "slice003.dcm")


def make_enhanced(folder: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(folder / "slice000.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(folder / "enhanced.dcm")


def make_corrupt_jpeg2000(folder: Path) -> None:
    """Every slice JPEG 2000 compressed (GDCM's writer), then one codestream's main header damaged.

    (Damage inside the entropy-coded data is decoded into wrong pixels without any error by OpenJPEG:
    DICOM holds no checksum, so only damage the decoder detects can be reported.)"""
    for f in sorted(folder.glob("*.dcm")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(f))
        reader.LoadPrivateTagsOn()
        image = reader.Execute()
        for key in reader.GetMetaDataKeys():
            image.SetMetaData(key, reader.GetMetaData(key))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(f))
        writer.UseCompressionOn()
        writer.SetCompressor("JPEG2000")
        writer.Execute(image)
    f = folder / "slice002.dcm"
    raw = bytearray(f.read_bytes())
    soc = raw.index(b"\xff\x4f\xff\x51")  # start of codestream, then the SIZ marker segment
    for k in range(soc + 4, soc + 40):
        raw[k] ^= 0x5A
    f.write_bytes(bytes(raw))


def make_descending(folder: Path) -> None:
    """File names run against the slice positions (slice000 is the last slice)."""
    files = sorted(folder.glob("slice*.dcm"))
    for f in files:
        f.rename(folder / f"tmp-{f.name}")
    for i, f in enumerate(files):
        (folder / f"tmp-{f.name}").rename(folder / f"slice{len(files) - 1 - i:03d}.dcm")


def make_shuffled(folder: Path) -> None:
    files = sorted(folder.glob("slice*.dcm"))
    order = [3, 0, 5, 1, 4, 2]
    for f in files:
        f.rename(folder / f"tmp-{f.name}")
    for i, f in enumerate(files):
        (folder / f"tmp-{f.name}").rename(folder / f"img{order[i]:02d}.dcm")


# case -> (builder, first words of the one-line error; None: corrected, with a note)
IRREGULAR = {
    "missing": (make_missing, "missing slice(s): gap of 5 mm between z="),
    "duplicate": (make_duplicate, "duplicate slice position: slice002.dcm and slice003.dcm are both at z="),
    "uneven": (make_uneven, "uneven slice spacing: gap of 3.2 mm between z="),
    "truncated": (make_truncated, "truncated: header of slice003.dcm says 960 bytes of pixels, the file holds 860"),
    "truncated-header": (make_truncated_header, "slice005.dcm holds no pixel data"),
    "tilt": (make_tilt, "gantry tilt or sheared slices: slice001.dcm is shifted 0.5 mm in-plane"),
    "mixed-size": (make_mixed_size, "slices of different sizes: slice003.dcm is 20x16 pixels"),
    "enhanced": (make_enhanced, "enhanced.dcm is a multi-frame (enhanced) DICOM file with 3 frames"),
    "corrupt-jpeg2000": (make_corrupt_jpeg2000, "cannot decode the pixel data of slice002.dcm"),
    "descending": (make_descending, None),
    "shuffled": (make_shuffled, None),
}
