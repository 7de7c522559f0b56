"""The whole run's header check (issue 28) on TIFF slides and DICOM series: a file that cannot fit
--max-memory is refused alone (exit 1, the batch goes on), and a run where none can is refused before any
work (exit 2), from headers only (segcli.header_needs)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile

from segcli import header_needs
from segcli.api import Segmenter
from tests.conftest import run_cli
from tests.dicom import write_dicom_series
from tests.test_memplan_routes import _cli_minimum

MB = 10**6


def _slide(path: Path, side: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((side, side, 3), 235, np.uint8)
    img[side // 4: side // 2, side // 4: side // 2] = 60
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="zlib")
    return path


def test_a_slide_whose_rough_map_cannot_fit_is_refused_from_its_header(tmp_path: Path, rgb_bundle) -> None:
    """--max-downscale 1 makes a 3000² slide's rough grid 9 MPix, 4.8 over the working set's: 144 MB of
    dense rough arrays. Alone it is refused before any work; beside a small slide, alone (exit 1)."""
    big = _slide(tmp_path / "in" / "big.tif", 3000)
    seg = Segmenter(rgb_bundle, max_downscale=1.0)
    own = header_needs.bounded_own(seg, "slide", (3000, 3000), None)
    assert own == (3000 * 3000 - header_needs.GRID_ROUGH_PIXELS) * (10 * 2 + 10)
    base = ("predict", big, "--model", rgb_bundle, "--max-downscale", "1", "-o", tmp_path / "out" / "big_seg.tif")
    budget = _cli_minimum(*base) + own / MB / 2
    r = run_cli(*base, "--max-memory", f"{budget:.0f}MB")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"segcli: error: {big}: the rough pass over this 3000x3000 slide needs at least ")
    assert not (tmp_path / "out").exists()
    _slide(tmp_path / "in" / "small.tif", 64)
    both = run_cli("predict", tmp_path / "in", "--model", rgb_bundle, "--max-downscale", "1", "-o", tmp_path / "out",
                   "--max-memory", f"{budget:.0f}MB")
    assert both.returncode == 1, both.stderr
    line = next(x for x in both.stderr.splitlines() if "needs at least" in x)
    assert f"{big}: the rough pass over this 3000x3000 slide needs at least" in line
    assert (tmp_path / "out" / "small_seg.tif").exists() and not (tmp_path / "out" / "big_seg.tif").exists()


def test_a_dicom_series_that_cannot_fit_is_refused_before_any_work(tmp_path: Path, grey_bundle) -> None:
    img = sitk.GetImageFromArray(np.zeros((40, 128, 128), np.int16))
    img.SetSpacing((0.8, 0.8, 2.0))
    write_dicom_series(tmp_path / "ct", img, "1.2.826.0.1.3680043.2.1125.91")
    base = ("predict", tmp_path / "ct", "--model", grey_bundle, "-o", tmp_path / "m.nii.gz")
    minimum = _cli_minimum(*base)
    r = run_cli(*base, "--max-memory", f"{minimum + 1:.0f}MB")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"segcli: error: {tmp_path / 'ct'}: this 40x128x128 volume needs at least ")
    need = float(re.search(r"needs at least ([0-9.]+) MB", r.stderr).group(1))  # type: ignore[union-attr]
    vox = 40 * 128 * 128
    assert abs(need - (minimum + (3 * 2 * vox + vox) / MB)) < 1.5  # streamed: three slabs and the mask once
    assert not (tmp_path / "m.nii.gz").exists()
