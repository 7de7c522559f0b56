"""An input is never overwritten (issue 16): every planned output is compared with every input before any work,
by path, through symlinks and hard links; the inputs stay byte for byte; the walk's left-out outputs are counted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("case", ["same-file", "other-input", "symlink", "hardlink", "probabilities", "preview",
                                  "stats", "log-file"])
def test_outputs_never_overwrite_inputs(tmp_path, rgb_bundle, case):
    d = tmp_path / "d"
    a = _png(d / "a.png")
    args: list = [a, "--model", rgb_bundle]
    want = "segcli: error: "
    if case == "same-file":
        args += ["-o", a]
        want += f"{a}: its mask {a} would overwrite itself"
    elif case == "other-input":
        b = _png(d / "a_seg.png", 1)
        args = [a, b, "--model", rgb_bundle]
        want += f"{a}: its mask {d / 'a_seg.png'} would overwrite the input {b}"
    elif case == "symlink":
        link = tmp_path / "link.png"
        link.symlink_to(a)
        args += ["-o", link]
        want += f"{a}: its mask {link} would overwrite itself"
    elif case == "hardlink":
        other = tmp_path / "hard.png"
        os.link(a, other)
        args += ["-o", other]
        want += f"{a}: its mask {other} would overwrite itself"
    elif case == "probabilities":
        b = d / "a_seg_probs.tif"
        b.write_bytes(b"II*\x00" + bytes(60))  # any file: it is an input, so it must not be replaced
        args = [a, b, "--model", rgb_bundle, "--probabilities"]
        want += f"{a}: its probabilities {b} would overwrite the input {b}"
    elif case == "preview":
        b = _png(d / "a_seg_preview.jpg", 2)
        args = [a, b, "--model", rgb_bundle, "--preview"]
        want += f"{a}: its preview {b} would overwrite the input {b}"
    elif case == "stats":
        args += ["--stats", a]
        want += f"--stats {a} would overwrite the input {a}"
    elif case == "log-file":
        args += ["--log-file", a]
        want += f"--log-file {a} would overwrite the input {a}"
    before = _digest(tmp_path)
    r = run_cli("predict", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith(want), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _digest(tmp_path) == before  # nothing written, nothing changed


def test_folder_walk_counts_left_out_outputs(tmp_path, rgb_bundle):
    _png(tmp_path / "in" / "x.png")
    _png(tmp_path / "in" / "old_seg.png", 1)
    r = run_cli("predict", tmp_path / "in", "-o", tmp_path / "out", "--model", rgb_bundle, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"]["total"] == 1 and doc["summary"]["earlier_outputs_left_out"] == 1
    assert "left out 1 file(s) named *_seg/*_probs/*_preview" in r.stderr
