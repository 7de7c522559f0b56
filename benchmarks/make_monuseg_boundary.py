"""Give the MoNuSeg training set object ids (``instances/``) so ``segcli train --boundary`` can learn to separate nuclei.

    python benchmarks/make_monuseg_boundary.py --data /work/shared/data/monuseg --xml XML_DIR -o OUT
    segcli train ... --data OUT --boundary 2

Each tile's nuclei come from its MoNuSeg XML polygons where ``XML_DIR/NAME.xml`` exists (rasterised as
``bench_monuseg_instances.rasterise`` does: pixel centres inside the polygon, a later polygon over an earlier
one); otherwise from the binary mask split by segcli's own seeded watershed (``segcli.instances.split_touching``),
since the shared binary masks merge touching nuclei. ``OUT/instances/NAME.tif`` holds uint32 ids, ``OUT/masks``
the binary masks (from the same ids), ``OUT/images`` the tiles; ``OUT/sources.json`` says which tiles had polygons.
With ``--targets`` the masks are instead the three-class targets ``--boundary W`` makes
(``segcli.instances.boundary_targets``: background / nucleus / boundary), for training without ``--boundary``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from segcli.instances import boundary_targets, split_touching


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="MoNuSeg folder: images/, masks/ (binary)")
    ap.add_argument("--xml", type=Path, required=True, help="folder of MoNuSeg XML annotations")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--targets", type=int, default=0, metavar="W",
                    help="write three-class masks with a boundary W px wide instead of binary ones")
    args = ap.parse_args()
    from bench_monuseg_instances import rasterise  # same folder

    for sub in ("images", "masks", "instances"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    sources = {}
    for img in sorted((args.data / "images").glob("*.png")):
        name = img.stem
        mask = np.asarray(Image.open(args.data / "masks" / img.name)) > 0
        xml = args.xml / f"{name}.xml"
        if xml.exists():
            inst, sources[name] = rasterise(xml, mask.shape), "xml"
        else:
            inst, sources[name] = split_touching(mask), "watershed"
        shutil.copyfile(img, args.out / "images" / img.name)
        tifffile.imwrite(args.out / "instances" / f"{name}.tif", inst.astype(np.uint32), compression="zlib")
        target = boundary_targets(inst, args.targets) if args.targets else (inst > 0).astype(np.uint8)
        Image.fromarray(target).save(args.out / "masks" / img.name)
        print(f"{name}: {sources[name]}, {int(inst.max())} nuclei")
    spec = json.loads((args.data / "dataset.json").read_text())
    if args.targets:
        spec["labels"] = {"background": 0, "nucleus": 1, "boundary": 2}
        spec["instances"] = {"boundary": "boundary", "object": "nucleus"}
    spec["note"] = ("instances/ made by benchmarks/make_monuseg_boundary.py: nuclei from the XML polygons where "
                    "present, else the binary mask split by segcli's watershed (sources.json)")
    (args.out / "dataset.json").write_text(json.dumps(spec, indent=1))
    (args.out / "sources.json").write_text(json.dumps(sources, indent=1))


if __name__ == "__main__":
    main()
