"""refine on DRIVE: Dice against FLOPs as the number of refined patches N_p grows (the paper's Figure 2).

The bundle (default: the shipped ``retina-vessels``, refine with a U-Net pair, S=128, 128-px patches) is
run on the val split recorded in it, at full resolution, with ``--patches`` N_p in {0, 2, 4, 8, 16} and
with every patch refined. N_p = 0 is the rough network alone, upsampled, which is the low-resolution baseline.
"All" is a full-resolution pass of the fine network over the grid: the reference cost. Dice is computed
inside the field of view (DRIVE's ``fov`` masks). FLOPs are counted with ``torch.utils.flop_counter`` for
every network input at the shape it had. Each timing is the median of ``--reps`` runs after a warm-up,
and every N_p runs in each round (interleaved).

    python benchmarks/bench_refine.py --data ../shared/data/drive --json benchmarks/results/refine-drive.json \\
        --plot benchmarks/results/refine-drive.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class Counting:
    """Wraps a predictor and records the shape of every network input (for FLOPs)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.shapes = inner, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.extend([tuple(batch.shape[1:])] * batch.shape[0])
        return self.inner(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def flops_of(module: Any, shape: tuple[int, ...], cache: dict) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    key = (id(module), shape)
    if key not in cache:
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            module(torch.zeros((1, *shape)))
        cache[key] = int(fc.get_total_flops())
    return cache[key]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="retina-vessels")
    ap.add_argument("--patches", type=int, nargs="*", default=[0, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from segcli import io
    from segcli.api import Segmenter

    seg0 = Segmenter(args.model, threads=args.threads)
    bundle = seg0.warm_up("2d")
    val = bundle.training["split"]["val"]
    images = {p.stem: p for p in (args.data / "images").iterdir()}
    cases = []
    for stem in val:
        img = io.open_image(images[stem]).array
        gt = io.open_image(args.data / "masks" / f"{stem}.png").array[..., 0] > 0
        fov = io.open_image(args.data / "fov" / f"{stem}.png").array[..., 0] > 0
        cases.append((stem, img, gt, fov))
    variants: dict[str, Segmenter] = {}
    counters: dict[str, dict[str, Counting]] = {}
    for n in [*args.patches, "all"]:
        kw = {"patches": 10**9} if n == "all" else {"patches": int(n)}
        s = Segmenter(args.model, threads=args.threads, overrides=kw)
        b = s.bundle_for("2d")
        counters[str(n)] = {r: Counting(s.predictor(b, r)) for r in ("coarse", "fine")}
        for r in ("coarse", "fine"):
            s._predictors[(b.path.resolve(), r)] = counters[str(n)][r]
        variants[str(n)] = s
    modules = {r: variants["0"]._predictors[(bundle.path.resolve(), r)].inner.module for r in ("coarse", "fine")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    results: dict[str, dict[str, Any]] = {}
    for rep in range(args.reps + 1):  # round 0 is the warm-up
        order = list(variants)[rep % len(variants):] + list(variants)[: rep % len(variants)]
        for k in order:
            for c in counters[k].values():
                c.shapes.clear()
            t = time.perf_counter()
            out = [variants[k].segment_array(img)[0] for _, img, _, _ in cases]
            dt = time.perf_counter() - t
            if rep:
                times[k].append(dt)
            if rep == 1:
                fl = {r: sum(flops_of(modules[r], s, {}) for s in counters[k][r].shapes) for r in ("coarse", "fine")}
                ds = [dice((o.labels > 0) & fov, gt & fov) for o, (_, _, gt, fov) in zip(out, cases, strict=True)]
                results[k] = {"patches": k, "dice": float(np.mean(ds)), "dice_per_case": ds,
                              "gflops": (fl["coarse"] + fl["fine"]) / 1e9, "coarse_gflops": fl["coarse"] / 1e9,
                              "fine_gflops": fl["fine"] / 1e9,
                              "refined": int(sum(o.info["patches_refined"] for o in out)),
                              "patches_total": int(sum(o.info["patches_total"] for o in out))}
        print(f"round {rep}/{args.reps} done", flush=True)
    results = {k: results[k] for k in variants}  # N_p order, "all" last
    full = results["all"]["gflops"]
    for k, r in results.items():
        r["median_s"] = float(np.median(times[k]))
        r["flops_saved_vs_all"] = 1.0 - r["gflops"] / full
        r["speedup_vs_all"] = float(np.median(times["all"])) / r["median_s"]
        print(f"N_p={k:>3}: Dice {r['dice']:.4f}, {r['gflops']:.1f} GFLOP ({r['flops_saved_vs_all']:.0%} saved), "
              f"{r['median_s']:.2f} s (x{r['speedup_vs_all']:.2f}), {r['refined']}/{r['patches_total']} patches", flush=True)
    doc = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "threads": args.threads},
           "model": args.model, "val_cases": [c[0] for c in cases], "reps": args.reps, "rows": list(results.values())}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    if args.plot:
        plot(doc, args.plot)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["gflops"] for r in rows]
    y = [r["dice"] for r in rows]
    ax.plot(x[:-1], y[:-1], "o-", label="refine, N_p patches")
    ax.plot(x[-1:], y[-1:], "s", color="k", label="every patch (full resolution)")
    for r in rows:
        ax.annotate(f"N_p={r['patches']}", (r["gflops"], r["dice"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    ax.set(xlabel="GFLOP over the val images", ylabel="Dice inside the FOV", title=f"{doc['model']} on DRIVE val")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
