"""highdicom's volume API on the units of ``dicom_conformance.py``: does it place them where dcm2niix does?

The measurement behind wrapping dcm2niix rather than highdicom (benchmarks/README.md, "DICOM conformance"):
per repository, how many series highdicom turns into a volume whose voxel-centre corners match the Ref
NIfTI of the same SeriesNumber (0.01 mm), place elsewhere, or refuse with an exception.

    python benchmarks/dicom_highdicom_probe.py --root /work/dcmqa --repos dcm_qa dcm_qa_enh
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.dicom_conformance import CORNER_MM, REPOS, grid_error, gunzipped, refs, units  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_of(unit: Path):
    """highdicom's volume for a multi-frame file or a folder of single-frame files."""
    import highdicom as hd
    import pydicom

    if unit.is_file():
        return hd.imread(str(unit)).get_volume()
    datasets = [pydicom.dcmread(str(f)) for f in sorted(unit.iterdir()) if f.is_file()]
    if len(datasets) == 1:
        return hd.Image.from_dataset(datasets[0]).get_volume()
    return hd.get_volume_from_series(datasets)


def main() -> None:
    import nibabel as nib

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--repos", nargs="*", default=list(REPOS))
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="segcli-hdprobe-") as tmp:
        for name in args.repos:
            root = gunzipped(args.root / name, Path(tmp))
            by_number = refs(root / "Ref")
            counts = {"OK": 0, "wrong": 0, "error": 0, "no-ref": 0}
            for unit, number, label in units(root, Path(tmp)):
                candidates = by_number.get(number, [])
                if not candidates:
                    counts["no-ref"] += 1
                    continue
                try:
                    vol = volume_of(unit)
                except Exception as exc:  # highdicom raises many types on what it cannot stack
                    counts["error"] += 1
                    print(f"  error {label}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                err = min(grid_error(vol.spatial_shape, LPS_TO_RAS @ vol.affine, nib.load(str(c)).shape,
                                     nib.load(str(c)).affine) for c in candidates)
                counts["OK" if err <= CORNER_MM else "wrong"] += 1
                if err > CORNER_MM:
                    print(f"  wrong {label}: {err:.3g} mm, shape {vol.spatial_shape}")
            print(f"{name}: {counts}", flush=True)


if __name__ == "__main__":
    main()
