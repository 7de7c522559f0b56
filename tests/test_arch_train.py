"""Every registered architecture trains for 2 epochs through `segcli train` and predicts through `segcli predict`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segcli.bundle import load_bundle
from tests.conftest import run_cli

SHARED = Path(__file__).parent / "fixtures" / "shared"

SMALL = {
    "unet": ["features=4", "depth=2"],
    "hrnet": ["width=w18-small-v1", "base_channels=4", "stem_stride=4"],
    "arsm": ["width=w18-small-v1", "base_channels=4", "stem_stride=4"],
    "rpn-fcn": ["width_mult=0.0625"],
    "deconvnet": ["widths=[4,8,16]"],
    "vgg-fcn": ["width_mult=0.0625"],
}


def test_every_registered_arch_has_a_small_config():
    from segcli.nets import available

    assert set(available()) == set(SMALL)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_two_epoch_train_then_predict(tmp_path, arch):
    out = tmp_path / "run"
    cfg = [a for kv in SMALL[arch] for a in ("--arch-config", kv)]
    r = run_cli("train", "--method", "direct", "--arch", arch, "--data", SHARED, "-o", out, "--size", "32",
                "--epochs", "2", "--batch-size", "4", "--threads", "1", "--no-val-full-res", "-q", *cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    b = load_bundle(out)
    assert b.network("coarse").arch == arch and not b.verify()
    img = next((SHARED / "images").iterdir())
    r = run_cli("predict", img, "-o", tmp_path / "mask.png", "--model", out, "--method", "stts", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["files"][0]["status"] in ("ok", "empty")
    assert (tmp_path / "mask.png").exists()
