"""First-use ONNX exports (segcli.runtimes.onnx_cache): the default CPU runtime without a user step.

Known answers: the cached export gives torch's probabilities, is made once per weights (a second
use and a second process reuse it), a tampered cache file is rebuilt, tampered weights are refused,
an unfaithful export is recorded once and the bundle runs on torch, and the cache can be turned off
or moved by option and environment variable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcli.bundle import load_bundle
from segcli.errors import BundleError
from segcli.runtimes import make_predictor
from segcli.runtimes import onnx_cache as oc
from tests.conftest import REPO, make_bundle, run_cli


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "b", seed=3)


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 1, 32, 40)).astype(np.float32)


def test_cache_root_rules(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEGCLI_ONNX_CACHE", "off")
    assert oc.cache_root() is None
    assert oc.cache_root(str(tmp_path)) == tmp_path  # the option wins over the environment
    monkeypatch.setenv("SEGCLI_ONNX_CACHE", str(tmp_path / "c"))
    assert oc.cache_root() == tmp_path / "c"
    assert oc.cache_root("OFF") is None
    monkeypatch.delenv("SEGCLI_ONNX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert oc.cache_root() == tmp_path / "xdg" / "segcli" / "onnx"


def test_first_use_exports_once_and_matches_torch(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    b = load_bundle(bundle)
    ort_pred = make_predictor(b, "coarse", backend="auto", onnx_cache=str(cache))
    torch_pred = make_predictor(b, "coarse", backend="torch")
    assert ort_pred.backend == "onnx" and torch_pred.backend == "torch"
    np.testing.assert_allclose(ort_pred(_x()), torch_pred(_x()), atol=1e-4)
    onnx_file, record = oc.cache_paths(cache, b, "coarse")
    rec = json.loads(record.read_text())
    assert rec["ok"] is True and rec["weights_sha256"] == b.network("coarse").sha256
    assert rec["max_rel_logit_diff"] <= 1e-3
    assert not list(cache.glob(".*partial*"))
    # The second use reads the cache: exporting again would fail here.
    import segcli.export as ex

    monkeypatch.setattr(ex, "export_module", lambda *a, **k: pytest.fail("exported twice"))
    again = make_predictor(load_bundle(bundle), "coarse", backend="auto", onnx_cache=str(cache))
    np.testing.assert_array_equal(again(_x(1)), ort_pred(_x(1)))


def test_new_weights_get_a_new_export(bundle: Path, tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "other", seed=4)
    cache = tmp_path / "cache"
    a, b = load_bundle(bundle), load_bundle(other)
    assert oc.cache_paths(cache, a, "coarse") != oc.cache_paths(cache, b, "coarse")
    pa = make_predictor(a, "coarse", backend="auto", onnx_cache=str(cache))
    pb = make_predictor(b, "coarse", backend="auto", onnx_cache=str(cache))
    assert not np.allclose(pa(_x()), pb(_x()))
    np.testing.assert_allclose(pb(_x()), make_predictor(b, "coarse", backend="torch")(_x()), atol=1e-4)


def test_tampered_cache_file_is_rebuilt(bundle: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    b = load_bundle(bundle)
    make_predictor(b, "fine", backend="auto", onnx_cache=str(cache))
    onnx_file, _ = oc.cache_paths(cache, b, "fine")
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="segcli"):
        p = make_predictor(load_bundle(bundle), "fine", backend="auto", onnx_cache=str(cache))
    assert "does not match its record or the bundle's weights; exporting again" in caplog.text
    np.testing.assert_allclose(p(_x()), make_predictor(b, "fine", backend="torch")(_x()), atol=1e-4)


def test_replaced_export_with_edited_record_is_caught(bundle: Path, tmp_path: Path, caplog) -> None:
    """Issue 31: another network put in the cache, its record edited to the new file's hash, is caught by the
    binding (the export embeds its weights' hash); a symlinked entry is never used either."""
    import hashlib
    import json

    cache = tmp_path / "cache"
    b = load_bundle(bundle)
    make_predictor(b, "fine", backend="auto", onnx_cache=str(cache))
    make_predictor(b, "coarse", backend="auto", onnx_cache=str(cache))
    fine_onnx, fine_rec = oc.cache_paths(cache, b, "fine")
    coarse_onnx, _ = oc.cache_paths(cache, b, "coarse")
    other = coarse_onnx.read_bytes()  # a different network: the coarse one, in the fine one's place
    fine_onnx.write_bytes(other)
    rec = json.loads(fine_rec.read_text())
    rec["sha256"] = hashlib.sha256(other).hexdigest()
    fine_rec.write_text(json.dumps(rec))
    with caplog.at_level("WARNING", logger="segcli"):
        p = make_predictor(load_bundle(bundle), "fine", backend="auto", onnx_cache=str(cache))
    assert "does not match its record or the bundle's weights" in caplog.text
    np.testing.assert_allclose(p(_x()), make_predictor(b, "fine", backend="torch")(_x()), atol=1e-4)
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(fine_onnx.read_bytes())
    fine_onnx.unlink()
    fine_onnx.symlink_to(target)
    caplog.clear()
    with caplog.at_level("WARNING", logger="segcli"):
        make_predictor(load_bundle(bundle), "fine", backend="auto", onnx_cache=str(cache))
    assert "is a symbolic link" in caplog.text and not fine_onnx.is_symlink()


def test_partials_of_dead_exporters_are_removed(bundle: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / ".abc.onnx.partial-999999999"
    stale.write_bytes(b"half an export")
    make_predictor(load_bundle(bundle), "fine", backend="auto", onnx_cache=str(cache))
    assert not stale.exists() and not list(cache.glob(".*.partial-*"))


def test_cache_variable_naming_a_file_is_refused_by_predict_and_doctor(bundle: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    f = tmp_path / "not-a-folder"
    f.write_text("x")
    r = run_cli("predict", tmp_path, "--model", bundle, env={"SEGCLI_ONNX_CACHE": str(f)})
    assert r.returncode == 2 and f"SEGCLI_ONNX_CACHE={f} is a file, not a folder" in r.stderr
    d = run_cli("doctor", env={"SEGCLI_ONNX_CACHE": str(f)})
    assert d.returncode == 0 and "is a file, not a folder (predict stops with exit 2)" in d.stdout


def test_tampered_weights_are_refused_even_with_a_cached_export(bundle: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    make_predictor(load_bundle(bundle), "coarse", backend="auto", onnx_cache=str(cache))
    w = bundle / load_bundle(bundle).network("coarse").weights
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its recorded SHA-256"):
        make_predictor(load_bundle(bundle), "coarse", backend="auto", onnx_cache=str(cache))


def test_unfaithful_export_is_recorded_once_and_runs_on_torch(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import segcli.export as ex

    calls = []
    monkeypatch.setattr(ex, "parity", lambda *a, **k: calls.append(1) or 0.5)
    cache = tmp_path / "cache"
    b = load_bundle(bundle)
    p = make_predictor(b, "coarse", backend="auto", onnx_cache=str(cache))
    assert p.backend == "torch"
    rec = json.loads(oc.cache_paths(cache, b, "coarse")[1].read_text())
    assert rec["ok"] is False and rec["reason"].startswith("ONNX Runtime disagrees with torch")
    assert oc.status(b, "coarse", str(cache)).startswith("torch fp32 (export refused: ONNX Runtime disagrees")
    assert make_predictor(load_bundle(bundle), "coarse", backend="auto", onnx_cache=str(cache)).backend == "torch"
    assert len(calls) == 1  # not tried again on every run


def test_off_runs_torch_and_status_says_so(bundle: Path) -> None:
    b = load_bundle(bundle)
    assert make_predictor(b, "coarse", backend="auto", onnx_cache="off").backend == "torch"
    assert oc.status(b, "coarse", "off") == "torch fp32 (ONNX cache off)"


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64)) * 255).astype(np.uint8)).save(path)
    return path


def test_two_processes_at_once_share_one_export(bundle: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "a.png")
    cache = tmp_path / "cache"
    env = {"SEGCLI_ONNX_CACHE": str(cache), "NO_COLOR": "1"}
    import os

    procs = [subprocess.Popen([sys.executable, "-m", "segcli", "predict", str(img), "-o", str(tmp_path / f"o{i}/"),
                               "--model", str(bundle), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **env}, cwd=REPO, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out, _ in outs:
        providers = json.loads(out)["files"][0]["providers"]
        assert providers == {"coarse": "onnx:CPUExecutionProvider", "fine": "onnx:CPUExecutionProvider"}
    assert len(list(cache.glob("*.onnx"))) == 2 and not list(cache.glob(".*partial*"))
    a = np.asarray(Image.open(tmp_path / "o0" / "a_seg.png"))
    np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "o1" / "a_seg.png")))


def test_cli_option_turns_it_off_and_masks_agree(bundle: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "a.png")
    shutil.copy(img, tmp_path / "b.png")
    r_off = run_cli("predict", img, "-o", tmp_path / "off/", "--model", bundle, "--json", "--onnx-cache", "off")
    r_on = run_cli("predict", img, "-o", tmp_path / "on/", "--model", bundle, "--json", "--onnx-cache", tmp_path / "c")
    assert r_off.returncode == 0 and r_on.returncode == 0, r_off.stderr + r_on.stderr
    assert json.loads(r_off.stdout)["files"][0]["providers"]["fine"] == "torch:torch-cpu"
    assert json.loads(r_on.stdout)["files"][0]["providers"]["fine"] == "onnx:CPUExecutionProvider"
    off = np.asarray(Image.open(tmp_path / "off" / "a_seg.png"))
    on = np.asarray(Image.open(tmp_path / "on" / "a_seg.png"))
    assert (off != on).mean() < 0.001  # logits agree to 1e-3: at most a pixel at the threshold may flip


def test_onnx_cache_that_is_a_file_is_a_usage_error(bundle: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "a.png")
    f = tmp_path / "not-a-folder"
    f.write_text("x")
    r = run_cli("predict", img, "-o", tmp_path / "o/", "--model", bundle, "--onnx-cache", f)
    assert r.returncode == 2
    assert r.stderr.startswith(f"segcli: error: --onnx-cache {f} is a file, not a folder")


def test_doctor_says_which_runtime_each_shipped_bundle_uses(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    b = load_bundle("polyp")
    make_predictor(b, "coarse", backend="auto", onnx_cache=str(cache))
    r = run_cli("doctor", "--json", env={"SEGCLI_ONNX_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    oc_report = json.loads(r.stdout)["onnx_cache"]
    assert oc_report["folder"] == str(cache)
    assert oc_report["bundles"]["polyp"] == {"coarse": "onnxruntime fp32 (cached export)",
                                            "fine": "onnxruntime fp32 (exported on first use)"}
    r = run_cli("doctor", env={"SEGCLI_ONNX_CACHE": "off"})
    assert "  polyp/fine           torch fp32 (ONNX cache off)" in r.stdout


def test_export_of_a_shipped_bundle_fills_the_cache_and_leaves_the_bundle(tmp_path: Path) -> None:
    """Shipped bundles belong to the installation: `segcli export NAME` fills the ONNX cache that a first use
    would fill, and options that would write into the bundle are refused (exit 2)."""
    shipped = tmp_path / "models"
    make_bundle(shipped / "tiny", seed=5)
    before = {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir() if p.is_file()}
    cache = tmp_path / "cache"
    env = {"SEGCLI_MODELS": str(shipped), "SEGCLI_ONNX_CACHE": str(cache)}
    r = run_cli("export", "tiny", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["coarse", "fine"]
    assert all("(ONNX cache; the shipped bundle is left as installed)" in ln for ln in lines)
    assert len(list(cache.glob("*.onnx"))) == 2
    assert {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir() if p.is_file()} == before
    for flag in (["--fp16"], ["--precision", "int8", "--images", str(tmp_path)]):
        r = run_cli("export", "tiny", *flag, env=env)
        assert r.returncode == 2 and r.stderr.startswith("segcli: error: tiny is a shipped bundle, which segcli does not modify")
    assert {p.name: p.read_bytes() for p in (shipped / "tiny").iterdir() if p.is_file()} == before
    r = run_cli("export", str(shipped / "tiny"), env=env)  # a folder the user names is exported into, as before
    assert r.returncode == 0 and (shipped / "tiny" / "coarse.onnx").is_file()


def test_a_script_without_a_main_guard_exports_on_first_use(bundle: Path, tmp_path: Path) -> None:
    """The first-use export runs in a child interpreter, not a multiprocessing child: spawning one re-runs the
    caller's main script, so a plain script (no ``if __name__ == "__main__"``) failed with BrokenProcessPool."""
    import os

    img = _image(tmp_path / "a.png")
    script = tmp_path / "plain.py"
    script.write_text("import sys\nfrom segcli.api import Segmenter\n"
                      "assert 'torch' not in sys.modules  # so the export goes to a child\n"
                      f"rep = Segmenter({str(bundle)!r}).predict_file({str(img)!r}, {str(tmp_path / 'o' / 'a_seg.png')!r})\n"
                      "print(rep.status, rep.error, sorted(set(rep.providers.values())))\n")
    env = {**os.environ, "SEGCLI_ONNX_CACHE": str(tmp_path / "cache"), "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "None", "['onnx:CPUExecutionProvider']"]
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 2
