"""Build a three-class MoNuSeg training set (background / nucleus interior / nucleus boundary) for nuclei-he.

    python benchmarks/make_monuseg_boundary.py --data /work/shared/data/monuseg --xml XML_DIR -o OUT [--width 2]

Each tile's instances come from its MoNuSeg XML polygons where ``XML_DIR/NAME.xml`` exists (rasterised as
``bench_monuseg_instances.rasterise`` does); otherwise from the binary mask split by segcli's own seeded
watershed (``segcli.instances.split_touching``), since the repository's binary masks merge touching nuclei.
A pixel is *boundary* (2) when it lies within ``--width`` px of a pixel outside its own instance (background
or another nucleus), *interior* (1) otherwise: a network trained on it marks the neck between two touching
nuclei, which the distance-map split on a binary mask can only guess. ``OUT/sources.json`` says which tiles
had polygons.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from segcli.instances import split_touching


def boundary_labels(inst: np.ndarray, width: int = 2) -> np.ndarray:
    """uint8 0/1/2 (background / interior / boundary) from uint32 instance ids."""
    inst = np.asarray(inst)
    # a pixel is on a boundary when a (2*width+1)² neighbourhood holds another id (background included)
    size = 2 * width + 1
    hi = ndi.maximum_filter(inst, size=size)
    lo = ndi.minimum_filter(inst, size=size)
    edge = (hi != inst) | (lo != inst)
    out = np.zeros(inst.shape, np.uint8)
    fg = inst > 0
    out[fg] = 1
    out[fg & edge] = 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MoNuSeg folder: images/, masks/ (binary)")
    ap.add_argument("--xml", type=Path, required=True, help="folder of MoNuSeg XML annotations")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=2, help="boundary width in px (inside each nucleus)")
    args = ap.parse_args()
    from bench_monuseg_instances import rasterise  # same folder

    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    sources = {}
    for img in sorted((args.data / "images").glob("*.png")):
        name = img.stem
        mask = np.asarray(Image.open(args.data / "masks" / img.name)) > 0
        xml = args.xml / f"{name}.xml"
        if xml.exists():
            inst, sources[name] = rasterise(xml, mask.shape), "xml"
        else:
            inst, sources[name] = split_touching(mask), "watershed"
        lab = boundary_labels(inst, args.width)
        shutil.copyfile(img, args.out / "images" / img.name)
        Image.fromarray(lab).save(args.out / "masks" / img.name)
        print(f"{name}: {sources[name]}, {int(inst.max())} nuclei, boundary {np.mean(lab == 2):.3f}")
    spec = json.loads((args.data / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "nucleus": 1, "boundary": 2}
    spec["instances"] = {"boundary": "boundary", "object": "nucleus"}  # the trained bundle folds and splits by it
    spec["note"] = (f"three classes made by benchmarks/make_monuseg_boundary.py (width {args.width}): instances from "
                    "the XML polygons where present, else the binary mask split by segcli's watershed")
    (args.out / "dataset.json").write_text(json.dumps(spec, indent=1))
    (args.out / "sources.json").write_text(json.dumps(sources, indent=1))


if __name__ == "__main__":
    main()
