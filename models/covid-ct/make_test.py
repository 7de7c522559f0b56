"""Build covid-ct's test folder: the 48 test slices of Inf-Net's COVID-SemiSeg split, in HU.

    python models/covid-ct/make_test.py --mirror /work/.mirror/DengPingFan+Inf-Net/repo -o runs/data/covid-hu-test

``/work/shared/data/covid19-ct-slices`` holds only the 50 TRAIN slices of that split (its PROVENANCE.txt);
the 48 TEST slices (MedSeg, re-exported by Inf-Net) were removed from Inf-Net's HEAD and are read here from
git history: ``--mirror`` is a clone of github.com/DengPingFan/Inf-Net (bare or not), ``--commit`` the commit
that still has ``Dataset/TestingSet/MultiClassInfection-Test/`` (Imgs/*.jpg, GT/*.png = palette PNG with
indices 0 background, 1 ground-glass, 2 consolidation; GT-1/GT-2 are the same two classes one by one).

Same conventions as make_data.py: each 8-bit slice p is mapped to HU as p/255*1500-1350 and stored as
float32 TIFF; the mask is stored as an 8-bit grey PNG of the class indices. ``splits.json`` lists all 48
under ``test`` (for ``benchmarks/eval_split.py --splits DATA/splits.json --part test``). The script checks
that GT agrees with GT-1/GT-2 and that no slice name is one of the training slices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from held_out import Source, arguments, finish, test_folder  # noqa: E402

WINDOW_LO, WINDOW_WIDTH = -1350.0, 1500.0
COMMIT = "e9adc05b59095aac077d6376629698e9091e1bb7"
FOLDER = "Dataset/TestingSet/MultiClassInfection-Test"


def main() -> None:
    args = arguments(__doc__.split("\n")[0], "DengPingFan/Inf-Net", COMMIT)
    src = Source(args.mirror, args.commit)
    names = sorted((Path(p).stem for p in src.names(f"{FOLDER}/Imgs") if p.endswith(".jpg")), key=int)
    train = {p.stem for p in (args.shared / "covid19-ct-slices" / "images").glob("*.jpg")}
    if train & set(names):
        raise SystemExit(f"test slices also in the training folder: {sorted(train & set(names))}")
    out = test_folder(args.out)
    counts = np.zeros(3, np.int64)
    for name in names:
        p = np.asarray(Image.fromarray(src.image(f"{FOLDER}/Imgs/{name}.jpg")).convert("L"), np.float32)
        gt = src.image(f"{FOLDER}/GT/{name}.png")  # palette indices
        ggo = src.image(f"{FOLDER}/GT-1/{name}.png") > 0
        con = src.image(f"{FOLDER}/GT-2/{name}.png") > 0
        if gt.shape != p.shape or gt.max() > 2 or not ((gt == 1) == ggo).all() or not ((gt == 2) == con).all():
            raise SystemExit(f"{name}: GT does not match the image or GT-1/GT-2")
        counts += np.bincount(gt.ravel(), minlength=3)
        tifffile.imwrite(out / "images" / f"{name}.tif", p / 255.0 * WINDOW_WIDTH + WINDOW_LO)
        Image.fromarray(gt.astype(np.uint8), mode="L").save(out / "masks" / f"{name}.png")
    meta = {"name": "covid19-ct-slices-hu-test", "modality": "CT",
            "labels": {"background": 0, "ground_glass": 1, "consolidation": 2},
            "source": "MedSeg COVID-19 CT segmentation dataset, test part of Inf-Net's COVID-SemiSeg split "
                      f"(github.com/DengPingFan/Inf-Net {args.commit}:{FOLDER})",
            "licence": "MedSeg terms; repo code MIT",
            "note": "DERIVED COPY (models/covid-ct/make_test.py): each 8-bit slice p mapped to HU as p/255*1500-1350; "
                    "never used for training or checkpoint selection."}
    finish(out, names, meta, f"{len(names)} test slices; pixels background/GGO/consolidation {counts.tolist()}")


if __name__ == "__main__":
    main()
