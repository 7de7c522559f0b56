"""AJI, PQ, F1 and Dice of an H&E bundle on MoNuSeg tiles with instance ground truth from the XML polygons.

    python benchmarks/bench_monuseg_instances.py --model models/nuclei-he --xml DIR [--images DIR] \
        --json benchmarks/results/instances-monuseg-nuclei-he.json

Each ``DIR/NAME.xml`` (MoNuSeg's annotation: one ``Region`` of ``Vertex X= Y=`` per nucleus) is rasterised into
an instance label image (pixels whose centre lies inside the polygon, ``skimage.draw.polygon``; where polygons
overlap the later one wins, as HoVer-Net's conversion does). The image is ``DIR/NAME.tif`` (the official test
tiles) or ``--images/NAME.png``. Each image goes through ``Segmenter.predict_file`` with ``instances=True``, the
path of ``segcli predict --instances``; the mask's connected components, the written instance image and, with
``--min-distance``, other seed distances of the same split are scored against the truth (segcli.instance_metrics:
AJI of Kumar et al. 2017, PQ of Kirillov et al. 2019, F1 at IoU 0.5). Dice is the mask's, per tile and pooled.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from segcli.api import Segmenter
from segcli.instance_metrics import InstanceCounts, instance_counts
from segcli.instances import components, split_touching


def rasterise(xml: Path, shape: tuple[int, int]) -> np.ndarray:
    """uint32 instance ids from MoNuSeg's XML polygons (ids in file order)."""
    from skimage.draw import polygon

    out = np.zeros(shape, np.uint32)
    k = 0
    for region in ET.parse(xml).getroot().iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) < 3:
            continue
        xs, ys = np.array(pts).T
        rr, cc = polygon(ys, xs, shape)
        if len(rr):
            k += 1
            out[rr, cc] = k
    return out


def _image(name: str, xml_dir: Path, images: Path | None) -> Path:
    tif = xml_dir / f"{name}.tif"
    if tif.exists():
        return tif
    if images is not None and (images / f"{name}.png").exists():
        return images / f"{name}.png"
    raise SystemExit(f"no image for {name} in {xml_dir} or {images}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--xml", type=Path, required=True, help="folder of MoNuSeg XML annotations (and test .tif)")
    ap.add_argument("--images", type=Path, help="folder of NAME.png for XMLs without a .tif beside them")
    ap.add_argument("--names", nargs="+", help="only these tiles")
    ap.add_argument("--min-distance", type=float, nargs="*", default=[], help="extra seed distances to score")
    ap.add_argument("--method", help="override the bundle's method")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.names or sorted(p.stem for p in args.xml.glob("*.xml"))
    seg = Segmenter(args.model, instances=True, **({"method": args.method} if args.method else {}))
    variants = ["components", "instances"] + [f"watershed-{d:g}" for d in args.min_distance]
    pooled = {v: InstanceCounts() for v in variants}
    inter = total = 0
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            src = _image(name, args.xml, args.images)
            rep = seg.predict_file(src, Path(tmp) / f"{name}_seg.tif")
            if rep.status != "ok":
                raise SystemExit(f"{name}: {rep.status} {rep.error}")
            mask = tifffile.imread(Path(tmp) / f"{name}_seg.tif") > 0
            inst = tifffile.imread(Path(tmp) / f"{name}_seg_instances.tif")
            truth = rasterise(args.xml / f"{name}.xml", mask.shape)
            tf = truth > 0
            i, s = int((mask & tf).sum()), int(mask.sum() + tf.sum())
            inter, total = inter + i, total + s
            row: dict = {"image": name, "dice": round(2 * i / s, 4), "objects_true": int(truth.max())}
            for v in variants:
                pred = (components(mask) if v == "components" else inst if v == "instances"
                        else split_touching(mask, float(v.split("-")[1])))
                c = instance_counts(truth, pred)
                pooled[v] = pooled[v] + c
                row[v] = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in c.scores().items()}
            rows.append(row)
            print(f"{name}: Dice {row['dice']:.3f}  " + "  ".join(
                f"{v} AJI {row[v]['aji']:.3f} PQ {row[v]['pq']:.3f}" for v in variants), flush=True)
    summary = {"dice": round(2 * inter / total, 4), "mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4)}
    for v in variants:
        s = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in pooled[v].scores().items()}
        s["mean_aji"] = round(float(np.mean([r[v]["aji"] for r in rows])), 4)
        s["mean_pq"] = round(float(np.mean([r[v]["pq"] for r in rows])), 4)
        summary[v] = s
        print(f"{v:14s} AJI {s['aji']:.3f} (mean {s['mean_aji']:.3f})  PQ {s['pq']:.3f} SQ {s['sq']:.3f} "
              f"DQ/F1 {s['dq']:.3f}  objects {s['objects_pred']} vs {s['objects_true']}")
    print(f"Dice {summary['dice']:.3f} (mean {summary['mean_dice']:.3f}); {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "xml": str(args.xml), "tiles": names,
                                         "pooled": summary, "per_image": rows}, indent=1))


if __name__ == "__main__":
    main()
