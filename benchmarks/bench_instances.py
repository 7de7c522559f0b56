"""Object-level scores of a bundle's masks: AJI, PQ and F1 for connected components against the watershed split.

    python benchmarks/bench_instances.py --model models/nuclei --data ../shared/data/dsb2018-nuclei \
        --json benchmarks/results/instances-dsb-nuclei.json

The images scored are the bundle's own validation split (recorded in segcli.json), whose ground-truth instance
labels sit in the dataset's ``instances/`` folder. That split also chose the bundle's checkpoint: the figures are
optimistic for Dice and say so; what they compare (the same masks as components or split) is unaffected.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segcli.api import Segmenter
from segcli.instance_metrics import InstanceCounts, instance_counts
from segcli.instances import components, split_touching


def _val_names(model: Path) -> list[str]:
    split = json.loads((model / "segcli.json").read_text())["training"]["split"]
    return list(split["val"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--min-distance", type=float, nargs="+", default=[2.0, 3.0, 4.0, 6.0])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    seg = Segmenter(str(args.model))
    names = _val_names(args.model)
    variants = ["components"] + [f"watershed-{d:g}" for d in args.min_distance]
    pooled = {v: InstanceCounts() for v in variants}
    per_image, seconds = [], {v: 0.0 for v in variants}
    for name in names:
        img = np.asarray(Image.open(args.data / "images" / f"{name}.png").convert("RGB"))
        truth = np.asarray(Image.open(args.data / "instances" / f"{name}.png"))
        labels = seg.segment_array(img)[0].labels
        row = {"image": name}
        for v in variants:
            t = time.perf_counter()
            inst = components(labels) if v == "components" else split_touching(labels, float(v.split("-")[1]))
            seconds[v] += time.perf_counter() - t
            c = instance_counts(truth, inst)
            pooled[v] = pooled[v] + c
            row[v] = c.scores()
        per_image.append(row)
    summary = {}
    for v in variants:
        s = pooled[v].scores()
        s["mean_aji"] = float(np.mean([r[v]["aji"] for r in per_image if r[v]["aji"] is not None]))
        s["mean_pq"] = float(np.mean([r[v]["pq"] for r in per_image if r[v]["pq"] is not None]))
        s["seconds"] = round(seconds[v], 3)
        summary[v] = s
        print(f"{v:14s} AJI {s['aji']:.3f} (mean {s['mean_aji']:.3f})  PQ {s['pq']:.3f} SQ {s['sq']:.3f} "
              f"DQ/F1 {s['dq']:.3f}  objects {s['objects_pred']} vs {s['objects_true']}  {s['seconds']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "data": str(args.data), "images": len(names),
                                         "split": "the bundle's validation split (it chose the checkpoint)",
                                         "pooled": summary, "per_image": per_image}, indent=1))


if __name__ == "__main__":
    main()
