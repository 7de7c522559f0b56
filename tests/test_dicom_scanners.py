"""DICOM as scanners write it: mosaics, enhanced multi-frame files, 4D series, series without UIDs, non-image
objects and sagittal stacks, each placed voxel by voxel against an independent reader (the positions the
fixture wrote with pydicom, and nibabel's Siemens mosaic reader)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segcli import io
from segcli.errors import InputError
from segcli.io.medical import to_original_axes
from tests.conftest import run_cli
from tests.dicom_scanners import coded, write_classic, write_enhanced, write_mosaic, write_sr

TILT = np.radians(12)
ROW, COL = (1.0, 0.0, 0.0), (0.0, float(np.cos(TILT)), float(np.sin(TILT)))  # an oblique axial plane
SAG_ROW, SAG_COL = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)  # sagittal: rows run A->P, columns head->feet


def world_values(img) -> tuple[np.ndarray, np.ndarray]:
    """(LPS position of every voxel centre, its value) from segcli's geometry, in file order."""
    g = img.meta["geometry"]
    arr = to_original_axes(img.array[..., 0], img.meta)  # (z, y, x) of the sitk grid
    z, y, x = np.meshgrid(*(np.arange(s) for s in arr.shape), indexing="ij")
    idx = np.stack([x, y, z], -1).reshape(-1, 3) * np.asarray(g["spacing"])
    pos = idx @ np.asarray(g["direction"]).reshape(3, 3).T + np.asarray(g["origin"])
    return pos, arr.reshape(-1)


def assert_placed(img, truth: np.ndarray, origin, row, col, spacing) -> None:
    """Every voxel segcli decoded sits where the fixture wrote that value (0.01 mm), and all are there.

    ``truth`` is (slices, rows, cols); voxel (k, y, x) of it lies at ``origin + x*sc*row + y*sr*col +
    k*sz*normal`` with ``spacing`` = (sr, sc, sz), the DICOM definition."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    axes = np.column_stack([row * spacing[1], col * spacing[0], np.cross(row, col) * spacing[2]])
    pos, values = world_values(img)
    idx = np.linalg.solve(axes, (pos - np.asarray(origin, float)).T).T  # (x, y, k) in the fixture's grid
    assert np.abs(idx - np.rint(idx)).max() * max(spacing) < 0.01
    x, y, k = np.rint(idx).astype(int).T
    assert values.size == truth.size
    assert sorted(zip(k, y, x, strict=True)) == sorted(np.ndindex(truth.shape))
    np.testing.assert_array_equal(values, truth[k, y, x])


# ------------------------------------------------------------------------------------------ mosaics
def test_mosaic_demosaiced_where_nibabel_places_it(tmp_path):
    """A 5-slice oblique mosaic (3x3 tile sheet) becomes 10x8x5 voxels, origin corrected as dcm2niix does."""
    import warnings

    import pydicom

    with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental on import
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

    truth = coded(1, 5, 8, 10)[0]
    path = tmp_path / "mosaic" / "m.dcm"
    write_mosaic(path, truth, row_dir=ROW, col_dir=COL, origin=(-40, -30, 20), spacing=(2.0, 2.5, 3.0))
    img = io.open_image(path.parent)
    assert img.meta["geometry"]["size"][2] == 5 and img.meta["source"] == "dicom-converted"
    assert_placed(img, truth, (-40, -30, 20), ROW, COL, (2.0, 2.5, 3.0))
    w = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    np.testing.assert_allclose(w.image_position, (-40, -30, 20), atol=1e-3)  # the independent origin correction
    assert io.open_image(path).meta["geometry"] == img.meta["geometry"]  # the file alone: the same grid


# ------------------------------------------------------------------------------------------ enhanced
def test_enhanced_frames_placed_in_any_order(tmp_path):
    """Frames stored shuffled, in a sagittal file: each placed from its own PlanePositionSequence."""
    truth = coded(1, 6, 7, 9)
    order = [(0, k) for k in (3, 0, 5, 1, 4, 2)]
    path = tmp_path / "enh" / "sag.dcm"
    write_enhanced(path, truth, row_dir=SAG_ROW, col_dir=SAG_COL, origin=(30, -50, 60), frame_order=order)
    for source in (path, path.parent):
        img = io.open_image(source)
        assert_placed(img, truth[0], (30, -50, 60), SAG_ROW, SAG_COL, (1.5, 1.0, 2.5))


def test_enhanced_two_volumes_refused_then_picked(tmp_path):
    truth = coded(2, 4, 6, 8)
    path = tmp_path / "enh4d" / "f.dcm"
    write_enhanced(path, truth, row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    with pytest.raises(InputError) as err:
        io.open_image(path)
    assert err.value.message.startswith("4D DICOM (an enhanced multi-frame DICOM): 2 volumes along ")
    assert "--volume N (1 to 2)" in err.value.message
    assert_placed(io.open_image(path, volume=2), truth[1], (0, 0, 0), ROW, COL, (1.5, 1.0, 2.5))
    with pytest.raises(InputError, match="--volume 3: this DICOM holds 2 volumes"):
        io.open_image(path, volume=3)


# ------------------------------------------------------------------------------------------ classic series
def test_multi_echo_series_is_4d_not_duplicate(tmp_path):
    truth = coded(2, 3, 6, 5)
    write_classic(tmp_path / "me", truth, echo_times=(5.0, 10.0), row_dir=ROW, col_dir=COL, origin=(1, 2, 3))
    with pytest.raises(InputError) as err:
        io.open_image(tmp_path / "me")
    assert err.value.message.startswith("4D DICOM (a 4D series (2 images at each of 3 slice positions)): "
                                        "2 volumes along echoes; segment one with --volume N (1 to 2)")
    img = io.open_image(tmp_path / "me", volume=2)
    assert_placed(img, truth[1], (1, 2, 3), ROW, COL, (1.0, 1.0, 2.0))


def test_4d_volume_keeps_the_scaling(tmp_path):
    """A picked volume of a 4D Philips series carries dcm2niix's precise-float values (stored / ScaleSlope)."""
    truth = coded(2, 3, 4, 5)
    write_classic(tmp_path / "ph4d", truth, philips=(2.0, 0.25))  # repeats: one 4D NIfTI from dcm2niix
    img = io.open_image(tmp_path / "ph4d", volume=2)
    assert_placed(img, truth[1].astype(np.float64) / 0.25, (0, 0, 0), (1, 0, 0), (0, 1, 0), (1.0, 1.0, 2.0))


def test_series_without_uids_grouped_with_a_warning(tmp_path):
    truth = coded(1, 4, 6, 5)
    write_classic(tmp_path / "anon", truth, uids=False, row_dir=ROW, col_dir=COL, origin=(5, 5, 5))
    img = io.open_image(tmp_path / "anon")
    assert any("carry no SeriesInstanceUID: 4 files grouped" in w for w in img.meta["warnings"])
    assert_placed(img, truth[0], (5, 5, 5), ROW, COL, (1.0, 1.0, 2.0))
    assert io.is_dicom_series(tmp_path / "anon")


def test_structured_report_skipped_and_named(tmp_path):
    truth = coded(1, 3, 6, 5)
    write_classic(tmp_path / "s", truth)
    write_sr(tmp_path / "s" / "report.dcm")
    img = io.open_image(tmp_path / "s")
    assert "skipped 1 non-image object: structured report (SR) (report.dcm)" in img.meta["warnings"]
    assert_placed(img, truth[0], (0, 0, 0), (1, 0, 0), (0, 1, 0), (1.0, 1.0, 2.0))
    only = tmp_path / "only-sr"
    only.mkdir()
    write_sr(only / "a.dcm")
    with pytest.raises(InputError, match="folder holds no image series, only non-image DICOM objects: 1 structured"):
        io.open_image(only)


def test_philips_precise_float_scaling_as_dcm2niix(tmp_path):
    """Display value (stored x 2) divided by RescaleSlope x ScaleSlope: stored / 0.25, dcm2niix's default."""
    truth = coded(1, 3, 4, 5)
    write_classic(tmp_path / "ph", truth, philips=(2.0, 0.25))
    img = io.open_image(tmp_path / "ph")
    assert any(n.startswith("Philips precise-float scaling applied") for n in img.meta["warnings"])
    assert_placed(img, truth[0].astype(np.float64) / 0.25, (0, 0, 0), (1, 0, 0), (0, 1, 0), (1.0, 1.0, 2.0))


def test_sagittal_thick_slices_stream_along_every_axis(tmp_path):
    """A thick-slice sagittal series (the engine slices across the files): every block equals the whole read."""
    from segcli.io.volstream import open_streamed

    truth = coded(1, 5, 12, 10)
    write_classic(tmp_path / "sag", truth, row_dir=SAG_ROW, col_dir=SAG_COL, origin=(-20, 40, 70),
                  spacing=(0.9, 0.9, 5.0))
    whole = io.open_image(tmp_path / "sag")
    assert_placed(whole, truth[0], (-20, 40, 70), SAG_ROW, SAG_COL, (0.9, 0.9, 5.0))
    vol = open_streamed(tmp_path / "sag")
    assert vol is not None
    for axis in range(3):
        n = vol.shape[axis]
        parts = [vol.block(axis, i, min(n, i + 3)) for i in range(0, n, 3)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=axis), whole.array)


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_volume_checked_before_work(tmp_path):
    write_mosaic(tmp_path / "mos" / "m.dcm", coded(1, 4, 6, 6)[0], row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    bad = run_cli("predict", tmp_path / "mos", "--volume", "0", "-o", tmp_path / "out/")
    assert bad.returncode == 2 and "--volume must be >= 1, not 0" in bad.stderr


def test_cli_dicom_seg_refused_for_mosaic_before_work(tmp_path):
    write_mosaic(tmp_path / "mos" / "m.dcm", coded(1, 4, 6, 6)[0], row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    seg = run_cli("predict", tmp_path / "mos", "--output-type", "dicom-seg", "-o", tmp_path / "out/")
    assert seg.returncode == 2
    assert "--output-type dicom-seg: a Siemens mosaic packs every slice into one image, so a DICOM SEG cannot" in seg.stderr
    assert not (tmp_path / "out").exists()


def test_cli_info_names_the_fourth_dimension(tmp_path):
    write_classic(tmp_path / "me", coded(3, 2, 4, 4), echo_times=(2.0, 4.0, 6.0))
    done = run_cli("info", tmp_path / "me")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("4D DICOM (a 4D series (3 images at each of 2 slice positions)): 3 volumes "
                                        "along echoes; segment one with --volume N (1 to 3)")


# ------------------------------------------------------------------------------------------ localizers
def _same_series(files, like) -> None:
    """Rewrite ``files`` into the series (and study) of the file ``like``: one series, several planes."""
    import pydicom

    ref = pydicom.dcmread(like)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = ref.SeriesInstanceUID, ref.StudyInstanceUID
        ds.save_as(f, enforce_file_format=True)


def test_localizer_planes_split_largest_placed(tmp_path):
    """A three-plane localizer in one series: each plane is a series of its own (as dcm2niix writes one
    NIfTI per plane), the largest is read where its files say, and the warning names the planes."""
    truth = coded(1, 3, 6, 5)
    axial = write_classic(tmp_path / "loc", truth, row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    sag = write_classic(tmp_path / "sag", coded(1, 1, 6, 5), row_dir=SAG_ROW, col_dir=SAG_COL, origin=(9, 9, 9))
    cor = write_classic(tmp_path / "cor", coded(1, 1, 6, 5), row_dir=(1, 0, 0), col_dir=(0, 0, -1))
    for i, f in enumerate(sag + cor):
        f.rename(tmp_path / "loc" / f"other{i}.dcm")
    _same_series(sorted((tmp_path / "loc").glob("other*.dcm")), axial[0])
    from segcli.io.dicomscan import scan_folder

    assert sorted(len(v) for v in scan_folder(tmp_path / "loc").series.values()) == [1, 1, 3]
    img = io.open_image(tmp_path / "loc")
    assert any(w.startswith("the images of series ") and " lie in 3 planes (a localizer?); using plane 1 (3 images)"
               in w for w in img.meta["warnings"]), img.meta["warnings"]
    assert_placed(img, truth[0], (0, 0, 0), ROW, COL, (1.0, 1.0, 2.0))


# ------------------------------------------------------------------------------------------ no patient geometry
def _secondary_captures(folder, truth) -> None:
    """``truth`` (slices, rows, cols) as secondary captures without position or orientation, file names in
    reverse of InstanceNumber (the stacking order dcm2niix uses)."""
    import pydicom

    files = write_classic(folder, truth[None])
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness"):
            delattr(ds, key)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.InstanceNumber = k + 1
        f.unlink()
        ds.save_as(folder / f"sc{len(files) - k:03d}.dcm", enforce_file_format=True)


def test_secondary_captures_read_without_place_as_dcm2niix(tmp_path):
    """No ImagePositionPatient anywhere: stacked by InstanceNumber, rows bottom-up and no spatial transform,
    which is how dcm2niix writes them (its NIfTI: qform and sform code 0); read back with nibabel."""
    import nibabel as nib

    truth = coded(1, 4, 6, 5)[0]
    _secondary_captures(tmp_path / "sc", truth)
    img = io.open_image(tmp_path / "sc")
    assert img.meta["unknown_space"] is True
    assert any("no file of the series has an ImagePositionPatient (secondary captures): its 4 images are stacked "
               "by InstanceNumber" in w for w in img.meta["warnings"])
    out = tmp_path / "out"
    done = run_cli("predict", tmp_path / "sc", "--model", "covid-ct", "--no-lung-gate", "-o", f"{out}/")
    assert done.returncode == 0, done.stderr
    mask = nib.load(next(out.glob("sc_seg.nii*")))
    assert (int(mask.header["qform_code"]), int(mask.header["sform_code"])) == (0, 0)
    assert mask.shape == (5, 6, 4) and tuple(float(v) for v in mask.header.get_zooms()) == (1.0, 1.0, 1.0)
    values = np.transpose(to_original_axes(img.array[..., 0], img.meta), (2, 1, 0))  # NIfTI (x, y, z)
    np.testing.assert_array_equal(values, np.transpose(truth[:, ::-1, :], (2, 1, 0)))  # rows bottom-up
    seg = run_cli("predict", tmp_path / "sc", "--model", "covid-ct", "--output-type", "dicom-seg", "-o", f"{out}2/")
    assert seg.returncode == 2 and "--output-type dicom-seg: no file of the series has an ImagePositionPatient" \
        in seg.stderr


# ------------------------------------------------------------------------------------------ SEG on multi-frame
def test_dicom_seg_references_each_frame_of_an_enhanced_file(tmp_path):
    """A mask on dcm2niix's grid goes back onto the frames of the shuffled sagittal file it came from: each
    SEG frame names its source frame, and holds the mask of that frame's pixels (read with pydicom)."""
    import pydicom

    from segcli.io.dicomframes import frame_planes
    from segcli.io.dicomseg import write_dicom_seg

    truth = coded(1, 6, 7, 9)
    order = [(0, k) for k in (3, 0, 5, 1, 4, 2)]
    path = tmp_path / "enh" / "sag.dcm"
    write_enhanced(path, truth, row_dir=SAG_ROW, col_dir=SAG_COL, origin=(30, -50, 60), frame_order=order)
    img = io.open_image(path)
    rule = lambda v: ((v % 7) < 3).astype(np.uint8)  # noqa: E731 - a pattern that differs in every frame
    mask = rule(to_original_axes(img.array[..., 0], img.meta))
    planes = frame_planes(mask, img.meta["geometry"], path)
    expected = np.stack([rule(truth[0, k]) for _, k in order])
    np.testing.assert_array_equal(planes, expected)
    report = write_dicom_seg(tmp_path / "seg.dcm", planes, [path], classes=["background", "x"],
                             bundle_name="t", bundle_version="1", segcli_version="0")
    assert report["written"] and report["frames"] == 6
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    pixels = seg.pixel_array.reshape(6, 7, 9)
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        np.testing.assert_array_equal(pixels[f], expected[int(ref.ReferencedFrameNumber) - 1])


def test_cli_dicom_seg_refused_for_a_4d_enhanced_file_before_work(tmp_path):
    path = tmp_path / "enh4d" / "f.dcm"
    write_enhanced(path, coded(2, 4, 6, 8), row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    seg = run_cli("predict", path, "--volume", "1", "--output-type", "dicom-seg", "-o", tmp_path / "out/")
    assert seg.returncode == 2
    assert "--output-type dicom-seg: the multi-frame file holds 8 frames at 4 positions (4D)" in seg.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ memory, before decoding
def test_decoded_size_from_headers_matches_the_decoded_image(tmp_path):
    """What a whole read of each kind of series decodes, known from its headers before any pixel is."""
    from segcli.io.dicomseries import decoded_size

    write_classic(tmp_path / "plain", coded(1, 4, 6, 5))
    write_mosaic(tmp_path / "mos" / "m.dcm", coded(1, 5, 8, 10)[0], row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    write_enhanced(tmp_path / "enh4d" / "f.dcm", coded(2, 4, 6, 8), row_dir=ROW, col_dir=COL, origin=(0, 0, 0))
    write_classic(tmp_path / "me", coded(3, 2, 4, 4), echo_times=(2.0, 4.0, 6.0))
    _secondary_captures(tmp_path / "sc", coded(1, 3, 6, 5)[0])
    for name, volume in (("plain", None), ("mos", None), ("enh4d", 2), ("me", 1), ("sc", None)):
        shape, channels, itemsize = decoded_size(tmp_path / name, volume)
        img = io.open_image(tmp_path / name, volume=volume)
        assert sorted(shape) == sorted(img.spatial_shape), name
        assert (channels, itemsize) == (1, 2), name


def test_budget_refuses_a_whole_read_before_decoding(tmp_path, monkeypatch):
    """A 4D series (read whole through dcm2niix) too big for --max-memory is refused from its headers: the
    pixels are never decoded, and the message names the volume and the budget."""
    from segcli import io as segio
    from segcli.api import Segmenter
    from segcli.errors import SegcliError
    from segcli.pipeline import open_route

    write_classic(tmp_path / "me", np.zeros((2, 60, 300, 300), np.uint16), echo_times=(2.0, 4.0))

    def decoded(*_a, **_k):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(segio, "open_image", decoded)
    seg = Segmenter("covid-ct", max_memory="150MB", volume=1)
    with pytest.raises(SegcliError, match=r"this 60x300x300 volume needs at least .*; --max-memory is 150\.0 MB"):
        open_route(seg.context(), tmp_path / "me", tmp_path / "out.nii.gz", "dicom")


# ------------------------------------------------------------------------------------------ several series
def test_cli_series_picks_one_of_several(tmp_path):
    """A folder with two series: the largest by default with a warning that names the other and --series;
    --series picks the other (mask on its grid, checked with nibabel); an unknown id is one line, exit 1."""
    import nibabel as nib
    import pydicom

    big = write_classic(tmp_path / "a", coded(1, 5, 8, 8), spacing=(1.0, 1.0, 2.0))
    small = write_classic(tmp_path / "b", coded(1, 3, 6, 6), origin=(10, 20, 30), spacing=(0.5, 0.5, 3.0))
    (tmp_path / "study").mkdir()
    big, small = ([f.rename(tmp_path / "study" / f"{tag}{f.name}") for f in files] for tag, files in (("a", big), ("b", small)))
    uid_big, uid_small = (str(pydicom.dcmread(f[0]).SeriesInstanceUID) for f in (big, small))
    default = run_cli("info", tmp_path / "study", "--json")
    assert default.returncode == 0 and json.loads(default.stdout)[0]["spatial_shape"] in ([8, 8, 5], [5, 8, 8])
    assert f"2 DICOM series found; using {uid_big} (5 files); choose another with --series ID: {uid_small} (3 files)" \
        in default.stdout
    out = tmp_path / "mask.nii.gz"
    done = run_cli("predict", tmp_path / "study", "--series", uid_small, "--model", "covid-ct", "--no-lung-gate",
                   "-o", out, "-q")
    assert done.returncode == 0, done.stderr
    nii = nib.load(out)
    assert nii.shape == (6, 6, 3)
    assert np.allclose(nii.header.get_zooms(), (0.5, 0.5, 3.0))
    # DICOM's (10, 20, 30) in LPS is (-10, -20, 30) in NIfTI's RAS
    np.testing.assert_allclose(nii.affine[:3, 3], (-10, -20, 30), atol=1e-4)
    bad = run_cli("predict", tmp_path / "study", "--series", "1.2.3", "--model", "covid-ct", "-o", tmp_path / "x/")
    assert bad.returncode == 1
    assert f"no DICOM series '1.2.3' here (found: {', '.join(sorted((uid_big, uid_small)))})" in bad.stderr
