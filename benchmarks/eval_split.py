"""Score a trained bundle on the val split recorded in a training run, through the public CLI.

Copies the run's val images and masks, runs ``segcli predict`` and ``segcli evaluate`` on them (full
resolution), then adds the per-class IoU pooled over the split (intersections and unions summed over
images, as segmentation papers report mIoU), background included. Every score in MODELS.md and the
model cards was produced this way.

    python benchmarks/eval_split.py RUN DATA OUT [--model BUNDLE] [--fov]

RUN is the training output folder (its segcli.json holds the split), DATA the dataset folder, OUT a
scratch folder; ``--model`` scores another bundle (e.g. the packed ``models/<name>``) on RUN's split.
``--splits FILE --part test`` scores the cases FILE lists under ``test`` instead: a split that neither
training nor checkpoint selection saw (RUN then only names the model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def pooled_iou(pred_dir: Path, gt_dir: Path, labels: dict[str, int]) -> dict:
    from segcli.io import open_image

    names = sorted(labels, key=labels.get)
    inter, union = np.zeros(len(names)), np.zeros(len(names))
    per: dict[str, list[float]] = {n: [] for n in names}
    preds = {p.name.split(".")[0].removesuffix("_seg"): p for p in pred_dir.iterdir()}
    for g in sorted(gt_dir.iterdir()):
        gt = np.asarray(open_image(g).array).squeeze()
        pr = np.asarray(open_image(preds[g.name.split(".")[0]]).array).squeeze()
        for i, n in enumerate(names):
            a, b = pr == labels[n], gt == labels[n]
            inter_i, union_i = int((a & b).sum()), int((a | b).sum())
            inter[i] += inter_i
            union[i] += union_i
            if union_i:
                per[n].append(inter_i / union_i)
    out = {"per_case_mean_iou": {n: float(np.mean(v)) if v else None for n, v in per.items()},
           "pooled_iou": {n: float(inter[i] / union[i]) if union[i] else None for i, n in enumerate(names)}}
    for key in ("per_case_mean_iou", "pooled_iou"):
        vals = [v for v in out[key].values() if v is not None]
        out[key.replace("iou", "miou")] = float(np.mean(vals)) if vals else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=None, help="bundle to score (default: RUN)")
    ap.add_argument("--fov", action="store_true", help="score inside DATA/fov masks only (DRIVE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", type=Path, default=None, help="JSON with a --part list (e.g. a test split)")
    ap.add_argument("--part", default="test", help="which list of --splits to score (default: test)")
    ap.add_argument("--tta", default="none", help="segcli predict --tta: none | flips | dihedral")
    args = ap.parse_args()
    if args.splits is not None:
        val = json.loads(args.splits.read_text())[args.part]
    else:
        val = json.loads((args.run / "segcli.json").read_text())["training"]["split"]["val"]
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    for sub in ("img", "gt", "fov"):
        (out / sub).mkdir(parents=True)
    images = {p.stem: p for p in (args.data / "images").iterdir()}
    for stem in val:
        shutil.copy(images[stem], out / "img" / images[stem].name)
        shutil.copy(args.data / "masks" / f"{stem}.png", out / "gt" / f"{stem}.png")
        if args.fov:
            shutil.copy(args.data / "fov" / f"{stem}.png", out / "fov" / f"{stem}.png")
    shutil.copy(args.data / "dataset.json", out / "dataset.json")
    segcli = [sys.executable, "-m", "segcli"]
    t = time.perf_counter()
    subprocess.run([*segcli, "predict", str(out / "img"), "-o", str(out / "pred"), "--model", str(args.model or args.run),
                    "-q", "--threads", str(args.threads), "--tta", args.tta], check=True)
    print(f"predicted {len(val)} cases in {time.perf_counter() - t:.1f} s", flush=True)
    ev = [*segcli, "evaluate", str(out / "pred"), str(out / "gt"), "--json-file", str(out / "eval.json"),
          "--csv", str(out / "eval.csv"), "--summary"]
    if args.fov:
        ev += ["--fov", str(out / "fov")]
    subprocess.run(ev, check=True)
    labels = json.loads((args.data / "dataset.json").read_text())["labels"]
    miou = pooled_iou(out / "pred", out / "gt", labels)
    (out / "miou.json").write_text(json.dumps(miou, indent=1))
    print(json.dumps(miou))


if __name__ == "__main__":
    main()
