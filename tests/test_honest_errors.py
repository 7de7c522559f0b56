"""Honest errors and exit codes (issue 16): options checked before work, operating-system failures in the
user's words, SIGTERM like SIGINT, --skip-existing only when every output exists, evaluate's empty classes."""

from __future__ import annotations

import json
import math
import re
import resource
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.api import Segmenter
from segcli.evaluate import evaluate
from tests.conftest import REPO, run_cli


def _png(path: Path, seed: int = 0, h: int = 48, w: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("flags, first_words", [
    (["--threads", "0"], "segcli: error: --threads must be between 1 and 1024, not 0"),
    (["--threads", "100000"], "segcli: error: --threads must be between 1 and 1024, not 100000"),
    (["--size", "7"], "segcli: error: --size must be between 8 and 8192, not 7"),
    (["--patches", "-3"], "segcli: error: --patches must be >= 0, not -3"),
    (["--overlap", "-0.5"], "segcli: error: --overlap must be between 0 and 0.95, not -0.5"),
    (["--threshold", "nan"], "segcli: error: --threshold must be a finite number, not nan"),
    (["--threshold", "1.5"], "segcli: error: --threshold must be between 0 and 1, not 1.5"),
    (["--batch-size", "0"], "segcli: error: --batch-size must be between 1 and 4096, not 0"),
    (["--pad", "-1"], "segcli: error: --pad must be >= 0, not -1"),
    (["--prefetch", "-1"], "segcli: error: --prefetch must be between 0 and 64, not -1"),
    (["--workers", "0"], "segcli: error: --workers must be between 1 and 256, not 0"),
    (["--tile-size", "100"], "segcli: error: tile size must be a multiple of 16"),
    (["--max-memory", "lots"], "segcli: error: "),
    (["--backend", "tensorrt"], "segcli: error: --backend must be one of auto, torch, onnx"),
])
def test_numeric_options_are_checked_before_work(tmp_path, rgb_bundle, flags, first_words):
    a = _png(tmp_path / "a.png")
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "out", *flags)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith(first_words), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_stats_and_log_file_options(tmp_path, rgb_bundle):
    a = _png(tmp_path / "a.png")
    folder = tmp_path / "folder"
    folder.mkdir()
    r = run_cli("predict", a, "--model", rgb_bundle, "--stats", folder)
    assert r.returncode == 2 and r.stderr.startswith(f"segcli: error: --stats {folder} is a folder")
    r = run_cli("predict", a, "--model", rgb_bundle, "--log-file", folder)
    assert r.returncode == 2 and r.stderr.startswith(f"segcli: error: --log-file {folder} is a folder")
    # missing folders are created for every output option, as for -o
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "o" / "m.png",
                "--stats", tmp_path / "s" / "stats.csv", "--log-file", tmp_path / "l" / "run.log")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "stats.csv").is_file() and (tmp_path / "l" / "run.log").is_file()


def test_disk_full_is_one_line_naming_the_output(tmp_path, rgb_bundle):
    """A file-size limit (RLIMIT_FSIZE) makes every write fail as a full disk would: exit 1, no bug report."""
    a = _png(tmp_path / "a.png", h=256, w=256)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    out = tmp_path / "out" / "a_seg.png"
    r = subprocess.run([sys.executable, "-m", "segcli", "predict", str(a), "--model", str(rgb_bundle), "-o", str(out)],
                       capture_output=True, text=True, cwd=REPO, preexec_fn=limit, timeout=300)
    assert r.returncode == 1, r.stderr
    assert f"{out}: file too large" in r.stderr or f"{out}: cannot write" in r.stderr, r.stderr
    assert "this is a bug" not in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".partial-" in p.name]


@pytest.fixture
def small_mount(tmp_path):
    """A tiny tmpfs (root: mounted for real, as CI runs here); yields a function mounting it with options."""
    import os

    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            if os.environ.get("CI"):  # CI runs as root: there a skip would hide an untested error path
                pytest.fail("mounting a tmpfs needs root, and CI is expected to run as root")
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if r.returncode:
            if os.environ.get("CI"):
                pytest.fail(f"CI refuses mount, so these error paths went untested: {r.stderr.decode().strip()}")
            pytest.skip(f"this sandbox refuses mount: {r.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_file_system_is_the_users_situation(tmp_path, rgb_bundle, small_mount):
    ro = small_mount("ro,size=1m")
    a = _png(tmp_path / "a.png")
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", ro / "m.png")
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(f"failed  {ro / 'm.png'}: read-only file system"), r.stderr
    assert "this is a bug" not in r.stderr and "Traceback" not in r.stderr


def test_full_disk_is_the_users_situation(tmp_path, rgb_bundle, small_mount):
    full = small_mount("size=64k")
    (full / "filler").write_bytes(b"\0" * (60 << 10))
    a = _png(tmp_path / "a.png", h=512, w=512)
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", full / "m.png", "--probabilities")
    assert r.returncode == 1, r.stderr
    assert f"{full / 'm.png'}: " in r.stderr and "no space left" in r.stderr, r.stderr
    assert "this is a bug" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no partial files left behind


def test_long_output_name_does_not_fail_on_the_temporary_name(tmp_path, rgb_bundle):
    stem = "x" * (255 - len("_seg.png"))
    a = _png(tmp_path / (stem[:-4] + "abcd.png"))  # a 251-byte name; its mask name is 255 bytes, the limit
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "out" / "")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*_seg.png"))) == 1


def test_sigterm_is_handled_like_sigint(tmp_path, rgb_bundle):
    src = tmp_path / "in"
    for i in range(40):
        _png(src / f"img{i:02d}.png", seed=i, h=200, w=240)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(src), "-o", str(out), "--model",
                             str(rgb_bundle), "--lock"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_seg.png"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "segcli: terminated; rerun with --skip-existing to resume"
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
    assert not list(out.glob(".*.lock"))  # locks are removed with their outputs
    for f in out.glob("*_seg.png"):
        assert np.asarray(Image.open(f)).shape == (200, 240)


def test_skip_existing_needs_every_asked_output(tmp_path, rgb_bundle):
    a = _png(tmp_path / "a.png")
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "o" / "")
    assert r.returncode == 0
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "o" / "", "--skip-existing", "--probabilities",
                "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["summary"]["ok"] == 1  # the probabilities were missing
    assert (tmp_path / "o" / "a_seg_probs.tif").is_file()
    r = run_cli("predict", a, "--model", rgb_bundle, "-o", tmp_path / "o" / "", "--skip-existing", "--probabilities",
                "--json")
    assert json.loads(r.stdout)["summary"]["skipped"] == 1


def test_evaluate_leaves_classes_absent_from_both_out_of_the_mean(tmp_path):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    a = np.zeros((20, 20), np.uint8)
    a[2:8, 2:8] = 1  # class 1 only; class 2 absent from both
    b = np.zeros((20, 20), np.uint8)
    b[2:8, 2:8] = 1
    b[12:18, 12:18] = 2  # class 2 present in the ground truth, missed
    Image.fromarray(a).save(pred / "x.png")
    Image.fromarray(a).save(gt / "x.png")
    Image.fromarray(a).save(pred / "y.png")
    Image.fromarray(b).save(gt / "y.png")
    res = evaluate(pred, gt, classes=["background", "one", "two"], hd95=False)
    per_case = {c["case"]: c["metrics"] for c in res["cases"]}
    assert math.isnan(per_case["x"]["two"]["dice"])  # absent from both: no score
    assert res["mean"]["two"]["dice"] == 0.0 and res["mean"]["two"]["cases_scored"] == 1  # only y counts
    assert res["mean"]["one"]["dice"] == 1.0 and res["mean"]["all"]["dice"] == pytest.approx(0.5)


def test_exif_orientation_is_applied_and_reported(tmp_path, rgb_bundle):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    r = run_cli("predict", tmp_path / "phone.jpg", "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)["files"][0]
    assert f["shape"] == [60, 40] and any(w.startswith("EXIF orientation 6 applied") for w in f["warnings"])
    assert np.asarray(Image.open(tmp_path / "phone_seg.png")).shape == (60, 40)


def test_ignored_frames_and_series_are_named(tmp_path, rgb_bundle):
    import tifffile

    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (10, 120, 240)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with tifffile.TiffWriter(tmp_path / "two.ome.tif", ome=True) as tw:  # an OME-TIFF with two images
        tw.write(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8), photometric="rgb")
        tw.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    r = run_cli("predict", tmp_path / "anim.png", tmp_path / "two.ome.tif", "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    warn = {Path(f["input"]).name: f["warnings"] for f in json.loads(r.stdout)["files"]}
    assert "animated image: only the first of its 3 frames is segmented" in warn["anim.png"]
    assert any("only series 0 is segmented; 1 more series ignored" in w for w in warn["two.ome.tif"]), warn


def test_compressed_volume_over_budget_is_refused_from_its_header(tmp_path, grey_bundle):
    """A compressed NRRD is read whole: its size comes from the header and it is refused before decoding."""
    import SimpleITK as sitk

    # 131 MB of float32 decoded, 130 kB on disk: the NRRD written directly (SimpleITK's writer took 4 s to
    # compress it); SimpleITK reads its header below as it reads any NRRD
    gz, zero = zlib.compressobj(1, zlib.DEFLATED, 31), bytes(320 * 320 * 4)
    payload = b"".join(gz.compress(zero) for _ in range(320)) + gz.flush()
    (tmp_path / "v.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 320 320 320\n"
                                      b"spacings: 1 1 1\nencoding: gzip\nendian: little\n\n" + payload)
    head = sitk.ImageFileReader()
    head.SetFileName(str(tmp_path / "v.nrrd"))
    head.ReadImageInformation()
    assert head.GetSize() == (320, 320, 320)
    # The first use exports the networks to ONNX (torch loaded: the process's memory then holds it); the
    # memory plan counts what the process holds, so export here, as a user's earlier run would have.
    Segmenter(grey_bundle).warm_up("volume")
    cmd = [sys.executable, "-m", "segcli", "predict", str(tmp_path / "v.nrrd"), "--model", str(grey_bundle),
           "--max-memory", "300MB", "-o", str(tmp_path / "m.nrrd")]
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr  # the run's only file cannot fit: refused up front
    assert f"segcli: error: {tmp_path / 'v.nrrd'}: this 320x320x320 volume needs at least" in r.stderr
    assert "; --max-memory is 300.0 MB" in r.stderr
    peak_kb = int(next(line.split(":")[1] for line in r.stderr.splitlines() if "Maximum resident" in line))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(tmp_path / "tiny.nrrd"),
                    useCompression=True)  # a tiny volume refused by the plan itself: the same libraries loaded
    baseline = subprocess.run(["/usr/bin/time", "-v", *cmd[:4], str(tmp_path / "tiny.nrrd"), *cmd[5:8], "1MB",
                               *cmd[9:]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert baseline.returncode == 2 and "needs at least" in baseline.stderr, baseline.stderr
    base_kb = int(next(line.split(":")[1] for line in baseline.stderr.splitlines() if "Maximum resident" in line))
    assert peak_kb - base_kb < 40_000, (peak_kb, base_kb)  # the 131 MB of voxels were never decoded
    assert not (tmp_path / "m.nrrd").exists()


def test_read_ahead_files_share_the_budget(tmp_path, grey_bundle):
    """Files read ahead are held at once: a budget one such volume fits but three do not refuses each
    file, naming how many are held; --prefetch 0 holds one and fits."""
    import SimpleITK as sitk

    from segcli import memory

    shape = (96, 256, 256)  # compressed NRRD, read whole: 6 bytes per voxel of its own (float32 + masks)
    for i in range(2):
        sitk.WriteImage(sitk.GetImageFromArray(np.full(shape, i + 1, np.float32)), str(tmp_path / f"v{i}.nrrd"),
                        useCompression=True)
    args = ("predict", tmp_path / "v0.nrrd", tmp_path / "v1.nrrd", "--model", grey_bundle, "-o", tmp_path / "o")
    r = run_cli(*args, "--max-memory", "1MB")  # the CLI's own minimum (its interpreter, the networks at batch 1)
    minimum = float(re.search(r"needs at least ([0-9.]+) MB at batch 1", r.stderr).group(1)) * 10**6  # type: ignore[union-attr]
    own = memory.estimate_volume(shape, 1, 4, model_channels=1, n_classes=2, return_probs=False)
    budget = int(minimum + 2 * own) // 10**6  # one file's need < budget < three files' need
    args = (*args, "--max-memory", f"{budget}MB")
    r = run_cli(*args)
    assert r.returncode == 1 and "with 3 files held at once (--prefetch 0 holds one)" in r.stderr, r.stderr
    assert f"{tmp_path / 'v0.nrrd'}: this 96x256x256 volume needs at least" in r.stderr
    r = run_cli(*args, "--prefetch", "0")
    assert r.returncode == 0, r.stderr


def test_volume_mask_as_png_is_refused_before_work(tmp_path, grey_bundle):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 20, 20)).astype(np.float32)),
                    str(tmp_path / "v.nii.gz"))
    r = run_cli("predict", tmp_path / "v.nii.gz", "--model", grey_bundle, "-o", tmp_path / "m.png")
    assert r.returncode == 2
    assert r.stderr.startswith(f"segcli: error: {tmp_path / 'v.nii.gz'}: a volume's mask cannot be written as .png")


def test_a_backend_the_default_bundle_cannot_serve_fails_once(tmp_path, rgb_bundle):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(rgb_bundle, models / "rgb")
    (models / "index.json").write_text(json.dumps({"default": "rgb", "default_by_kind": {"2d": "rgb"}}))
    files = [_png(tmp_path / f"in{i}.png", seed=i) for i in range(3)]
    # With the ONNX cache off, --backend onnx has nothing to run for a bundle without an export.
    r = run_cli("predict", *files, "--backend", "onnx", "-o", tmp_path / "out",
                env={"SEGCLI_MODELS": str(models), "SEGCLI_ONNX_CACHE": "off"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("segcli: error: bundle ") and "has no ONNX export and none could be made" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_every_crop_filled_is_flagged(tmp_path):
    """A fine network that fills every crop from edge to edge is a wrong model or input: the report says so."""
    from segcli.api import Segmenter
    from segcli.runtimes import FunctionPredictor
    from tests.conftest import make_bundle

    img = np.full((200, 240, 3), 230, np.uint8)
    for y, x in [(20, 30), (120, 60), (60, 180), (150, 190)]:
        img[y : y + 12, x : x + 12] = 20
    Image.fromarray(img).save(tmp_path / "a.png")
    bundle = make_bundle(tmp_path / "b", in_channels=3, size=32, normalization={"kind": "dtype"})

    def dark(batch):
        p = (batch[:, :1] < 0.5).astype(np.float32)
        return np.concatenate([1 - p, p], axis=1)

    def everything(batch):
        return np.concatenate([np.zeros_like(batch[:, :1]), np.ones_like(batch[:, :1])], axis=1)

    for fine, flagged in ((dark, False), (everything, True)):
        seg = Segmenter(bundle, method="stts")
        b = seg.bundle_for("2d")
        seg.set_predictor(b, "coarse", FunctionPredictor(dark))
        seg.set_predictor(b, "fine", FunctionPredictor(fine))
        rep = seg.predict_file(tmp_path / "a.png", tmp_path / f"m{flagged}.png")
        assert rep.status == "ok" and rep.info["crops"] >= 3
        assert any("came out foreground from edge to edge" in w for w in rep.warnings) == flagged, rep.warnings
