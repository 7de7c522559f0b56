"""Segment-then-segment ablations at inference (issue 22): fusion rule, fine threshold, padding k.

One shipped stts bundle, its own validation split (``training.split.val`` in its segcli.json; images
and masks read from ``--data``), full resolution. No training: every variant reuses the bundle's two
networks. Variants:

* ``direct``: the bundle's coarse network alone (``Segmenter(..., method="direct")``);
* ``stts max``: today's default (per-class maximum, the paper's OR);
* ``stts mean`` / ``centre`` / ``own-box``: the other fusion rules of :mod:`segcli.fusion`
  (``own-box`` with margin k/2, the default, and 0 and k);
* ``fine t=0.6/0.7``: max fusion, the fused fine probabilities thresholded at 0.6/0.7 (the rough
  pass, and so the crops, stay at 0.5);
* ``k=S/16``, ``k=S/4``: max fusion with another crop padding (the default is k = S/8);
* ``ground-truth boxes (oracle)``: the fine pass alone on crops cut around the ground-truth
  components (default padding, max fusion), which isolates the fine network from the rough pass.

Per variant: mean per-image Dice, precision and recall, object recall pooled over the ground-truth
components (``segcli.metrics.object_recall``) and, where ``DATA/instances`` holds instance label
images (DSB 2018), over the individual nuclei; and for stts the crops per image and the mean number
of crops covering a ground-truth foreground pixel (how dense the crops are).

    python benchmarks/bench_stts_ablation.py --data /work/shared/data/dsb2018-nuclei --model models/nuclei \
        --json benchmarks/results/stts-ablation-dsb2018.json

The fusion rule is not a CLI option: the script selects it by wrapping the stts engine
(``segcli.engines.stts.stts``) with ``fusion=`` for the duration of a variant.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


@contextlib.contextmanager
def engine_options(**kw: Any) -> Iterator[None]:
    """Run the stts engine with extra keyword arguments (``fusion``, ``own_margin``) inside the block."""
    import segcli.engines.stts as st

    orig = st.stts
    st.stts = functools.partial(orig, **kw) if kw else orig  # type: ignore[assignment]
    try:
        yield
    finally:
        st.stts = orig  # type: ignore[assignment]


def find_case(data: Path, stem: str) -> tuple[Path, Path]:
    img = next((p for p in sorted((data / "images").glob(stem + ".*"))), None)
    mask = next((p for p in sorted((data / "masks").glob(stem + ".*"))), None)
    if img is None or mask is None:
        raise FileNotFoundError(f"case {stem} not found under {data}")
    return img, mask


def variants(size: int) -> list[dict[str, Any]]:
    k = size // 8
    return [
        {"label": "direct (coarse net alone)", "method": "direct"},
        {"label": "stts max (default)", "method": "stts", "fusion": "max", "fine_thresholds": [0.6, 0.7]},
        {"label": "stts mean", "method": "stts", "fusion": "mean"},
        {"label": "stts centre", "method": "stts", "fusion": "centre"},
        {"label": f"stts own-box (margin k/2={k // 2})", "method": "stts", "fusion": "own-box"},
        {"label": "stts own-box (margin 0)", "method": "stts", "fusion": "own-box", "own_margin": 0},
        {"label": f"stts own-box (margin k={k})", "method": "stts", "fusion": "own-box", "own_margin": k},
        {"label": f"stts max, k=S/16={size // 16}", "method": "stts", "fusion": "max", "pad": size // 16},
        {"label": f"stts max, k=S/4={size // 4}", "method": "stts", "fusion": "max", "pad": size // 4},
        {"label": "stts max, ground-truth boxes (oracle)", "method": "stts", "fusion": "max", "oracle": True},
    ]


def oracle_stts(seg: Any, img: np.ndarray, gt: np.ndarray, size: int) -> Any:
    """The fine pass alone, on crops cut around the ground-truth components (same padding, max fusion).

    Isolates the fine network: the rough pass and its boxes are replaced by perfect ones.
    """
    from segcli.engines.base import ArrayPlane, Timer
    from segcli.engines.stts import fine_pass
    from segcli.geometry import crop_boxes
    from segcli.params import default_pad

    bundle = seg.bundle_for("2d")
    p = seg.plan_for(bundle)
    pad = p.params.get("pad") or default_pad(size)
    plane = ArrayPlane(seg.prepare(img, bundle))
    boxes = crop_boxes(gt, gt.shape, pad, min_side=int(p.params.get("min_side", 5)))
    rough = np.zeros((2, 1, 1), np.float32)  # only read for keep_coarse, which is off
    return fine_pass(plane, seg.predictor(bundle, "fine"), boxes, rough, size=size,
                     threshold=float(p.params["threshold"]), keep_coarse=False, batch_size=16, return_probs=False,
                     timer=Timer())


class Scores:
    """Per-case overlap scores and pooled object counts of one variant."""

    def __init__(self) -> None:
        self.cases: list[dict[str, Any]] = []
        self.pooled: dict[str, int] = {}
        self.seconds = 0.0

    def add(self, stem: str, pred: np.ndarray, gt: np.ndarray, inst: np.ndarray | None,
            extra: dict[str, Any]) -> None:
        from segcli import metrics

        m = metrics.overlap_scores(pred, gt)
        obj = metrics.object_recall(pred, gt)
        for k, v in obj.items():
            if k != "object_recall":
                self.pooled[k] = self.pooled.get(k, 0) + int(v)
        if inst is not None:
            ids = np.unique(inst[inst > 0])
            hit = np.unique(inst[(inst > 0) & pred])
            self.pooled["instances"] = self.pooled.get("instances", 0) + len(ids)
            self.pooled["instances_hit"] = self.pooled.get("instances_hit", 0) + len(hit)
        self.cases.append({"case": stem, **m, "objects": obj["objects"], "hit": obj["hit"], **extra})

    def summary(self) -> dict[str, Any]:
        c = self.cases
        out: dict[str, Any] = {k: float(np.nanmean([x[k] for x in c])) for k in ("dice", "iou", "precision", "recall")}
        out["dice_std"] = float(np.nanstd([x["dice"] for x in c]))
        out["object_recall"] = self.pooled["hit"] / self.pooled["objects"] if self.pooled.get("objects") else None
        out["objects"] = self.pooled.get("objects", 0)
        if self.pooled.get("instances"):
            out["instance_recall"] = self.pooled["instances_hit"] / self.pooled["instances"]
            out["instances"] = self.pooled["instances"]
        if c and "crops" in c[0]:
            out["crops_per_image"] = float(np.mean([x["crops"] for x in c]))
            cov = [x["fg_coverage"] for x in c if x["fg_coverage"] is not None]
            out["crops_per_fg_pixel"] = float(np.mean(cov)) if cov else None
            reach = [x["fg_reached"] for x in c if x["fg_reached"] is not None]
            out["fg_reached"] = float(np.mean(reach)) if reach else None
        out["cases"] = len(c)
        out["seconds"] = self.seconds
        out["per_case"] = c
        return out


def coverage(boxes: list[list[int]], gt: np.ndarray) -> tuple[float | None, float | None]:
    """Mean number of crops over the ground-truth foreground pixels, and the fraction reached by any."""
    if not gt.any():
        return None, None
    count = np.zeros(gt.shape, np.int32)
    for y0, x0, y1, x1 in boxes:
        count[y0:y1, x0:x1] += 1
    return float(count[gt].mean()), float((count[gt] > 0).mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from segcli.api import Segmenter
    from segcli.io import open_image

    cfg = json.loads((args.model / "segcli.json").read_text())
    size = int(cfg["input_size"])
    cases = list(cfg["training"]["split"]["val"])
    if args.limit:
        cases = cases[: args.limit]
    vs = variants(size)
    if args.only:
        vs = [v for v in vs if any(o in v["label"] for o in args.only)]
    scores: dict[str, Scores] = {}
    segs: dict[tuple[str, int | None], Any] = {}
    for i, stem in enumerate(cases):
        img_p, mask_p = find_case(args.data, stem)
        img = open_image(img_p).array
        gt = np.asarray(open_image(mask_p).array)
        gt = (gt[..., 0] if gt.ndim == 3 else gt) > 0
        inst = None
        inst_p = args.data / "instances" / f"{stem}.png"
        if inst_p.exists():
            inst = np.asarray(open_image(inst_p).array)
            inst = inst[..., 0] if inst.ndim == 3 else inst
        for v in vs:
            key = (v["method"], v.get("pad"))
            if key not in segs:
                params = {"pad": v["pad"]} if v.get("pad") is not None else {}
                segs[key] = Segmenter(str(args.model), method=v["method"], backend="torch", threads=args.threads,
                                      params=params)
            kw = {k: v[k] for k in ("fusion", "own_margin") if k in v}
            probs_needed = bool(v.get("fine_thresholds"))
            t0 = time.perf_counter()
            if v.get("oracle"):
                res = oracle_stts(segs[key], img, gt, size)
            else:
                with engine_options(**kw):
                    res, _ = segs[key].segment_array(img, kind="2d", return_probs=probs_needed)
            dt = time.perf_counter() - t0
            pred = np.asarray(res.labels) > 0
            extra: dict[str, Any] = {}
            if v["method"] == "stts":
                cov, reach = coverage(res.info.get("boxes", []), gt)
                extra = {"crops": int(res.info.get("crops", 0)), "fg_coverage": cov, "fg_reached": reach}
            scores.setdefault(v["label"], Scores()).add(stem, pred, gt, inst, extra)
            scores[v["label"]].seconds += dt
            for t in v.get("fine_thresholds", []):
                label = f"stts max, fine t={t}"
                scores.setdefault(label, Scores()).add(stem, res.probs[1] > t, gt, inst, extra)
                scores[label].seconds += dt
        print(f"[{i + 1}/{len(cases)}] {stem}", file=sys.stderr, flush=True)
    rows = []
    for label, s in scores.items():
        rows.append({"label": label, **s.summary()})
    direct = next((r for r in rows if r["label"].startswith("direct")), None)
    for r in rows:
        if direct is not None and r is not direct:
            r["dice_minus_direct"] = r["dice"] - direct["dice"]
            r["meets_issue_22"] = bool(r["dice"] >= direct["dice"] - 0.01
                                       and (r["object_recall"] or 0) > (direct["object_recall"] or 0))
    return {"dataset": args.data.name, "model": str(args.model), "size": size, "cases": len(cases),
            "split": "training.split.val" + (f"[:{args.limit}]" if args.limit else ""),
            "command": " ".join(["python", *sys.argv]), "rows": rows}


def table(out: dict[str, Any]) -> str:
    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    inst = any("instance_recall" in r for r in out["rows"])
    cols = ["variant", "Dice", "precision", "recall", "object recall"] + (["nucleus recall"] if inst else []) + \
        ["crops/image", "crops per fg px", "s/image"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in out["rows"]:
        cells = [r["label"], f(r["dice"]), f(r["precision"]), f(r["recall"]), f(r["object_recall"])]
        if inst:
            cells.append(f(r.get("instance_recall")))
        cells.append(f"{r['crops_per_image']:.1f}" if "crops_per_image" in r else "–")
        cells.append(f"{r['crops_per_fg_pixel']:.2f}" if r.get("crops_per_fg_pixel") is not None else "–")
        cells.append(f"{r['seconds'] / max(r['cases'], 1):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dumps(out: dict[str, Any]) -> str:
    """JSON with one line per case (floats to 4 decimals), so a 180-image run stays small and diffable."""
    def rnd(x: Any) -> Any:
        return round(x, 4) if isinstance(x, float) else x

    rows = []
    for r in out["rows"]:
        head = {k: v for k, v in r.items() if k != "per_case"}
        cases = ",\n".join("    " + json.dumps({k: rnd(v) for k, v in c.items()}) for c in r.get("per_case", []))
        body = json.dumps(head, indent=1)[:-2]
        rows.append(f"{body},\n \"per_case\": [\n{cases}\n ]\n}}")
    top = json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1)[:-2]
    return top + ',\n "rows": [\n' + ",\n".join(rows) + "\n ]\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (images/, masks/, optional instances/)")
    ap.add_argument("--model", type=Path, required=True, help="an stts bundle with training.split.val")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--limit", type=int, default=0, help="only the first N validation cases (0: all)")
    ap.add_argument("--only", nargs="*", default=None, help="only variants whose label contains one of these")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dumps(out))
    print(f"{out['dataset']} · {out['model']} · S={out['size']} · {out['cases']} val cases")
    print(table(out))


if __name__ == "__main__":
    main()
