"""Image I/O: geometry must survive open -> mask -> write exactly, and bad inputs must fail in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from segcli.errors import InputError, UsageError
from segcli.io import (
    LoadedImage,
    default_output_path,
    describe,
    is_image_path,
    list_images,
    open_image,
    write_mask,
    write_probabilities,
)
from segcli.io.atomic import atomic_path
from tests.dicom import write_dicom_series

SPACING = (0.7, 0.9, 2.5)  # sitk (x, y, z)
ORIGIN = (10.0, -20.0, 30.0)


def _label(values: np.ndarray) -> np.ndarray:
    """A mask that is a pure function of pixel content, so its positions can be checked after writing."""
    return (values.astype(np.int64) % 251).astype(np.uint8)


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def _oblique_permuted_direction() -> tuple[float, ...]:
    """Index axes along P, I and R (not LPS order), slightly rotated: forces a real reorientation."""
    base = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns: +y(P), -z(I), -x(R)
    return tuple((_rot_z(8.0) @ base).ravel())


def _volume(direction: tuple[float, ...], shape: tuple[int, int, int] = (5, 6, 7)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.int16).reshape(shape))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(a, get)(), getattr(b, get)(), atol=1e-6), get


# --- geometry round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_volume_roundtrip_restores_geometry_and_positions(tmp_path: Path, ext: str) -> None:
    source = _volume(_oblique_permuted_direction())
    src = tmp_path / f"scan{ext}"
    sitk.WriteImage(source, str(src))
    on_disk = sitk.ReadImage(str(src))

    loaded = open_image(src)
    assert loaded.kind == "volume" and loaded.ndim == 3 and loaded.channels == 1
    assert loaded.meta["orientation"] != "LPS"
    canonical = sitk.DICOMOrient(on_disk, "LPS")
    assert loaded.spatial_shape == canonical.GetSize()[::-1] != on_disk.GetSize()[::-1]
    assert np.allclose(loaded.spacing, canonical.GetSpacing()[::-1])
    assert np.array_equal(loaded.array[..., 0], sitk.GetArrayFromImage(canonical))

    out = write_mask(_label(loaded.array[..., 0]), loaded, tmp_path / f"scan_seg{ext}")
    written = sitk.ReadImage(str(out))
    _assert_same_geometry(written, on_disk)
    assert written.GetPixelID() == sitk.sitkUInt8
    # Each mask voxel sits at the index (hence physical point) of the voxel it was computed from.
    assert np.array_equal(sitk.GetArrayFromImage(written), _label(sitk.GetArrayFromImage(on_disk)))


def test_ras_and_lps_copies_give_the_same_canonical_array(tmp_path: Path) -> None:
    ras = _volume((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    arr = sitk.GetArrayFromImage(ras)
    lps = sitk.GetImageFromArray(arr[:, ::-1, ::-1].copy())
    lps.SetSpacing(SPACING)
    lps.SetOrigin(ras.TransformIndexToPhysicalPoint((ras.GetWidth() - 1, ras.GetHeight() - 1, 0)))
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))
    sitk.WriteImage(lps, str(tmp_path / "lps.nii.gz"))

    a, b = open_image(tmp_path / "ras.nii.gz"), open_image(tmp_path / "lps.nii.gz")
    assert a.meta["orientation"] == "RAS" and b.meta["orientation"] == "LPS"
    assert np.array_equal(a.array, b.array)
    assert np.allclose(a.spacing, b.spacing)
    assert np.allclose(a.meta["canonical"]["origin"], b.meta["canonical"]["origin"], atol=1e-5)


def test_dicom_series_roundtrip_picks_largest_series(tmp_path: Path) -> None:
    coronal = (1, 0, 0, 0, 0, 1, 0, -1, 0)  # rows along x, columns along -z: not LPS
    source = _volume(coronal, shape=(4, 6, 5))
    folder = tmp_path / "ct"
    write_dicom_series(folder, source, "1.2.826.0.1.3680043.2.1125.1")
    second = _volume(coronal, shape=(2, 6, 5))
    write_dicom_series(folder, second, "1.2.826.0.1.3680043.2.1125.2", prefix="other")

    loaded = open_image(folder)
    assert loaded.kind == "volume" and loaded.meta["series_id"].endswith(".1")
    assert loaded.meta["warnings"] and "2 DICOM series" in loaded.meta["warnings"][0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), loaded.meta["series_id"]))
    on_disk = reader.Execute()
    assert on_disk.GetSize() == (5, 6, 4)
    assert np.allclose(on_disk.GetSpacing(), SPACING, atol=1e-4)

    out = write_mask(_label(loaded.array[..., 0]), loaded, default_output_path(folder))
    assert out == tmp_path / "ct_seg.nii.gz"
    written = sitk.ReadImage(str(out))
    _assert_same_geometry(written, on_disk)
    assert np.array_equal(sitk.GetArrayFromImage(written), _label(sitk.GetArrayFromImage(on_disk)))
    assert open_image(folder, series_id=loaded.meta["series_id"][:-1] + "2").spatial_shape == (6, 2, 5)


def test_medical2d_and_single_slice_nifti(tmp_path: Path) -> None:
    plane = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(5, 6))
    plane.SetSpacing((0.5, 0.25))
    plane.SetOrigin((3.0, 4.0))
    sitk.WriteImage(plane, str(tmp_path / "plane.mha"))
    loaded = open_image(tmp_path / "plane.mha")
    assert loaded.kind == "medical2d" and loaded.array.shape == (5, 6, 1) and loaded.spacing == (0.25, 0.5)
    written = sitk.ReadImage(str(write_mask(_label(loaded.array[..., 0]), loaded, tmp_path / "m.nii.gz")))
    assert written.GetDimension() == 2
    _assert_same_geometry(written, plane)

    sitk.WriteImage(_volume((1, 0, 0, 0, 1, 0, 0, 0, 1), shape=(1, 6, 7)), str(tmp_path / "one.nii.gz"))
    one = open_image(tmp_path / "one.nii.gz")
    assert one.kind == "volume" and one.spatial_shape == (1, 6, 7)


def test_tiff_resolution_tags_roundtrip(tmp_path: Path) -> None:
    data = (np.arange(40 * 50, dtype=np.uint16) * 7).reshape(40, 50)
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, data, resolution=((250, 1), (200, 1)), resolutionunit="CENTIMETER")
    loaded = open_image(src)
    assert loaded.kind == "tiff" and loaded.array.shape == (40, 50, 1) and loaded.array.dtype == np.uint16
    assert np.allclose(loaded.spacing, (10 / 200, 10 / 250))

    out = write_mask(_label(loaded.array[..., 0]), loaded, default_output_path(src))
    assert out.name == "slide_seg.tif"
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        assert page.tags["XResolution"].value == (250, 1) and page.tags["YResolution"].value == (200, 1)
        assert page.tags["ResolutionUnit"].value == 3
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert np.array_equal(page.asarray(), _label(data))

    probs = np.stack([data / data.max(), 1 - data / data.max()]).astype(np.float32)
    with tifffile.TiffFile(write_probabilities(probs, loaded, tmp_path / "p.tif")) as tif:
        assert len(tif.pages) == 2 and tif.pages[1].dtype == np.float32
        assert tif.pages[1].tags["XResolution"].value == (250, 1)
        assert np.array_equal(tif.asarray(), probs)


def test_tiff_palette_planar_and_stacks(tmp_path: Path) -> None:
    index = (np.arange(20 * 30) % 3).reshape(20, 30).astype(np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[0, 1] = cmap[1, 2] = 65535
    tifffile.imwrite(tmp_path / "pal.tif", index, photometric="palette", colormap=cmap)
    pal = open_image(tmp_path / "pal.tif").array
    assert pal.shape == (20, 30, 3) and pal.dtype == np.uint8
    assert pal[0, :3].tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    rgb = np.random.default_rng(2).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"
    )
    assert np.array_equal(open_image(tmp_path / "planar.tif").array, rgb)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 20, 30), np.uint8), photometric="minisblack")
    assert "multi-page TIFF stacks are not supported" in _message(tmp_path / "stack.tif")


def test_ome_tiff_physical_size_roundtrip(tmp_path: Path) -> None:
    data = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    src = tmp_path / "cells.ome.tif"
    meta = {"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25}
    tifffile.imwrite(src, data, metadata=meta)
    loaded = open_image(src)
    assert loaded.meta["is_ome"] and np.allclose(loaded.spacing, (0.25e-3, 0.5e-3))
    out = write_mask(_label(data), loaded, default_output_path(src))
    assert out.name == "cells_seg.ome.tif"
    reread = open_image(out)
    assert np.allclose(reread.spacing, loaded.spacing) and np.array_equal(reread.array[..., 0], _label(data))


def test_large_tiff_mask_is_tiled(tmp_path: Path) -> None:
    data = np.zeros((8, 1100), np.uint8)
    data[:, ::3] = 9
    tifffile.imwrite(tmp_path / "wide.tif", data)
    loaded = open_image(tmp_path / "wide.tif")
    assert loaded.spacing is None  # no physical unit in the file
    with tifffile.TiffFile(write_mask(data, loaded, tmp_path / "wide_seg.tif")) as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        assert np.array_equal(tif.asarray(), data)


def test_png_roundtrip_keeps_dpi_and_pixels(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png", dpi=(300, 300))
    loaded = open_image(tmp_path / "photo.png")
    assert loaded.kind == "raster" and loaded.array.shape == (12, 16, 3)
    assert np.allclose(loaded.spacing, (25.4 / 300,) * 2, rtol=1e-3)
    mask = (loaded.array[..., 0] > 128).astype(np.uint8)
    with Image.open(write_mask(mask, loaded, tmp_path / "photo_seg.png")) as out:
        assert out.size == (16, 12) and np.allclose(out.info["dpi"], (300, 300), rtol=1e-3)
        assert np.array_equal(np.asarray(out), mask)
    # A 2D mask can also go to NIfTI, carrying the pixel size.
    nii = sitk.ReadImage(str(write_mask(mask, loaded, tmp_path / "photo_seg.nii.gz")))
    assert nii.GetSize() == (16, 12) and np.allclose(nii.GetSpacing(), (25.4 / 300,) * 2, rtol=1e-3)


def test_raster_modes(tmp_path: Path) -> None:
    Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5)).convert("P").save(tmp_path / "pal.png")
    assert open_image(tmp_path / "pal.png").array.shape == (4, 5, 3)
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / "deep.png")
    deep = open_image(tmp_path / "deep.png").array
    assert deep.dtype == np.uint16 and deep.shape == (4, 5, 1) and deep.max() == 40000
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "bits.bmp")
    bits = open_image(tmp_path / "bits.bmp").array
    assert bits.dtype == np.uint8 and set(np.unique(bits)) == {0, 255}
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "photo.jpg")
    photo = open_image(tmp_path / "photo.jpg")
    with pytest.raises(UsageError, match="JPEG"):
        write_mask(np.zeros((4, 5), np.uint8), photo, tmp_path / "photo_seg.jpg")


def test_volume_probabilities_are_a_vector_image_with_input_geometry(tmp_path: Path) -> None:
    source = _volume(_oblique_permuted_direction())
    sitk.WriteImage(source, str(tmp_path / "scan.nii.gz"))
    loaded = open_image(tmp_path / "scan.nii.gz")
    values = loaded.array[..., 0].astype(np.float32)
    probs = np.stack([values / values.max(), 1 - values / values.max()])
    written = sitk.ReadImage(str(write_probabilities(probs, loaded, tmp_path / "p.nii.gz")))
    _assert_same_geometry(written, source)
    assert written.GetNumberOfComponentsPerPixel() == 2
    expected = sitk.GetArrayFromImage(source).astype(np.float32) / values.max()
    assert np.allclose(sitk.GetArrayFromImage(written)[..., 0], expected)


def test_mhd_mask_is_moved_into_place_with_its_data_file(tmp_path: Path) -> None:
    source = _volume(_oblique_permuted_direction())
    sitk.WriteImage(source, str(tmp_path / "head.mhd"))
    loaded = open_image(tmp_path / "head.mhd")
    out = write_mask(_label(loaded.array[..., 0]), loaded, tmp_path / "out" / "head_seg.mhd")
    assert sorted(p.name for p in out.parent.iterdir()) == ["head_seg.mhd", "head_seg.zraw"]
    written = sitk.ReadImage(str(out))
    _assert_same_geometry(written, source)
    assert np.array_equal(sitk.GetArrayFromImage(written), _label(sitk.GetArrayFromImage(source)))


def test_describe(tmp_path: Path) -> None:
    sitk.WriteImage(_volume(_oblique_permuted_direction()), str(tmp_path / "scan.nrrd"))
    info = describe(tmp_path / "scan.nrrd")
    assert info["kind"] == "volume" and info["channels"] == 1 and info["dtype"] == "int16"
    assert info["intensity"]["min"] == 0 and info["intensity"]["max"] == 209 and len(info["direction"]) == 9
    assert info["file_size"] > 0 and info["orientation"] != "LPS"
    tifffile.imwrite(tmp_path / "a.tif", np.ones((4, 4), np.uint8))
    assert describe(tmp_path / "a.tif")["tiff"]["pages"] == 1


# --- errors ----------------------------------------------------------------------------------------


def _message(path: Path) -> str:
    with pytest.raises(InputError) as info:
        open_image(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    return text


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "not found" in _message(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in _message(tmp_path / "empty.png")


def test_truncated_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).random((20, 30, 40)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(tmp_path / "cut.nii.gz"), useCompression=True)
    tifffile.imwrite(tmp_path / "cut.tif", (noise[0] * 255).astype(np.uint8), compression="zlib")
    for name in ("cut.nii.gz", "cut.tif"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert "truncated" in _message(tmp_path / name)


def test_4d_nifti_is_refused(tmp_path: Path) -> None:
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.uint8)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "fmri.nii.gz"))
    assert "4D images are not supported" in _message(tmp_path / "fmri.nii.gz")


def test_wrong_extension_and_unrecognised_content(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "real.png")
    (tmp_path / "real.png").rename(tmp_path / "fake.tif")
    loaded = open_image(tmp_path / "fake.tif")
    assert loaded.kind == "raster" and "does not match" in loaded.meta["warnings"][0]
    (tmp_path / "notes.png").write_text("hello, this is not an image\n")
    assert "content looks like text" in _message(tmp_path / "notes.png")


def test_misnamed_nifti_is_read_by_content(tmp_path: Path) -> None:
    sitk.WriteImage(_volume((1, 0, 0, 0, 1, 0, 0, 0, 1)), str(tmp_path / "scan.nii"))
    (tmp_path / "scan.nii").rename(tmp_path / "scan.img")
    assert open_image(tmp_path / "scan.img").spatial_shape == (5, 6, 7)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 192 px: between 1x and 2x -> warning case
    assert "too large" in _message(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # over 2x -> Pillow's error case
    assert "too large" in _message(tmp_path / "bomb.png")


def test_import_is_cheap() -> None:
    code = "import sys, segcli.io; print(any(m in sys.modules for m in ('SimpleITK', 'tifffile', 'PIL')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_tiny_image_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")
    assert "too small" in _message(tmp_path / "dot.png")


def test_absurd_header_is_refused_before_allocating(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(tmp_path / "small.nii"))
    header = bytearray((tmp_path / "small.nii").read_bytes())
    for name, dims in (("huge.nii", (30000, 30000, 30000)), ("liar.nii", (2000, 2000, 100))):
        header[42:48] = np.array(dims, "<i2").tobytes()
        (tmp_path / name).write_bytes(bytes(header))
        text = _message(tmp_path / name)
        assert "header declares" in text


# --- listing, atomic writes, output names ----------------------------------------------------------


def test_list_images_walks_nested_dicom_and_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.png").write_bytes(b"x")
    (root / "a_seg.png").write_bytes(b"x")
    (root / ".hidden.png").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    (root / "sub" / "b.nii.gz").write_bytes(b"x")
    (root / "sub" / "deeper" / "c.tif").write_bytes(b"x")
    (root / "dcm").mkdir()
    (root / "dcm" / "1.dcm").write_bytes(b"x")
    (root / "dcm" / "2.dcm").write_bytes(b"x")
    write_dicom_series(root / "noext", _volume((1, 0, 0, 0, 1, 0, 0, 0, 1), shape=(2, 4, 4)), "1.2.3.4")
    for f in (root / "noext").iterdir():  # DICOM found by content, as scanners often write it
        f.rename(f.with_suffix(""))
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root / "a.png", root / "sub" / "alias.png")

    found = list_images(root)
    expected = ["a.png", "a_seg.png", "dcm", "noext", "sub/b.nii.gz", "sub/deeper/c.tif"]
    assert [p.relative_to(root).as_posix() for p in found] == expected
    assert is_image_path(root / "dcm") and not is_image_path(root / "notes.txt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "out" / "scan_seg.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer died")
    assert list(final.parent.iterdir()) == []

    def broken_imwrite(path: Path, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"half a tiff")
        raise OSError("disk full")

    tifffile.imwrite(tmp_path / "in.tif", np.ones((4, 4), np.uint8))
    like = open_image(tmp_path / "in.tif")
    monkeypatch.setattr(tifffile, "imwrite", broken_imwrite)
    with pytest.raises(OSError):
        write_mask(np.ones((4, 4), np.uint8), like, tmp_path / "out" / "in_seg.tif")
    assert list((tmp_path / "out").iterdir()) == []


def test_default_output_path_rules(tmp_path: Path) -> None:
    assert default_output_path(tmp_path / "scan.nii.gz") == tmp_path / "scan_seg.nii.gz"
    assert default_output_path(tmp_path / "slide.tif") == tmp_path / "slide_seg.tif"
    assert default_output_path(tmp_path / "photo.jpg") == tmp_path / "photo_seg.png"
    assert default_output_path(tmp_path / "head.mhd") == tmp_path / "head_seg.mha"
    (tmp_path / "ct").mkdir()
    assert default_output_path(tmp_path / "ct") == tmp_path / "ct_seg.nii.gz"
    out = tmp_path / "results"
    out.mkdir()
    assert default_output_path(tmp_path / "scan.nii.gz", out) == out / "scan_seg.nii.gz"
    assert (
        default_output_path(tmp_path / "scan.nii.gz", f"{tmp_path}/new/")
        == tmp_path / "new" / "scan_seg.nii.gz"
    )
    nested = tmp_path / "in" / "p1" / "scan.mha"
    assert default_output_path(nested, out, is_dir_input_root=tmp_path / "in") == out / "p1" / "scan_seg.mha"
    assert default_output_path(nested, tmp_path / "mine.nrrd") == tmp_path / "mine.nrrd"
    assert default_output_path(nested, suffix="_mask") == nested.parent / "scan_mask.mha"


def test_loaded_image_properties() -> None:
    image = LoadedImage(Path("x"), "volume", np.zeros((2, 3, 4, 1), np.uint8), (1.0, 1.0, 1.0), {})
    assert (image.ndim, image.spatial_shape, image.channels) == (3, (2, 3, 4), 1)
