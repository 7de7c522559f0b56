"""Generate the corpus of bad inputs that ``tests/test_robustness.py`` runs through ``segcli predict``.

Every file is generated (no binaries in the repository). Run it as a script to get a corpus to poke at
by hand::

    python tests/bad_inputs/make_corpus.py /tmp/corpus

The corpus has two folders, one per model kind, because channel handling depends on the model:

* ``grey/``: run with a 1-channel model and ``--channels keep`` (the default);
* ``rgb/``: run with a 3-channel model, once with ``--channels keep`` (the entries marked ``rgb_hint``
  fail with a hint to pass ``--channels rgb``) and once with ``--channels rgb`` (everything succeeds).

``manifest.json`` (beside the two folders) lists every entry with the behaviour the tests assert: the
status in the ``--json`` summary (``failed``, ``ok`` or ``empty``), a substring of the error or warning,
and the mask name for the ones that must produce one. Entries with ``attempted: false`` must be left
alone by the folder walk (not images, or a symlink loop's second way into a folder).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `tests.dicom` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MANIFEST = "manifest.json"


@dataclass
class Entry:
    """One corpus item and the behaviour segcli must show for it."""

    path: str  # relative to the corpus root, posix separators
    group: str  # "grey" or "rgb": which model the folder is run with
    what: str  # the words for it
    status: str  # "failed" | "ok" | "empty" | "ignored" (not an image: the walk skips it)
    message: str | None = None  # substring of the error (failed) or of a warning (ok/empty)
    output: str | None = None  # mask path relative to the -o folder (ok/empty, and rgb_hint failures)
    shape: tuple[int, ...] | None = None  # that mask's spatial shape
    rgb_hint: bool = False  # a failure that ``--channels rgb`` turns into a success

    @property
    def attempted(self) -> bool:
        return self.status != "ignored"


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _textured(shape: tuple[int, ...], seed: int, dtype=np.uint8) -> np.ndarray:
    """Noise with a bright block, in ``dtype``'s range: something a model can segment."""
    info = np.iinfo(dtype)
    hi = min(int(info.max), 60 if dtype == np.uint8 else 4000)
    a = _rng(seed).integers(0, hi, shape, dtype=dtype)
    sl = tuple(slice(s // 4, max(s // 4 + 1, 3 * s // 4)) for s in shape[:2])
    a[sl] = int(info.max) * 7 // 8
    return a


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")  # PNG whatever the name says


def _write_dicom_series(folder: Path, shape: tuple[int, int, int], uid: str, prefix: str, seed: int) -> None:
    """A random int16 series of ``shape`` (z, y, x) at 0.7 x 0.7 x 2 mm, written with the tests' DICOM helper."""
    import SimpleITK as sitk

    from tests.dicom import write_dicom_series

    image = sitk.GetImageFromArray(_rng(seed).normal(0, 100, shape).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.0))
    write_dicom_series(folder, image, uid, prefix, description=f"series {prefix}")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def huge_nifti(path: Path, dims: tuple[int, int, int] = (10000, 10000, 10000)) -> None:
    """A valid small .nii whose header then claims ``dims`` (10^12 voxels by default)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(path))
    header = bytearray(path.read_bytes())
    header[42:48] = np.array(dims, "<i2").tobytes()
    path.write_bytes(bytes(header))


def _nifti_field(path: Path, offset: int, fmt: str, value: float) -> None:
    """A small valid .nii with one header field overwritten."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(_textured((4, 6, 8), 17).astype(np.int16)), str(path))
    header = bytearray(path.read_bytes())
    header[offset : offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    path.write_bytes(bytes(header))


def _text_header(path: Path, ext: str, old: bytes, new: bytes) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4), np.uint8)), str(path.with_suffix(ext)))
    data = path.with_suffix(ext).read_bytes()
    assert old in data, data[:300]
    path.with_suffix(ext).write_bytes(data.replace(old, new, 1))


def huge_nrrd(path: Path, sizes: bytes = b"10000 10000 10000") -> None:
    """A small .nrrd whose ``sizes:`` line claims 10^12 voxels."""
    _text_header(path, ".nrrd", b"sizes: 4 3 2", b"sizes: " + sizes)


def huge_mha(path: Path, sizes: bytes = b"10000 10000 10000") -> None:
    """A small .mha whose ``DimSize`` claims 10^12 voxels."""
    _text_header(path, ".mha", b"DimSize = 4 3 2", b"DimSize = " + sizes)


def huge_tiff(path: Path, width: int = 1_000_000, length: int = 1_000_000) -> None:
    """A small striped TIFF whose ImageWidth/ImageLength tags claim ``width`` x ``length`` pixels."""
    import tifffile

    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), photometric="minisblack")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        patches = [(tags["ImageWidth"], width), (tags["ImageLength"], length)]
        for tag, value in patches:
            # Small values sit inside the IFD entry itself; rewrite the entry as a LONG (type 4).
            entry = tag.offset  # start of the 12-byte IFD entry
            data[entry + 2 : entry + 4] = struct.pack("<H", 4)
            data[entry + 4 : entry + 8] = struct.pack("<I", 1)
            data[entry + 8 : entry + 12] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


def make_corpus(root: Path | str) -> list[Entry]:
    """Write the corpus under ``root`` and return its manifest (also written as ``root/manifest.json``)."""
    import SimpleITK as sitk
    import tifffile

    root = Path(root)
    grey, rgb = root / "grey", root / "rgb"
    for folder in (grey, rgb, grey / "nested"):
        folder.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []

    def add(
        path: Path,
        group: str,
        what: str,
        status: str,
        message: str | None = None,
        output: str | None = None,
        shape: tuple[int, ...] | None = None,
        rgb_hint: bool = False,
    ) -> None:
        if status in ("ok", "empty") and output is None:
            raise ValueError(f"{path}: ok/empty entries need an output name")
        entries.append(
            Entry(path.relative_to(root).as_posix(), group, what, status, message, output, shape, rgb_hint)
        )

    # -- truncated files: a header promising more data than the file holds -----------------------------
    noise = _rng(1).random((20, 30, 40)).astype(np.float32)
    p = grey / "truncated.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(noise), str(p), useCompression=True)
    _truncate(p)
    add(p, "grey", "truncated .nii.gz", "failed", "truncated")
    p = grey / "truncated.tif"
    tifffile.imwrite(p, (noise[0] * 255).astype(np.uint8), compression="zlib")
    _truncate(p)
    add(p, "grey", "truncated .tif", "failed", "truncated")

    # -- zero bytes --------------------------------------------------------------------------------------
    p = grey / "zero-bytes.nii.gz"
    p.write_bytes(b"")
    add(p, "grey", "zero-byte file", "failed", "empty (0 bytes)")

    # -- wrong extension: valid content is read by content (warning); garbage is an error ----------------
    p = grey / "png-named-as.tif"
    _png(p, _textured((40, 48), 2))
    add(
        p,
        "grey",
        "wrong extension, valid content (PNG named .tif)",
        "ok",
        "does not match the content",
        "png-named-as_seg.tif",
        (40, 48),
    )
    p = grey / "volume-named-as.png"
    vol = sitk.GetImageFromArray(_textured((6, 24, 20), 3).astype(np.int16))
    vol.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(vol, str(grey / "volume-named-as.nii.gz"))
    (grey / "volume-named-as.nii.gz").rename(p)
    # A 3D volume cannot be written as PNG and its geometry needs a medical format: the mask follows
    # the content (NIfTI), not the misleading name.
    add(
        p,
        "grey",
        "wrong extension, valid content (NIfTI volume named .png)",
        "ok",
        "does not match the content",
        "volume-named-as_seg.nii.gz",
        (6, 24, 20),
    )
    p = grey / "text-named-as.png"
    p.write_text("patient notes, not an image\n" * 4, encoding="utf-8")
    add(p, "grey", "garbage content with an image extension (text)", "failed", "not a recognised image")
    p = grey / "zip-named-as.nii.gz"
    p.write_bytes(b"PK\x03\x04" + bytes(_rng(4).integers(0, 256, 200, dtype=np.uint8)))
    add(p, "grey", "garbage content with an image extension (ZIP)", "failed", "ZIP archive")

    # -- shapes ----------------------------------------------------------------------------------------
    p = grey / "fmri-4d.nii.gz"
    frames = [sitk.GetImageFromArray(_textured((3, 8, 10), 5 + t)) for t in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(p))
    add(p, "grey", "4D NIfTI", "failed", "4D images are not supported")
    p = grey / "one-pixel.png"
    _png(p, np.full((1, 1), 200, np.uint8))
    add(p, "grey", "1x1 image", "failed", "too small")
    p = grey / "one-row.tif"
    tifffile.imwrite(p, _textured((1, 50), 6), photometric="minisblack")
    add(p, "grey", "1xN TIFF", "failed", "too small")
    p = grey / "strip-100000x3.png"
    strip = _rng(7).integers(0, 60, (100000, 3), dtype=np.uint8)
    strip[40000:60000] = 230
    _png(p, strip)
    add(p, "grey", "100000x3 strip (valid, segmented)", "ok", None, "strip-100000x3_seg.png", (100000, 3))

    # -- values --------------------------------------------------------------------------------------
    p = grey / "all-nan.tif"
    tifffile.imwrite(p, np.full((24, 32), np.nan, np.float32), photometric="minisblack")
    add(p, "grey", "all-NaN float image (TIFF)", "failed", "no finite values")
    p = grey / "all-nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), np.nan, np.float32)), str(p))
    add(p, "grey", "all-NaN float volume (NIfTI)", "failed", "no finite values")
    p = grey / "constant.png"
    _png(p, np.full((32, 40), 17, np.uint8))
    add(p, "grey", "all-constant image", "empty", "image is constant", "constant_seg.png", (32, 40))
    p = grey / "constant.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), -1000, np.int16)), str(p))
    add(p, "grey", "all-constant volume", "empty", "image is constant", "constant_seg.nii.gz", (4, 16, 16))

    # -- channels and bit depths ---------------------------------------------------------------------
    p = grey / "grey16.png"
    _png(p, _textured((40, 44), 8, np.uint16))
    add(p, "grey", "16-bit PNG, grey model", "ok", None, "grey16_seg.png", (40, 44))
    p = grey / "rgb-for-grey-model.png"
    _png(p, _textured((30, 36, 3), 9))
    add(p, "grey", "RGB PNG, grey model", "failed", "--channels grey")
    p = rgb / "rgba.png"
    rgba = _textured((36, 40, 4), 10)
    rgba[..., 3] = 255
    _png(p, rgba)
    add(p, "rgb", "RGBA PNG, RGB model (alpha dropped by itself, with a note: issue 31)", "ok", None, "rgba_seg.png",
        (36, 40), rgb_hint=True)
    p = rgb / "constant-rgb.png"
    _png(p, np.full((24, 28, 3), 128, np.uint8))  # grey-valued: every pixel and channel the same
    add(p, "rgb", "all-constant RGB image", "empty", "image is constant", "constant-rgb_seg.png", (24, 28))
    p = rgb / "palette.tif"
    index = _textured((32, 48), 11) % 4
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = np.array([[0, 0, 0], [65535, 0, 0], [0, 65535, 0], [0, 0, 65535]], np.uint16).T
    tifffile.imwrite(p, index.astype(np.uint8), photometric="palette", colormap=cmap)
    add(p, "rgb", "paletted TIFF, RGB model (expanded to RGB)", "ok", None, "palette_seg.tif", (32, 48))
    p = rgb / "grey16-for-rgb-model.png"
    _png(p, _textured((30, 34), 12, np.uint16))
    add(
        p,
        "rgb",
        "16-bit grey PNG, RGB model (repeated into 3 channels by itself, with a note: issue 31)",
        "ok",
        None,
        "grey16-for-rgb-model_seg.png",
        (30, 34),
        rgb_hint=True,
    )

    # -- DICOM with two series: the largest is used, with a warning ----------------------------------
    mixed = grey / "mixed-series"
    _write_dicom_series(mixed, (3, 16, 16), "1.2.826.0.1.3680043.2.1125.1", "big", 13)
    _write_dicom_series(mixed, (2, 12, 12), "1.2.826.0.1.3680043.2.1125.2", "small", 14)
    add(
        mixed,
        "grey",
        "DICOM folder with mixed series",
        "ok",
        "2 DICOM series found",
        "mixed-series_seg.nii.gz",
        (3, 16, 16),
    )

    # -- names and folder walks ----------------------------------------------------------------------
    p = grey / "scan with spaces ü é 肺.png"
    _png(p, _textured((36, 30), 15))
    add(
        p,
        "grey",
        "file name with spaces and non-ASCII characters",
        "ok",
        None,
        "scan with spaces ü é 肺_seg.png",
        (36, 30),
    )
    p = grey / "nested" / "inner.png"
    _png(p, _textured((28, 28), 16))
    add(p, "grey", "real file beside a symlink loop", "ok", None, "nested/inner_seg.png", (28, 28))
    loop = grey / "nested" / "loop"
    os.symlink("..", loop)  # nested/loop -> grey: a cycle the walk must not follow forever
    entries.append(
        Entry(loop.relative_to(root).as_posix(), "grey", "symlink loop in an input folder", "ignored")
    )
    p = grey / "README.txt"
    p.write_text("not an image: the folder walk skips it\n", encoding="utf-8")
    add(p, "grey", "non-image file in the folder", "ignored")

    # -- headers that read but describe an unusable image --------------------------------------------
    p = grey / "nan-orientation.nii"
    _nifti_field(p, 280, "f", float("nan"))  # srow_x[0]: the direction matrix becomes NaN
    add(p, "grey", "NIfTI with NaN in its orientation (sform)", "failed", "non-finite values in sform")
    p = grey / "complex.nii"
    _nifti_field(p, 70, "h", 32)  # datatype complex64 (the int16 data reads as half as many complex)
    add(p, "grey", "complex-valued NIfTI", "failed", "complex pixels")

    # -- absurd declared sizes: refused from the header, before allocating ---------------------------
    huge_nifti(grey / "huge-header.nii")
    add(grey / "huge-header.nii", "grey", "NIfTI header declaring 10^12 voxels", "failed", "declares")
    huge_nrrd(grey / "huge-header.nrrd")
    add(grey / "huge-header.nrrd", "grey", "NRRD header declaring 10^12 voxels", "failed", "declares")
    huge_mha(grey / "huge-header.mha")
    add(grey / "huge-header.mha", "grey", "MHA header declaring 10^12 voxels", "failed", "declares")
    huge_tiff(grey / "huge-header.tif")
    add(grey / "huge-header.tif", "grey", "TIFF tags declaring 10^12 pixels", "failed", "declares")
    huge_nifti(grey / "liar-header.nii", (2000, 2000, 100))
    add(
        grey / "liar-header.nii",
        "grey",
        "NIfTI header declaring 4e8 voxels on a tiny file",
        "failed",
        "declares",
    )
    huge_nrrd(grey / "liar-header.nrrd", b"2000 2000 100")
    add(
        grey / "liar-header.nrrd",
        "grey",
        "NRRD header declaring 4e8 voxels on a tiny file",
        "failed",
        "declares",
    )
    huge_mha(grey / "liar-header.mha", b"2000 2000 100")
    add(
        grey / "liar-header.mha",
        "grey",
        "MHA header declaring 4e8 voxels on a tiny file",
        "failed",
        "declares",
    )
    huge_tiff(grey / "liar-header.tif", 20000, 20000)
    add(
        grey / "liar-header.tif",
        "grey",
        "TIFF tags declaring 4e8 pixels on a tiny file",
        "failed",
        "truncated",
    )

    (root / MANIFEST).write_text(
        json.dumps([asdict(e) for e in entries], indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return entries


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_corpus.py DEST_FOLDER", file=sys.stderr)
        return 2
    entries = make_corpus(argv[0])
    for e in entries:
        print(f"{e.status:8} {e.path}  ({e.what})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
