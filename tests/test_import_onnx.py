"""``segcli import onnx`` (issue 34): a foreign ONNX graph plus a spec becomes a bundle that predicts
exactly like ONNX Runtime run by hand over the same windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from segcli.api import Segmenter
from segcli.bundle import load_bundle
from segcli.errors import BundleError, UsageError
from segcli.importers.onnx import import_onnx
from segcli.runtimes import make_predictor
from tests.conftest import run_cli

S = 32  # the foreign network's window
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter makes the fixtures


class Tiny(torch.nn.Module):
    """Three classes from RGB: enough structure for windows to disagree at their borders."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 3, 3, padding=1))
        self.softmax = softmax

    def forward(self, x):
        y = self.body(x) * 4.0
        return torch.softmax(y, dim=1) if self.softmax else y


def _export(path: Path, softmax: bool = False, fixed: bool = False) -> Path:
    dyn = None if fixed else {"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}}
    torch.onnx.export(Tiny(softmax).eval(), (torch.rand(1, 3, S, S),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes=dyn)
    return path


def _spec(path: Path, **changes) -> Path:
    doc = {"classes": ["background", "a", "b"], "channels": 3, "input_size": S,
           "normalization": {"kind": "scale", "factor": 1 / 255}, "output": "logits", "pixel_size_um": None}
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx-import")
    return {"logits": _export(d / "logits.onnx"), "probs": _export(d / "probs.onnx", softmax=True),
            "fixed": _export(d / "fixed.onnx", fixed=True), "spec": _spec(d / "spec.json"), "dir": d}


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:70, 0:90]
    rng = np.random.default_rng(3)
    img = np.stack([(yy * 3) % 256, (xx * 5) % 256, rng.integers(0, 256, yy.shape)], -1)
    return img.astype(np.uint8)


def _by_hand(onnx_path: Path, img: np.ndarray, overlap: float) -> np.ndarray:
    """ONNX Runtime over nnU-Net-style windows, Gaussian-weighted softmax, argmax: written out here."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.moveaxis(img.astype(np.float32) / 255, -1, 0)
    H, W = x.shape[1:]

    def starts(n: int) -> list[int]:
        k = int(np.ceil((n - S) / (S * (1 - overlap)))) + 1
        return [round(i * (n - S) / (k - 1)) for i in range(k)]

    c = (np.arange(S) - (S - 1) / 2) / (S / 8)
    g = np.maximum(np.exp(-0.5 * (c[:, None] ** 2 + c[None] ** 2)), 1e-3)
    acc, wsum = np.zeros((3, H, W)), np.zeros((H, W))
    for y0 in starts(H):
        for x0 in starts(W):
            logits = sess.run(None, {"x": x[None, :, y0:y0 + S, x0:x0 + S]})[0][0].astype(np.float64)
            p = np.exp(logits - logits.max(0))
            acc[:, y0:y0 + S, x0:x0 + S] += p / p.sum(0) * g
            wsum[y0:y0 + S, x0:x0 + S] += g
    return np.argmax(acc / wsum, axis=0)


def test_imported_onnx_predicts_like_onnxruntime_by_hand(files, tmp_path):
    out = import_onnx(files["logits"], files["spec"], tmp_path / "b")
    b = load_bundle(out)
    assert (b.method, b.classes, b.in_channels, b.input_size) == ("sliding", ["background", "a", "b"], 3, S)
    assert b.params["overlap"] == 0.5 and not b.verify()
    src = b.info["imported_from"]
    assert src["format"] == "onnx" and (out / "fine.onnx").read_bytes() == files["logits"].read_bytes()
    assert src["sha256"] in (out / "MODEL_CARD.md").read_text()
    img = _image()
    res, _ = Segmenter(out, backend="auto").segment_array(img)
    want = _by_hand(files["logits"], img, 0.5)
    assert res.labels.shape == want.shape
    assert len(np.unique(want)) == 3  # the check means something: all three classes appear
    assert np.mean(res.labels == want) > 0.999


def test_probability_output_is_used_as_is_and_a_wrong_statement_is_refused(files, tmp_path):
    with pytest.raises(BundleError, match="the spec says logits but the graph's channels sum to 1"):
        import_onnx(files["probs"], files["spec"], tmp_path / "wrong")
    with pytest.raises(BundleError, match="the spec says probabilities but"):
        import_onnx(files["logits"], _spec(tmp_path / "p.json", output="probabilities"), tmp_path / "wrong2")
    a = import_onnx(files["logits"], files["spec"], tmp_path / "a")
    b = import_onnx(files["probs"], _spec(tmp_path / "p.json", output="probabilities"), tmp_path / "b")
    img = _image()
    la = Segmenter(a).segment_array(img)[0].labels
    lb = Segmenter(b).segment_array(img)[0].labels
    assert np.array_equal(la, lb)  # softmax applied once, by segcli or by the graph


def test_fixed_shape_graph_runs_one_window_at_a_time(files, tmp_path):
    out = import_onnx(files["fixed"], files["spec"], tmp_path / "f")
    assert any("fixed batch size 1" in n for n in load_bundle(out).info["notes"])
    img = _image()
    assert np.array_equal(Segmenter(out).segment_array(img)[0].labels, _by_hand(files["fixed"], img, 0.5))
    with pytest.raises(BundleError, match="input height is fixed at 32"):
        import_onnx(files["fixed"], _spec(tmp_path / "s.json", input_size=64), tmp_path / "g")


@pytest.mark.parametrize("change, words", [
    ({"channels": 1}, "the graph takes 3 channels, the spec says 1"),
    ({"classes": ["background", "a"]}, "3 output channels for 2 classes"),
    ({"output": "scores"}, "output must be 'logits' or 'probabilities'"),
    ({"normalization": {"kind": "hu"}}, "unknown normalization kind"),
    ({"pixel_size_um": -1}, "pixel_size_um must be a positive number"),
    ({"colour": 1}, "unknown spec key 'colour'"),
])
def test_spec_contradictions_are_refused_in_one_line(files, tmp_path, change, words):
    with pytest.raises(BundleError, match=words):
        import_onnx(files["logits"], _spec(tmp_path / "s.json", **change), tmp_path / "x")
    assert not (tmp_path / "x" / "segcli.json").exists()


def test_torch_backend_is_refused_and_tampering_caught(files, tmp_path):
    with pytest.raises(BundleError, match="model file not found"):
        import_onnx(tmp_path / "nope.onnx", files["spec"], tmp_path / "c")
    out = import_onnx(files["logits"], files["spec"], tmp_path / "b")
    with pytest.raises(BundleError, match="imported ONNX model; it runs on ONNX Runtime only"):
        make_predictor(load_bundle(out), "fine", backend="torch")
    data = bytearray((out / "fine.onnx").read_bytes())
    data[-1] ^= 1
    (out / "fine.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its recorded SHA-256"):
        Segmenter(out).segment_array(_image())


def test_cli_import_and_predict(files, tmp_path):
    from PIL import Image

    r = run_cli("import", "onnx", files["logits"], "-o", tmp_path / "b")
    assert r.returncode == 2 and "needs --spec" in r.stderr
    r = run_cli("import", "onnx", files["logits"], "--spec", files["spec"], "-o", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("imported onnx ->")
    r = run_cli("import", "onnx", files["logits"], "--spec", files["spec"], "-o", tmp_path / "b")
    assert r.returncode == 2 and "is not empty; pass --force" in r.stderr
    Image.fromarray(_image()).save(tmp_path / "img.png")
    r = run_cli("predict", tmp_path / "img.png", "--model", tmp_path / "b", "-o", tmp_path / "img_seg.png")
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(tmp_path / "img_seg.png"))
    assert np.mean(got == _by_hand(files["logits"], _image(), 0.5)) > 0.999


class Dark(torch.nn.Module):
    """A 'tissue' detector anyone can check: logit > 0 where the 3x3 mean of the pixel values is below ~0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.c.weight.fill_(-20 / 27)
            self.c.bias.fill_(10.0)

    def forward(self, x):
        return self.c(x)


def _export_dark(path: Path) -> None:
    """The dark-pixel "tissue" network as a dynamic-size ONNX graph (shared by the slide and pairing tests)."""
    torch.onnx.export(Dark().eval(), (torch.rand(1, 3, 64, 64),), str(path), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})


def test_slide_runs_tissue_only_in_bounded_memory(tmp_path):
    import tifffile

    _export_dark(tmp_path / "dark.onnx")
    spec = _spec(tmp_path / "s.json", classes=["background", "tissue"], input_size=64)
    out = import_onnx(tmp_path / "dark.onnx", spec, tmp_path / "b")
    H, W = 1500, 2000
    img = np.full((H, W, 3), 240, np.uint8)  # glass
    yy, xx = np.ogrid[:H, :W]
    for cy, cx, r in ((400, 500, 200), (1000, 1500, 300)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 60  # tissue
    tifffile.imwrite(tmp_path / "slide.tif", img, tile=(256, 256), photometric="rgb", compression="zlib")
    rep = Segmenter(out, lazy_pixels=500_000).predict_file(tmp_path / "slide.tif", tmp_path / "slide_seg.tif")
    assert rep.status == "ok", rep.error
    assert rep.info["bounded_memory"] and rep.info["windows"]["kept"] < rep.info["windows"]["grid"] / 3
    m = tifffile.imread(tmp_path / "slide_seg.tif") > 0
    truth = img[..., 0] < 128
    assert 2 * np.sum(m & truth) / (m.sum() + truth.sum()) > 0.995


def test_imported_graph_cannot_be_fine_tuned(files, tmp_path):
    from segcli.train import train

    out = import_onnx(files["logits"], files["spec"], tmp_path / "b")
    with pytest.raises(UsageError, match="imported ONNX graph, which segcli cannot train"):
        train(Path(__file__).parent / "fixtures" / "shared", tmp_path / "ft", init=str(out), epochs=1, quiet=True)


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = np.full((h, w, 3), 240, np.uint8)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(3):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 10, h // 4)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 60
    return img


def test_pair_distils_a_rough_network_without_labels(tmp_path):
    from PIL import Image

    from segcli.train.pair import train_pair

    _export_dark(tmp_path / "dark.onnx")
    spec = _spec(tmp_path / "s.json", classes=["background", "tissue"], input_size=64)
    fine = import_onnx(tmp_path / "dark.onnx", spec, tmp_path / "fine")
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(_blobs(rng, 128, 160)).save(tmp_path / "imgs" / f"i{i}.png")
    # through the CLI, as the issue spells it: --stage coarse --pair BUNDLE (masks come from the bundle itself)
    r = run_cli("train", "--stage", "coarse", "--pair", fine, "--data", tmp_path / "imgs", "-o", tmp_path / "pair",
                "--epochs", "3", "--features", "4", "--batch-size", "4", "--threads", "1", "--no-val-full-res", "-q")
    assert r.returncode == 0, r.stderr
    b = load_bundle(tmp_path / "pair")
    assert set(b.networks) == {"coarse", "fine"} and b.method == "sliding" and not b.verify()
    assert b.networks["fine"].sha256 == load_bundle(fine).networks["fine"].sha256
    assert b.training["distilled"] is True and b.network("coarse").arch == "unet"
    with pytest.raises(UsageError, match="drop that option"):
        train_pair(tmp_path / "imgs", tmp_path / "p2", str(fine), size=32)

    with pytest.raises(UsageError, match="one-network sliding bundle"):
        train_pair(tmp_path / "imgs", tmp_path / "p3", str(tmp_path / "pair"))



@pytest.mark.parametrize(("args", "says"), [
    (["--stage", "fine", "--pair", "x"], "only 'coarse' can be trained alone"),
    (["--stage", "coarse"], "add --pair BUNDLE"),
])
def test_stage_is_checked_before_any_work(tmp_path, args, says):
    r = run_cli("train", *args, "--data", tmp_path / "nothing-here", "-o", tmp_path / "out")
    assert r.returncode == 2 and says in r.stderr and not (tmp_path / "out").exists()
