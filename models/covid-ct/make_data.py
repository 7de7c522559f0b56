"""Rebuild covid-ct's training folder from ../shared/data (the card's "Training data" section).

    python models/covid-ct/make_data.py --shared ../shared/data -o runs/data/covid-hu-neg [--neg-stride 8]

1. Each 8-bit covid19-ct-slices JPEG p is mapped back to Hounsfield units as p/255*1500-1350, the inverse
   of the lung window (centre -600, width 1500) the bundle normalises real CT with, and stored as float32
   TIFF; masks are copied as they are.
2. Negative slices (all background) are every ``--neg-stride``-th axial slice of the normal chest CT
   ``ct-example/images/aorta_1p5mm.nii.gz`` (starting at stride/2), in file index order, HU as stored.
3. ``splits.json`` holds the seeded split of the 50 covid slices (seed 0, 20 %) that every covid run in
   MODELS.md used, with all negatives in the train part, so val stays the same 10 covid slices.

The default reproduces the folder the shipped bundle was trained on bit for bit.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import tifffile
from PIL import Image

from segcli.train.data import make_split

WINDOW_LO, WINDOW_WIDTH = -1350.0, 1500.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--neg-stride", type=int, default=8, help="every N-th slice of the normal chest CT")
    args = ap.parse_args()
    src = args.shared / "covid19-ct-slices"
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    covid = sorted((p.stem for p in (src / "images").glob("*.jpg")), key=int)
    for name in covid:
        p = np.asarray(Image.open(src / "images" / f"{name}.jpg").convert("L"), np.float32)
        tifffile.imwrite(out / "images" / f"{name}.tif", p / 255.0 * WINDOW_WIDTH + WINDOW_LO)
        shutil.copyfile(src / "masks" / f"{name}.png", out / "masks" / f"{name}.png")
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(args.shared / "ct-example/images/aorta_1p5mm.nii.gz")))
    negatives = []
    for z in range(args.neg_stride // 2, ct.shape[0], args.neg_stride):
        name = f"neg_aorta_z{z:03d}"
        tifffile.imwrite(out / "images" / f"{name}.tif", ct[z].astype(np.float32))
        Image.fromarray(np.zeros(ct[z].shape, np.uint8)).save(out / "masks" / f"{name}.png")
        negatives.append(name)
    split = make_split(covid, seed=0, val_fraction=0.2)
    train, val = split.train + negatives, split.val
    (out / "splits.json").write_text(json.dumps({"train": train, "val": val}, indent=1))
    meta = json.loads((src / "dataset.json").read_text())
    meta["name"] = "covid19-ct-slices-hu+negatives"
    meta["note"] += (f" DERIVED COPY (models/covid-ct/make_data.py): each 8-bit slice p mapped to HU as p/255*1500-1350;"
                     f" plus {len(negatives)} normal-chest negative slices (every {args.neg_stride}th axial slice of"
                     " ct-example aorta_1p5mm.nii.gz, TotalSegmentator test data, Apache-2.0), train split only.")
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    print(f"{out}: {len(covid)} covid slices ({len(train) - len(negatives)} train / {len(val)} val) "
          f"+ {len(negatives)} negatives")


if __name__ == "__main__":
    main()
