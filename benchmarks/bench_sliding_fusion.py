"""Sliding's fusion rule on the bounded route: the previous max fusion against the Gaussian blend (issues 30, 32).

A bundle whose method is ``sliding`` (``nuclei-he``) runs on a slide too big to hold as full-resolution windows
over the rough pass's tissue. Those windows used to be max-fused; they are now blended with the in-memory sliding
window's Gaussian. This script runs each of ``nuclei-he``'s 7 held-out MoNuSeg tiles (5 hospitals the model never
saw; ``models/nuclei-he/splits.json``) three ways, in one process, and scores each mask against the tile's
ground truth (pooled over the tiles: every pixel counts once):

* ``in-memory``: the whole tile through the sliding window (Gaussian blend over every window);
* ``bounded, gaussian``: the tile forced onto the bounded route (``lazy_pixels=0``), as a big slide is run today;
* ``bounded, max``: the same with the previous rule (the engine's fusion swapped back to ``max`` here only).

    python benchmarks/bench_sliding_fusion.py --data /work/shared/data/monuseg \\
        --results benchmarks/results/sliding_fusion.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _score(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    p, t = pred > 0, truth > 0
    return {"tp": int((p & t).sum()), "fp": int((p & ~t).sum()), "fn": int((~p & t).sum())}


def _pooled(counts: list[dict[str, int]]) -> dict[str, float]:
    tp, fp, fn = (sum(c[k] for c in counts) for k in ("tp", "fp", "fn"))
    return {"dice": round(2 * tp / (2 * tp + fp + fn), 4), "precision": round(tp / (tp + fp), 4),
            "recall": round(tp / (tp + fn), 4)}


def _run(bundle: Path, tif: Path, out: Path, lazy: bool, rule: str) -> tuple[np.ndarray, dict]:
    import tifffile

    import segcli.engines.stts as stts_engine
    from segcli.api import Segmenter

    real_fine_pass = stts_engine.fine_pass
    if rule == "max":  # the previous rule of the bounded route, for comparison only
        stts_engine.fine_pass = lambda *a, **k: real_fine_pass(*a, **{**k, "fusion": "max"})
    try:
        seg = Segmenter(str(bundle), **({"lazy_pixels": 0} if lazy else {}))
        t0 = time.perf_counter()
        rep = seg.predict_file(tif, out)
        dt = time.perf_counter() - t0
    finally:
        stts_engine.fine_pass = real_fine_pass
    assert rep.status == "ok", rep.error
    assert bool(rep.info.get("bounded_memory")) == lazy
    return tifffile.imread(out), {"seconds": round(dt, 2), "windows": rep.info.get("windows")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="monuseg folder (images/*.png, masks/*.png)")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "nuclei-he")
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args()
    import tifffile
    from PIL import Image

    split = json.loads((args.model / "splits.json").read_text())
    held = split.get("val") or split.get("test")
    arms = {"in-memory": (False, "gaussian"), "bounded, gaussian": (True, "gaussian"), "bounded, max": (True, "max")}
    counts: dict[str, list[dict[str, int]]] = {a: [] for a in arms}
    per_tile = []
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for case in held:
            img = np.asarray(Image.open(args.data / "images" / f"{case}.png").convert("RGB"))
            truth = np.asarray(Image.open(args.data / "masks" / f"{case}.png"))
            tif = Path(tmp) / f"{case}.tif"
            tifffile.imwrite(tif, img, tile=(256, 256), compression="zlib", resolution=(40000.0, 40000.0),
                             resolutionunit="CENTIMETER")  # 0.25 µm/px, as the tiles were scanned
            masks, row = {}, {"case": case}
            for arm, (lazy, rule) in arms.items():
                masks[arm], info = _run(args.model, tif, Path(tmp) / f"{case}-{arm.replace(', ', '-')}.tif", lazy, rule)
                c = _score(masks[arm], truth)
                counts[arm].append(c)
                row[arm] = {**_pooled([c]), **info}
            row["bounded gaussian == in-memory"] = bool(np.array_equal(masks["in-memory"], masks["bounded, gaussian"]))
            same &= row["bounded gaussian == in-memory"]
            per_tile.append(row)
            print(case, {a: row[a]["dice"] for a in arms}, "identical" if row["bounded gaussian == in-memory"] else "")
    doc = {"pooled": {a: _pooled(c) for a, c in counts.items()}, "tiles": per_tile,
           "bounded_gaussian_identical_to_in_memory": same, "load_average": os.getloadavg()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["pooled"], indent=2), "identical on every tile:", same)


if __name__ == "__main__":
    main()
