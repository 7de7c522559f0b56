"""The CLI run as a user runs it: subprocesses, real files, exit codes, geometry kept."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image

from tests.conftest import REPO, make_bundle, run_cli
from tests.dicom import write_dicom_series


def write_volume(path: Path, shape=(12, 48, 40), spacing=(0.8, 0.9, 2.5), origin=(-10.0, 5.0, 30.0)) -> sitk.Image:
    rng = np.random.default_rng(1)
    arr = (rng.normal(-500, 50, shape)).astype(np.int16)
    arr[3:9, 10:30, 12:28] = 100  # a bright block
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    # An oblique, non-LPS direction (RAS-like, rotated) so reorientation really happens.
    c, s = np.cos(0.3), np.sin(0.3)
    d = np.array([[-c, -s, 0], [s, -c, 0], [0, 0, 1]])
    img.SetDirection(d.ravel().tolist())
    sitk.WriteImage(img, str(path))
    return img


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def png(path: Path, h=64, w=80, seed=0, rgb=False) -> Path:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    a[10:30, 20:50] = 220
    Image.fromarray(a).save(path)
    return path


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "predict" in r.stdout and "Exit codes" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("segcli ")
    r = subprocess.run([sys.executable, "-m", "segcli", "predict"], capture_output=True, encoding="utf-8", cwd=REPO)
    assert r.returncode == 2


@pytest.mark.parametrize("ext", [".nii.gz", ".mha", ".nrrd"])
def test_predict_volume_keeps_geometry(tmp_path, grey_bundle, ext):
    src = tmp_path / f"scan{ext}"
    ref = write_volume(src)
    r = run_cli("predict", src, "--model", grey_bundle, "--json")
    assert r.returncode == 0, r.stderr
    out = tmp_path / f"scan_seg{ext}"
    assert out.exists()
    mask = sitk.ReadImage(str(out))
    assert_same_geometry(ref, mask)
    assert mask.GetPixelID() == sitk.sitkUInt8
    rep = json.loads(r.stdout)
    f = rep["files"][0]
    assert f["status"] == "ok" and f["output"] == str(out) and f["volume_ml"] is not None
    assert set(f["seconds"]) >= {"read", "rough", "write", "total"}


def test_predict_dicom_folder_writes_nifti(tmp_path, grey_bundle):
    vol = sitk.GetImageFromArray((np.random.default_rng(0).normal(0, 100, (5, 32, 32))).astype(np.int16))
    vol.SetSpacing((0.7, 0.7, 2.0))
    vol.SetOrigin((-5.0, 7.0, 0.0))
    folder = tmp_path / "ct"
    write_dicom_series(folder, vol, "1.2.3.4")
    r = run_cli("predict", folder, "--model", grey_bundle)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ct_seg.nii.gz"
    assert out.exists()
    reader = sitk.ImageSeriesReader()
    ref = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(folder)))
    assert_same_geometry(ref, sitk.ReadImage(str(out)))


def test_predict_tiff_keeps_resolution(tmp_path, grey_bundle):
    a = np.random.default_rng(0).integers(0, 50, (96, 128), dtype=np.uint16)
    a[20:60, 30:90] = 900
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, a, resolution=(2000.0, 2000.0), resolutionunit="CENTIMETER")
    r = run_cli("predict", src, "--model", grey_bundle, "--method", "sliding")
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(tmp_path / "slide_seg.tif") as t:
        page = t.pages[0]
        assert page.shape == (96, 128) and page.dtype == np.uint8
        assert page.tags["XResolution"].value == (2000, 1) and page.tags["YResolution"].value == (2000, 1)
        assert int(page.tags["ResolutionUnit"].value) == 3


@pytest.mark.parametrize("method", ["stts", "refine", "direct", "sliding"])
def test_every_method_on_png(tmp_path, rgb_bundle, method):
    src = png(tmp_path / "photo.png", rgb=True)
    out = tmp_path / "masks" / f"{method}.png"
    r = run_cli("predict", src, "-o", out, "--model", rgb_bundle, "--method", method, "--json", "--patches", "2")
    assert r.returncode == 0, r.stderr
    m = np.asarray(Image.open(out))
    assert m.shape == (64, 80) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert json.loads(r.stdout)["files"][0]["method"] == method


def test_channel_mismatch_is_explicit(tmp_path, grey_bundle):
    src = png(tmp_path / "photo.png", rgb=True)
    r = run_cli("predict", src, "--model", grey_bundle)
    assert r.returncode == 1 and "--channels grey" in r.stderr and "photo.png" in r.stderr
    r = run_cli("predict", src, "--model", grey_bundle, "--channels", "grey")
    assert r.returncode == 0, r.stderr


def test_batch_with_one_corrupt_file(tmp_path, rgb_bundle):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(19):
        png(src / ("sub" if i % 2 else ".") / f"img{i:02d}.png", seed=i, rgb=True)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    out = tmp_path / "out"
    # a real process: its exit status, the JSON alone on its stdout, the error on its stderr
    r = run_cli("predict", src, "-o", out, "--model", rgb_bundle, "--json", process=True)
    assert r.returncode == 1
    assert "broken.png" in r.stderr
    masks = sorted(out.rglob("*_seg.png"))
    assert len(masks) == 19
    assert (out / "sub").is_dir()  # the folder layout is mirrored
    summary = json.loads(r.stdout)["summary"]
    assert summary["ok"] == 19 and summary["failed"] == 1
    assert not list(out.rglob("*partial*"))


def test_skip_existing_after_kill(tmp_path, rgb_bundle):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        png(src / f"img{i:02d}.png", h=200, w=240, seed=i, rgb=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(src), "-o", str(out), "--model",
                             str(rgb_bundle), "-q"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_seg.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*_seg.png")))
    assert 0 < done_before < 40
    r = run_cli("predict", src, "-o", out, "--model", rgb_bundle, "--skip-existing", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["skipped"] == done_before and s["ok"] == 40 - done_before
    finals = sorted(out.glob("*_seg.png"))
    assert len(finals) == 40
    for f in finals:
        assert np.asarray(Image.open(f)).shape == (200, 240)  # complete, decodable masks
    leftovers = [p for p in out.iterdir() if not p.name.endswith("_seg.png")]
    assert all(p.name.startswith(".") for p in leftovers)  # partial files never carry the final name


def test_errors_are_one_line_and_name_the_file(tmp_path, grey_bundle):
    missing = tmp_path / "nope.nii.gz"
    r = run_cli("predict", missing, "--model", grey_bundle)
    assert r.returncode == 1 and "nope.nii.gz" in r.stderr and "Traceback" not in r.stderr

    vol = tmp_path / "t.nii.gz"
    write_volume(vol)
    data = vol.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    r = run_cli("predict", trunc, "--model", grey_bundle)
    assert r.returncode == 1 and "trunc.nii.gz" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "trunc_seg.nii.gz").exists()

    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 8, 8), np.float32), isVector=False), str(four))
    r = run_cli("predict", four, "--model", grey_bundle)
    assert r.returncode == 1 and "4D" in r.stderr and "four.nii.gz" in r.stderr

    const = tmp_path / "const.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 16, 16), 7, np.int16)), str(const))
    r = run_cli("predict", const, "--model", grey_bundle)
    assert r.returncode == 0 and "constant" in r.stderr
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "const_seg.nii.gz"))).sum() == 0


def test_bad_bundle_version_is_a_clear_error(tmp_path):
    b = make_bundle(tmp_path / "b")
    cfg = json.loads((b / "segcli.json").read_text())
    cfg["schema_version"] = 99
    (b / "segcli.json").write_text(json.dumps(cfg))
    src = png(tmp_path / "x.png")
    r = run_cli("predict", src, "--model", b)
    assert r.returncode == 2 and "schema_version 99" in r.stderr and "Traceback" not in r.stderr


def test_info_and_models(tmp_path):
    vol = tmp_path / "v.nii.gz"
    write_volume(vol)
    r = run_cli("info", vol, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)[0]
    assert tuple(d["spacing"]) and "min" in json.dumps(d)
    r = run_cli("models")
    assert r.returncode == 0
    # each model's number says what it is: metric, how many held-out images, how measured (issue 20), and
    # whether those images also chose the checkpoint, with the command that reproduces it (issue 33)
    assert "Dice 0.829 on 180 kvasir-seg validation images (seed-0 split of the 900 shared; they also chose" in r.stdout
    assert "reproduce: python benchmarks/eval_split.py models/polyp /work/shared/data/kvasir-seg" in r.stdout


def test_probabilities_and_stdin_paths(tmp_path, grey_bundle):
    vol = tmp_path / "v.nii.gz"
    ref = write_volume(vol)
    p2 = png(tmp_path / "p.png")
    r = run_cli("predict", "-", "--model", grey_bundle, "--probabilities", "--json", stdin=f"{vol}\n{p2}\n")
    assert r.returncode == 0, r.stderr
    probs = sitk.ReadImage(str(tmp_path / "v_seg_probs.nii.gz"))
    assert probs.GetNumberOfComponentsPerPixel() == 2
    assert_same_geometry(ref, probs)
    arr = sitk.GetArrayFromImage(probs)
    np.testing.assert_allclose(arr.sum(-1), 1.0, atol=1e-4)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v_seg.nii.gz")))
    np.testing.assert_array_equal(mask, (arr[..., 1] > 0.5).astype(np.uint8))
    with tifffile.TiffFile(tmp_path / "p_seg_probs.tif") as t:
        a = t.asarray()
    assert a.shape == (2, 64, 80) and a.dtype == np.float32
    assert [f["status"] for f in json.loads(r.stdout)["files"]] == ["ok", "ok"]


@pytest.mark.parametrize("method", ["stts", "direct"])
def test_volume_sliced_along_a_non_first_axis(tmp_path, grey_bundle, method):
    """Spacing coarsest along x: slices are taken along x, and the mask still lands on the input grid."""
    src = tmp_path / "aniso.nii.gz"
    ref = write_volume(src, shape=(20, 24, 10), spacing=(3.0, 0.7, 0.7))
    r = run_cli("predict", src, "--model", grey_bundle, "--method", method, "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)["files"][0]
    assert f["info"]["slice_axis"] == 2
    assert_same_geometry(ref, sitk.ReadImage(str(tmp_path / "aniso_seg.nii.gz")))


def test_big_tiff_bounded_path_through_the_cli(tmp_path, grey_bundle):
    """Under a --max-memory too small for the whole image a TIFF goes through the lazy path: tiled BigTIFF out, pyramid, tags kept."""
    n = 3600  # in memory it brings ~194 MB of its own (segcli.memory.estimate_2d); read by region, ~140 MB
    a = np.random.default_rng(0).integers(0, 40, (n, n), dtype=np.uint8)
    a[300:420, 500:640] = 230
    src = tmp_path / "slide.tif"
    tifffile.imwrite(src, a, tile=(256, 256), compression="zlib", resolution=(40000.0, 40000.0),
                     resolutionunit="CENTIMETER")
    refused = run_cli("predict", src, "--model", grey_bundle, "--max-memory", "1MB")
    minimum = float(re.search(r"needs at least ([0-9.]+) MB at batch 1", refused.stderr).group(1))  # type: ignore[union-attr]
    budget = f"{minimum + 165:.0f}MB"  # the plan's minimum + less than the whole image's own buffers
    r = run_cli("predict", src, "--model", grey_bundle, "--max-memory", budget, "--pyramid", "--json",
                "--stats", tmp_path / "stats.csv", "--tile-size", "128")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["info"]["bounded_memory"]
    with tifffile.TiffFile(tmp_path / "slide_seg.tif") as t:
        page = t.pages[0]
        assert page.shape == (n, n) and page.is_tiled and page.dtype == np.uint8
        assert page.tags["XResolution"].value == (40000, 1)
        assert len(page.pages or page.subifds or []) >= 1  # pyramid levels
        mask = page.asarray()
    # --stats on the bounded path: gathered tile by tile, equal to the statistics of the whole mask
    from segcli.stats import label_stats

    row = next(csv.DictReader((tmp_path / "stats.csv").read_text().splitlines()))
    want = label_stats(mask, ["background", "object"], None)[0]
    assert int(row["voxels"]) == want["voxels"] and int(row["components"]) == want["components"]
    if want["bbox"]:
        assert list(map(int, row["bbox"].split())) == want["bbox"]
    r = run_cli("predict", src, "--model", grey_bundle, "--max-memory", budget, "--method", "direct",
                "-o", tmp_path / "d.tif")
    # the run's only file cannot fit in memory and --method direct has no bounded route: refused before any work
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"segcli: error: {src}: --method direct on this {n}x{n} image needs at least ")
    assert not (tmp_path / "d.tif").exists()


def test_a_run_builds_only_its_command_and_help_and_errors_read_the_same():
    """`segcli predict` builds the click command of predict alone (start-up); help, option errors and unknown
    commands answer as from the whole group."""
    from segcli import cli

    one = cli._command("predict")
    assert list(one.commands) == ["predict"] and one.name == "segcli"
    assert set(cli._command().commands) >= {"predict", "train", "evaluate", "models", "info", "doctor"}
    r = run_cli("predict", "--help")
    assert r.returncode == 0 and "Usage: segcli predict" in r.stdout and "--max-memory" in r.stdout
    r = run_cli("predict", "x.png", "--no-such-option")
    assert r.returncode == 2 and "No such option" in r.stderr
    r = run_cli("predikt", "x.png")
    assert r.returncode == 2 and "No such command 'predikt'" in r.stderr


def test_a_failure_line_keeps_the_brackets_of_a_file_name(tmp_path, grey_bundle):
    """stderr that is not a terminal gets plain lines (no rich): segcli's own colour tags go, the user's file name
    stays whole, "[red]" in it included (rich markup would have eaten it)."""
    bad = tmp_path / "scan[red]01.png"
    bad.write_bytes(b"not a png at all")
    good = png(tmp_path / "ok.png")
    r = run_cli("predict", str(bad), str(good), "-o", str(tmp_path / "out"), "--model", str(grey_bundle))
    assert r.returncode == 1
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("failed")]
    assert len(failed) == 1 and "scan[red]01.png" in failed[0], r.stderr
    assert any(ln.startswith("ok ") and "ok.png" in ln for ln in r.stderr.splitlines()), r.stderr
    assert "[/red]" not in r.stderr
