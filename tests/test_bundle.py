"""Bundle loading: every problem is a one-line BundleError naming the file; nothing is unpickled."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from segcli import normalize
from segcli.bundle import load_bundle, save_bundle
from segcli.errors import BundleError, InputError
from segcli.nets import build
from tests.conftest import make_bundle


def edit(bundle, fn):
    cfg = json.loads((bundle / "segcli.json").read_text())
    fn(cfg)
    (bundle / "segcli.json").write_text(json.dumps(cfg))


def test_roundtrip_and_params(tmp_path):
    b = load_bundle(make_bundle(tmp_path / "b", size=64))
    assert b.n_classes == 2 and b.param("pad") == 8 and b.param("threshold") == 0.5
    m = b.load_module("fine")
    assert isinstance(m, torch.nn.Module) and not m.training
    assert b.verify() == []


def test_half_weights_load_as_float32(tmp_path):
    m = build("unet", in_channels=1, out_channels=1, features=4, depth=2)
    save_bundle(tmp_path / "h", name="h", method="direct", classes=["bg", "fg"], in_channels=1, input_size=32,
                normalization={"kind": "dtype"}, networks={"coarse": ("unet", {"features": 4, "depth": 2}, m)}, half=True)
    b = load_bundle(tmp_path / "h")
    loaded = b.load_module("coarse")
    assert next(loaded.parameters()).dtype == torch.float32
    assert b.network("fine").arch == "unet"  # a one-network bundle serves both roles


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(schema_version=99), "schema_version 99"),
        (lambda c: c.pop("classes"), "the field 'classes' is missing"),
        (lambda c: c.update(classes=["bg", "a", "b"]), "shape mismatch"),
        (lambda c: c.update(method="magic"), "unknown method"),
        (lambda c: c["networks"]["fine"].update(weights="../../etc/passwd"), "escapes the bundle"),
        (lambda c: c["networks"]["fine"].update(weights="/etc/passwd"), "relative path"),
        (lambda c: c["networks"]["fine"].update(arch="nope"), "unknown architecture"),
        (lambda c: c["networks"]["fine"]["config"].update(features=8), "shape mismatch"),
        (lambda c: c.update(normalization={"kind": "magic"}), "normalization kind"),
    ],
)
def test_bad_bundles(tmp_path, mutate, message):
    b = make_bundle(tmp_path / "b")
    edit(b, mutate)
    with pytest.raises(BundleError, match=message):
        load_bundle(b).load_module("fine")


def test_missing_and_tampered_weights(tmp_path):
    b = make_bundle(tmp_path / "b")
    w = b / "fine.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    bundle = load_bundle(b)
    assert any("SHA-256" in p for p in bundle.verify())
    with pytest.raises(BundleError, match="SHA-256"):
        bundle.load_module("fine")
    w.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(b).load_module("fine")


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pwned')",))


def test_pickle_weights_are_refused(tmp_path):
    b = make_bundle(tmp_path / "b")
    evil = b / "fine.pt"
    with open(evil, "wb") as f:
        pickle.dump({"x": Boom()}, f)
    edit(b, lambda c: c["networks"]["fine"].update(weights="fine.pt", sha256=None))
    with pytest.raises(BundleError, match="has no recorded sha256"):
        load_bundle(b).load_module("fine")  # unhashed weights are refused outright
    bundle = load_bundle(b)
    bundle.allow_unhashed = True  # even when the user allows them, a pickle is never unpickled
    with pytest.raises(BundleError, match="refusing to load"):
        bundle.load_module("fine")


def test_plain_pt_state_dict_loads_weights_only(tmp_path):
    b = make_bundle(tmp_path / "b")
    m = load_bundle(b).load_module("fine")
    torch.save(m.state_dict(), b / "fine.pt")
    edit(b, lambda c: c["networks"]["fine"].update(weights="fine.pt", sha256=None))
    bundle = load_bundle(b)
    bundle.allow_unhashed = True
    m2 = bundle.load_module("fine")
    for (k, v), (_, v2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(v.float(), v2.float()), k


def test_normalisations():
    hu = np.array([-2000, -1000, -600, 150, 3000], np.int16)
    np.testing.assert_allclose(normalize.normalize(hu, {"kind": "ct_window", "center": -600, "width": 1500}),
                               [0, 350 / 1500, 0.5, 1, 1], atol=1e-6)
    np.testing.assert_allclose(normalize.normalize(np.array([0, 255], np.uint8), {"kind": "dtype"}), [0, 1])
    np.testing.assert_allclose(normalize.normalize(np.array([0, 65535], np.uint16), {"kind": "dtype"}), [0, 1])
    z = normalize.normalize(np.arange(10, dtype=np.float32), {"kind": "zscore"})
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    p = normalize.normalize(np.arange(101, dtype=np.float32), {"kind": "percentile", "lower": 10, "upper": 90})
    assert p[10] == 0 and p[90] == 1 and p[50] == pytest.approx(0.5)
    nan = normalize.normalize(np.array([np.nan, 1.0], np.float32), {"kind": "scale", "factor": 1})
    assert nan.tolist() == [0.0, 1.0]


def test_channel_conversion_is_explicit():
    rgb = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(InputError, match="--channels grey"):
        normalize.convert_channels(rgb, 1, "keep", "x.png")
    assert normalize.convert_channels(rgb, 1, "grey").shape == (4, 4, 1)
    assert normalize.convert_channels(np.zeros((4, 4, 1), np.uint8), 3, "rgb").shape == (4, 4, 3)
    assert normalize.convert_channels(np.zeros((4, 4, 4), np.uint8), 3, "rgb").shape == (4, 4, 3)


def test_unhashed_weights_need_the_users_flag(tmp_path):
    """A segcli.json without sha256 must not load tampered weights in silence (issue 16)."""
    import numpy as np
    from PIL import Image

    from tests.conftest import run_cli

    b = make_bundle(tmp_path / "b", in_channels=3, normalization={"kind": "dtype"})
    edit(b, lambda c: [n.pop("sha256") for n in c["networks"].values()])
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 40, 3), np.uint8) + np.arange(40, dtype=np.uint8)[None, :, None]).save(img)
    r = run_cli("predict", img, "--model", b, "-o", tmp_path / "m.png")
    assert r.returncode == 2 and "has no recorded sha256" in r.stderr and not (tmp_path / "m.png").exists()
    r = run_cli("predict", img, "--model", b, "-o", tmp_path / "m.png", "--allow-unhashed")
    assert r.returncode == 0, r.stderr


def test_bundle_files_are_group_readable(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        b = make_bundle(tmp_path / "b")
    finally:
        os.umask(mask)
    for f in b.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(classes=5), "'classes' must be a list of class names, not int"),
    (lambda c: c.update(networks=[1, 2]), "'networks' must be an object mapping roles to networks, not list"),
    (lambda c: c["networks"]["fine"].update(config="abc"), "network 'fine' 'config' must be an object"),
    (lambda c: c.update(params=[1]), "'params' must be an object, not list"),
    (lambda c: c.update(normalization="dtype"), "'normalization' must be an object, not str"),
    (lambda c: c.update(input_size="big"), "'input_size' must be an integer, not str"),
    (lambda c: c.update(input_size=True), "'input_size' must be an integer, not bool"),
    (lambda c: c.update(name={"a": 1}), "'name' must be a string, not dict"),
    (lambda c: c["networks"]["fine"].update(weights=5), "network 'fine' must be an object with 'arch' and 'weights'"),
    (lambda c: c.update(classes=["background", "a\x00b"]), "'classes' must be non-empty strings without NUL"),
    (lambda c: c.pop("method"), "the field 'method' is missing"),
])
def test_malformed_bundle_json_of_any_shape_is_one_line(tmp_path, change, words):
    b = make_bundle(tmp_path / "b")
    edit(b, change)
    with pytest.raises(BundleError) as err:
        load_bundle(b)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_deeply_nested_bundle_json(tmp_path):
    b = make_bundle(tmp_path / "b")
    (b / "segcli.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(b)
