"""DICOM SEG from `segcli predict` (issue 18): the SEG read back with highdicom equals the NIfTI mask of the
same run, frame by frame at the source slices' positions; refusals are usage errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from segcli.api import Segmenter  # noqa: E402
from segcli.runtimes import FunctionPredictor  # noqa: E402
from tests.conftest import make_bundle, run_cli  # noqa: E402
from tests.dicom import write_pydicom_series  # noqa: E402

C, S = np.cos(0.3), np.sin(0.3)
GEOMETRIES = {  # origin, row direction, column direction, spacing (row, col, slice), descending file order
    "axial": ((-20.0, -30.0, 100.0), (1, 0, 0), (0, 1, 0), (0.75, 0.75, 2.5), False),
    "oblique": ((12.5, -7.25, 3.0), (C, S, 0.0), (-0.3 * S, 0.3 * C, -0.95), (0.8, 0.7, 1.5), False),
    "reversed": ((0.0, 0.0, -40.0), (1, 0, 0), (0, 1, 0), (0.6, 0.6, 3.0), True),
}


def _unit(v):
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _series(folder: Path, name: str) -> list[Path]:
    """Dark background (-1000 HU) with two bright blocks on some slices only."""
    vol = np.full((6, 40, 48), -1000, np.int16)
    vol[1:3, 5:15, 6:20] = 800
    vol[4, 25:35, 30:44] = 600
    origin, row, col, spacing, descending = GEOMETRIES[name]
    return write_pydicom_series(folder, vol, origin=origin, row_dir=_unit(row), col_dir=_unit(col),
                                spacing=spacing, descending=descending)


def bright_probs(batch: np.ndarray) -> np.ndarray:
    """Foreground where the (percentile-normalised) input is bright: deterministic, no training."""
    p = (batch[:, :1] > 0.5).astype(np.float32)
    return np.concatenate([1 - p, p], axis=1)


def _segmenter(bundle: Path) -> Segmenter:
    seg = Segmenter(bundle, method="direct")
    b = seg.bundle_for("volume")
    for role in ("coarse", "fine"):
        seg.set_predictor(b, role, FunctionPredictor(bright_probs))
    return seg


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_seg_equals_the_nifti_mask_at_the_source_positions(tmp_path, geometry):
    files = _series(tmp_path / "series", geometry)
    bundle = make_bundle(tmp_path / "vol", size=32)
    seg = _segmenter(bundle)
    rep_n = seg.predict_file(tmp_path / "series", tmp_path / "mask.nii.gz")
    rep_s = seg.predict_file(tmp_path / "series", tmp_path / "mask.dcm", output_type="dicom-seg")
    assert rep_n.status == rep_s.status == "ok", (rep_n.error, rep_s.error)
    assert rep_s.output == str(tmp_path / "mask.dcm") and rep_s.info["dicom_seg"]["written"]

    nifti = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    mask = sitk.GetArrayFromImage(nifti)
    assert mask.sum() > 0
    ds = pydicom.dcmread(tmp_path / "mask.dcm")
    segm = hd.seg.Segmentation.from_dataset(ds)
    frames = segm.pixel_array if segm.pixel_array.ndim == 3 else segm.pixel_array[None]
    src_pos = {tuple(np.round(np.asarray(pydicom.dcmread(f).ImagePositionPatient, float), 3)) for f in files}
    seen = 0
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        assert tuple(np.round(pos, 3)) in src_pos  # every frame sits exactly on a source slice
        # the NIfTI mask's slice through that position, independently located by ITK
        z = nifti.TransformPhysicalPointToIndex(tuple(pos))[2]
        assert np.array_equal(frames[i] > 0, mask[z] > 0), f"frame {i} differs from NIfTI slice {z}"
        seen += int(mask[z].any())
    # frames without foreground are omitted; every slice with foreground has its frame
    assert seen == len(ds.PerFrameFunctionalGroupsSequence) == int(mask.reshape(len(mask), -1).any(1).sum())
    assert str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert ds.Manufacturer == "segcli" and ds.PatientID == "SEGCLI-001"


def test_cli_refuses_dicom_seg_for_a_nifti_input(tmp_path):
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "v.nii.gz"))
    bundle = make_bundle(tmp_path / "b", size=32)
    r = run_cli("predict", tmp_path / "v.nii.gz", "--model", bundle, "--output-type", "dicom-seg")
    assert r.returncode == 2
    assert r.stderr.startswith(f"segcli: error: {tmp_path / 'v.nii.gz'}: --output-type dicom-seg needs a DICOM series")
    assert not list(tmp_path.glob("*.dcm"))
    r = run_cli("predict", tmp_path / "v.nii.gz", "--model", bundle, "-o", tmp_path / "out.dcm")
    assert r.returncode == 2 and "needs a DICOM series folder" in r.stderr


def test_cli_writes_a_seg_and_an_empty_result_writes_none(tmp_path):
    _series(tmp_path / "series", "axial")
    bundle = make_bundle(tmp_path / "b", size=32)
    r = run_cli("predict", tmp_path / "series", "--model", bundle, "--method", "direct", "--threshold", "0",
                "-o", tmp_path / "out" / "", "--output-type", "dicom-seg", "--json")
    assert r.returncode == 0, r.stderr
    seg_path = tmp_path / "out" / "series_seg.dcm"
    assert seg_path.is_file() and pydicom.dcmread(seg_path).Modality == "SEG"
    info = run_cli("info", seg_path, "--json")
    assert info.returncode == 0 and '"kind": "dicom-seg"' in info.stdout
    # threshold 1: no pixel has p > 1, so nothing is found; no SEG, exit 0, and the report says so
    r = run_cli("predict", tmp_path / "series", "--model", bundle, "--method", "direct", "--threshold", "1",
                "-o", tmp_path / "empty.dcm")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "empty.dcm").exists() and "no foreground: no DICOM SEG written" in r.stderr
