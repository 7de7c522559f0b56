"""Reduced precision (segcli.quantize, --precision): int8 variants are calibrated on half of the images,
checked against fp32 masks on the other half, recorded with hashes, and chosen by ``auto`` only when
the check passed; bf16 runs only where the CPU computes it natively."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli import quantize
from segcli.bundle import load_bundle
from segcli.errors import BundleError, UsageError
from segcli.runtimes import cpu_has_bf16, int8_ok, make_predictor
from tests.conftest import make_bundle, run_cli


def _images(folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a = (rng.random((40, 48)) * 60).astype(np.uint8)
        y, x = rng.integers(5, 25), rng.integers(5, 30)
        a[y : y + 12, x : x + 14] += 150
        p = folder / f"img{i}.png"
        Image.fromarray(a).save(p)
        out.append(p)
    return out


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A tiny random stts bundle whose rough pass finds components (a low threshold), so both networks run."""
    b = make_bundle(tmp_path / "b", seed=5)
    doc = json.loads((b / "segcli.json").read_text())
    probe = load_bundle(b)
    x = np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32)
    p1 = make_predictor(probe, "coarse", backend="torch")(x)[0, 1]
    doc.setdefault("params", {})["threshold"] = float(np.quantile(p1, 0.7))  # about 30 % foreground
    (b / "segcli.json").write_text(json.dumps(doc))
    return b


def test_split_never_uses_an_image_twice() -> None:
    paths = [Path(f"{c}.png") for c in "fbdace"]
    calib, check = quantize.split_images(paths)
    assert calib == [Path("a.png"), Path("c.png"), Path("e.png")]
    assert check == [Path("b.png"), Path("d.png"), Path("f.png")]


def test_dice_labels_known_answers() -> None:
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert quantize.dice_labels(a, b) == 1.0
    a[0, :2] = 1
    b[0, 1:3] = 1
    assert quantize.dice_labels(a, b) == pytest.approx(0.5)


def test_int8_kept_recorded_and_served(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quantize, "MIN_DICE", 0.0)  # the tiny random network's masks are not the point here
    rec = quantize.build_int8(bundle, _images(tmp_path / "imgs"))
    assert rec["passed"] is True and rec["check_images"] == 3 and rec["calibration_images"] == 3
    assert set(rec["calibration_inputs"]) == {"coarse", "fine"} and rec["calibration_inputs"]["coarse"] == 3
    b = load_bundle(bundle)
    assert b.verify() == []
    assert b.network("fine").int8 == "fine.int8.onnx" and int8_ok(b, "fine")
    doc = json.loads((bundle / "segcli.json").read_text())
    assert doc["precision_checks"]["int8"]["dice_vs_fp32_mean"] == rec["dice_vs_fp32_mean"]
    p8 = make_predictor(b, "fine", backend="auto", precision="auto")
    assert p8.metadata["precision"] == "int8" and p8.metadata["weights_sha256"] == b.network("fine").sha256
    p32 = make_predictor(b, "fine", backend="torch", precision="fp32")
    x = np.random.default_rng(1).random((2, 1, 32, 32)).astype(np.float32)
    assert np.abs(p8(x) - p32(x)).max() < 0.1  # quantised, not another network
    r = run_cli("predict", tmp_path / "imgs" / "img1.png", "-o", tmp_path / "o/", "--model", bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["providers"]["fine"] == "onnx:CPUExecutionProvider:int8"
    r = run_cli("predict", tmp_path / "imgs" / "img1.png", "-o", tmp_path / "o32/", "--model", bundle, "--json",
                "--precision", "fp32")
    assert json.loads(r.stdout)["files"][0]["providers"]["fine"] == "onnx:CPUExecutionProvider"


def test_int8_that_fails_its_check_is_not_kept(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quantize, "MIN_DICE", 1.01)  # no variant can pass
    rec = quantize.build_int8(bundle, _images(tmp_path / "imgs"))
    assert rec["passed"] is False
    b = load_bundle(bundle)
    assert b.network("fine").int8 is None and not (bundle / "fine.int8.onnx").exists()
    assert json.loads((bundle / "segcli.json").read_text())["precision_checks"]["int8"]["passed"] is False
    assert make_predictor(b, "fine", backend="auto", precision="auto").metadata["precision"] == "fp32"
    with pytest.raises(UsageError, match="has no int8 export; run `segcli export .* --precision int8 --images DIR`"):
        make_predictor(b, "fine", backend="auto", precision="int8")


def test_tampered_int8_file_is_refused(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quantize, "MIN_DICE", 0.0)
    quantize.build_int8(bundle, _images(tmp_path / "imgs"))
    f = bundle / "fine.int8.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="fine.int8.onnx does not match its recorded SHA-256"):
        make_predictor(load_bundle(bundle), "fine", precision="int8", backend="auto")


def test_cli_int8_needs_images_and_int8_needs_the_variant(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    r = run_cli("export", copy, "--precision", "int8")
    assert r.returncode == 2 and r.stderr.startswith("segcli: error: ") and "--precision int8 needs --images DIR" in r.stderr
    img = _images(tmp_path / "imgs", 1)[0]
    r = run_cli("predict", img, "-o", tmp_path / "o/", "--model", copy, "--precision", "int8")
    assert r.returncode == 2 and "has no int8 export" in r.stderr
    r = run_cli("predict", img, "-o", tmp_path / "o/", "--model", copy, "--precision", "fp8")
    assert r.returncode == 2 and r.stderr.startswith("segcli: error: --precision must be one of auto, fp32, fp16, bf16, int8")


def test_bf16_runs_where_the_cpu_has_it_and_is_refused_elsewhere(bundle: Path) -> None:
    b = load_bundle(bundle)
    x = np.random.default_rng(2).random((2, 1, 32, 32)).astype(np.float32)
    if cpu_has_bf16():
        p = make_predictor(b, "coarse", backend="auto", precision="bf16")
        assert p.provider == "torch-cpu-bf16"
        ref = make_predictor(b, "coarse", backend="torch", precision="fp32")(x)
        assert np.abs(p(x) - ref).max() < 0.05  # bf16 keeps 8 bits of mantissa
    else:
        with pytest.raises(UsageError, match="this CPU has no native bf16"):
            make_predictor(b, "coarse", backend="auto", precision="bf16")
    with pytest.raises(UsageError, match="--precision bf16 runs on torch"):
        make_predictor(b, "coarse", backend="onnx", precision="bf16")


def test_int8_where_the_bundle_has_it_fp32_elsewhere(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """nuclei-he ships int8 for its fine network only: --precision int8 must still run (coarse in fp32)."""
    monkeypatch.setattr(quantize, "MIN_DICE", 0.0)
    quantize.build_int8(bundle, _images(tmp_path / "imgs"))
    doc = json.loads((bundle / "segcli.json").read_text())
    (bundle / "coarse.int8.onnx").unlink()
    doc["networks"]["coarse"].pop("int8")
    doc["networks"]["coarse"].pop("int8_sha256")
    (bundle / "segcli.json").write_text(json.dumps(doc))
    b = load_bundle(bundle)
    assert make_predictor(b, "fine", backend="auto", precision="int8").metadata["precision"] == "int8"
    assert make_predictor(b, "coarse", backend="auto", precision="int8").metadata["precision"] == "fp32"
    r = run_cli("predict", tmp_path / "imgs" / "img1.png", "-o", tmp_path / "o/", "--model", bundle, "--json",
                "--precision", "int8")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["files"][0]["providers"] == {"coarse": "onnx:CPUExecutionProvider",
                                                             "fine": "onnx:CPUExecutionProvider:int8"}


def test_bf16_is_checked_once_at_parse_time(monkeypatch, tmp_path: Path) -> None:
    """A CPU without native bf16, or --backend onnx, stops the run before any work (exit 2), not per file."""
    import segcli.options as options
    from segcli.options import PredictOptions

    monkeypatch.setattr(options, "cpu_has_bf16", lambda: False)
    with pytest.raises(UsageError, match="^--precision bf16: this CPU has no native bf16"):
        PredictOptions(precision="bf16", device="cpu")
    with pytest.raises(UsageError, match="^--precision bf16 runs on torch"):
        PredictOptions(precision="bf16", backend="onnx")
    monkeypatch.setattr(options, "cpu_has_bf16", lambda: True)
    assert PredictOptions(precision="bf16", device="cpu").precision == "bf16"
    from tests.conftest import run_cli

    r = run_cli("predict", tmp_path / "missing.png", "--precision", "bf16", "--backend", "onnx")
    assert r.returncode == 2 and "--precision bf16 runs on torch" in r.stderr


def test_half_is_precision_fp16_and_fp16_needs_cuda(monkeypatch, tmp_path: Path) -> None:
    """--half is the deprecated spelling of --precision fp16; both are refused before work on the CPU (before,
    --half was ignored there in silence), and --half with another precision is a contradiction."""
    import segcli.options as options
    from segcli.options import PredictOptions

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(img)
    for args in (["--precision", "fp16"], ["--half"]):
        r = run_cli("predict", img, "--device", "cpu", *args)
        assert r.returncode == 2 and "--precision fp16 runs on CUDA only" in r.stderr, r.stderr
        assert ("--half is deprecated" in r.stderr) == (args == ["--half"])
    r = run_cli("predict", img, "--half", "--precision", "int8")
    assert r.returncode == 2 and "--half is --precision fp16; it cannot go with --precision int8" in r.stderr
    assert not list(tmp_path.glob("a_seg*"))  # nothing was written
    monkeypatch.setattr(options, "cuda_possible", lambda: True)
    o = PredictOptions(half=True)
    assert (o.precision, o.half) == ("fp16", True)
    assert PredictOptions(precision="fp16", device="cuda").half
