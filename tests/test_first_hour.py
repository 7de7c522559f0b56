"""Issue 31, "the first hour": the model chosen from the input and named, intensities the user can declare,
previews that never fail in silence, and failures that reach stderr under -q. Through the CLI, as a user runs it.

A tiny stand-in of the shipped models folder (random networks under the shipped names, the real
``models/index.json``) keeps these fast; the H&E and polyp pictures are the shipped bundles' samples.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli import choose
from tests.conftest import REPO, make_bundle, run_cli

HE = REPO / "models" / "nuclei-he" / "sample" / "he_prostate_CH-5767.png"
POLYP = REPO / "models" / "polyp" / "sample" / "polyp.jpg"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    rgb = {"kind": "dtype"}
    for name in ("polyp", "nuclei-he", "nuclei", "retina-vessels"):
        make_bundle(root / name, in_channels=3, normalization=rgb, size=32)
    make_bundle(root / "covid-ct", in_channels=1, method="direct", size=32,
                normalization={"kind": "ct_window", "center": -600.0, "width": 1500.0})
    make_bundle(root / "em-vnc", in_channels=1, normalization=rgb, size=32)
    shutil.copy(REPO / "models" / "index.json", root / "index.json")
    return root


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _ct_jpeg(path: Path) -> Path:
    """A grey CT-like slice: a mid-grey body ellipse with dark lungs on black air, saved as 8-bit JPEG."""
    yy, xx = np.mgrid[:160, :200]
    a = np.zeros((160, 200), np.uint8)
    a[((yy - 80) / 70) ** 2 + ((xx - 100) / 90) ** 2 < 1] = 150
    a[((yy - 80) / 40) ** 2 + ((xx - 65) / 25) ** 2 < 1] = 30
    a[((yy - 80) / 40) ** 2 + ((xx - 135) / 25) ** 2 < 1] = 30
    Image.fromarray(a).save(path, quality=92)
    return path


def _predict(models: Path, *args, env=None):
    r = run_cli("predict", *args, "--threads", "1", env={"SEGCLI_MODELS": str(models), **(env or {})})
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def test_model_chosen_from_content_and_named(models: Path, tmp_path: Path) -> None:
    he, polyp = tmp_path / "tile.png", tmp_path / "frame.jpg"
    shutil.copy(HE, he)
    shutil.copy(POLYP, polyp)
    ct = _ct_jpeg(tmp_path / "slice.jpg")
    before = {p: _digest(p) for p in (he, polyp, ct)}
    r, doc = _predict(models, he, polyp, ct, "-o", tmp_path / "out", "--json")
    assert r.returncode == 1, r.stderr
    by_name = {Path(f["input"]).name: f for f in doc["files"]}
    assert by_name["tile.png"]["model"] == "nuclei-he"  # H&E saved as PNG: not the polyp network
    assert by_name["frame.jpg"]["model"] == "polyp"
    assert any("a guess" in n and "retina-vessels" in n for n in by_name["frame.jpg"]["notes"])
    assert any("a guess" in n and "polyp" in n for n in by_name["tile.png"]["notes"])  # dermoscopy can pass as H&E
    assert by_name["slice.jpg"]["status"] == "failed" and by_name["slice.jpg"]["model"] is None
    lines = r.stderr.splitlines()
    assert any(ln.startswith("ok") and "tile.png" in ln and "(nuclei-he;" in ln for ln in lines), r.stderr
    assert any(ln.startswith("ok") and "frame.jpg" in ln and "(polyp;" in ln for ln in lines), r.stderr
    assert sum(ln.startswith("note    model polyp chosen") for ln in lines) == 1
    refusal = next(ln for ln in lines if ln.startswith("failed"))
    assert "slice.jpg: no shipped model fits a grey image" in refusal and "--window" in refusal
    assert "shipped: covid-ct, em-vnc" in refusal
    assert not (tmp_path / "out" / "slice_seg.jpg").exists()
    assert {p: _digest(p) for p in before} == before


def test_window_declares_ct_export(models: Path, tmp_path: Path) -> None:
    ct = _ct_jpeg(tmp_path / "slice.jpg")
    before = _digest(ct)
    r, doc = _predict(models, ct, "--window", "-600,1500", "-o", tmp_path / "m.png", "--json")
    assert r.returncode == 0, r.stderr
    f = doc["files"][0]
    assert f["model"] == "covid-ct"
    assert f["info"]["normalization"].startswith("8-bit values mapped to HU by --window -600,1500")
    assert not any("Hounsfield" in w for w in f["warnings"])
    assert _digest(ct) == before
    bad, _ = _predict(models, ct, "--window", "1500", "-o", tmp_path / "n.png")
    assert bad.returncode == 2 and "--window takes CENTRE,WIDTH" in bad.stderr
    wrong, _ = _predict(models, ct, "--window", "-600,1500", "--model", str(models / "polyp"),
                        "-o", tmp_path / "p.png")
    assert wrong.returncode == 2 and "does not take CT in HU" in wrong.stderr


def test_window_maps_levels_to_hu(models: Path) -> None:
    from segcli.bundle import load_bundle
    from segcli.prepare import prepare

    b = load_bundle(models / "covid-ct")
    levels = np.array([[0, 51, 255]], np.uint8)[..., None]
    x = prepare(levels, b, window=(-600.0, 1500.0))
    # level 0 = -1350 HU, 51 = -1050 HU, 255 = 150 HU; the bundle's window -600/1500 spans -1350..150
    assert np.allclose(x[0, 0], [0.0, 0.2, 1.0], atol=1e-6)


def test_sixteen_bit_microscopy_percentiles_per_channel(models: Path, tmp_path: Path) -> None:
    from segcli.bundle import load_bundle
    from segcli.prepare import intensity, prepare

    b = load_bundle(models / "nuclei")
    rng = np.random.default_rng(0)
    a = np.stack([rng.integers(100, 400, (64, 64)), rng.integers(1000, 5000, (64, 64)),
                  rng.integers(0, 60000, (64, 64))], axis=-1).astype(np.uint16)
    x = prepare(a, b)
    for c in range(3):  # each channel spans 0..1 on its own: a per-channel rule, not one for the image
        assert x[c].min() == 0.0 and x[c].max() == 1.0
        assert 0.4 < float(np.median(x[c])) < 0.6
    plan = intensity(b, np.uint16, 1)
    assert plan.channels == "rgb" and plan.spec["kind"] == "percentile"
    assert any("repeated into the 3 channels" in n for n in plan.notes)


def test_fluorescence_tiff_runs_with_notes(models: Path, tmp_path: Path) -> None:
    import tifffile

    a = np.full((96, 96), 200, np.uint16)
    yy, xx = np.mgrid[:96, :96]
    for cy, cx in ((20, 20), (50, 70), (75, 30)):
        a[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 3000
    src = tmp_path / "cells.tif"
    tifffile.imwrite(src, a)
    r, doc = _predict(models, src, "-o", tmp_path / "out.tif", "--json")
    assert r.returncode == 0, r.stderr
    f = doc["files"][0]
    assert f["model"] == "nuclei"
    assert f["info"]["normalization"].startswith("percentile 1-99.8 % per channel")
    assert any("repeated into the 3 channels" in n for n in f["notes"])
    assert "note    grey image repeated into the 3 channels model nuclei takes" in r.stderr


def test_volume_without_hu_refused(models: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    mr = tmp_path / "t1.nii.gz"
    rng = np.random.default_rng(1)
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 900, (6, 40, 40)).astype(np.int16)), str(mr))
    ct = tmp_path / "ct.nii.gz"
    vol = np.full((6, 40, 40), -1000, np.int16)
    vol[:, 8:32, 8:32] = 40
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(ct))
    before = _digest(mr)
    r, doc = _predict(models, mr, ct, "-o", tmp_path / "out", "--json")
    assert r.returncode == 1
    by_name = {Path(f["input"]).name: f for f in doc["files"]}
    assert by_name["ct.nii.gz"]["model"] == "covid-ct"
    assert "no shipped model fits a volume without Hounsfield units" in by_name["t1.nii.gz"]["error"]
    assert _digest(mr) == before


def test_quiet_still_prints_failures(models: Path, tmp_path: Path) -> None:
    ok = tmp_path / "frame.jpg"
    shutil.copy(POLYP, ok)
    r, _ = _predict(models, ok, tmp_path / "missing.png", "-o", tmp_path / "out", "-q")
    assert r.returncode == 1
    assert r.stderr.startswith("failed") and "missing.png" in r.stderr
    assert "ok " not in r.stderr


def test_preview_on_read_only_pixels_leaves_them_unchanged() -> None:
    from segcli import viz

    a = np.random.default_rng(0).integers(0, 255, (300, 300, 3)).astype(np.uint8)
    a.setflags(write=False)  # decoders hand out read-only buffers; no downscale happens at this size
    copy = a.copy()
    labels = np.zeros((300, 300), np.uint8)
    labels[100:200, 100:200] = 1
    pv = viz.render_preview(a, labels, classes=["background", "nucleus"])
    assert pv.pixels.shape[0] > 0 and np.array_equal(a, copy)
    assert [e.name for e in pv.entries] == ["nucleus"]


def test_batch_preview_uses_the_model_that_ran(models: Path, tmp_path: Path) -> None:
    he = tmp_path / "tile.png"
    shutil.copy(HE, he)
    r, doc = _predict(models, he, "-o", tmp_path / "out", "--preview", "--json")
    assert r.returncode == 0, r.stderr
    f = doc["files"][0]
    assert f["model"] == "nuclei-he" and Path(f["info"]["preview"]).is_file()
    assert "preview" in f["seconds"]  # drawn in the writer thread, from the pixels in memory


def test_long_name_refused_before_work(models: Path, tmp_path: Path) -> None:
    src = tmp_path / ("n" * 240 + ".jpg")
    shutil.copy(POLYP, src)
    r, _ = _predict(models, src, "--preview")
    assert r.returncode == 2
    assert "over the 255-byte limit of file names" in r.stderr
    assert not any(p.name.endswith("_preview.jpg") for p in tmp_path.iterdir())


def test_he_detector_on_synthetic_colours() -> None:
    rng = np.random.default_rng(0)
    pink = np.array([235, 160, 205], np.float32)  # eosin
    purple = np.array([90, 60, 150], np.float32)  # haematoxylin
    he = np.where(rng.random((80, 80, 1)) < 0.3, purple, pink) + rng.normal(0, 6, (80, 80, 3))
    mucosa = np.array([200, 90, 60], np.float32) + rng.normal(0, 6, (80, 80, 3))  # endoscopy red-orange
    assert choose.content_kind(np.clip(he, 0, 255).astype(np.uint8), "2d") == "he"
    assert choose.content_kind(np.clip(mucosa, 0, 255).astype(np.uint8), "2d") == "2d"
    grey = np.repeat(rng.integers(60, 200, (80, 80, 1)), 3, axis=-1).astype(np.uint8)
    assert choose.content_kind(grey, "2d") == "grey"


def _eval_layout(root: Path, with_images: bool = True) -> tuple[Path, Path]:
    masks, gt = root / "masks", root / "gt"
    for d in (masks, gt, root / "images"):
        d.mkdir(parents=True, exist_ok=True)
    truth = np.zeros((40, 50), np.uint8)
    truth[10:30, 10:30] = 1
    pred = np.zeros_like(truth)
    pred[12:32, 12:34] = 1
    Image.fromarray(truth).save(gt / "a.png")
    Image.fromarray(pred).save(masks / "a_seg.png")
    if with_images:
        Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(root / "images" / "a.png")
    return masks, gt


def test_evaluate_swapped_files_and_preview_folders(tmp_path: Path) -> None:
    masks, gt = _eval_layout(tmp_path)
    r = run_cli("evaluate", gt, masks)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "everything would with the folders swapped: predictions come first" in r.stderr
    r = run_cli("evaluate", masks / "a_seg.png", gt / "a.png")
    assert r.returncode == 2 and "predictions must be a folder, and this is a file" in r.stderr
    for inside in (gt, masks, gt / "sub"):
        r = run_cli("evaluate", masks, gt, "--preview", inside)
        assert r.returncode == 2 and "--preview" in r.stderr and "is inside the" in r.stderr
    assert sorted(p.name for p in gt.iterdir()) == ["a.png"]


def test_evaluate_error_maps_find_images_or_say_where(tmp_path: Path) -> None:
    masks, gt = _eval_layout(tmp_path / "found")
    r = run_cli("evaluate", masks, gt, "--preview", tmp_path / "maps", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "maps" / "a_errors.png").is_file() and "over grey" not in r.stderr
    masks, gt = _eval_layout(tmp_path / "lost", with_images=False)
    r = run_cli("evaluate", masks, gt, "--preview", tmp_path / "maps2", "--summary")
    assert r.returncode == 0
    assert "1 error map(s) drawn over grey" in r.stderr and "pass --images FOLDER" in r.stderr


def test_info_prints_spacing_with_its_unit(tmp_path: Path) -> None:
    import tifffile

    slide = tmp_path / "tile.tif"
    tifffile.imwrite(slide, np.zeros((32, 32, 3), np.uint8) + 200, resolution=(40000.0, 40000.0),
                     resolutionunit="CENTIMETER")  # 0.25 µm/px
    r = run_cli("info", slide)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("spacing"))
    assert line.split(None, 1)[1] == "0.25 x 0.25 µm"


def test_timings_are_own_work_and_model_load_is_a_stage(models: Path, tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 70, 3)).astype(np.uint8)).save(
            tmp_path / f"{i}.png")
    r, doc = _predict(models, *(tmp_path / f"{i}.png" for i in range(3)), "-o", tmp_path / "out", "--json",
                      env={"SEGCLI_ONNX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    first = doc["files"][0]["seconds"]
    assert first.get("model_load", 0) > 0  # the first file built the predictors (an ONNX export): its own stage
    for f in doc["files"]:
        s = f["seconds"]
        stages = sum(v for k, v in s.items() if k not in ("total", "queued"))
        # every stage is inside the total, and the total is the stages (engine bookkeeping aside), not the
        # time the file waited in the read-ahead queue (reported apart as "queued")
        assert stages <= s["total"] * 1.05 + 0.01 and s["total"] - stages < 0.5 * s["total"] + 0.2, s
    assert doc["summary"]["model_load_seconds"] >= first["model_load"] - 0.001


def test_progress_columns_count_and_eta() -> None:
    import io
    import re
    import time

    from rich.console import Console

    from segcli.cli_report import progress_display

    con = Console(file=io.StringIO(), force_terminal=True, width=120)
    with progress_display(con, False) as prog:
        files = prog.add_task("files", total=10)
        stage = prog.add_task("  a.png: reading, rough pass", total=None)
        for _ in range(3):
            prog.advance(files)
            time.sleep(0.05)
        prog.refresh()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", con.file.getvalue())
    assert "0/?" not in text and "a.png: reading, rough pass" in text and "3/10" in text
    assert re.search(r"3/10 .*ETA \d+:\d\d", text), text
    assert stage is not None
    piped = Console(file=io.StringIO(), force_terminal=False)
    with progress_display(piped, False) as none:
        assert none is None  # not a terminal: no progress display at all


def test_train_resume_example_parses_as_written(tmp_path: Path) -> None:
    """The `--resume ... --time-limit 30m` example of `train --help`, run as written on a folder with no run in it:
    the answer is about the missing checkpoint, never a usage error about the command line itself."""
    from segcli.cli import app

    epilog = typer_command("train").epilog
    line = next(ln.strip() for ln in epilog.splitlines() if "--resume" in ln)
    args = line.split("#")[0].split()[2:]  # after "segcli train"
    args = [str(tmp_path / "mine") if a == "models/mine" else a for a in args]
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["train", *args])
    assert r.exit_code == 2, r.output
    assert "checkpoint" in r.output and "unexpected extra argument" not in r.output.lower(), r.output


def typer_command(name: str):
    import typer

    from segcli.cli import app

    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def test_two_d_slice_in_hu_goes_to_the_ct_model(models: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    a = np.full((48, 48), -1000, np.int16)
    a[10:40, 10:40] = 40
    src = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(src))
    r, doc = _predict(models, src, "-o", tmp_path / "out.nii.gz", "--json")
    assert r.returncode == 0, r.stderr
    assert doc["files"][0]["model"] == "covid-ct"


def test_rgba_he_tile_goes_to_the_he_model_alpha_dropped(models: Path, tmp_path: Path) -> None:
    """An RGBA export of an H&E tile: the H&E model is chosen, the alpha channel is dropped with a note, and the
    mask equals the one of the same tile saved as RGB."""
    rgba, rgb = tmp_path / "tile_rgba.png", tmp_path / "tile.png"
    shutil.copy(HE, rgb)
    Image.open(HE).convert("RGBA").save(rgba)
    r, doc = _predict(models, rgba, rgb, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    by_name = {Path(f["input"]).name: f for f in doc["files"]}
    assert by_name["tile_rgba.png"]["model"] == by_name["tile.png"]["model"] == "nuclei-he"
    assert "alpha channel dropped: model nuclei-he takes the 3 colour channels" in by_name["tile_rgba.png"]["notes"]
    a = np.asarray(Image.open(tmp_path / "out" / "tile_rgba_seg.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "tile_seg.png"))
    assert a.any() and np.array_equal(a, b)


def test_nuclei_bundles_own_grey_sample_goes_to_nuclei(models: Path, tmp_path: Path) -> None:
    """The grey DSB sample shipped with `nuclei` (dense nuclei: 59 % dark pixels, which the first fluorescence
    rule missed) is chosen for `nuclei` without --model, as a guess said in one line."""
    sample = REPO / "models" / "nuclei" / "sample" / "dsb_53df5150.png"
    r, doc = _predict(models, sample, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    assert doc["files"][0]["model"] == "nuclei"
    assert "model nuclei chosen for a grey image with a dark background and bright objects" in r.stderr
