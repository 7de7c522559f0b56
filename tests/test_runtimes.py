"""ONNX export and the ONNX Runtime predictor: parity with torch, integrity checks, device fallback."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from segcli.bundle import BUNDLE_FILE, load_bundle, save_bundle
from segcli.errors import BundleError, SegcliError, UsageError
from segcli.export import export_bundle, export_module
from segcli.nets import available, build
from segcli.runtimes import make_predictor
from segcli.runtimes.onnx_backend import CPU_EP, CUDA_EP, OnnxPredictor, choose_providers, is_oom
from tests.conftest import make_bundle, run_cli

# Known tiny configurations (milliseconds per forward at 64x64); any other registered network gets
# its registry defaults with whatever width/depth keys its factory takes shrunk (SMALL_KEYS).
TINY: dict[str, dict[str, Any]] = {
    "unet": {"features": 4, "depth": 2},
    "hrnet": {"width": "w18-small-v1", "base_channels": 4},
    "arsm": {"width": "w18-small-v1", "base_channels": 4, "gate_units": 1},
    "rpn-fcn": {"width_mult": 0.125, "fc_channels": 16},
    "deconvnet": {"widths": (8, 16, 32)},
}
SMALL_KEYS: dict[str, Any] = {"features": 4, "depth": 2, "widths": (8, 16, 32), "width_mult": 0.125, "fc_channels": 16,
                              "base_channels": 4, "channels": 8, "hidden": 8, "gate_units": 1}


def small_config(name: str) -> dict[str, Any]:
    if name in TINY:
        return dict(TINY[name])
    params = inspect.signature(available()[name].factory).parameters
    return {k: v for k, v in SMALL_KEYS.items() if k in params}


def calibrate_bn(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Real BN running statistics (as after training) so logits are O(1) and 1e-4 means something.
    Only BN layers switch to train mode, so data-dependent heads (an RPN) keep their eval path."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        net(x)
    return net.eval()


@pytest.mark.parametrize("name", sorted(available()))
def test_onnx_parity_every_registered_network(name: str) -> None:
    torch.manual_seed(0)
    out_ch = 1 if sum(map(ord, name)) % 2 else 3  # both heads (sigmoid and softmax) get exercised
    net = build(name, in_channels=1, out_channels=out_ch, **small_config(name)).eval()
    net = calibrate_bn(net, torch.rand(2, 1, 48, 40))
    model = export_module(net, in_channels=1, input_size=64, metadata={"arch": name})
    sess = ort.InferenceSession(model.SerializeToString(), providers=[CPU_EP])
    for shape in [(2, 1, 64, 64), (1, 1, 37, 53)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape == (shape[0], out_ch, *shape[2:])
        assert np.abs(got - ref).max() < 1e-4, (name, shape, np.abs(got - ref).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny grey bundle with its ONNX export (tests that modify it work on a copy)."""
    b = make_bundle(tmp_path_factory.mktemp("onnx") / "grey")
    export_bundle(b)
    return b


def test_export_bundle_checker_metadata_and_json(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", in_channels=3, classes=("background", "polyp", "tool"), size=48,
                    normalization={"kind": "dtype"})
    before = json.loads((b / BUNDLE_FILE).read_text())
    paths = export_bundle(b)
    assert set(paths) == {"coarse", "fine"} and all(p.parent == b and p.name == f"{r}.onnx" for r, p in paths.items())
    after = json.loads((b / BUNDLE_FILE).read_text())
    for role, p in paths.items():
        onnx.checker.check_model(str(p), full_check=True)
        m = onnx.load(str(p))
        meta = {q.key: q.value for q in m.metadata_props}
        assert json.loads(meta["classes"]) == ["background", "polyp", "tool"]
        assert meta["input_size"] == "48" and meta["arch"] == "unet" and meta["role"] == role
        assert json.loads(meta["normalization"]) == {"kind": "dtype"} and meta["segcli_version"]
        dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["N", 3, "H", "W"]
        net = after["networks"][role]
        assert net["onnx"] == p.name and net["onnx_sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        # everything else is untouched
        assert {k: v for k, v in net.items() if not k.startswith("onnx")} == before["networks"][role]
    assert {k: v for k, v in after.items() if k != "networks"} == {k: v for k, v in before.items() if k != "networks"}
    bundle = load_bundle(b)
    assert bundle.verify() == []
    p = make_predictor(bundle, "fine", backend="onnx", max_batch=2)
    t = make_predictor(bundle, "fine", backend="torch")
    x = np.random.default_rng(0).random((5, 3, 40, 44), dtype=np.float32)
    assert (p.backend, p.provider, p.device, p.n_classes, p.in_channels) == ("onnx", CPU_EP, "cpu", 3, 3)
    np.testing.assert_allclose(p(x), t(x), atol=1e-5)


def test_export_fp16(tmp_path: Path) -> None:
    b = make_bundle(tmp_path / "b", size=32)
    paths = export_bundle(b, fp16=True)
    assert paths["fine"].name == "fine.fp16.onnx"
    meta = {q.key: q.value for q in onnx.load(str(paths["fine"])).metadata_props}
    assert meta["precision"] == "fp16"
    bundle = load_bundle(b)
    p = OnnxPredictor.from_bundle(bundle, "fine")  # CPU: runs, with a warning that fp32 is the better choice
    x = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(p(x), make_predictor(bundle, "fine")(x), atol=2e-2)


def _biased_bundle(path: Path, image: np.ndarray) -> Path:
    """A random U-Net bundle whose masks are neither empty nor full: BN calibrated on the image and
    the head biased to the median logit, so logits spread O(1) around the 0.5 threshold."""
    torch.manual_seed(0)
    x = torch.from_numpy((image - image.min()) / (image.max() - image.min()))[None, None].float()
    nets = {}
    for role in ("coarse", "fine"):
        m = calibrate_bn(build("unet", in_channels=1, out_channels=1, features=4, depth=2), x)
        with torch.no_grad():
            m.head.bias -= m(x).median()
        nets[role] = ("unet", {"features": 4, "depth": 2}, m)
    return save_bundle(path, name=path.name, method="stts", classes=["background", "object"], in_channels=1,
                       input_size=32, normalization={"kind": "percentile", "lower": 1, "upper": 99}, networks=nets)


def test_cli_export_then_predict_onnx_matches_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 60, (64, 80), dtype=np.uint8)
    a[10:30, 20:50] = 220
    Image.fromarray(a).save(tmp_path / "img.png")
    b = _biased_bundle(tmp_path / "polyp", a.astype(np.float32))
    r = run_cli("export", b, "--json")
    assert r.returncode == 0, r.stderr
    assert {row["role"] for row in json.loads(r.stdout)} == {"coarse", "fine"}
    masks = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"mask_{backend}.png"
        r = run_cli("predict", tmp_path / "img.png", "--model", b, "--backend", backend, "-o", out, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["files"][0]["backend"] == backend
        masks[backend] = np.array(Image.open(out)) > 0
    t, o = masks["torch"], masks["onnx"]
    assert 0.05 < t.mean() < 0.95  # a real mask, not an empty or a full one
    assert 2 * (t & o).sum() / (t.sum() + o.sum()) >= 0.999
    # a tampered export (one byte changed) is refused before ONNX Runtime parses it
    f = b / "fine.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = run_cli("predict", tmp_path / "img.png", "--model", b, "--backend", "onnx", "-o", tmp_path / "t.png")
    assert r.returncode != 0 and "fine.onnx does not match its recorded SHA-256" in r.stderr
    # --device cuda on a machine without CUDA: a one-line usage error, exit 2
    r = run_cli("predict", tmp_path / "img.png", "--model", b, "--backend", "onnx", "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cuda" in r.stderr


def test_cli_export_errors(tmp_path: Path) -> None:
    r = run_cli("export", tmp_path / "nothing-here")
    assert r.returncode == 2 and r.stderr.startswith("segcli: error:") and r.stderr.strip().count("\n") == 0


def test_tampered_stale_and_escaping_exports_refused(exported: Path, tmp_path: Path) -> None:
    b = Path(shutil.copytree(exported, tmp_path / "b"))
    bundle = load_bundle(b)
    OnnxPredictor.from_bundle(bundle, "coarse")  # the intact export loads
    # one byte changed
    f = b / "coarse.onnx"
    good = f.read_bytes()
    f.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(BundleError, match="does not match its recorded SHA-256"):
        OnnxPredictor.from_bundle(load_bundle(b), "coarse")
    f.write_bytes(good)
    # an .onnx path escaping the bundle
    doc = json.loads((b / BUNDLE_FILE).read_text())
    doc["networks"]["coarse"]["onnx"] = "../elsewhere.onnx"
    (b / BUNDLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="escapes the bundle"):
        OnnxPredictor.from_bundle(load_bundle(b), "coarse")
    # an export of other weights (retrained after export): stale, refused
    doc["networks"]["coarse"]["onnx"] = "coarse.onnx"
    doc["networks"]["coarse"]["sha256"] = "0" * 64
    (b / BUNDLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="stale export"):
        OnnxPredictor.from_bundle(load_bundle(b), "coarse")
    # a model whose external data points outside the bundle, with a correct hash
    m = onnx.load_model_from_string(good)
    init = m.graph.initializer[0]
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../etc/passwd")
    evil = m.SerializeToString()
    f.write_bytes(evil)
    doc = json.loads((b / BUNDLE_FILE).read_text())
    doc["networks"]["coarse"].update(sha256=bundle.networks["coarse"].sha256,
                                     onnx_sha256=hashlib.sha256(evil).hexdigest())
    (b / BUNDLE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="external data path '../../etc/passwd' escapes the bundle"):
        OnnxPredictor.from_bundle(load_bundle(b), "coarse")


def test_no_export_and_no_cache_is_a_usage_error(grey_bundle: Path) -> None:
    with pytest.raises(UsageError, match=r"has no ONNX export and none could be made \(the ONNX cache is off\); run `segcli export"):
        make_predictor(load_bundle(grey_bundle), "fine", backend="onnx", onnx_cache="off")


class _FakeSession:
    """Stands in for an InferenceSession: records run calls, fails above a batch size."""

    def __init__(self, limit: int, providers: list[str], message: str = "Failed to allocate memory for requested buffer") -> None:
        self.limit, self._providers, self.message, self.sizes = limit, providers, message, []

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self):
        return [type("I", (), {"name": "input", "type": "tensor(float)", "shape": ["N", 1, "H", "W"]})()]

    def get_outputs(self):
        return [type("O", (), {"name": "logits", "shape": ["N", 1, "H", "W"]})()]

    def run(self, _names, feed):
        x = feed["input"]
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise RuntimeError(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : {self.message}")
        return [x.mean(axis=1, keepdims=True) - 0.5]


def test_out_of_memory_halves_the_batch_then_fails_clearly() -> None:
    sess = _FakeSession(limit=3, providers=[CUDA_EP, CPU_EP])
    p = OnnxPredictor(sess, n_classes=2, in_channels=1, device="cuda", max_batch=16)
    x = np.random.default_rng(0).random((11, 1, 8, 8), dtype=np.float32)
    out = p(x)
    assert out.shape == (11, 2, 8, 8) and p.max_batch == 2
    assert sess.sizes[:3] == [11, 5, 2]  # 11 -> 5 -> 2 fits; the rest goes in batches of 2
    np.testing.assert_allclose(out[:, 1], 1 / (1 + np.exp(-(x[:, 0] - 0.5))), rtol=1e-6)
    p = OnnxPredictor(_FakeSession(limit=0, providers=[CUDA_EP]), n_classes=2, in_channels=1, device="cuda", max_batch=4)
    with pytest.raises(SegcliError, match="out of memory .* even with a batch of 1"):
        p(x[:4])
    p = OnnxPredictor(_FakeSession(limit=0, providers=[CPU_EP], message="Invalid rank"), n_classes=2, in_channels=1)
    with pytest.raises(RuntimeError, match="Invalid rank"):  # not an OOM: no retry, the real error
        p(x[:4])
    assert is_oom(MemoryError()) and is_oom(RuntimeError("CUDA failure 2: out of memory")) and not is_oom(ValueError("x"))


def test_cuda_requested_only_when_really_usable(monkeypatch: pytest.MonkeyPatch, exported: Path) -> None:
    bundle = load_bundle(exported)
    asked: list[Any] = []
    real = ort.InferenceSession

    def spy(model, so=None, providers=None, **kw):
        asked.append(providers)
        return real(model, so, providers=[CPU_EP], **kw)  # never really load the CUDA libraries here

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    import segcli.runtimes.device as device

    monkeypatch.setattr(device, "cuda_possible", lambda: True)  # as on a machine with an NVIDIA driver
    # ORT lists CUDA, torch says there is no usable GPU: CPU only, CUDA never requested
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_providers("cuda") == [CPU_EP]
    p = OnnxPredictor.from_bundle(bundle, "fine", device="cuda")
    assert p.provider == CPU_EP and p.device == "cpu" and asked[-1] == [CPU_EP]
    # both agree: CUDA asked for first (device index kept), CPU as the fallback for unsupported nodes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    provs = choose_providers("cuda:1")
    assert provs[0][0] == CUDA_EP and provs[0][1]["device_id"] == 1 and provs[-1] == CPU_EP
    with pytest.raises(UsageError):
        choose_providers("cuda:x")
    # ORT fails to start CUDA anyway and silently uses the CPU: reported as such, not as "cuda"
    p = OnnxPredictor.from_bundle(bundle, "fine", device="cuda")
    assert asked[-1][0][0] == CUDA_EP and p.provider == CPU_EP and p.device == "cpu"
    # an ORT build without CUDA: CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_EP])
    assert choose_providers("cuda") == [CPU_EP] and choose_providers("cpu") == [CPU_EP]


def test_threads_follow_the_setting(exported: Path) -> None:
    p = OnnxPredictor.from_bundle(load_bundle(exported), "coarse", threads=1)
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    assert p.session.get_session_options().intra_op_num_threads == 1
    assert p(x).shape == (3, 2, 32, 32) and p(x[:0]).shape == (0, 2, 32, 32)
    with pytest.raises(ValueError, match="channels"):
        p(np.zeros((1, 3, 8, 8), np.float32))


def test_onnx_runs_never_import_torch(tmp_path: Path) -> None:
    """An exported bundle on ONNX Runtime: the whole predict command runs without importing torch (issue 19:
    importing torch only to ask about CUDA cost about 1.4 s per run)."""
    import subprocess
    import sys

    b = tmp_path / "b"
    save_bundle(b, name="b", method="stts", classes=["bg", "fg"], in_channels=3, input_size=32,
                normalization={"kind": "dtype"},
                networks={r: ("unet", {"features": 4, "depth": 2}, build("unet", in_channels=3, out_channels=1,
                                                                           features=4, depth=2).eval())
                          for r in ("coarse", "fine")})
    export_bundle(b)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code = ("import sys\nfrom segcli.cli import main\nsys.argv = ['segcli', 'predict', sys.argv[1], '--model', "
            "sys.argv[2], '--backend', 'onnx', '-q']\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint('torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png"), str(b)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert "torch imported: False" in r.stdout, (r.stdout, r.stderr)
    assert (tmp_path / "a_seg.png").is_file()


def test_torch_predictor_takes_a_read_only_array_without_warning_or_writing_it():
    """A plane's downscaled view is shared and read-only; the torch runtime must neither warn nor touch it."""
    import warnings

    from segcli.runtimes.torch_backend import TorchPredictor

    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
    x.flags.writeable = False
    before = x.copy()
    pred = TorchPredictor(torch.nn.Conv2d(3, 1, 1), n_classes=2, in_channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = pred(x)
    assert out.shape == (1, 2, 16, 16)
    np.testing.assert_array_equal(x, before)
