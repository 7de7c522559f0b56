"""stts vs direct accuracy per input size S on held-out val splits (the paper's Figure 2), with object recall.

For each dataset and S it needs one bundle per method: a ``direct`` bundle (one network on the
downscaled image) and an ``stts`` bundle (rough + fine network). Either pass existing bundles,
``--bundles direct:64=runs/kvasir-direct stts:64=models/polyp``, or let the script train the
missing ones with ``segcli train`` (``--train``; ``--train-args`` are passed through, e.g. a time
limit). Every bundle is evaluated on the val split recorded in it (``training.split.val``, the
cases it never trained on); bundles of one dataset must share that split, which the script checks.

Per bundle and S: mean per-image Dice, IoU, precision and recall (``segcli.metrics`` rules),
object-level recall pooled over all ground-truth objects, and by object size (small < 0.1 % of the
image, medium 0.1-1 %, large >= 1 %). An stts bundle is also run with ``--method direct`` (its own
coarse network alone), which isolates what the fine pass adds with the same weights.

    python benchmarks/bench_accuracy.py --data /work/shared/data/kvasir-seg \
        --bundles direct:64=runs/kvasir-direct stts:64=models/polyp \
        --json benchmarks/results/accuracy-kvasir.json --plot benchmarks/results/accuracy-kvasir.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = (32, 64, 128, 256)
# The reference paper's Dice (Benčević et al., Sensors 2023, Figure 2), direct vs stts at S = 32/64/128/256.
REFERENCE = {
    "cells": {"direct": [0.573, 0.757, 0.845, 0.876], "stts": [0.806, 0.843, 0.845, 0.849]},
    "polyps": {"direct": [0.724, 0.818, 0.829, 0.838], "stts": [0.765, 0.838, 0.814, 0.847]},
}
DATASET_REF = {"dsb2018-nuclei": "cells", "kvasir-seg": "polyps"}


def parse_bundles(items: list[str]) -> list[tuple[str, int, Path]]:
    out = []
    for it in items:
        try:
            head, path = it.split("=", 1)
            method, s = head.split(":")
            out.append((method, int(s), Path(path)))
        except ValueError:
            sys.exit(f"--bundles wants METHOD:S=PATH (e.g. stts:64=models/polyp), got {it!r}")
    return out


def train(data: Path, method: str, size: int, out: Path, extra: list[str], threads: int) -> Path:
    """``segcli train`` one bundle (skipped when ``out`` already holds one)."""
    if (out / "segcli.json").exists():
        return out
    cmd = [sys.executable, "-m", "segcli", "train", "--method", method, "--arch", "unet", "--data", str(data),
           "--size", str(size), "--features", "16", "-o", str(out), "--threads", str(threads), *extra]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)
    return out


def val_cases(bundle: Any) -> list[str]:
    split = (bundle.raw.get("training") or {}).get("split") or {}
    return list(split.get("val") or [])


def find_case(data: Path, stem: str) -> tuple[Path, Path]:
    img = next((p for p in sorted((data / "images").glob(stem + ".*"))), None)
    mask = next((p for p in sorted((data / "masks").glob(stem + ".*"))), None)
    if img is None or mask is None:
        raise FileNotFoundError(f"case {stem} not found under {data}")
    return img, mask


def evaluate(path: Path, method: str, data: Path, cases: list[str], threads: int) -> dict[str, Any]:
    """Run one bundle with ``method`` over ``cases``; per-case overlap scores, pooled object recall."""
    from segcli import metrics
    from segcli.api import Segmenter
    from segcli.io import open_image

    seg = Segmenter(str(path), method=method, backend="torch", threads=threads)
    per_case = []
    pooled: dict[str, int] = {}
    t0 = time.perf_counter()
    for stem in cases:
        img_p, mask_p = find_case(data, stem)
        img = open_image(img_p)
        gt = np.asarray(open_image(mask_p).array)[..., 0] > 0
        res, _ = seg.segment_array(img.array, kind="2d")
        pred = np.asarray(res.labels) > 0
        m = metrics.overlap_scores(pred, gt)
        obj = metrics.object_recall(pred, gt)
        for k, v in obj.items():
            if k != "object_recall":
                pooled[k] = pooled.get(k, 0) + int(v)
        per_case.append({"case": stem, **m, "objects": obj["objects"], "hit": obj["hit"],
                         "crops": res.info.get("crops")})
    out: dict[str, Any] = {k: float(np.nanmean([c[k] for c in per_case])) for k in ("dice", "iou", "precision", "recall")}
    out["dice_std"] = float(np.nanstd([c["dice"] for c in per_case]))
    out["object_recall"] = pooled["hit"] / pooled["objects"] if pooled.get("objects") else float("nan")
    for b in metrics.SIZE_BINS:
        n = pooled.get(f"{b}_objects", 0)
        out[f"object_recall_{b}"] = pooled.get(f"{b}_hit", 0) / n if n else None
        out[f"objects_{b}"] = n
    out.update({"cases": len(per_case), "seconds": time.perf_counter() - t0, "per_case": per_case})
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ref = REFERENCE.get(result["reference"] or "")
    rows = result["rows"]
    for ax, key, title in ((axes[0], "dice", "Dice"), (axes[1], "recall", "pixel recall")):
        for label, style in (("direct", "o-"), ("stts", "s-"), ("stts bundle, coarse only (direct)", "x:")):
            rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["size"])
            if rs:
                ax.plot([r["size"] for r in rs], [r[key] for r in rs], style, label=f"ours: {label}")
        if ref and key == "dice":
            for m, style in (("direct", "o--"), ("stts", "s--")):
                ax.plot(SIZES, ref[m], style, alpha=0.5, label=f"paper: {m}")
        for r in rows:
            if r["label"] != "stts bundle, coarse only (direct)":
                ax.annotate(f"obj {r['object_recall']:.2f}" if key == "recall" else f"{r[key]:.3f}",
                            (r["size"], r[key]), fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log", base=2)
        ax.set_xticks(SIZES, [str(s) for s in SIZES])
        ax.set_xlabel("input size S")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    not_run = ", ".join(f"{m} S={s}" for m, s in result["not_run"]) or "none"
    fig.suptitle(f"{result['dataset']} val split ({result['cases']} cases); not run: {not_run}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder (images/, masks/)")
    ap.add_argument("--bundles", nargs="*", default=[], help="METHOD:S=PATH for existing bundles")
    ap.add_argument("--train", type=int, nargs="*", default=None,
                    help="train the missing (method, S) pairs for these S with segcli train (default: none)")
    ap.add_argument("--train-dir", type=Path, default=Path("runs/accuracy"), help="where trained bundles go")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="passed to segcli train (last option: everything after it), e.g. --epochs 40 --time-limit 7m")
    ap.add_argument("--no-coarse-only", action="store_true", help="skip running stts bundles with --method direct")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N val cases (quick checks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", type=Path, default=None,
                    help="an earlier result JSON: rows of the same bundle, label and val cases are copied, not re-run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from bench_runtimes import machine_info

    from segcli.bundle import load_bundle

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    bundles = parse_bundles(args.bundles)
    have = {(m, s) for m, s, _ in bundles}
    if args.train:
        for s in args.train:
            for m in ("direct", "stts"):
                if (m, s) not in have:
                    out = args.train_dir / f"{args.data.name}-{m}-{s}"
                    bundles.append((m, s, train(args.data, m, s, out, args.train_args, args.threads)))
    if not bundles:
        sys.exit("no bundles: pass --bundles METHOD:S=PATH or --train S ...")
    splits = {}
    for m, s, p in bundles:
        b = load_bundle(p)
        if b.input_size != s:
            print(f"warning: {p} has input_size {b.input_size}, labelled S={s}; evaluating at {b.input_size}")
        splits[(m, s, str(p))] = val_cases(b)
    ref_split = next(iter(splits.values()))
    same = all(v == ref_split for v in splits.values())
    if not ref_split:
        sys.exit("the bundles record no val split; cannot evaluate held-out cases")
    if not same:
        print("warning: bundles have different val splits; each is evaluated on its own val cases")
    rows = []
    earlier = {}
    if args.reuse is not None:  # evaluation is deterministic: same weights and cases give the same row
        old = json.loads(args.reuse.read_text())
        earlier = {(r["bundle"], r["label"]): r for r in old["rows"] if r.get("cases") is not None}
    for m, s, p in bundles:
        cases = splits[(m, s, str(p))][: args.limit]
        runs = [(m, m)]
        if m == "stts" and not args.no_coarse_only:
            runs.append(("direct", "stts bundle, coarse only (direct)"))
        for method, label in runs:
            prev = earlier.get((str(p), label))
            score = (load_bundle(p).raw.get("training") or {}).get("val_score")
            if prev is not None and prev["cases"] == len(cases) and prev.get("bundle_val_score") == score:
                rows.append({**prev, "reused_from": str(args.reuse)})
                print(f"reused {p} ({label}, S={s}) from {args.reuse}: Dice {prev['dice']:.4f}", flush=True)
                continue
            print(f"evaluating {p} ({label}, S={s}) on {len(cases)} val cases ...", flush=True)
            r = evaluate(p, method, args.data, cases, args.threads)
            rows.append({"label": label, "method": method, "size": s, "bundle": str(p),
                         "bundle_val_score": (load_bundle(p).raw.get("training") or {}).get("val_score"), **r})
            print(f"  Dice {r['dice']:.4f}  recall {r['recall']:.4f}  object recall {r['object_recall']:.3f} "
                  f"(small {r['object_recall_small']}, n={r['objects_small']}; medium {r['object_recall_medium']}, "
                  f"n={r['objects_medium']}; large {r['object_recall_large']}, n={r['objects_large']})  "
                  f"[{r['seconds']:.0f} s]", flush=True)
    done = {(r["method"], r["size"]) for r in rows if r["label"] in ("direct", "stts")}
    not_run = [(m, s) for s in SIZES for m in ("direct", "stts") if (m, s) not in done]
    ref = DATASET_REF.get(args.data.name)
    info["loadavg_end"] = os.getloadavg()
    result = {"dataset": args.data.name, "reference": ref, "reference_dice": REFERENCE.get(ref or ""),
              "cases": len(ref_split[: args.limit]), "same_split": same, "rows": rows, "not_run": not_run,
              "machine": info}
    print("\n| method | S | Dice | recall | object recall | small | medium | large | paper Dice |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["size"], r["label"])):
        pd = "-"
        if ref and r["label"] in ("direct", "stts") and r["size"] in SIZES:
            pd = f"{REFERENCE[ref][r['label']][SIZES.index(r['size'])]:.3f}"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {r['label']} | {r['size']} | {r['dice']:.3f} | {r['recall']:.3f} | {r['object_recall']:.3f} | "
              f"{fmt(r['object_recall_small'])} | {fmt(r['object_recall_medium'])} | {fmt(r['object_recall_large'])} | {pd} |")
    print(f"not run: {not_run}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        slim = {**result, "rows": [{k: v for k, v in r.items() if k != "per_case"} for r in rows]}
        args.json.write_text(json.dumps(slim, indent=1, default=float) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
