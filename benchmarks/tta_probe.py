"""What test-time flips would buy a bundle (issue 33): pooled per-class IoU with 1, 4 or 8 dihedral transforms.

Every network input is run under each transform (flips, and transposes for 8) and the probabilities, transformed
back, are averaged: the cost is that many times the networks' work. It runs what ``segcli predict --tta
none|flips|dihedral`` runs (segcli.runtimes.tta), scoring in-process.

    python benchmarks/tta_probe.py --model models/em-vnc --data /work/shared/data/drosophila-vnc \\
        --names 02.png 03.png 11.png --classes 5 --json benchmarks/results/tta-em-vnc.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segcli.inferer import Inferer  # noqa: E402
from segcli.options import PredictOptions  # noqa: E402

#: --transforms N as segcli predict --tta names it (segcli.runtimes.tta.TTA_MODES)
MODES = {1: "none", 4: "flips", 8: "dihedral"}


def score(model: str, data: Path, names: list[str], k: int, n: int) -> dict:
    inf = Inferer(PredictOptions(model=model, tta=MODES[n]))  # what segcli predict --tta runs
    inf.warm_up("2d")
    inter, union = np.zeros(k), np.zeros(k)
    dice = []  # binary tasks: the foreground's Dice per image, averaged (segcli evaluate's figure)
    t0 = time.perf_counter()
    for name in names:
        img = np.asarray(Image.open(data / "images" / name).convert("RGB" if k == 2 else None))
        gt = np.asarray(Image.open(next((data / "masks").glob(Path(name).stem + ".*"))))  # masks may be .png
        lab = np.asarray(inf.run_staged(inf.stage_2d(img if img.ndim == 3 else img[..., None])).labels)
        if k == 2:
            gt = (gt > 0).astype(np.uint8)
            s = int((lab == 1).sum() + (gt == 1).sum())
            dice.append(1.0 if s == 0 else 2.0 * int(((lab == 1) & (gt == 1)).sum()) / s)
        for c in range(k):
            inter[c] += ((lab == c) & (gt == c)).sum()
            union[c] += ((lab == c) | (gt == c)).sum()
    iou = inter / np.maximum(union, 1)
    return {"transforms": n, "iou_pooled": [round(float(v), 4) for v in iou], "miou": round(float(iou.mean()), 4),
            **({"dice_mean": round(float(np.mean(dice)), 4)} if dice else {}),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with images/ and masks/")
    ap.add_argument("--names", nargs="+", help="file names under images/ and masks/ to score")
    ap.add_argument("--splits", type=Path, help="instead of --names: a splits JSON and --part of it (stems)")
    ap.add_argument("--part", default="test")
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--transforms", type=int, nargs="+", default=[1, 4, 8], choices=sorted(MODES))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.splits is not None:
        stems = set(json.loads(a.splits.read_text())[a.part])
        a.names = sorted(p.name for p in (a.data / "images").iterdir() if p.stem in stems)
    if not a.names:
        ap.error("give --names or --splits")
    rows = [score(a.model, a.data, a.names, a.classes, n) for n in a.transforms]
    for r in rows:
        print(r)
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "names": a.names, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
