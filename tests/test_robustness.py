"""Bad inputs, run as a user runs them: one `segcli predict` per corpus folder, judged from `--json`.

The corpus (``tests/bad_inputs/make_corpus.py``) is generated into a temporary folder; its manifest
says, per entry, whether segcli must fail (one line naming the file, exit 1, no mask), succeed, or
give an empty mask with a warning. CLI subprocesses are few and batched: torch import dominates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from segcli.errors import InputError
from segcli.io import open_image, write_mask
from segcli.io.atomic import atomic_path
from tests.bad_inputs.make_corpus import Entry, huge_mha, huge_nifti, huge_nrrd, huge_tiff, make_corpus
from tests.conftest import REPO, run_cli

# The issue's list: the corpus must hold at least one entry for each of these.
REQUIRED = (
    "truncated .nii.gz",
    "truncated .tif",
    "zero-byte",
    "wrong extension, valid content",
    "garbage content",
    "4D NIfTI",
    "1x1",
    "100000x3",
    "all-NaN",
    "all-constant",
    "RGBA PNG",
    "16-bit PNG",
    "paletted TIFF",
    "mixed series",
    "symlink loop",
    "spaces and non-ASCII",
    "NIfTI header declaring 10^12",
    "NRRD header declaring 10^12",
    "MHA header declaring 10^12",
    "TIFF tags declaring 10^12",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Entry]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def _predict(*args: object, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    r = run_cli("predict", *args, "--json", env=env)
    assert r.returncode in (0, 1), r.stderr  # never a usage error (2) or a bug (3)
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    return r, json.loads(r.stdout)


@pytest.fixture(scope="module")
def grey_run(corpus, grey_bundle, tmp_path_factory):
    """The grey folder in the C locale: non-ASCII names must survive a non-UTF-8 environment."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("out-grey")
    r, summary = _predict(root / "grey", "-o", out, "--model", grey_bundle, env={"LC_ALL": "C", "LANG": "C"})
    return r, summary, out


@pytest.fixture(scope="module")
def rgb_run(corpus, rgb_bundle, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("out-rgb")
    r, summary = _predict(root / "rgb", "-o", out, "--model", rgb_bundle)
    return r, summary, out


def _entries(corpus, group: str) -> list[Entry]:
    return [e for e in corpus[1] if e.group == group]


def _by_input(summary: dict) -> dict[str, dict]:
    return {f["input"]: f for f in summary["files"]}


def _all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def _decode(path: Path) -> np.ndarray:
    """A written mask, decoded by a reader independent of segcli's."""
    name = path.name.lower()
    if name.endswith((".png", ".bmp")):
        return np.asarray(Image.open(path))
    if name.endswith((".tif", ".tiff")):
        return tifffile.imread(path)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- the corpus itself --------------------------------------------------------------------------------


def test_corpus_covers_the_issue_list(corpus):
    root, entries = corpus
    text = " | ".join(e.what for e in entries)
    missing = [item for item in REQUIRED if item not in text]
    assert not missing, missing
    assert len(entries) >= 30
    for e in entries:  # every entry exists on disk (a symlink loop counts as existing)
        assert (root / e.path).exists() or (root / e.path).is_symlink(), e.path
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    assert [m["path"] for m in manifest] == [e.path for e in entries]


@pytest.mark.parametrize("group", ["grey", "rgb"])
def test_every_corpus_entry_was_tried_once(corpus, grey_run, rgb_run, group):
    root, _ = corpus
    r, summary, _ = grey_run if group == "grey" else rgb_run
    tried = [Path(f["input"]) for f in summary["files"]]
    expected = [root / e.path for e in _entries(corpus, group) if e.attempted]
    # Same set, each once: the symlink loop neither hangs the walk nor duplicates a file.
    assert sorted(map(str, tried)) == sorted(map(str, expected))
    assert summary["summary"]["total"] == len(expected)
    n_failed = sum(e.status == "failed" for e in _entries(corpus, group))
    assert summary["summary"]["failed"] == n_failed
    assert r.returncode == (1 if n_failed else 0)


@pytest.mark.parametrize("group", ["grey", "rgb"])
def test_bad_inputs_fail_with_one_line_naming_the_file_and_leave_no_mask(corpus, grey_run, rgb_run, group):
    root, _ = corpus
    r, summary, out = grey_run if group == "grey" else rgb_run
    reports = _by_input(summary)
    written = [p.name for p in _all_files(out)]
    for e in _entries(corpus, group):
        if e.status != "failed":
            continue
        src = root / e.path
        rep = reports[str(src)]
        assert rep["status"] == "failed", (e.path, rep)
        error = rep["error"]
        assert "\n" not in error and str(src) in error, (e.path, error)
        assert e.message in error, (e.path, error)
        assert "internal error" not in error
        assert f"  {error}" in r.stderr.splitlines()  # the end-of-batch list repeats it, one line
        stem = src.name.split(".")[0]
        assert not [n for n in written if n.startswith(f"{stem}_seg")], (e.path, written)
        assert not (src.parent / f"{stem}_seg").exists()
    # Nothing half-written anywhere: no partial files, no hidden leftovers.
    assert not [n for n in written if n.startswith(".")], written


@pytest.mark.parametrize("group", ["grey", "rgb"])
def test_good_and_empty_inputs_give_a_decodable_mask_of_the_right_shape(corpus, grey_run, rgb_run, group):
    root, _ = corpus
    r, summary, out = grey_run if group == "grey" else rgb_run
    reports = _by_input(summary)
    for e in _entries(corpus, group):
        if e.status not in ("ok", "empty"):
            continue
        rep = reports[str(root / e.path)]
        assert rep["status"] == e.status, (e.path, rep)
        mask_path = out / e.output
        assert rep["output"] == str(mask_path)
        mask = _decode(mask_path)
        assert mask.shape == tuple(e.shape) and mask.dtype == np.uint8, e.path
        if e.status == "empty":
            assert not mask.any()
        if e.message:
            assert any(e.message in w for w in rep["warnings"]), (e.path, rep["warnings"])
            assert f"warning {root / e.path}: " in r.stderr
    # Warnings are printed once per input, not with the path twice.
    assert not [ln for ln in r.stderr.splitlines() if ln.count(str(root)) > 1 and "->" not in ln]


def test_info_on_the_corpus_gives_one_line_errors_and_valid_json(corpus):
    root, entries = corpus
    tried = [e for e in entries if e.attempted]
    r = run_cli("info", *(root / e.path for e in tried), "--json")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert all(ln.startswith("segcli: error: ") for ln in lines), r.stderr  # nothing but our one-liners
    described = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    # Channel mismatches and all-NaN pixels are readable images, refused later for segmentation.
    failed = [
        e for e in tried if e.status == "failed" and not e.message.startswith(("--channels", "no finite"))
    ]
    assert len(lines) == len(failed) and len(described) == len(tried) - len(failed)
    for e in failed:
        assert any(str(root / e.path) in ln and e.message in ln for ln in lines), e.path


def test_following_the_channel_hint_succeeds_and_empty_exits_zero(corpus, rgb_bundle, tmp_path):
    """With --channels rgb the hinted failures succeed; the constant image stays a warning: exit 0."""
    root, entries = corpus
    group = _entries(corpus, "rgb")
    assert sum(e.rgb_hint for e in group) >= 2 and any(e.status == "empty" for e in group)
    r, summary = _predict(root / "rgb", "-o", tmp_path, "--model", rgb_bundle, "--channels", "rgb")
    assert r.returncode == 0, r.stderr
    reports = _by_input(summary)
    for e in group:
        rep = reports[str(root / e.path)]
        assert rep["status"] == ("empty" if e.status == "empty" else "ok"), (e.path, rep)
        assert rep["output"] == str(tmp_path / e.output)
        assert _decode(tmp_path / e.output).shape == tuple(e.shape)
    assert "warning" in r.stderr and "image is constant" in r.stderr


def test_uniform_colour_image_is_empty_not_segmented(rgb_bundle):
    from segcli.api import Segmenter
    from segcli.errors import EmptyImageError

    seg = Segmenter(rgb_bundle)
    with pytest.raises(EmptyImageError):
        seg.segment_array(np.full((24, 28, 3), (10, 200, 30), np.uint8))


# --- absurd headers: refused from the header, before any pixel is read -------------------------------


@pytest.mark.parametrize(
    "make, name",
    [(huge_nifti, "h.nii"), (huge_nrrd, "h.nrrd"), (huge_mha, "h.mha"), (huge_tiff, "h.tif")],
)
def test_absurd_declared_size_is_refused_before_reading_pixels(tmp_path, monkeypatch, make, name):
    path = tmp_path / name
    make(path)
    assert path.stat().st_size < 2000

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixel data was read for an absurd header")

    # The pixel readers must never be reached: the check works from the header alone.
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_pixels)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_pixels)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    with pytest.raises(InputError) as info:
        open_image(path)
    assert "declares" in str(info.value) and str(path) in str(info.value)


# --- atomic outputs ----------------------------------------------------------------------------------


def _like(tmp_path: Path, kind: str):
    if kind == "volume":
        sitk.WriteImage(
            sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)),
            str(tmp_path / "in.nii.gz"),
        )
        return open_image(tmp_path / "in.nii.gz"), (3, 4, 5)
    Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5)).save(tmp_path / "in.png")
    return open_image(tmp_path / "in.png"), (4, 5)


WRITERS = [
    ("volume", "m.nii.gz", sitk, "WriteImage"),
    ("volume", "m.nrrd", sitk, "WriteImage"),
    ("volume", "m.mha", sitk, "WriteImage"),
    ("volume", "m.tif", tifffile, "imwrite"),
    ("2d", "m.png", Image.Image, "save"),
    ("2d", "m.bmp", Image.Image, "save"),
]


@pytest.mark.parametrize("kind, name, module, attr", WRITERS)
def test_partial_files_never_carry_the_final_name(tmp_path, monkeypatch, kind, name, module, attr):
    like, shape = _like(tmp_path, kind)
    final = tmp_path / "out" / name
    final.parent.mkdir()
    final.write_bytes(b"previous mask")  # an older result that a failed write must not damage
    real = getattr(module, attr)
    seen: list[tuple[str, bool]] = []

    def spy(*args, **kwargs):
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)))
        seen.append((Path(target).name, final.read_bytes() == b"previous mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, attr, spy)
    write_mask(np.ones(shape, np.uint8), like, final)
    ((written, untouched),) = seen
    assert written != final.name and written.startswith(".") and ".partial-" in written
    assert written.endswith(name.split(".", 1)[1])  # the writer still sees the real extension
    assert untouched  # while writing, the final name still held the old file
    assert _decode(final).shape == shape
    assert sorted(p.name for p in final.parent.iterdir()) == [name]

    def dies_halfway(*args, **kwargs):
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)))
        Path(target).write_bytes(b"half a mask")
        raise OSError("disk full")

    monkeypatch.setattr(module, attr, dies_halfway)
    with pytest.raises(Exception):  # noqa: B017 - the writer's error, as whichever type io maps it to
        write_mask(np.zeros(shape, np.uint8), like, final)
    assert sorted(p.name for p in final.parent.iterdir()) == [name]  # no partial file left behind
    assert _decode(final).shape == shape and _decode(final).all()  # the previous good mask survives


def test_mhd_header_and_data_appear_together(tmp_path):
    like, shape = _like(tmp_path, "volume")
    final = tmp_path / "out" / "m.mhd"
    write_mask(np.ones(shape, np.uint8), like, final)
    names = sorted(p.name for p in final.parent.iterdir())
    assert names in (["m.mhd", "m.raw"], ["m.mhd", "m.zraw"]), names  # no hidden staging folder left
    assert _decode(final).shape == shape


def test_concurrent_partial_names_differ(tmp_path):
    final = tmp_path / "mask.png"
    with atomic_path(final) as a, atomic_path(final) as b:
        assert a != b and a.parent == b.parent == tmp_path and final.name not in (a.name, b.name)
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert final.read_bytes() in (b"a", b"b")
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_two_processes_writing_the_same_output_folder(tmp_path, grey_bundle):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(3)
    shapes = {}
    for i in range(20):
        h, w = 20 + i, 40 - i
        a = rng.integers(0, 60, (h, w), dtype=np.uint8)
        a[h // 4 : h // 2, w // 4 : w // 2] = 220
        Image.fromarray(a).save(src / f"img{i:02d}.png")
        shapes[f"img{i:02d}_seg.png"] = (h, w)
    # One thread and the single-pass method each: the point is the shared folder, not the compute.
    cmd = [
        sys.executable,
        "-m",
        "segcli",
        "predict",
        str(src),
        "-o",
        str(out),
        "--model",
        str(grey_bundle),
        "--json",
        "--method",
        "direct",
        "--threads",
        "1",
    ]
    env = {**os.environ, "NO_COLOR": "1"}
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert json.loads(stdout)["summary"]["ok"] == 20
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(shapes), names  # no partial or temporary file left, under any name
    for name, shape in shapes.items():
        mask = np.asarray(Image.open(out / name))
        assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


def test_metaimage_data_file_outside_its_folder_is_refused(tmp_path):
    """An untrusted .mhd header must not make segcli read an arbitrary file as pixels."""
    from segcli.errors import InputError
    from segcli.io import open_image

    for name, target in (("abs.mhd", "/etc/passwd"), ("up.mhd", "../../etc/passwd")):
        p = tmp_path / name
        p.write_text(f"ObjectType = Image\nNDims = 2\nDimSize = 10 10\nElementType = MET_UCHAR\nElementDataFile = {target}\n")
        with pytest.raises(InputError, match="outside the header's folder"):
            open_image(p)
