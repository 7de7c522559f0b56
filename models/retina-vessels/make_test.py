"""Build retina-vessels' test folder: DRIVE's 20 official test images, which the shared copy leaves out.

    python models/retina-vessels/make_test.py \
        --mirror /work/.mirror/hamdan92+retinal-vessel-segmentation/repo -o runs/data/drive-test

``/work/shared/data/drive`` holds DRIVE's 20 training images (21-40) from the repository its PROVENANCE.txt
names (github.com/hamdan92/retinal-vessel-segmentation, ``--mirror`` a clone, bare or not); the same repository
carries the official test set (01-19 and 20: images, the first observer's manual segmentation, the field-of-view
masks). None of them was trained on or chose a checkpoint, so they are the bundle's test split, the set
published DRIVE figures are reported on.

Conversions are the shared copy's, and the script first checks they reproduce its 20 images exactly: the TIFF
as an RGB PNG, ``1st_manual/NN_manual1.gif`` (0/255) as a 0/1 PNG, ``mask/NN_test_mask.gif`` (0/255) as a 0/1
field-of-view PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from held_out import Source, arguments, derived, finish, test_folder  # noqa: E402

COMMIT = "7952b714c5a4f51f9e03871ba48de37ac991f377"


def main() -> None:
    args = arguments(__doc__.split("\n")[0], "hamdan92/retinal-vessel-segmentation", COMMIT)
    src = Source(args.mirror, args.commit)

    def case(part: str, n: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = src.image(f"DRIVE/{part}/images/{n}_{part}.tif")
        vessels = (src.image(f"DRIVE/{part}/1st_manual/{n}_manual1.gif") > 127).astype(np.uint8)
        fov = (src.image(f"DRIVE/{part}/mask/{n}_{part}_mask.gif") > 127).astype(np.uint8)
        return image, vessels, fov

    shared = args.shared / "drive"
    trained = sorted(p.stem for p in (shared / "images").glob("*.png"))
    for n in trained:
        got = case("training", n)
        want = [np.asarray(Image.open(shared / sub / f"{n}.png")) for sub in ("images", "masks", "fov")]
        if not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)):
            raise SystemExit(f"training image {n}: the conversion does not reproduce the shared copy")
    names = [f"{i:02d}" for i in range(1, 21)]
    if set(names) & set(trained):
        raise SystemExit(f"test images also in the shared copy: {sorted(set(names) & set(trained))}")
    out = test_folder(args.out, ("images", "masks", "fov"))
    vessel_px = 0
    for n in names:
        image, vessels, fov = case("test", n)
        vessel_px += int(vessels.sum())
        Image.fromarray(image).save(out / "images" / f"{n}.png")
        Image.fromarray(vessels, mode="L").save(out / "masks" / f"{n}.png")
        Image.fromarray(fov, mode="L").save(out / "fov" / f"{n}.png")
    meta = derived(shared, name="drive-test", note=f"DERIVED COPY (models/retina-vessels/make_test.py): DRIVE's 20 "
                   f"official test images, github.com/hamdan92/retinal-vessel-segmentation {args.commit}; "
                   "fov/<case>.png is the field of view (1 inside); never used for training or checkpoint selection.")
    finish(out, names, meta, f"{len(names)} test images (the conversion reproduces all {len(trained)} shared ones); "
                             f"{vessel_px} vessel pixels")


if __name__ == "__main__":
    main()
