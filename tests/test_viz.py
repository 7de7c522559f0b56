"""--preview overlays and --arsm-maps resolution maps, through the CLI."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.conftest import make_bundle, run_cli
from tests.test_cli import png, write_volume


def test_preview_png_for_image_and_volume(tmp_path, grey_bundle):
    src = png(tmp_path / "a.png")
    vol = tmp_path / "v.nii.gz"
    write_volume(vol)
    r = run_cli("predict", src, vol, "--model", grey_bundle, "--preview", "--json")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    for f in files:
        p = f["info"]["preview"]
        pic = np.asarray(Image.open(p))
        assert pic.ndim == 3 and pic.shape[2] == 3 and pic.dtype == np.uint8
    assert np.asarray(Image.open(files[0]["info"]["preview"])).shape[:2] == (64, 80)


def test_arsm_maps(tmp_path):
    b = make_bundle(tmp_path / "arsm", arch="arsm", classes=("bg", "a", "b"),
                    config={"width": "w18-small-v1", "base_channels": 4, "stem_stride": 4})
    src = png(tmp_path / "x.png")
    r = run_cli("predict", src, "--model", b, "--arsm-maps", tmp_path / "maps", "--method", "direct", "--json")
    assert r.returncode == 0, r.stderr
    maps = sorted((tmp_path / "maps").glob("x_arsm_*.png"))
    assert [m.name for m in maps] == ["x_arsm_0_bg.png", "x_arsm_1_a.png", "x_arsm_2_b.png"]
    a = np.asarray(Image.open(maps[1]))
    assert a.shape == (32, 32, 3)
    # Without an ARSM network the request is a warning, not a failure.
    u = make_bundle(tmp_path / "unet")
    r = run_cli("predict", src, "--model", u, "--arsm-maps", tmp_path / "m2")
    assert r.returncode == 0 and "no ARSM gate" in r.stderr
