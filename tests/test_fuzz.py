"""Property-based fuzzing: box geometry invariants, and image readers that fail only with SegcliError.

Bounded (``max_examples``) and derandomised so the file runs in a few seconds and a failure replays
the same way every time; raise ``SEGCLI_FUZZ_EXAMPLES`` locally for a longer hunt.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from segcli.errors import SegcliError
from segcli.geometry import crop_boxes, patch_grid, scale_boxes, sliding_grid, square_pad_shift
from segcli.io import default_output_path, open_image, write_mask

SCALE = max(1, int(os.environ.get("SEGCLI_FUZZ_EXAMPLES", "1")))
FIXED = not os.environ.get("SEGCLI_FUZZ_RANDOM")  # set it to explore beyond the replayable examples


def _budget(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=FIXED, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


FAST = _budget(100)  # pure geometry
IO = _budget(40)  # each example writes and reads a file


# --- geometry ------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))


@st.composite
def image_and_boxes(draw, max_boxes: int = 6):
    """An image shape and boxes lying inside it, each at least 1 px on a side."""
    H, W = draw(shapes)
    boxes = []
    for _ in range(draw(st.integers(0, max_boxes))):
        y0 = draw(st.integers(0, H - 1))
        x0 = draw(st.integers(0, W - 1))
        y1 = draw(st.integers(y0 + 1, H))
        x1 = draw(st.integers(x0 + 1, W))
        boxes.append((y0, x0, y1, x1))
    return (H, W), np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def _inside(boxes: np.ndarray, shape: tuple[int, int]) -> bool:
    H, W = shape
    return bool(
        np.all(boxes[:, 0] >= 0)
        and np.all(boxes[:, 1] >= 0)
        and np.all(boxes[:, 2] <= H)
        and np.all(boxes[:, 3] <= W)
        and np.all(boxes[:, 2] > boxes[:, 0])
        and np.all(boxes[:, 3] > boxes[:, 1])
    )


def _covered(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    hit = np.zeros(shape, dtype=bool)
    for y0, x0, y1, x1 in boxes:
        hit[y0:y1, x0:x1] = True
    return hit


@FAST
@given(image_and_boxes(), st.integers(0, 64))
def test_square_pad_shift_clamped_stays_inside_and_contains_the_box(case, pad):
    shape, boxes = case
    out = square_pad_shift(boxes, shape, pad, clamp=True)
    assert out.shape == boxes.shape and out.dtype == np.int64
    assert _inside(out, shape)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + 2 * pad
    for b, o, s in zip(boxes, out, side, strict=True):
        # Never shrunk: the component's box stays inside its crop.
        assert o[0] <= b[0] and o[1] <= b[1] and o[2] >= b[2] and o[3] >= b[3]
        # Square unless the image is too small on that axis, where it is the whole axis.
        assert o[2] - o[0] == min(s, shape[0])
        assert o[3] - o[1] == min(s, shape[1])


@FAST
@given(image_and_boxes(), st.integers(0, 64))
def test_square_pad_shift_unclamped_is_always_square(case, pad):
    shape, boxes = case
    out = square_pad_shift(boxes, shape, pad, clamp=False)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + 2 * pad
    assert np.array_equal(out[:, 2] - out[:, 0], side)
    assert np.array_equal(out[:, 3] - out[:, 1], side)
    fits = (side <= shape[0]) & (side <= shape[1])
    assert _inside(out[fits], shape)  # a square that fits is shifted inside, not dropped


@st.composite
def coarse_and_full(draw):
    """A small binary mask and a full-resolution shape it is the rough pass of (same or coarser)."""
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    H = draw(st.integers(h, 8 * h))
    W = draw(st.integers(w, 8 * w))
    bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    return np.asarray(bits, dtype=bool).reshape(h, w), (H, W)


@FAST
@given(coarse_and_full())
def test_scale_boxes_cover_every_full_resolution_pixel(case):
    mask, full = case
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    boxes = np.stack([ys, xs, ys + 1, xs + 1], axis=1) if len(ys) else np.zeros((0, 4), np.int64)
    out = scale_boxes(boxes, mask.shape, full)
    if len(out):
        assert _inside(out, full)
    want = np.zeros(full, dtype=bool)
    for y, x in zip(ys, xs, strict=True):  # what each coarse pixel covers at full resolution
        want[
            int(y * full[0] / h) : int(np.ceil((y + 1) * full[0] / h)),
            int(x * full[1] / w) : int(np.ceil((x + 1) * full[1] / w)),
        ] = True
    assert not np.any(want & ~_covered(out, full))


@FAST
@given(coarse_and_full(), st.integers(0, 16), st.integers(1, 8), st.booleans())
def test_crop_boxes_are_inside_big_enough_and_cover_the_rough_mask(case, pad, min_side, clamp):
    mask, full = case
    out = crop_boxes(mask, full, pad, min_side=min_side, clamp=clamp)
    assert out.ndim == 2 and out.shape[1] == 4
    if len(out):
        assert _inside(out, full)
        assert np.all(out[:, 2] - out[:, 0] >= min_side) and np.all(out[:, 3] - out[:, 1] >= min_side)
    if not clamp:
        return
    # With min_side=1 nothing is dropped: every rough foreground pixel, scaled up, lies inside some
    # crop (no recall hole) ...
    every = crop_boxes(mask, full, pad, min_side=1, clamp=True)
    ys, xs = np.nonzero(mask)
    pixels = scale_boxes(np.stack([ys, xs, ys + 1, xs + 1], 1), mask.shape, full)
    assert not np.any(_covered(pixels, full) & ~_covered(every, full))
    # ... and min_side only drops the crops smaller than it (the paper's rule), nothing else.
    big = (every[:, 2] - every[:, 0] >= min_side) & (every[:, 3] - every[:, 1] >= min_side)
    assert np.array_equal(out, every[big])


@FAST
@given(shapes, st.one_of(st.integers(4, 128), st.tuples(st.integers(1, 128), st.integers(1, 128))))
def test_patch_grid_tiles_cover_every_pixel_inside(shape, patch):
    out = patch_grid(shape, patch)
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    assert _inside(out, shape)
    assert np.all(out[:, 2] - out[:, 0] == min(ph, shape[0]))
    assert np.all(out[:, 3] - out[:, 1] == min(pw, shape[1]))
    assert _covered(out, shape).all()
    assert len({tuple(b) for b in out}) == len(out)  # no duplicate patch


@FAST
@given(shapes, st.integers(4, 128), st.floats(0.0, 0.9))
def test_sliding_grid_tiles_cover_every_pixel_with_the_overlap(shape, tile, overlap):
    out = sliding_grid(shape, tile, overlap)
    assert _inside(out, shape)
    th, tw = min(tile, shape[0]), min(tile, shape[1])
    assert np.all(out[:, 2] - out[:, 0] == th) and np.all(out[:, 3] - out[:, 1] == tw)
    assert _covered(out, shape).all()
    for axis, t in ((0, th), (1, tw)):
        starts = np.unique(out[:, axis])
        if len(starts) > 1:  # neighbours share at least `overlap` of a tile (up to rounding)
            assert np.diff(starts).max() <= max(1.0, t * (1.0 - overlap)) + 1


# --- readers on valid files of random shapes and dtypes -------------------------------------------------


def _read(path: Path):
    """open_image, allowing only a clean one-line SegcliError naming the file.

    An image that reads must also take its mask back in its own geometry (a corrupt orientation that
    only failed at write time would cost a whole segmentation and then crash).
    """
    try:
        image = open_image(path)
    except SegcliError as exc:
        text = str(exc)
        assert "\n" not in text and str(path) in text, text
        return None
    out = default_output_path(path)
    write_mask(np.zeros(image.spatial_shape, np.uint8), image, out)
    assert out.is_file()
    out.unlink()
    return image


SITK_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64]


@IO
@given(
    st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]),
    st.sampled_from(SITK_DTYPES),
    st.lists(st.integers(1, 9), min_size=2, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_sitk_files_of_any_shape_and_dtype(ext, dtype, shape, seed):
    a = np.random.default_rng(seed).integers(0, 100, shape).astype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"img{ext}"
        sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
        img = _read(p)
        if min(shape[-2:]) < 2:
            assert img is None  # too small
            return
        assert img is not None
        assert img.spatial_shape == tuple(shape) and img.channels == 1
        np.testing.assert_array_equal(img.array[..., 0], a)  # identity direction: no reorientation


@IO
@given(
    st.sampled_from([np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_]),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.sampled_from([1, 3, 4]),
    st.sampled_from([None, "zlib", "lzw", "packbits"]),
    st.integers(0, 2**31 - 1),
)
def test_tiff_files_of_any_shape_and_dtype(dtype, shape, channels, compression, seed):
    if dtype == np.bool_ and channels > 1:
        reject()  # 1-bit TIFFs hold one sample per pixel: tifffile writes such an array as a page stack
    a = np.random.default_rng(seed).integers(0, 100, (*shape, channels)).astype(dtype)
    if channels == 1:
        a = a[..., 0]
    kwargs = {"photometric": "minisblack" if channels != 3 or dtype == np.bool_ else "rgb"}
    if channels == 4 and dtype != np.bool_:
        kwargs = {"photometric": "rgb", "extrasamples": ["unassalpha"]}
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "img.tif"
        try:
            tifffile.imwrite(p, a, compression=compression, **kwargs)
        except (ValueError, TypeError, NotImplementedError, KeyError):
            reject()  # tifffile refuses to write this combination: not a test case (too many fail a health check)
        img = _read(p)
        if min(shape) < 2:
            assert img is None  # too small to segment: refused with a one-line error
            return
        assert img is not None, f"a valid {dtype.__name__} TIFF of {a.shape} ({compression}) was refused"
        assert img.spatial_shape[:2] == shape[:2]
        assert img.array.size == a.size


@IO
@given(
    st.sampled_from(["L", "LA", "RGB", "RGBA", "I;16", "1", "P"]),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.sampled_from(["PNG", "BMP", "JPEG"]),
    st.integers(0, 2**31 - 1),
)
def test_pillow_files_of_any_mode(mode, shape, fmt, seed):
    rng = np.random.default_rng(seed)
    h, w = shape
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        base = Image.fromarray(rng.integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
        img = base.convert(mode)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"img.{fmt.lower()}"
        try:
            img.save(p, format=fmt)
        except (OSError, ValueError, KeyError):
            reject()  # e.g. JPEG cannot hold alpha: Pillow writes no file, so there is nothing to read
        loaded = _read(p)
        if min(shape) < 2:
            assert loaded is None
        else:
            assert loaded is not None and loaded.spatial_shape == shape


# --- readers on corrupted files ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def _seeds() -> dict[str, bytes]:
    """Valid small files, one per reader family, whose bytes the corruption tests mutate."""
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 200, (3, 6, 5)).astype(np.int16)
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            p = Path(tmp) / f"src{ext}"
            sitk.WriteImage(sitk.GetImageFromArray(vol), str(p), useCompression=ext != ".nii")
            out[ext] = p.read_bytes()
        p = Path(tmp) / "src.tif"
        tifffile.imwrite(p, vol[0].astype(np.uint8), compression="zlib", resolution=(72, 72))
        out[".tif"] = p.read_bytes()
        p = Path(tmp) / "raw.tif"
        tifffile.imwrite(p, vol[0].astype(np.uint16))
        out["raw.tif"] = p.read_bytes()
        p = Path(tmp) / "src.png"
        Image.fromarray(vol[0].astype(np.uint8)).save(p, dpi=(150, 150))
        out[".png"] = p.read_bytes()
    return out


FAMILIES = [".nii.gz", ".nii", ".nrrd", ".mha", ".tif", "raw.tif", ".png"]


@st.composite
def corruption(draw):
    """A seed file with a few bytes flipped (mostly in the header), a truncation, or both."""
    family = draw(st.sampled_from(FAMILIES))
    data = bytearray(_seeds()[family])
    for _ in range(draw(st.integers(0, 4))):
        # Headers are where parsers go wrong: aim most flips at the first 512 bytes.
        limit = draw(st.sampled_from([min(512, len(data)), len(data)]))
        pos = draw(st.integers(0, limit - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return family, bytes(data)


@settings(
    max_examples=300 * SCALE,
    deadline=None,
    derandomize=FIXED,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(corruption())
def test_corrupted_files_fail_only_with_a_clean_error(case):
    family, data = case
    name = "img.tif" if family == "raw.tif" else f"img{family}"
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_bytes(data)
        img = _read(p)
        if img is not None:  # survived the corruption: it must still be a usable image
            assert img.array.ndim in (3, 4) and min(img.spatial_shape) >= 1
            assert img.spacing is None or all(np.isfinite(s) and s > 0 for s in img.spacing)


# NIfTI-1 header fields (offset, struct format) that readers interpret, and values that break naive code.
NIFTI_FIELDS = (
    [(40 + 2 * i, "h") for i in range(8)]  # dim[0..7]
    + [(70, "h"), (72, "h"), (252, "h"), (254, "h")]  # datatype, bitpix, qform_code, sform_code
    + [(76 + 4 * i, "f") for i in range(8)]  # pixdim[0..7]
    + [(108, "f"), (112, "f"), (116, "f")]  # vox_offset, scl_slope, scl_inter
    + [(256 + 4 * i, "f") for i in range(18)]  # quatern b/c/d, qoffset x/y/z, srow_x/y/z
)
SPECIAL_FLOATS = [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, 1e-38, 2.0**31]
SPECIAL_SHORTS = [0, -1, 1, 2, 3, 4, 7, 8, 32767, -32768]


@st.composite
def nifti_field_edits(draw):
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        offset, fmt = draw(st.sampled_from(NIFTI_FIELDS))
        value = draw(st.sampled_from(SPECIAL_FLOATS if fmt == "f" else SPECIAL_SHORTS))
        edits.append((offset, fmt, value))
    return edits


@IO
@given(nifti_field_edits(), st.booleans())
def test_nifti_header_fields_with_absurd_values(edits, compressed):
    import gzip
    import struct

    raw = bytearray(gzip.decompress(_seeds()[".nii.gz"]))
    for offset, fmt, value in edits:
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / ("img.nii.gz" if compressed else "img.nii")
        p.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
        img = _read(p)
        if img is not None:
            assert img.array.size > 0 and img.array.dtype.kind in "biuf"


TEXT_VALUES = ["0", "-1", "nan", "inf", "1e30", "99999999999", "", "abc", "1 2", "(0,0,0)"]


@IO
@given(st.sampled_from([".mha", ".nrrd"]), st.data())
def test_text_header_values_with_absurd_values(ext, data):
    seed = _seeds()[ext]
    split = seed.index(b"\n\n") + 1 if ext == ".nrrd" else seed.index(b"ElementDataFile")
    lines = seed[:split].split(b"\n")
    i = data.draw(st.integers(1 if ext == ".nrrd" else 0, len(lines) - 2))  # keep the NRRD magic line
    sep = b":" if ext == ".nrrd" else b"="
    if sep in lines[i]:
        key, _, value = lines[i].partition(sep)
        tokens = value.split() or [b""]
        k = data.draw(st.integers(0, len(tokens) - 1))
        tokens[k] = data.draw(st.sampled_from(TEXT_VALUES)).encode()
        lines[i] = key + sep + b" " + b" ".join(tokens)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"img{ext}"
        p.write_bytes(b"\n".join(lines) + seed[split:])
        img = _read(p)
        if img is not None:
            assert img.array.size > 0 and img.array.dtype.kind in "biuf"


def _nifti_with(tmp: Path, offset: int, fmt: str, value) -> Path:
    import struct

    p = tmp / "img.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), str(p))
    raw = bytearray(p.read_bytes())
    raw[offset : offset + struct.calcsize(fmt)] = struct.pack("<" + fmt, value)
    p.write_bytes(bytes(raw))
    return p


def _mha_with(tmp: Path, old: bytes, new: bytes, *more: tuple[bytes, bytes]) -> Path:
    p = tmp / "img.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)), str(p))
    data = p.read_bytes()
    for a, b in ((old, new), *more):
        assert a in data, a
        data = data.replace(a, b, 1)
    p.write_bytes(data)
    return p


def _tiff_with_description(tmp: Path, old: bytes, new: bytes) -> Path:
    p = tmp / "img.tif"
    tifffile.imwrite(p, np.arange(30, dtype=np.uint8).reshape(6, 5))  # writes {"shape": [6, 5]}
    p.write_bytes(p.read_bytes().replace(old, new, 1))
    return p


# Crashes the fuzzers found (all fixed in segcli.io), kept as fixed regressions.
REGRESSIONS = {
    "nifti vox_offset NaN (int(nan) in the truncation check)": (
        lambda t: _nifti_with(t, 108, "f", float("nan")),
        None,
    ),
    "nifti complex64 datatype": (lambda t: _nifti_with(t, 70, "h", 32), "complex pixels"),
    "mha DimSize with a zero axis (a 0-voxel volume was returned)": (
        lambda t: _mha_with(t, b"DimSize = 5 4 3", b"DimSize = 5 4 0"),
        "no voxels",
    ),
    "nifti NaN in the sform (reads, then the mask write crashed in to_original_axes)": (
        lambda t: _nifti_with(t, 280, "f", float("nan")),
        "non-finite values in sform",
    ),
    "compressed mha whose data file name holds a NUL (ValueError in segcli's own pre-check)": (
        lambda t: _mha_with(
            t, b"CompressedData = False", b"CompressedData = True", (b"= LOCAL", b"= a\x00b.zraw")
        ),
        None,
    ),
    "tiff corrupt shaped description (tifffile ValueError)": (
        lambda t: _tiff_with_description(t, b"[6, 5]", b"[6, x]"),
        None,
    ),
    "tiff shaped description with a zero (tifffile ZeroDivisionError)": (
        lambda t: _tiff_with_description(t, b"[6, 5]", b"[0, 5]"),
        None,
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_fuzz_regressions(case, tmp_path):
    make, message = REGRESSIONS[case]
    path = make(tmp_path)
    img = _read(path)
    if message is not None:
        assert img is None
        with pytest.raises(SegcliError, match=message):
            open_image(path)


def test_unusable_geometry_is_refused_at_read_time(tmp_path):
    """The second line of defence behind the header checks: any reader's NaN/singular geometry."""
    from segcli.io.medical import check_geometry

    p = tmp_path / "x.nii"
    check_geometry((1.0, 0.5, 2.0), (0, 1, 0, 1, 0, 0, 0, 0, -1), p)  # a signed permutation is fine
    for spacing, direction in [
        ((1.0, float("nan"), 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
        ((1.0, 0.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
        ((1.0, 1.0, 1.0), (float("nan"), 0, 0, 0, 1, 0, 0, 0, 1)),
        ((1.0, 1.0, 1.0), (1, 0, 0, 1, 0, 0, 0, 0, 1)),  # singular
        ((1.0, 1.0), (float("inf"), 0, 0, 1)),
    ]:
        with pytest.raises(SegcliError, match="invalid"):
            check_geometry(spacing, direction, p)


def test_headers_that_crash_or_hang_itk_are_refused_first(tmp_path):
    """Found by the fuzzers: ITK segfaults on ``NDims = 1e30``, spins for ever on an sform holding inf,
    and loops for ever on a compressed MHA whose zlib header asks for a preset dictionary. Run in a
    child process with a timeout, so a regression fails instead of killing or hanging the session."""
    import subprocess
    import sys

    mha = _mha_with(tmp_path, b"NDims = 3", b"NDims = 1e30")
    dict_mha = tmp_path / "dict.mha"  # compressed; zlib header "x^" -> "x ": FDICT set, FCHECK still valid
    sitk.WriteImage(
        sitk.GetImageFromArray(np.arange(90, dtype=np.int16).reshape(3, 6, 5)), str(dict_mha), True
    )
    data = dict_mha.read_bytes()
    start = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    assert data[start : start + 2] == b"x^"
    dict_mha.write_bytes(data[: start + 1] + b" " + data[start + 2 :])
    nii = _nifti_with(tmp_path, 300, "f", float("inf"))  # srow_y[1] = inf ...
    raw = bytearray(nii.read_bytes())
    raw[296:300] = np.float32(1e-38).tobytes()  # ... with srow_y[0] = 1e-38: ITK 5.4 never returns
    nii.write_bytes(bytes(raw))
    code = (
        "import sys\n"
        "from segcli.io import open_image\n"
        "from segcli.errors import SegcliError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        open_image(p)\n"
        "        print('read', p)\n"
        "    except SegcliError as e:\n"
        "        print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(mha), str(nii), str(dict_mha)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "corrupt MetaImage header: NDims" in lines[0] and str(mha) in lines[0]
    assert "corrupt NIfTI header: non-finite values in sform" in lines[1] and str(nii) in lines[1]
    assert "preset dictionary" in lines[2] and str(dict_mha) in lines[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_truncation_point_of_a_header(family, tmp_path):
    """Deterministic sweep: every cut inside the first 400 bytes gives an image or a clean error."""
    data = _seeds()[family]
    name = "img.tif" if family == "raw.tif" else f"img{family}"
    for cut in range(0, min(400, len(data)), 7):
        p = tmp_path / f"{cut}-{name}"
        p.write_bytes(data[:cut])
        _read(p)
