"""DICOM SEG output and input (issue 18): series made here with pydicom, SEGs checked with highdicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from segcli.errors import InputError, UsageError  # noqa: E402
from segcli.io import dicomseg  # noqa: E402
from tests.dicom import write_pydicom_series  # noqa: E402

CLASSES = ["background", "polyp", "vessel"]
CODES = {
    "polyp": {
        "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Abnormal Structure"},
        "type": {"scheme": "SCT", "value": "68496003", "meaning": "Polyp of colon"},
    },
}
C, S = np.cos(0.35), np.sin(0.35)
GEOMETRIES = {
    # name: (origin, row_dir, col_dir, spacing (row, col, slice), files descending)
    "axial": ((-20.0, -30.0, 100.0), (1, 0, 0), (0, 1, 0), (0.75, 0.75, 2.5), False),
    "oblique": ((12.5, -7.25, 3.0), (C, S, 0.0), (-0.28 * S, 0.28 * C, -0.96), (0.8, 0.7, 1.5), False),
    "reversed": ((0.0, 0.0, -40.0), (1, 0, 0), (0, 1, 0), (0.6, 0.6, 3.0), True),
}
SHAPE = (7, 64, 72)


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _known_mask(shape=SHAPE) -> np.ndarray:
    """Two classes, slices 0, 3 and 6 empty, one slice holding both classes, an asymmetric shape."""
    m = np.zeros(shape, np.uint8)
    m[1, 5:20, 7:30] = 1
    m[2, 40:45, 3:9] = 2
    m[2, 10:12, 50:70] = 1
    m[4, 0:3, 0:5] = 2
    m[5, 30:33, 60:72] = 1
    return m


def _series(tmp_path: Path, name: str, **kw) -> list[Path]:
    origin, row, col, spacing, descending = GEOMETRIES[name]
    vol = np.random.default_rng(1).integers(-1000, 1000, SHAPE)
    return write_pydicom_series(tmp_path / name, vol, origin=origin, row_dir=_unit(row), col_dir=_unit(col),
                                spacing=spacing, descending=descending, **kw)


def _write(out: Path, labels, files, **kw):
    args = {"classes": CLASSES, "codes": CODES, "bundle_name": "tiny", "bundle_version": "3",
            "segcli_version": "9.8.7", **kw}
    return dicomseg.write_dicom_seg(out, labels, files, **args)


def _frames_by_source(seg) -> dict[str, dict[int, np.ndarray]]:
    """Per referenced source SOP Instance UID: segment number -> frame pixels, read with pydicom/highdicom."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out: dict[str, dict[int, np.ndarray]] = {}
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out.setdefault(uid, {})[number] = pixels[i]
    return out


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_voxels_and_positions_match_the_source_slices(tmp_path, geometry):
    files = _series(tmp_path, geometry)
    if geometry == "reversed":
        files = files[::-1]  # hand the writer the files top slice first, as a descending series lists them
    labels = _known_mask()
    report = _write(tmp_path / "out" / "seg.dcm", labels, files)
    assert report["written"] and report["status"] == "written"
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    assert seg.SOPClassUID == dicomseg.SEG_SOP_CLASS_UID and seg.SegmentationType == "BINARY"

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_uid = {h.SOPInstanceUID: (i, h) for i, h in enumerate(headers)}
    # each frame sits exactly at its own source slice's position, with the source's orientation
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        _, src = by_uid[uid]
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert pos == [float(v) for v in src.ImagePositionPatient]
    iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == [float(v) for v in headers[0].ImageOrientationPatient]

    # voxels: every (slice, class) with foreground is one frame equal to the mask; nothing else is stored
    frames = _frames_by_source(seg)
    class_of = {int(s.SegmentNumber): CLASSES.index(s.SegmentLabel) for s in seg.SegmentSequence}
    expected = {(i, c) for i in range(len(files)) for c in (1, 2) if (labels[i] == c).any()}
    stored = {(by_uid[uid][0], class_of[n]) for uid, segs in frames.items() for n in segs}
    assert stored == expected
    assert int(seg.NumberOfFrames) == len(expected) == report["frames"]
    for uid, segs in frames.items():
        i = by_uid[uid][0]
        for number, pixels in segs.items():
            np.testing.assert_array_equal(pixels.astype(bool), labels[i] == class_of[number])

    # highdicom's own volume view agrees too (independent of segcli's reader)
    src_uids = [h.SOPInstanceUID for h in headers]
    arr = seg.get_pixels_by_source_instance(src_uids, combine_segments=True, relabel=False)
    np.testing.assert_array_equal(np.vectorize(lambda n: class_of.get(int(n), 0))(arr), labels)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_segcli_reader_round_trip(tmp_path, geometry):
    files = _series(tmp_path, geometry)
    labels = _known_mask()
    out = tmp_path / "seg.dcm"
    _write(out, labels, files)
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(out, files, CLASSES), labels)
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(out, files[::-1], CLASSES), labels[::-1])

    volume, meta = dicomseg.read_dicom_seg(out, CLASSES)
    assert meta["classes"] == CLASSES and meta["referenced_series_instance_uid"] is not None
    # the grid spans slices 1..5 (the SEG omits the empty 0 and 6, keeps the empty 3 inside the span)
    assert volume.shape == (5, SHAPE[1], SHAPE[2])
    order = sorted(range(len(files)), key=lambda i: _ipp(files[i]) @ _normal(files[i]))
    np.testing.assert_array_equal(volume, labels[order][1:6])
    image = dicomseg.to_sitk_image(volume, meta)
    for z in range(volume.shape[0]):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, z)), _ipp(files[order[z + 1]]),
                                   atol=1e-4)
    # (x, y) index = (column, row): one step along a row moves by the column spacing along the row direction
    step = np.subtract(image.TransformIndexToPhysicalPoint((1, 0, 0)), image.TransformIndexToPhysicalPoint((0, 0, 0)))
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    np.testing.assert_allclose(step, np.array(src.ImageOrientationPatient[:3], float) * float(src.PixelSpacing[1]),
                               atol=1e-6)
    # without classes the segment labels become the classes, numbered in segment order
    _, own = dicomseg.read_dicom_seg(out)
    assert own["classes"] == ["background", "polyp", "vessel"]


def _ipp(f) -> np.ndarray:
    return np.array([float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient])


def _normal(f) -> np.ndarray:
    iop = np.array([float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def test_segments_labels_codes_and_equipment(tmp_path):
    files = _series(tmp_path, "axial")
    labels = _known_mask()
    report = _write(tmp_path / "seg.dcm", labels, files)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["polyp", "vessel"]
    polyp, vessel = seg.SegmentSequence
    assert polyp.SegmentedPropertyTypeCodeSequence[0].CodeValue == "68496003"
    assert polyp.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert polyp.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    # no codes in the bundle for "vessel": the generic Tissue code
    assert vessel.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"
    assert vessel.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Tissue"
    for s in seg.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        algo = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("tiny", "3")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.Manufacturer == "segcli" and seg.SoftwareVersions == "9.8.7"
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "FrameOfReferenceUID"):
        assert seg[key].value == src[key].value, key
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.Modality == "SEG"
    assert [s["label"] for s in report["segments"]] == ["polyp", "vessel"]
    assert report["segments"][0]["type"] == "SCT:68496003:Polyp of colon"
    assert report["compression"] == "deflate" and report["transfer_syntax"] == dicomseg.DEFLATED_LE
    assert seg.file_meta.TransferSyntaxUID == dicomseg.DEFLATED_LE


def test_only_present_classes_become_segments(tmp_path):
    files = _series(tmp_path, "axial")
    labels = np.zeros(SHAPE, np.uint8)
    labels[3, 10:20, 10:20] = 2  # class 1 absent
    report = _write(tmp_path / "seg.dcm", labels, files)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "vessel")]
    assert report["segments"][0]["class_id"] == 2 and report["frames"] == 1
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / "seg.dcm", files, CLASSES), labels)


def test_empty_mask_writes_nothing(tmp_path):
    files = _series(tmp_path, "axial")
    out = tmp_path / "out" / "seg.dcm"
    report = _write(out, np.zeros(SHAPE, np.uint8), files)
    assert report["written"] is False and report["status"] == "empty" and report["path"] is None
    assert "no DICOM SEG written" in report["message"]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_multi_series_folder_references_only_the_chosen_series(tmp_path):
    from segcli.io.dicomseries import dicom_series

    folder = tmp_path / "mixed"
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    vol = np.zeros(SHAPE, np.int16)
    chosen = write_pydicom_series(folder, vol, study_uid=study, frame_of_reference_uid=frame, prefix="a",
                                  series_number=2)
    other = write_pydicom_series(folder, vol[:4], study_uid=study, frame_of_reference_uid=frame, prefix="b",
                                 series_number=5, spacing=(1.0, 1.0, 5.0))
    series = dicom_series(folder)
    assert len(series) == 2
    files = max(series.values(), key=len)
    assert sorted(map(Path, files)) == sorted(chosen)
    _write(tmp_path / "seg.dcm", _known_mask(), files)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    chosen_uid = pydicom.dcmread(chosen[0]).SeriesInstanceUID
    assert [r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence] == [chosen_uid]
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in chosen}
    assert not referenced & {pydicom.dcmread(f).SOPInstanceUID for f in other}
    with pytest.raises(InputError, match="another series"):
        _write(tmp_path / "bad.dcm", np.zeros((len(files) + 1, *SHAPE[1:]), np.uint8), [*files, other[0]])


def test_jpeg2000_sources_are_not_decoded(tmp_path):
    pytest.importorskip("openjpeg")
    files = _series(tmp_path, "oblique", jpeg2000=True)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    # break every compressed code stream: a writer that decoded the source pixels would fail now
    for f in files:
        ds = pydicom.dcmread(f)
        data = bytearray(ds.PixelData)
        data[len(data) // 2:] = b"\xff" * (len(data) - len(data) // 2)
        ds.PixelData = bytes(data)
        ds.save_as(f)
    labels = _known_mask()
    _write(tmp_path / "seg.dcm", labels, files)
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / "seg.dcm", files, CLASSES), labels)


def test_segcli_reader_file_order_is_the_labels_convention(tmp_path):
    """The caller's recipe: to_original_axes(canonical mask, meta) with meta["files"] is per-file, per-pixel."""
    from segcli.io.dicomseries import read_dicom_folder
    from segcli.io.medical import to_original_axes

    origin, row, col, spacing, _ = GEOMETRIES["oblique"]
    vol = np.random.default_rng(5).integers(-1000, 1000, SHAPE)
    write_pydicom_series(tmp_path / "ct", vol, origin=origin, row_dir=_unit(row), col_dir=_unit(col),
                         spacing=spacing, descending=True)
    loaded = read_dicom_folder(tmp_path / "ct")
    canonical = (loaded.array[..., 0] > 500).astype(np.uint8)
    labels = to_original_axes(canonical, loaded.meta)
    files = loaded.meta["files"]
    for i, f in enumerate(files):  # plane i is file i's own pixels, rows x columns
        np.testing.assert_array_equal(labels[i], (pydicom.dcmread(f).pixel_array > 500).astype(np.uint8))
    report = _write(tmp_path / "seg.dcm", labels, files, classes=["background", "bright"], codes=None)
    assert report["written"]
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / "seg.dcm", files), labels)


def test_missing_type2_patient_attributes_are_left_empty(tmp_path):
    files = _series(tmp_path, "axial")
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber
        ds.save_as(f)
    report = _write(tmp_path / "seg.dcm", _known_mask(), files)
    assert report["empty_type2_attributes"] == ["AccessionNumber", "PatientBirthDate", "PatientSex"]
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.PatientBirthDate == "" and seg.PatientSex == "" and seg.AccessionNumber == ""
    assert seg.PatientID == "SEGCLI-001"


@pytest.mark.parametrize("compress, ts", [(False, dicomseg.EXPLICIT_LE), (True, dicomseg.DEFLATED_LE),
                                          ("jpeg2000", dicomseg.JPEG2000_LOSSLESS)])
def test_encodings_read_back(tmp_path, compress, ts):
    if compress == "jpeg2000":
        pytest.importorskip("openjpeg")
    files = _series(tmp_path, "oblique")
    labels = _known_mask()
    report = _write(tmp_path / "seg.dcm", labels, files, compress=compress)
    assert report["transfer_syntax"] == ts
    assert pydicom.dcmread(tmp_path / "seg.dcm").file_meta.TransferSyntaxUID == ts
    hd.seg.segread(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / "seg.dcm", files, CLASSES), labels)


def test_deflate_is_smaller_than_plain(tmp_path):
    files = _series(tmp_path, "axial")
    plain = _write(tmp_path / "plain.dcm", _known_mask(), files, compress=False)
    packed = _write(tmp_path / "deflate.dcm", _known_mask(), files)
    assert packed["bytes"] < plain["bytes"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed")
def test_dciodvfy_finds_no_errors(tmp_path):
    files = _series(tmp_path, "oblique")
    _write(tmp_path / "plain.dcm", _known_mask(), files, compress=False)
    # dciodvfy cannot read deflated files: check the default output re-encoded losslessly, too
    _write(tmp_path / "deflate.dcm", _known_mask(), files)
    ds = pydicom.dcmread(tmp_path / "deflate.dcm")
    ds.file_meta.TransferSyntaxUID = dicomseg.EXPLICIT_LE
    ds.save_as(tmp_path / "inflated.dcm")
    for name in ("plain.dcm", "inflated.dcm"):
        run = subprocess.run(["dciodvfy", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        text = run.stdout + run.stderr
        assert "Segmentation" in text
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert not errors, text


def test_is_dicom_seg(tmp_path):
    files = _series(tmp_path, "axial")
    _write(tmp_path / "seg.dcm", _known_mask(), files)
    assert dicomseg.is_dicom_seg(tmp_path / "seg.dcm")
    assert not dicomseg.is_dicom_seg(files[0])
    assert not dicomseg.is_dicom_seg(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    assert not dicomseg.is_dicom_seg(tmp_path / "junk.dcm")
    with pytest.raises(InputError, match="not a DICOM SEG"):
        dicomseg.read_dicom_seg(files[0])


def test_refusals_are_one_line_and_name_the_file(tmp_path):
    files = _series(tmp_path, "axial")
    labels = _known_mask()
    with pytest.raises(UsageError, match="n_files = 7"):
        _write(tmp_path / "x.dcm", labels[:3], files)
    with pytest.raises(UsageError, match="rows x columns"):
        _write(tmp_path / "x.dcm", labels[:, :10], files)
    bad = labels.copy()
    bad[1, 0, 0] = 5
    with pytest.raises(UsageError, match="label value 5 has no class"):
        _write(tmp_path / "x.dcm", bad, files)
    (tmp_path / "broken.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(InputError) as err:
        _write(tmp_path / "x.dcm", labels, [*files[:-1], tmp_path / "broken.dcm"])
    assert "broken.dcm" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="compression"):
        _write(tmp_path / "x.dcm", labels, files, compress="rle")
    with pytest.raises(InputError, match="none of the classes"):
        _write(tmp_path / "ok.dcm", labels, files)
        dicomseg.read_dicom_seg(tmp_path / "ok.dcm", ["background", "other"])
    assert not list(tmp_path.glob(".*partial*"))


def test_bundle_codes_are_parsed_and_validated(tmp_path):
    import json

    from segcli.bundle import load_bundle
    from segcli.errors import BundleError

    src = Path(__file__).resolve().parent.parent / "models" / "polyp"
    raw = json.loads((src / "segcli.json").read_text())
    root = tmp_path / "b"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("sample"))
    assert load_bundle(root).codes["polyp"]["type"]["value"] == "68496003"
    ok = {"scheme": "SCT", "value": "1", "meaning": "x"}
    for codes, msg in [
        ({"tumour": {"type": {"scheme": "SCT", "value": "1", "meaning": "x"}}}, "not a class"),
        ({"polyp": {"category": ok, "type": {"scheme": "SCT", "value": "1"}}}, "meaning"),
        ({"polyp": {"category": ok, "type": ok, "kind": ok}}, "kind"),
        ({"polyp": {"category": {"scheme": "SCT", "value": "1", "meaning": "x"}}}, "type"),
        ([1, 2], "object"),
    ]:
        (root / "segcli.json").write_text(json.dumps({**raw, "codes": codes}))
        with pytest.raises(BundleError, match=msg):
            load_bundle(root)
    raw.pop("codes", None)
    (root / "segcli.json").write_text(json.dumps(raw))
    assert load_bundle(root).codes == {}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_and_nifti_mask_agree_voxel_by_voxel_in_patient_space(tmp_path, geometry):
    """The same mask written to NIfTI by segcli and to DICOM SEG lands on the same physical points."""
    import SimpleITK as sitk

    from segcli.io.dicomseries import read_dicom_folder
    from segcli.io.medical import to_original_axes, write_mask

    origin, row, col, spacing, descending = GEOMETRIES[geometry]
    vol = np.random.default_rng(7).integers(-1000, 1000, SHAPE)
    write_pydicom_series(tmp_path / "ct", vol, origin=origin, row_dir=_unit(row), col_dir=_unit(col),
                         spacing=spacing, descending=descending)
    loaded = read_dicom_folder(tmp_path / "ct")
    canonical = np.zeros(loaded.array.shape[:3], np.uint8)
    canonical[loaded.array[..., 0] > 600] = 1
    canonical[loaded.array[..., 0] < -900] = 2
    canonical[:, :, : canonical.shape[2] // 3] = 0  # an asymmetric cut, so a flip cannot pass
    write_mask(canonical, loaded, tmp_path / "mask.nii.gz")
    labels = to_original_axes(canonical, loaded.meta)
    _write(tmp_path / "seg.dcm", labels, loaded.meta["files"])

    nii = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    nii_arr = sitk.GetArrayFromImage(nii)
    to_index = np.linalg.inv(np.array(nii.GetDirection()).reshape(3, 3) @ np.diag(nii.GetSpacing()))
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    class_of = {int(s.SegmentNumber): CLASSES.index(s.SegmentLabel) for s in seg.SegmentSequence}
    iop = np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    ps = np.array(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, float)
    rr, cc = np.mgrid[0:seg.Rows, 0:seg.Columns]
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = 0
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        pts = ipp + cc[..., None] * ps[1] * iop[:3] + rr[..., None] * ps[0] * iop[3:]
        idx = np.rint((pts - np.array(nii.GetOrigin())) @ to_index.T).astype(int)  # (x, y, z) index
        values = nii_arr[idx[..., 2], idx[..., 1], idx[..., 0]]
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame.astype(bool), values == class_of[number])
        seen += int(frame.sum())
    assert seen == int(np.count_nonzero(nii_arr)) > 0


def test_series_from_the_simpleitk_writer_without_slice_thickness(tmp_path):
    """GDCM writes no SliceThickness: the SEG takes the measured slice distance and says so."""
    import SimpleITK as sitk

    from segcli.io.dicomseries import read_dicom_folder
    from segcli.io.medical import to_original_axes
    from tests.dicom import write_dicom_series

    arr = (np.random.default_rng(0).random((6, 32, 24)) * 1000).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # coronal slices
    uid = "1.2.826.0.1.3680043.2.1125.99"
    write_dicom_series(tmp_path / "ct", img, uid, frame_of_reference=uid + ".1", study=uid + ".2")
    loaded = read_dicom_folder(tmp_path / "ct")
    labels = to_original_axes((loaded.array[..., 0] > 800).astype(np.uint8), loaded.meta)
    report = _write(tmp_path / "seg.dcm", labels, loaded.meta["files"])
    assert report["slice_thickness_from_spacing"] is True
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == pytest.approx(2.0)
    np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / "seg.dcm", loaded.meta["files"]), labels)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_seg_on_a_nifti_ground_truth_grid(tmp_path, geometry):
    """What `segcli evaluate` needs: a SEG scored on a NIfTI grid gives the NIfTI mask back exactly."""
    import SimpleITK as sitk

    from segcli.io.dicomseries import read_dicom_folder
    from segcli.io.medical import to_original_axes, write_mask

    origin, row, col, spacing, descending = GEOMETRIES[geometry]
    vol = np.random.default_rng(3).integers(-1000, 1000, SHAPE)
    write_pydicom_series(tmp_path / "ct", vol, origin=origin, row_dir=_unit(row), col_dir=_unit(col),
                         spacing=spacing, descending=descending)
    loaded = read_dicom_folder(tmp_path / "ct")
    canonical = np.zeros(loaded.array.shape[:3], np.uint8)
    canonical[2:5][loaded.array[2:5, ..., 0] > 700] = 2
    canonical[1][loaded.array[1, ..., 0] < -800] = 1
    write_mask(canonical, loaded, tmp_path / "gt.nii.gz")
    _write(tmp_path / "seg.dcm", to_original_axes(canonical, loaded.meta), loaded.meta["files"])
    gt = sitk.ReadImage(str(tmp_path / "gt.nii.gz"))
    got = dicomseg.dicom_seg_on_grid(tmp_path / "seg.dcm", gt, CLASSES)
    np.testing.assert_array_equal(got, sitk.GetArrayFromImage(gt))


def test_reads_labelmap_and_fractional_segs_from_other_tools(tmp_path):
    files = _series(tmp_path, "axial")
    sources = [pydicom.dcmread(f) for f in files]
    labels = _known_mask()
    descriptions = [
        hd.seg.SegmentDescription(segment_number=n, segment_label=name,
                                  segmented_property_category=pydicom.sr.codedict.codes.SCT.Tissue,
                                  segmented_property_type=pydicom.sr.codedict.codes.SCT.Tissue,
                                  algorithm_type="MANUAL")
        for n, name in ((1, "Polyp"), (2, "vessel"))
    ]
    common = dict(source_images=sources, segment_descriptions=descriptions, series_instance_uid=hd.UID(),
                  series_number=9, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="other",
                  manufacturer_model_name="other", software_versions="1", device_serial_number="1")
    hd.seg.Segmentation(pixel_array=labels, segmentation_type="LABELMAP", **common).save_as(tmp_path / "lm.dcm")
    stacked = np.stack([labels == 1, labels == 2], axis=-1).astype(np.float32) * 0.9
    hd.seg.Segmentation(pixel_array=stacked, segmentation_type="FRACTIONAL", fractional_type="PROBABILITY",
                        **common).save_as(tmp_path / "fr.dcm")
    for name in ("lm.dcm", "fr.dcm"):
        assert dicomseg.is_dicom_seg(tmp_path / name)
        np.testing.assert_array_equal(dicomseg.align_dicom_seg(tmp_path / name, files, CLASSES), labels)
        volume, meta = dicomseg.read_dicom_seg(tmp_path / name, CLASSES)
        assert volume.max() == 2 and meta["classes"] == CLASSES
