"""Build em-vnc's test folder: slices 16-19 of the labelled ssTEM stack, which the shared copy leaves out.

    python models/em-vnc/make_test.py --mirror /work/.mirror/unidesigner+groundtruth-drosophila-vnc/repo \
        -o runs/data/vnc-test

``/work/shared/data/drosophila-vnc`` holds slices 00-15 of stack 1 (train and val); the source repository
(github.com/unidesigner/groundtruth-drosophila-vnc, ``--mirror`` is a clone, bare or not) labels all 20. The
four it alone has were never trained on nor used to choose a checkpoint, so they are the bundle's test split.

The merged label map ``stack1/labels/labelsNNNNNNNN.png`` is mapped to the shared copy's class indices:
membrane (0, 32, 64, 96 = four orientations, 128 = junction) -> 1, glia/extracellular (159) -> 4,
mitochondria (191) -> 2, synapse (223) -> 3, intracellular (255) -> 0. The script first checks that this rule
reproduces the shared copy's masks of slices 00-15 exactly and that their raw slices are the shared images, so
the test slices are built the way the training ones were.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from held_out import Source, arguments, derived, finish, test_folder  # noqa: E402

COMMIT = "4a5f051466d24d8dc1e855ab55658bb1b1dcd6bf"
TEST = ["16", "17", "18", "19"]
LABEL_TO_CLASS = {0: 1, 32: 1, 64: 1, 96: 1, 128: 1, 159: 4, 191: 2, 223: 3, 255: 0}


def to_classes(labels: np.ndarray, name: str) -> np.ndarray:
    """Class indices of one merged label map; an unknown grey level stops the build."""
    lut = np.full(256, 255, np.uint8)
    for grey, cls in LABEL_TO_CLASS.items():
        lut[grey] = cls
    out = lut[labels]
    if (out == 255).any():
        raise SystemExit(f"{name}: grey levels {sorted(set(np.unique(labels)) - set(LABEL_TO_CLASS))} unknown")
    return out


def main() -> None:
    args = arguments(__doc__.split("\n")[0], "unidesigner/groundtruth-drosophila-vnc", COMMIT)
    src = Source(args.mirror, args.commit)

    def slice_of(name: str) -> tuple[np.ndarray, np.ndarray]:
        raw = tifffile.imread(io.BytesIO(src.bytes(f"stack1/raw/{name}.tif")))
        return raw, to_classes(src.image(f"stack1/labels/labels000000{name}.png"), name)

    shared = args.shared / "drosophila-vnc"
    trained = sorted(p.stem for p in (shared / "images").glob("*.png"))
    if set(trained) & set(TEST):
        raise SystemExit(f"test slices also in the shared copy: {sorted(set(trained) & set(TEST))}")
    for name in trained:
        raw, cls = slice_of(name)
        if not (np.array_equal(raw, np.asarray(Image.open(shared / "images" / f"{name}.png")))
                and np.array_equal(cls, np.asarray(Image.open(shared / "masks" / f"{name}.png")))):
            raise SystemExit(f"slice {name}: the mapping does not reproduce the shared copy")
    out = test_folder(args.out)
    counts = np.zeros(5, np.int64)
    for name in TEST:
        raw, cls = slice_of(name)
        counts += np.bincount(cls.ravel(), minlength=5)
        Image.fromarray(raw, mode="L").save(out / "images" / f"{name}.png")
        Image.fromarray(cls, mode="L").save(out / "masks" / f"{name}.png")
    source = json.loads((shared / "dataset.json").read_text()).get("source", "")
    meta = derived(shared, name="drosophila-vnc-test",
                   source=f"{source}; slices 16-19 of github.com/unidesigner/groundtruth-drosophila-vnc {args.commit}",
                   note="DERIVED COPY (models/em-vnc/make_test.py): slices 16-19 of stack 1, never used for training "
                        "or checkpoint selection.")
    finish(out, TEST, meta, f"{len(TEST)} test slices (the mapping reproduces all {len(trained)} shared slices); "
                            f"pixels per class {counts.tolist()}")


if __name__ == "__main__":
    main()
