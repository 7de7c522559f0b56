"""What the bundles' ``models/<name>/make_test.py`` scripts share: files of a public dataset repository read from a
git clone at a fixed commit (the held-out part the shared copy leaves out), and the test folder they write
(``images/``, ``masks/``, ``splits.json`` listing every case under ``test``, ``dataset.json``)."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def arguments(description: str, repo: str, commit: str) -> argparse.Namespace:
    """``--mirror`` (a clone of ``repo``, bare or not), ``--commit``, ``--shared`` (the shared data, to check the
    conversion against), ``-o`` (the test folder)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--mirror", type=Path, required=True, help=f"git dir of a clone of {repo}")
    ap.add_argument("--commit", default=commit)
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"), help="to check the conversion")
    ap.add_argument("-o", "--out", type=Path, required=True)
    return ap.parse_args()


class Source:
    """Files of one commit of a git clone."""

    def __init__(self, mirror: Path, commit: str) -> None:
        self.git, self.commit = ["git", "--git-dir", str(mirror)], commit

    def bytes(self, path: str) -> bytes:
        return subprocess.run([*self.git, "show", f"{self.commit}:{path}"], capture_output=True, check=True).stdout

    def image(self, path: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.bytes(path))))

    def names(self, folder: str) -> list[str]:
        out = subprocess.run([*self.git, "ls-tree", "--name-only", self.commit, f"{folder.rstrip('/')}/"],
                             capture_output=True, check=True, text=True).stdout.split()
        return [Path(p).name for p in out]


def test_folder(out: Path, subdirs: tuple[str, ...] = ("images", "masks")) -> Path:
    for sub in subdirs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def derived(shared: Path, **changes: str) -> dict[str, Any]:
    """The shared copy's ``dataset.json`` (labels, licence) with the test folder's ``changes`` (name, note, ...)."""
    meta = json.loads((shared / "dataset.json").read_text())
    meta.update(changes)
    return meta


def finish(out: Path, names: list[str], meta: dict[str, Any], summary: str) -> None:
    """``splits.json`` (every case is test) and ``dataset.json``; ``summary`` printed after ``out``."""
    (out / "splits.json").write_text(json.dumps({"test": names}, indent=1))
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    print(f"{out}: {summary}")
