"""Issue 31's red-team list, each example through the CLI: exit code, the first words of the message, inputs
unchanged. Tiny random bundles (conftest) keep every run to a second or two."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_bundle, run_cli


def _png(path: Path, seed: int = 0, shape=(40, 48, 3)) -> Path:
    a = np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _nifti(path: Path, shape=(5, 24, 24)) -> Path:
    import SimpleITK as sitk

    vol = np.full(shape, -1000, np.int16)
    vol[:, 6:18, 6:18] = 40
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(path))
    return path


def _predict(*args, env=None, stdin=None):
    return run_cli("predict", *args, "--threads", "1", env=env, stdin=stdin, timeout=120)


def test_non_utf8_file_name(rgb_bundle: Path, tmp_path: Path) -> None:
    src = _png(tmp_path / "x.png")
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    os.rename(src, odd)
    r = _predict(tmp_path, "-o", tmp_path / "out", "--model", rgb_bundle)
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr
    assert os.listdir(os.fsencode(tmp_path / "out")) == [b"caf\xe9_seg.png"]


def test_fifo_input_is_refused_not_waited_on(rgb_bundle: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "stream.png"
    os.mkfifo(fifo)
    r = _predict(fifo, "-o", tmp_path / "m.png", "--model", rgb_bundle)
    assert r.returncode == 1
    assert r.stderr.startswith("failed") and "stream.png: is a FIFO (named pipe), not a regular file" in r.stderr


def test_stdin_line_naming_a_folder_is_walked(rgb_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    _png(folder / "a.png", 1)
    _png(folder / "b.png", 2)
    r = _predict("-", "-o", tmp_path / "out", "--model", rgb_bundle, "--json", stdin=f"{folder}\n")
    assert r.returncode == 0, r.stderr
    assert sorted(Path(f["input"]).name for f in json.loads(r.stdout)["files"]) == ["a.png", "b.png"]


def test_output_folder_is_the_input_folder(rgb_bundle: Path, tmp_path: Path) -> None:
    src = _png(tmp_path / "a.png")
    before = _digest(src)
    r = _predict(tmp_path, "-o", tmp_path, "--model", rgb_bundle)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a_seg.png").is_file() and _digest(src) == before
    again = _predict(tmp_path, "-o", tmp_path, "--model", rgb_bundle, "--skip-existing")
    assert again.returncode == 0 and "skipped" in again.stderr


def test_folder_of_one_file_to_an_existing_file(rgb_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _png(folder / "a.png")
    existing = _png(tmp_path / "existing.png", 5)
    before = _digest(existing)
    r = _predict(folder, "-o", existing, "--model", rgb_bundle)
    assert r.returncode == 2
    assert "error: -o" in r.stderr and "is an existing file but the input is a folder" in r.stderr
    assert _digest(existing) == before


@pytest.mark.parametrize(("env", "words"), [
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not"),
    ({"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9", "SGE_TASK_STEPSIZE": "0"},
     "SGE_TASK_STEPSIZE=0"),
    ({"SGE_TASK_ID": "2", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9", "SGE_TASK_STEPSIZE": "2"},
     "SGE_TASK_ID=2 is not on the array's grid 1-9:2"),
])
def test_job_array_variables_that_cannot_shard(rgb_bundle: Path, tmp_path: Path, env, words) -> None:
    assert not any(k.startswith(("SLURM_ARRAY", "SGE_TASK")) for k in os.environ), "run outside a job array"
    _png(tmp_path / "a.png")
    r = _predict(tmp_path / "a.png", "-o", tmp_path / "m.png", "--model", rgb_bundle, env=env)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr
    assert not (tmp_path / "m.png").exists()


def test_sge_grid_task_gets_its_shard() -> None:
    from segcli.shard import shard_from_env

    env = {"SGE_TASK_ID": "5", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9", "SGE_TASK_STEPSIZE": "2"}
    assert shard_from_env(env) == ("2/5", "SGE_TASK_ID")


def test_merge_summaries_wrong_shape(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"files": "x", "summary": {}}))
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    for p, words in ((bad, '"files" is not a list of objects'), (lst, "the top level is a JSON list")):
        r = run_cli("merge-summaries", p)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("segcli: error:") and words in r.stderr


def test_bundle_param_of_wrong_type_is_one_refusal(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "bad", in_channels=3, normalization={"kind": "dtype"})
    cfg = b / "segcli.json"
    raw = json.loads(cfg.read_text())
    raw["params"] = {"threshold": "high"}
    cfg.write_text(json.dumps(raw))
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    r = _predict(*(tmp_path / f"{i}.png" for i in range(3)), "-o", tmp_path / "out", "--model", b)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "params.threshold must be a number, not 'high'" in r.stderr


def test_geojson_on_a_volume_refused(grey_bundle: Path, tmp_path: Path) -> None:
    vol = _nifti(tmp_path / "ct.nii.gz")
    r = _predict(vol, "--geojson", "-o", tmp_path / "out.nii.gz", "--model", grey_bundle)
    assert r.returncode == 2 and "--geojson writes polygons for 2D images" in r.stderr
    assert not (tmp_path / "out.nii.gz").exists()


def test_dicom_seg_needs_a_dcm_name(grey_bundle: Path, tmp_path: Path) -> None:
    from tests.dicom import regular_series

    vol = tmp_path / "series"
    regular_series(vol)
    r = _predict(vol, "--output-type", "dicom-seg", "-o", tmp_path / "x.nii.gz", "--model", grey_bundle)
    assert r.returncode == 2 and "a DICOM SEG is written as NAME.dcm" in r.stderr
    assert not (tmp_path / "x.dcm").exists()


def test_volume_probabilities_into_a_new_folder(grey_bundle: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    vol = _nifti(tmp_path / "ct.nii.gz")
    out = tmp_path / "new" / "deeper" / "mask.nii.gz"
    r = _predict(vol, "--probabilities", "-o", out, "--model", grey_bundle)
    assert r.returncode == 0, r.stderr
    probs = sitk.ReadImage(str(out.with_name("mask_probs.nii.gz")))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out))).shape == (5, 24, 24)
    assert probs.GetSize()[:3] == (24, 24, 5)
    assert not list(out.parent.glob(".segcli-probs-*"))


def test_quiet_keeps_a_missing_input_visible(rgb_bundle: Path, tmp_path: Path) -> None:
    r = _predict(tmp_path / "nope.png", "-o", tmp_path / "m.png", "--model", rgb_bundle, "-q")
    assert r.returncode == 1 and "nope.png" in r.stderr


@pytest.mark.parametrize(("sig", "code", "word"), [("INT", 130, "interrupted"), ("TERM", 143, "terminated")])
def test_two_signals_in_a_row_give_one_line_and_no_traceback(rgb_bundle: Path, tmp_path: Path, sig, code,
                                                            word) -> None:
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        _png(folder / f"{i:02d}.png", i, (96, 96, 3))
    proc = subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(folder), "-o", str(tmp_path / "out"),
                             "--model", str(rgb_bundle), "--threads", "1"], stderr=subprocess.PIPE,
                            env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", errors="replace")
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first file's line (or its warning): the batch is under way
    assert first.startswith(("ok", "warning")), first
    for _ in range(2):
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        time.sleep(0.01)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == code
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.count(f"segcli: {word}") == 1, rest
    assert not list((tmp_path / "out").glob(".*partial*")) and not list((tmp_path / "out").glob(".*.lock"))


def test_one_pixel_high_tiff_refused_on_both_routes(rgb_bundle: Path, tmp_path: Path) -> None:
    import tifffile

    thin = tmp_path / "thin.tif"
    tifffile.imwrite(thin, np.random.default_rng(0).integers(0, 255, (1, 500, 3)).astype(np.uint8))
    r = _predict(thin, "-o", tmp_path / "m.tif", "--model", rgb_bundle)  # in memory, through the CLI
    assert r.returncode == 1, r.stderr
    assert "thin.tif: image is too small (1x500); need at least 2 pixels per side" in r.stderr
    assert not (tmp_path / "m.tif").exists()
    # The refusal sits in pipeline.open_route before the route is chosen, from the header: a budget small enough
    # to force the bounded route is now refused up front by the memory plan, so one case covers both routes.


def test_report_line_without_an_output_says_so() -> None:
    """An empty DICOM SEG writes no file: its line says so instead of '-> None'."""
    import io

    from rich.console import Console

    from segcli.cli_report import report_line
    from segcli.report import FileReport

    con = Console(file=io.StringIO(), width=200)
    rep = FileReport(input="series/", output=None, model="covid-ct", voxel_counts={"ground_glass": 0})
    report_line(con, rep)
    line = con.file.getvalue()
    assert line.startswith("ok      series/ -> no mask written  (covid-ct;") and "None" not in line


def test_dicom_seg_with_probabilities_into_a_new_folder(tmp_path: Path) -> None:
    import pydicom

    from tests.test_dicomseg_cli import _series

    _series(tmp_path / "series", "axial")
    bundle = make_bundle(tmp_path / "b", size=32)
    out = tmp_path / "not" / "yet"
    r = _predict(tmp_path / "series", "--model", bundle, "--method", "direct", "--threshold", "0",
                 "--output-type", "dicom-seg", "--probabilities", "-o", out / "")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "_fd" not in r.stderr
    assert pydicom.dcmread(out / "series_seg.dcm").Modality == "SEG"
    assert not list(out.glob(".segcli-probs-*"))


def test_evaluate_names_classes_of_a_dicom_seg_without_dataset_json(tmp_path: Path) -> None:
    """The README's DICOM SEG example: evaluate names the classes from the bundle the SEG names, not class_1."""
    from tests.test_dicomseg_cli import _series

    _series(tmp_path / "series", "axial")
    models = tmp_path / "models"
    make_bundle(models / "ctb", size=32, classes=("background", "lesion"))
    env = {"SEGCLI_MODELS": str(models)}
    common = ("--model", "ctb", "--method", "direct", "--threshold", "0")
    r = _predict(tmp_path / "series", *common, "--output-type", "dicom-seg", "-o", tmp_path / "out" / "", env=env)
    assert r.returncode == 0, r.stderr
    r = _predict(tmp_path / "series", *common, "-o", tmp_path / "gt" / "series.nii.gz", env=env)
    assert r.returncode == 0, r.stderr
    ev = run_cli("evaluate", tmp_path / "out", tmp_path / "gt", "--json", "--no-hd95", env=env)
    assert ev.returncode == 0, ev.stderr
    doc = json.loads(ev.stdout)
    assert doc["classes"] == {"0": "background", "1": "lesion"}
    assert doc["mean"] and "class_1" not in ev.stdout


def test_a_file_named_twice_is_segmented_once(tmp_path, rgb_bundle):
    """`a.png ./a.png /abs/a.png` and a file plus its folder: one mask each, a note, no clash refusal."""
    d = tmp_path / "in"
    d.mkdir()
    a = _png(d / "a.png")
    _png(d / "b.png", 1)
    out = tmp_path / "out"
    r = run_cli("predict", a, d / "." / "a.png", str(a.resolve()), "-o", out, "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert "segcli: note: 2 input(s) named more than once are segmented once" in r.stderr
    assert [Path(f["input"]).name for f in json.loads(r.stdout)["files"]] == ["a.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.png"]
    r = run_cli("predict", d, a, "-o", tmp_path / "out2", "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(Path(f["input"]).name for f in json.loads(r.stdout)["files"]) == ["a.png", "b.png"]


@pytest.mark.parametrize("name, words", [("m.jpg", "masks are never written as JPEG"),
                                         ("m.webp", "a mask cannot be written as .webp")])
def test_output_named_as_a_picture_is_refused_before_work(tmp_path, rgb_bundle, name, words):
    """-o m.webp had made a folder named m.webp; -o m.jpg failed each file with exit 1 after its work."""
    a = _png(tmp_path / "a.png")
    r = run_cli("predict", a, "-o", tmp_path / name, "--model", rgb_bundle)
    assert r.returncode == 2
    assert r.stderr.startswith(f"segcli: error: -o {tmp_path / name}: {words}"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    (tmp_path / name).mkdir()  # an existing folder of that name is a folder
    assert run_cli("predict", a, "-o", tmp_path / name, "--model", rgb_bundle).returncode == 0
    assert (tmp_path / name / "a_seg.png").is_file()


def test_stdin_list_with_windows_line_ends(tmp_path, rgb_bundle):
    """A file list saved on Windows (CRLF): each name is found, not 'a.png\\r: file not found'."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", 1)
    r = run_cli("predict", "-", "-o", tmp_path / "out", "--model", rgb_bundle, "-q",
                stdin=f"{tmp_path / 'a.png'}\r\n{tmp_path / 'b.png'}\r\n")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_seg.png", "b_seg.png"]
