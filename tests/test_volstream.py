"""Volumes decoded slab by slab: the same voxels, the same masks, never the whole volume at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from segcli import io
from segcli.api import Segmenter
from segcli.io import volstream
from segcli.io.volstream import SlabCache, StreamedVolume, open_streamed
from tests.conftest import make_bundle

# A sagittal acquisition: file axes are (A->P, S->I, L->R), so the canonical LPS array is a
# permutation of the file's with flips: the hard case for mapping slabs back to file regions.
SAGITTAL = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def _volume(path: Path, direction=SAGITTAL, shape=(13, 17, 11), dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(1)
    arr = (rng.normal(0, 300, shape)).astype(dtype)
    arr[3:9, 4:12, 2:8] += 900  # one bright blob, so masks are not trivial
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 1.1, 4.0))  # thick file slices: the engine slices along the file's own z
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), useCompression=path.name.endswith(".gz"))
    return arr


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii", "v.mha"])
@pytest.mark.parametrize("direction", [SAGITTAL, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)])
def test_slab_reads_equal_slices_of_the_whole_read(tmp_path: Path, name: str, direction) -> None:
    _volume(tmp_path / name, direction)
    whole = io.open_image(tmp_path / name)
    from segcli.io.medical import open_reader

    vol = StreamedVolume(tmp_path / name, open_reader(tmp_path / name, tmp_path / name), [])  # any axis, any format
    assert vol.shape == whole.array.shape and np.allclose(vol.spacing, whole.spacing)
    assert vol.meta["signed_perm"] == whole.meta["signed_perm"]
    for axis in range(3):
        cache = SlabCache(vol, axis, slab=4)
        for i in range(vol.shape[axis]):
            np.testing.assert_array_equal(cache(i), np.take(whole.array, i, axis=axis))
        assert cache.slabs_read == -(-vol.shape[axis] // 4)  # in order: each slab decoded once


def test_gzip_nifti_sliced_across_its_file_slices_is_read_whole(tmp_path: Path) -> None:
    """Each slab across a .nii.gz's own slices would decompress the whole file: read it once instead."""
    thin = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.int16))
    thin.SetSpacing((4.0, 1.0, 1.0))  # x is the coarse axis, so slices are cut across the file's z
    for name in ("t.nii.gz", "t.nii"):
        sitk.WriteImage(thin, str(tmp_path / name), useCompression=name.endswith(".gz"))
    assert open_streamed(tmp_path / "t.nii.gz") is None
    assert isinstance(open_streamed(tmp_path / "t.nii"), StreamedVolume)  # plain NIfTI: a region read is cheap
    _volume(tmp_path / "v.nii.gz")  # sliced along its own file slices: streamed
    assert isinstance(open_streamed(tmp_path / "v.nii.gz"), StreamedVolume)


def test_formats_itk_cannot_stream_are_read_whole(tmp_path: Path) -> None:
    _volume(tmp_path / "v.nrrd")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "v.nrrd")), str(tmp_path / "c.mha"), useCompression=True)
    assert open_streamed(tmp_path / "v.nrrd") is None and open_streamed(tmp_path / "c.mha") is None
    flat = sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii"))
    assert open_streamed(tmp_path / "flat.nii") is None  # 2D: the whole reader handles it


@pytest.mark.parametrize(("method", "ext"), [("stts", ".nii.gz"), ("direct", ".nii.gz"), ("direct", ".mha")])
def test_streamed_outputs_equal_in_memory_outputs(tmp_path: Path, method: str, ext: str) -> None:
    """Masks and probabilities of the streamed path (NIfTI: written plane by plane, probabilities spilled
    to disk; MHA: through SimpleITK) equal those of the whole read, with the input's geometry."""
    arr = _volume(tmp_path / "v.nii.gz", shape=(9, 40, 36))
    # percentile normalisation: its statistics are collected slab by slab and must match
    bundle = make_bundle(tmp_path / "b", size=32, method=method)
    out, probs = {}, {}
    for stream in (True, False):
        seg = Segmenter(bundle, stream_volumes=stream)
        rep = seg.predict_file(tmp_path / "v.nii.gz", tmp_path / f"m{stream}{ext}", probabilities=True)
        assert rep.status == "ok", rep.warnings
        assert rep.info.get("probabilities_streamed", False) == (stream and ext == ".nii.gz")
        out[stream] = sitk.ReadImage(str(tmp_path / f"m{stream}{ext}"))
        probs[stream] = sitk.ReadImage(str(tmp_path / f"m{stream}_probs{ext}"))
    a, b = (sitk.GetArrayFromImage(out[k]) for k in (True, False))
    assert a.shape == arr.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    p, q = (sitk.GetArrayFromImage(probs[k]) for k in (True, False))
    assert p.shape == (*arr.shape, 2) and p[..., -1].std() > 1e-4  # the network saw real, varying input
    np.testing.assert_allclose(p, q, atol=1e-6)
    ref = sitk.ReadImage(str(tmp_path / "v.nii.gz"))
    for image in (out[True], out[False], probs[True]):  # the input's geometry on every output
        for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(image, getter)(), getattr(ref, getter)(), atol=1e-5), getter
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".segcli-probs*"))


def test_the_volume_is_never_decoded_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _volume(tmp_path / "v.nii.gz", shape=(30, 24, 20))
    monkeypatch.setattr(volstream, "SLAB_BYTES", 3 * 24 * 20 * 2)  # three file slices per slab
    vol = open_streamed(tmp_path / "v.nii.gz")
    assert vol is not None
    seg = Segmenter(make_bundle(tmp_path / "b", size=32))
    res, _ = seg.segment_volume(vol, spacing=vol.spacing)
    total = int(np.prod(vol.spatial_shape))
    assert res.labels.shape == vol.spatial_shape
    assert vol.largest_block * 5 <= total  # never more than a slab at a time
    # statistics pass + rough pass + fine pass: every voxel decoded three times, no more
    assert vol.voxels_read == 3 * total


def test_streamed_volume_errors_name_the_problem(tmp_path: Path) -> None:
    flat = np.full((6, 10, 10), -1000, np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(flat), str(tmp_path / "const.nii.gz"))
    seg = Segmenter(make_bundle(tmp_path / "b", size=32))
    rep = seg.predict_file(tmp_path / "const.nii.gz", tmp_path / "m.nii.gz")
    assert rep.status == "empty" and "constant" in rep.warnings[0]
    nan = np.full((6, 10, 10), np.nan, np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "nan.nii"))
    rep = seg.predict_file(tmp_path / "nan.nii", tmp_path / "n.nii.gz")
    assert rep.status == "failed" and "no finite values" in rep.error


def test_canonical_view_is_the_inverse_of_the_writer_reordering() -> None:
    """Every signed axis permutation: writing through the view fills the file-order buffer, no copy at write."""
    import itertools

    from segcli.io.medical import canonical_view, file_order_buffer, to_original_axes

    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            perm = np.zeros((3, 3), int)
            for a, b in enumerate(order):
                perm[a, b] = signs[a]
            meta = {"signed_perm": perm.tolist(), "geometry": {"size": (4, 5, 6)}}
            buf = file_order_buffer(meta)
            view = canonical_view(buf, meta)
            canon = np.random.default_rng(0).integers(0, 9, view.shape, dtype=np.uint8)
            view[...] = canon
            out = to_original_axes(view, meta)
            assert np.shares_memory(out, buf) and np.array_equal(out, to_original_axes(canon, meta))


def test_dicom_series_streams_by_file_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DICOM series is read a run of files at a time; voxels, geometry and masks match the whole read."""
    from tests.dicom import write_dicom_series

    rng = np.random.default_rng(3)
    arr = rng.normal(0, 200, (7, 24, 20)).astype(np.int16)
    arr[2:5, 6:15, 4:12] += 800
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7, 3.0))  # thick slices: sliced along the file axis
    img.SetOrigin((-10.0, 5.0, 40.0))
    write_dicom_series(tmp_path / "ct", img, "1.2.826.0.1.3680043.2.1125.77")
    monkeypatch.setattr(volstream, "SLAB_BYTES", 2 * 24 * 20 * 2)  # two files per slab
    vol = open_streamed(tmp_path / "ct")
    whole = io.open_image(tmp_path / "ct")
    assert isinstance(vol, StreamedVolume) and vol.meta["source"] == "dicom"
    assert vol.shape == whole.array.shape and np.allclose(vol.spacing, whole.spacing)
    for key in ("spacing", "origin", "direction", "size"):
        assert np.allclose(vol.meta["geometry"][key], whole.meta["geometry"][key], atol=1e-4), key
    cache = SlabCache(vol, 0)
    for i in range(vol.shape[0]):
        np.testing.assert_array_equal(cache(i), whole.array[i])
    assert cache.slabs_read == 4 and vol.largest_block == 2 * 24 * 20
    bundle = make_bundle(tmp_path / "b", size=32, method="direct")
    masks = []
    for stream in (True, False):
        rep = Segmenter(bundle, stream_volumes=stream).predict_file(tmp_path / "ct", tmp_path / f"m{stream}.nii.gz")
        assert rep.status == "ok", rep.error
        masks.append(sitk.ReadImage(str(tmp_path / f"m{stream}.nii.gz")))
    np.testing.assert_array_equal(*(sitk.GetArrayFromImage(m) for m in masks))
    assert np.allclose(masks[0].GetOrigin(), masks[1].GetOrigin(), atol=1e-4)
