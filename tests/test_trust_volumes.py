"""Medical volumes that must never give a mask in the wrong place: irregular DICOM series, NIfTI files whose
qform and sform differ, zero voxel sizes, and data shorter than its header says.

Every refusal is checked as a user meets it (a subprocess: exit code, the first words of the one line on
stderr, no output left, inputs byte-for-byte unchanged). Geometry is checked with readers independent of
segcli: pydicom positions for DICOM, nibabel affines for NIfTI.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from segcli import io
from segcli.api import Segmenter
from segcli.errors import InputError
from segcli.io.volstream import open_streamed
from tests.conftest import make_bundle, run_cli
from tests.dicom import IRREGULAR, regular_series


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dicom-corpus")
    for name, (build, _) in IRREGULAR.items():
        regular_series(root / name)
        build(root / name)
    regular_series(root / "regular")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "grey", size=32, method="direct")


REFUSED = [name for name, (_, words) in IRREGULAR.items() if words]


def _stream_all(path: Path):
    """The streamed reader as the engine uses it: open by header, then decode every slab."""
    vol = open_streamed(path)
    assert vol is not None
    vol.block(0, 0, vol.shape[0])
    return vol


# ------------------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("name", REFUSED)
def test_irregular_series_refused_by_both_readers(corpus: Path, name: str) -> None:
    """The whole reader and the streamed reader give the same one-line refusal, naming the folder."""
    words = IRREGULAR[name][1]
    for read in (io.open_image, _stream_all):
        with pytest.raises(InputError) as err:
            read(corpus / name)
        assert err.value.message.startswith(words), err.value.message
        assert err.value.path == corpus / name and "\n" not in err.value.message


@pytest.mark.parametrize("name", REFUSED)
def test_irregular_series_info_exit_code(corpus: Path, name: str) -> None:
    before = _digest(corpus / name)
    r = run_cli("info", corpus / name)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line: no traceback, no ITK/GDCM/OpenJPEG dump
    assert lines[0].startswith(f"segcli: error: {corpus / name}: {IRREGULAR[name][1]}"), lines[0]
    assert _digest(corpus / name) == before


def test_irregular_series_predict(corpus: Path, bundle: Path, tmp_path: Path) -> None:
    """One batch over the corpus: every irregular series fails with its message and leaves no output;
    the correctable ones are segmented with a note; no input byte changes."""
    before = _digest(corpus)
    out = tmp_path / "out"
    r = run_cli("predict", corpus, "-o", out, "--model", bundle, "--json")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "ITK" not in r.stderr and "marker" not in r.stderr, r.stderr
    files = {Path(f["input"]).name: f for f in json.loads(r.stdout)["files"]}
    for name, (_, words) in IRREGULAR.items():
        f = files[name]
        if words is None:
            assert f["status"] == "ok", f["error"]
            assert any("were ordered by ImagePositionPatient" in w for w in f["warnings"]), f["warnings"]
        else:
            assert f["status"] == "failed" and f["error"] == f"{corpus / name}: {f['error'].split(': ', 1)[1]}"
            assert f["error"].split(": ", 1)[1].startswith(words), f["error"]
    assert files["regular"]["status"] == "ok" and not files["regular"]["warnings"]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["descending_seg.nii.gz", "regular_seg.nii.gz", "shuffled_seg.nii.gz"]
    assert _digest(corpus) == before
    # A misordered series gives exactly the mask of the regular one, on the same grid.
    ref = nib.load(out / "regular_seg.nii.gz")
    for name in ("descending", "shuffled"):
        m = nib.load(out / f"{name}_seg.nii.gz")
        np.testing.assert_allclose(m.affine, ref.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(m.dataobj), np.asarray(ref.dataobj))


def test_single_refusal_exit_code_from_predict(corpus: Path, bundle: Path, tmp_path: Path) -> None:
    r = run_cli("predict", corpus / "missing", "-o", tmp_path / "m.nii.gz", "--model", bundle)
    assert r.returncode == 1
    assert f"{corpus / 'missing'}: missing slice(s): gap of 5 mm between z=" in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["descending", "shuffled", "regular"])
def test_corrected_series_geometry_matches_pydicom(corpus: Path, name: str, tmp_path: Path) -> None:
    """Every slice file lands on the mask voxel plane its own ImagePositionPatient says (pydicom, not segcli)."""
    bundle = make_bundle(tmp_path / "b", size=32, method="direct")
    for stream in (True, False):
        out = tmp_path / f"m{stream}.nii.gz"
        rep = Segmenter(bundle, stream_volumes=stream).predict_file(corpus / name, out)
        assert rep.status == "ok", rep.error
        if name != "regular":
            assert any("ordered by ImagePositionPatient" in w for w in rep.warnings)
        ras_to_vox = np.linalg.inv(nib.load(out).affine)
        ks = []
        for f in sorted((corpus / name).glob("*.dcm")):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            lps = np.array([float(v) for v in ds.ImagePositionPatient])
            vox = ras_to_vox @ np.array([-lps[0], -lps[1], lps[2], 1.0])
            np.testing.assert_allclose(vox[:2], 0, atol=1e-4)
            ks.append(vox[2])
            # the slice's own pixels sit on that plane: the mask was computed from them, so compare inputs
        assert sorted(np.round(ks, 4).tolist()) == list(range(6))
        np.testing.assert_allclose(nib.load(out).header.get_zooms(), (0.7, 0.8, 2.5), atol=1e-5)


def test_corrected_series_voxels_follow_positions(corpus: Path) -> None:
    """The volume read from a misnamed series equals the regular one voxel for voxel, in both readers."""
    ref = io.open_image(corpus / "regular")
    for name in ("descending", "shuffled"):
        whole = io.open_image(corpus / name)
        np.testing.assert_array_equal(whole.array, ref.array)
        assert whole.meta["notes"] and whole.meta["notes"][0] in whole.meta["warnings"]
        vol = open_streamed(corpus / name)
        assert vol is not None and vol.meta["notes"] == whole.meta["notes"]
        np.testing.assert_array_equal(vol.block(0, 0, vol.shape[0]), ref.array)
        for key in ("size", "spacing", "origin", "direction"):
            np.testing.assert_allclose(vol.meta["geometry"][key], ref.meta["geometry"][key], atol=1e-6)


# ------------------------------------------------------------------------------------------- NIfTI
def _sheared(path: Path, shape=(20, 24, 6), version: int = 1) -> nib.Nifti1Image:
    """qform (code 1, scanner) and sform (code 2, aligned: a shear and another offset) that disagree."""
    rng = np.random.default_rng(2)
    arr = rng.normal(0, 200, shape).astype(np.int16)
    arr[5:14, 6:16, 1:4] += 900
    q = np.diag([0.75, 0.875, 2.5, 1.0])
    q[:3, 3] = [-10.5, 20.25, 30.0]
    s = q.copy()
    s[0, 1] = 0.125
    s[:3, 3] = [5.5, -6.25, 7.0]
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = cls(arr if len(shape) == 3 else arr[..., 0], None)
    img.set_qform(q if len(shape) == 3 else q, code=1)
    img.set_sform(s, code=2)
    nib.save(img, path)
    return nib.load(path)


def _same_transforms(out: Path, ref: nib.Nifti1Image) -> None:
    m = nib.load(out)
    for getter in ("get_qform", "get_sform"):
        a, ca = getattr(m, getter)(coded=True)
        b, cb = getattr(ref, getter)(coded=True)
        assert int(ca) == int(cb), getter
        np.testing.assert_array_equal(a, b, err_msg=getter)
    np.testing.assert_array_equal(m.header["pixdim"][:4], ref.header["pixdim"][:4])


@pytest.mark.parametrize("name", ["s.nii.gz", "s.nii"])
def test_nifti_keeps_qform_and_sform_on_both_paths(tmp_path: Path, name: str) -> None:
    ref = _sheared(tmp_path / name)
    bundle = make_bundle(tmp_path / "b", size=32, method="direct")
    for stream in (True, False):
        out = tmp_path / f"m{stream}.nii.gz"
        rep = Segmenter(bundle, stream_volumes=stream).predict_file(tmp_path / name, out, probabilities=True)
        assert rep.status == "ok", rep.error
        assert any("qform (code 1) and sform (code 2)" in w for w in rep.warnings), rep.warnings
        _same_transforms(out, ref)
        _same_transforms(tmp_path / f"m{stream}_probs.nii.gz", ref)
        assert nib.load(out).shape == ref.shape
    plain = tmp_path / "plain.nii"  # an uncompressed output is patched in place
    Segmenter(bundle, stream_volumes=False).predict_file(tmp_path / name, plain)
    _same_transforms(plain, ref)


def test_2d_nifti_keeps_its_transforms_and_nifti2_is_refused_clearly(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", size=32, method="direct")
    flat = _sheared(tmp_path / "flat.nii.gz", shape=(40, 36, 1))
    for stream in (True, False):
        out = tmp_path / f"flat{stream}_seg.nii.gz"
        rep = Segmenter(bundle, stream_volumes=stream).predict_file(tmp_path / "flat.nii.gz", out)
        assert rep.status == "ok", rep.error
        _same_transforms(out, flat)
        assert nib.load(out).get_qform()[2, 3] == 30.0 and nib.load(out).affine[2, 3] == 7.0  # z origins kept
    _sheared(tmp_path / "v2.nii.gz", version=2)  # ITK 5.4 (SimpleITK 2.5) has no NIfTI-2 reader
    with pytest.raises(InputError) as err:
        io.open_image(tmp_path / "v2.nii.gz")
    assert err.value.message.startswith("NIfTI-2 files cannot be read by the SimpleITK in use")


def test_nifti_transforms_kept_from_the_cli(tmp_path: Path) -> None:
    ref = _sheared(tmp_path / "scan.nii.gz")
    bundle = make_bundle(tmp_path / "b", size=32, method="direct")
    r = run_cli("predict", tmp_path / "scan.nii.gz", "--model", bundle)
    assert r.returncode == 0, r.stderr
    assert "qform (code 1) and sform (code 2) place the voxels differently" in r.stderr
    assert "WARNING: In" not in r.stderr and "NiftiImageIO" not in r.stderr, r.stderr  # no ITK warning block
    _same_transforms(tmp_path / "scan_seg.nii.gz", ref)


def _nifti_bytes(tmp_path: Path, shape=(20, 24, 6)) -> bytes:
    img = sitk.GetImageFromArray(np.arange(np.prod(shape[::-1]), dtype=np.int16).reshape(shape[::-1]))
    img.SetSpacing((0.7, 0.8, 2.5))
    sitk.WriteImage(img, str(tmp_path / "base.nii"))
    return (tmp_path / "base.nii").read_bytes()


def _with_pixdim(raw: bytes, axis: int, value: float) -> bytes:
    out = bytearray(raw)
    out[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    return bytes(out)


def test_zero_pixdim_is_refused_or_noted(tmp_path: Path) -> None:
    raw = _nifti_bytes(tmp_path)
    (tmp_path / "zero.nii").write_bytes(_with_pixdim(raw, 3, 0.0))
    r = run_cli("info", tmp_path / "zero.nii")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"segcli: error: {tmp_path / 'zero.nii'}: NIfTI header gives voxel size 0 along "
                                "axis 3 (pixdim[3]); the voxel spacing is unknown, fix the header first")
    one = _nifti_bytes(tmp_path, shape=(20, 24, 1))  # one slice: a zero thickness only gets a note
    (tmp_path / "one.nii").write_bytes(_with_pixdim(one, 3, 0.0))
    loaded = io.open_image(tmp_path / "one.nii")
    assert any(w.startswith("NIfTI pixdim[3] is 0 on an axis of one voxel") for w in loaded.meta["warnings"])


def _short_gzip(tmp_path: Path, keep: int) -> Path:
    raw = _nifti_bytes(tmp_path)
    path = tmp_path / f"short{keep}.nii.gz"
    path.write_bytes(gzip.compress(raw[:keep]))  # a valid gzip stream, shorter than the header says
    return path


def test_short_nifti_refused_everywhere(tmp_path: Path) -> None:
    raw = _nifti_bytes(tmp_path)
    voxels = len(raw) - 352
    cases = {
        _short_gzip(tmp_path, len(raw) - 100): voxels - 100,
        _short_gzip(tmp_path, 352): 0,  # header only
    }
    (tmp_path / "short.nii").write_bytes(raw[:-100])
    cases[tmp_path / "short.nii"] = voxels - 100
    (tmp_path / "hdr.nii").write_bytes(raw[:352])
    cases[tmp_path / "hdr.nii"] = 0
    for path, held in cases.items():
        before = path.read_bytes()
        expected = f"truncated: header says {voxels} bytes of voxels, file holds {held}"
        for read in (io.open_image, open_streamed, io.describe):
            with pytest.raises(InputError) as err:
                read(path)
            assert err.value.message == expected and err.value.path == path, (read, err.value)
        assert path.read_bytes() == before
    r = run_cli("info", tmp_path / "short352.nii.gz")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"segcli: error: {tmp_path / 'short352.nii.gz'}: truncated: header says {voxels} bytes of voxels, file holds 0")


def test_short_metaimage_and_nrrd(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.zeros((6, 24, 20), np.int16))
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    raw = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "t.mha").write_bytes(raw[:-100])
    header = raw[: raw.index(b"ElementDataFile = LOCAL\n") + 24]
    (tmp_path / "h.mha").write_bytes(header)
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    raw = (tmp_path / "v.nrrd").read_bytes()
    (tmp_path / "t.nrrd").write_bytes(raw[:-100])
    for name, held in (("t.mha", 5660), ("h.mha", 0), ("t.nrrd", 5660)):
        for read in (io.open_image, open_streamed):
            if read is open_streamed and name.endswith(".nrrd"):
                continue  # NRRD is read whole
            with pytest.raises(InputError) as err:
                read(tmp_path / name)
            assert err.value.message == f"truncated: header says 5760 bytes of voxels, file holds {held}"
    r = run_cli("info", tmp_path / "h.mha")
    assert r.returncode == 1 and r.stderr.strip().endswith("truncated: header says 5760 bytes of voxels, file holds 0")
    assert "MetaImage" not in r.stderr


def test_streamed_gzip_errors_name_the_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed reader decompresses into a temporary .nii; a problem found there names the input."""
    from segcli.io import medical

    raw = _nifti_bytes(tmp_path)
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(raw))
    vol = open_streamed(path)
    assert vol is not None
    monkeypatch.setattr(medical, "check_nifti_complete", lambda p: (_ for _ in ()).throw(InputError("boom", p)))
    with pytest.raises(InputError) as err:
        vol.block(0, 0, 1)
    assert err.value.path == path and vol._tmp is None
    shutil.rmtree(tmp_path / "b", ignore_errors=True)


def test_header_only_files_are_not_images(tmp_path: Path, corpus: Path) -> None:
    """`segcli info` (io.describe) refuses a header without its data, whatever the format."""
    img = sitk.GetImageFromArray(np.zeros((6, 24, 20), np.int16))
    sitk.WriteImage(img, str(tmp_path / "v.nrrd"))
    raw = (tmp_path / "v.nrrd").read_bytes()
    (tmp_path / "h.nrrd").write_bytes(raw[: raw.index(b"\n\n") + 2])
    slice_file = (corpus / "regular" / "slice000.dcm").read_bytes()
    (tmp_path / "short.dcm").write_bytes(slice_file[:-100])
    (tmp_path / "header.dcm").write_bytes(slice_file[:400])
    expected = {
        "h.nrrd": "truncated: header says 5760 bytes of voxels, file holds 0",
        "short.dcm": "truncated: header says 960 bytes of pixels, file holds 860",
        "header.dcm": "DICOM file holds no pixel data (header only, or truncated)",
    }
    for name, message in expected.items():
        with pytest.raises(InputError) as err:
            io.describe(tmp_path / name)
        assert err.value.message == message and err.value.path == tmp_path / name


def test_oblique_series_passes_and_keeps_the_grid(tmp_path: Path) -> None:
    """An oblique (rotated) series: positions are projected on its own normal, not on z."""
    from tests.dicom import make_descending

    c, s = np.cos(0.4), np.sin(0.4)
    direction = (1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c)
    src = regular_series(tmp_path / "obl", direction=direction)
    regular_series(tmp_path / "desc", direction=direction)
    make_descending(tmp_path / "desc")
    for name in ("obl", "desc"):
        img = io.open_image(tmp_path / name)
        g = img.meta["geometry"]
        np.testing.assert_allclose(g["spacing"], src.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(g["origin"], src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(g["direction"], direction, atol=1e-5)
        assert bool(img.meta["notes"]) == (name == "desc")
