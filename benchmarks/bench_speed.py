"""Coarse-to-fine speed on CPU: stts and refine against full-resolution sliding window, plus their limits.

What it measures (each comparison: the same fine network, the same backend, the same thread count):

* **slides** - slide-like canvases (near-white glass with faint noise) with a few real
  dsb2018-nuclei tiles placed on them (tiles cover ``--slide-fraction`` of the area), at
  ``--slide-sizes`` (4k², 8k², ...): sliding window (overlap 0.25, Gaussian blending) vs stts vs
  refine, with Dice against the tiles' ground-truth masks and stts-vs-sliding agreement.
* **sweep** - the same at ``--sweep-size`` for a range of tile fractions, up to a dense mosaic
  (tiles edge to edge, fraction 1.0): where stts stops paying off (speed ratio vs fraction plot).
* **loop** - stts's batched fine stage vs the reference code's one-crop-at-a-time loop (same crops,
  batch 1 per crop, nearest-neighbour resizing both ways, OR into a full-size canvas).
* **cells** - stts/direct time ratio on the real dsb2018 images at S = 32..256 (the reference
  reported stts 3.5-4.9x slower than one direct pass), with the reference loop beside it.
* **ct** - the same sliding/stts comparison slice by slice on a CT volume.
* **limit** - every run's FLOPs (``FlopCounterMode``, per network input at the shapes used) divided
  by the conv2d throughput measured in this process = the best possible time; measured/limit and
  the per-stage breakdown say where the rest goes.

Why threshold outputs: time and FLOPs do not depend on the weights, Dice does. Without a trained
nuclei bundle the networks are U-Nets with random weights that *run* on every input (so time and
FLOPs are real) but whose returned probabilities come from an intensity threshold on the input
(``tests/test_engines.py``'s ``identity_probs`` with a threshold and a steep ramp). A threshold at
0.1 segments the fluorescence tiles at Dice 0.82 against their masks, so every method is scored
with the same, reasonable "network". The canvases are brightfield-like (near-white glass), so the
tiles are inverted (nuclei dark on near-white) and the threshold is on darkness (1 - intensity);
the rough predictor uses a lower threshold (a rough pass is meant to over-detect). With
``--model`` (default: ``models/nuclei`` when it exists) the bundle's own networks are used and the
canvases stay fluorescence-like (dark glass).

Shared machines: variants are interleaved (one run of each per round, the order rotated) and
compared as ratios from the same rounds; the load average is recorded. Use ``--threads 1``.

    python benchmarks/bench_speed.py --data /work/shared/data/dsb2018-nuclei \
        --ct /work/shared/data/ct-example/images/abdomen_3mm.nii.gz --threads 1 \
        --json benchmarks/results/speed.json --plot benchmarks/results/speed.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _blas_threads_from_argv(argv: list[str]) -> str:
    """``--blas-threads`` (default: ``--threads``, default 1), read before numpy loads OpenBLAS."""
    val = {"--threads": "1"}
    for i, a in enumerate(argv[:-1]):
        if a in ("--threads", "--blas-threads"):
            val[a] = argv[i + 1]
    return val.get("--blas-threads", val["--threads"])


# OpenBLAS sizes its pool when numpy is imported. segcli does not limit it (only torch's threads), and
# on a loaded machine its spinning threads make the small resize matmuls of the crop and fuse stages
# many times slower; see benchmarks/README.md. The benchmark pins it (``--blas-threads`` to measure it).
os.environ["OPENBLAS_NUM_THREADS"] = _blas_threads_from_argv(sys.argv)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_plot import plot  # noqa: E402
from speed_setup import (  # noqa: E402
    ANCHORS,
    GOALS,
    REF_STTS_OVER_DIRECT,
    Nets,
    Runner,
    cell_images,
    conv_throughput,
    dice,
    interleave,
    load_tiles,
    make_canvas,
    ramp,
    reference_loop,
    summarise,
    variant_fns,
)

# -- sections --------------------------------------------------------------------------------------------


def canvas_rows(runner: Runner, canvases: dict[str, dict[str, Any]], variants: list[str], fns: dict[str, Any],
                reps: int, single_sliding: bool, sliding_on: list[str] | None = None,
                warmup_plane: Any = None, sliding_estimate: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    from segcli.engines.base import ArrayPlane

    nets = runner.nets
    planes = {k: ArrayPlane(np.broadcast_to(c["grey"], (nets.channels, *c["grey"].shape))) for k, c in canvases.items()}
    jobs = []
    for k in canvases:
        for v in variants:
            if v == "sliding" and sliding_on is not None and k not in sliding_on:
                continue
            jobs.append((v, k, fns[v]))
    if sliding_estimate is not None:  # sliding window not run here: too slow; time estimated (see main)
        variants = [v for v in variants if v != "sliding"]
        jobs = [j for j in jobs if j[0] != "sliding"]
    single = {"sliding"} if single_sliding else set()
    if warmup_plane is not None:
        planes["_warmup"] = warmup_plane
    runs, results = interleave(runner, planes, jobs, reps, warmup="_warmup" if warmup_plane is not None else True,
                               single=single)
    planes.pop("_warmup", None)
    rows = []
    for k, c in canvases.items():
        if k == "_warmup":
            continue
        check = None
        if sliding_estimate is not None:
            sl_key, sl = None, None
            sl_med, sl_flops = sliding_estimate["median_s"], sliding_estimate["flops"]
        else:
            sl_key = ("sliding", k) if ("sliding", k) in runs else ("sliding", (sliding_on or [k])[0])
            sl = results.get(("sliding", k))
            if sl is None:  # sliding's cost does not depend on content: time one canvas, score each canvas once
                sl, rec = runner.once(lambda k=k: fns["sliding"](planes[k]))
                check = rec["wall_s"]
            sl_med = statistics.median(r["wall_s"] for r in runs[sl_key])
            sl_flops = runs[sl_key][-1]["flops"]
        for v in variants:
            key = (v, k) if (v, k) in runs or sl_key is None else sl_key
            s = summarise(runs[key], runner.gflops)
            res = results.get((v, k)) if v != "sliding" else sl
            lab = np.asarray(res.labels)
            # Ratios from the same rounds: per round, sliding time / this variant's time.
            paired = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[sl_key], runs[key], strict=False)] if sl_key else []
            rows.append({
                "canvas": k, "side": c["side"], "tile_fraction": c["tile_fraction"], "gt_fraction": c["gt_fraction"],
                "tiles": c["tiles"], "variant": v, **s,
                "sliding_median_s": sl_med, "speedup_vs_sliding": sl_med / s["median_s"],
                "speedup_vs_sliding_paired_median": statistics.median(paired) if paired else None,
                "flops_saved_vs_sliding": 1.0 - s["flops"] / sl_flops if sl_flops else None,
                "dice_gt": dice(lab, c["mask"]),
                "dice_vs_sliding": dice(lab, np.asarray(sl.labels)) if sl is not None else None,
                "sliding_estimated": sliding_estimate is not None,
                "fine_area_fraction": s["fine_inputs"] * nets.size ** 2 / c["side"] ** 2,
                "info": runs[key][-1].get("info", {}), "sliding_single_run_s_this_canvas": check,
            })
            r = rows[-1]
            print(f"  {k:>14} {v:>9}: {r['median_s']:7.2f} s ({r['runs']} runs), x{r['speedup_vs_sliding']:.2f} vs sliding, "
                  f"{r['gflop']:8.1f} GFLOP, {r['measured_over_limit']:.2f}x limit, Dice gt {r['dice_gt']:.4f}, "
                  f"vs sliding {r['dice_vs_sliding'] or float('nan'):.4f}; stages "
                  f"{ {a: round(b, 2) for a, b in r['stages_median_s'].items()} }", flush=True)
    return rows


def section_loop(runner: Runner, canvas: dict[str, Any], reps: int, args: argparse.Namespace,
                 cells: list | None = None) -> list[dict[str, Any]]:
    """Batched fine stage vs the reference loop, on the same boxes (paper crops: each box → one S×S input)."""
    from segcli.engines.base import ArrayPlane, Timer
    from segcli.engines.stts import fine_pass, rough_pass
    from segcli.fusion import foreground
    from segcli.geometry import crop_boxes

    nets = runner.nets
    S = nets.size
    sets = []
    if canvas is not None:
        pl = ArrayPlane(np.broadcast_to(canvas["grey"], (nets.channels, *canvas["grey"].shape)))
        sets.append((f"slide {canvas['side']}² ({canvas['tile_fraction']:.0%} tiles)", [(pl, canvas["mask"])], S,
                     args.max_downscale))
    for s in (cells or []):
        planes = [(ArrayPlane(np.broadcast_to(a, (nets.channels, *a.shape)).astype(np.float32)), m) for a, m, _ in cells[s]]
        sets.append((f"cells ({len(planes)} images)", planes, s, None))  # paper setting: one rough pass at S
    rows = []
    for name, planes, size, md in sets:
        prepared = []
        for pl, m in planes:
            rough, _ = rough_pass(pl, nets.coarse, size=size, max_downscale=md, batch_size=args.batch)
            boxes = crop_boxes(foreground(rough, 0.5), pl.shape, size // 8, min_size=1, min_side=5)
            prepared.append((pl, m, rough, boxes))
        nets.take_flops()

        def batched_all(prepared=prepared, size=size) -> Any:
            timer = Timer()
            labs = [fine_pass(pl, nets.fine, boxes, rough, size=size, threshold=0.5, keep_coarse=False,
                              batch_size=args.batch, return_probs=False, timer=timer).labels
                    for pl, _, rough, boxes in prepared]
            return _Res(labs, timer.t)

        def loop_all(prepared=prepared, size=size) -> Any:
            t: Counter[str] = Counter()
            labs = []
            for pl, _, _, boxes in prepared:
                lab, tt = reference_loop(pl, nets.fine, boxes, size)
                labs.append(lab)
                t.update(tt)
            return _Res(labs, dict(t))

        jobs = [("batched", "x", batched_all), ("loop", "x", loop_all)]
        runs, results = interleave(runner, {"x": None}, [(a, b, (lambda _p, f=f: f())) for a, b, f in jobs], reps, True)
        b, lp = summarise(runs[("batched", "x")], runner.gflops), summarise(runs[("loop", "x")], runner.gflops)
        paired = [x["wall_s"] / y["wall_s"] for x, y in zip(runs[("loop", "x")], runs[("batched", "x")], strict=True)]
        net_b = b["stages_median_s"].get("fine", 0.0)
        net_l = lp["stages_median_s"].get("fine", 0.0)
        d_b = float(np.mean([dice(lab, m) for lab, (_, m, _, _) in zip(results[("batched", "x")].labels, prepared, strict=True)]))
        d_l = float(np.mean([dice(lab, m) for lab, (_, m, _, _) in zip(results[("loop", "x")].labels, prepared, strict=True)]))
        rows.append({"set": name, "size": size, "crops": int(sum(len(p[3]) for p in prepared)), "batched": b, "loop": lp,
                     "speedup_fine_stage": lp["median_s"] / b["median_s"], "speedup_paired_median": statistics.median(paired),
                     "speedup_network_only": net_l / net_b if net_b else None, "dice_gt_batched": d_b, "dice_gt_loop": d_l})
        print(f"  loop vs batched, {name}, S={size}: {rows[-1]['crops']} crops, loop {lp['median_s']:.2f} s, "
              f"batched {b['median_s']:.2f} s -> x{rows[-1]['speedup_fine_stage']:.2f} (network only x"
              f"{rows[-1]['speedup_network_only'] or 0:.2f}); Dice gt batched {d_b:.3f}, loop {d_l:.3f}", flush=True)
    return rows


class _Res:
    def __init__(self, labels: Any, timings: dict[str, float], info: dict[str, Any] | None = None) -> None:
        self.labels = labels
        self.timings = timings
        self.info = info or {}


def section_cells(runner: Runner, cells: list, sizes: list[int], reps: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """stts/direct time ratio over a set of whole dsb2018 images, per S (paper settings, same nets)."""
    from segcli.engines.base import ArrayPlane
    from segcli.engines.direct import direct
    from segcli.engines.stts import stts

    nets = runner.nets
    planes = [(ArrayPlane(np.broadcast_to(a, (nets.channels, *a.shape)).astype(np.float32)), m) for a, m, _ in cells]
    rows = []
    for S in sizes:
        def run_all(method: str, S: int = S) -> Any:
            labs, t = [], Counter()
            info: Counter[str] = Counter()
            for pl, _ in planes:
                if method == "direct":
                    r = direct(pl, nets.coarse, size=S)
                else:
                    r = stts(pl, nets.coarse, nets.fine, size=S, batch_size=args.batch)
                    info["crops"] += int(r.info["crops"])
                labs.append(r.labels)
                t.update(r.timings)
            return _Res(labs, dict(t), dict(info))

        jobs = [("direct", "x", lambda _p, S=S: run_all("direct", S)), ("stts", "x", lambda _p, S=S: run_all("stts", S))]
        runs, results = interleave(runner, {"x": None}, jobs, reps, True)
        d, s = summarise(runs[("direct", "x")], runner.gflops), summarise(runs[("stts", "x")], runner.gflops)
        paired = [b["wall_s"] / a["wall_s"] for a, b in zip(runs[("direct", "x")], runs[("stts", "x")], strict=True)]
        dd = [dice(lab, m) for lab, (_, m) in zip(results[("direct", "x")].labels, planes, strict=True)]
        ds = [dice(lab, m) for lab, (_, m) in zip(results[("stts", "x")].labels, planes, strict=True)]
        rows.append({"size": S, "images": len(planes), "crops": results[("stts", "x")].info.get("crops", 0),
                     "direct": d, "stts": s, "stts_over_direct": s["median_s"] / d["median_s"],
                     "stts_over_direct_paired_median": statistics.median(paired),
                     "flops_ratio": s["flops"] / d["flops"], "dice_gt_direct": float(np.mean(dd)),
                     "dice_gt_stts": float(np.mean(ds))})
        r = rows[-1]
        print(f"  cells S={S}: {r['crops']} crops, direct {d['median_s']:.3f} s, stts {s['median_s']:.3f} s -> "
              f"stts/direct {r['stts_over_direct']:.2f} (FLOPs x{r['flops_ratio']:.1f}; reference {REF_STTS_OVER_DIRECT})",
              flush=True)
    return rows


def section_ct(runner: Runner, path: Path, reps: int, args: argparse.Namespace, fns: dict[str, Any]) -> dict[str, Any]:
    """Slice-by-slice sliding vs stts on a CT volume; 'network' = threshold at +200 HU (bone, contrast)."""
    from segcli.engines.base import ArrayPlane
    from segcli.io import open_image

    nets = runner.nets
    img = open_image(path)
    vol = img.array[..., 0].astype(np.float32)  # (Z, Y, X)
    if args.ct_slices and len(vol) > args.ct_slices:  # every k-th slice, to bound the cost
        vol = vol[:: int(np.ceil(len(vol) / args.ct_slices))]
    x = np.clip((vol + 1000.0) / 2000.0, 0, 1).astype(np.float32)  # +200 HU -> 0.6
    planes = {f"z{z}": ArrayPlane(np.broadcast_to(x[z], (nets.channels, *x[z].shape))) for z in range(len(x))}
    t_bright = (200.0 + 1000.0) / 2000.0
    saved = nets.coarse.output, nets.fine.output
    # Always threshold outputs here (a nuclei model means nothing on CT); the networks still run for time.
    nets.coarse.output = lambda b: ramp(b, t_bright - 0.05, "bright")
    nets.fine.output = lambda b: ramp(b, t_bright, "bright")
    truth = (vol > 200).astype(np.uint8)

    def whole(v: str) -> Any:
        labs, t = [], Counter()
        for k in planes:
            r = fns[v](planes[k])
            labs.append(np.asarray(r.labels))
            t.update(r.timings)
        return _Res(np.stack(labs), dict(t))

    jobs = [(v, "x", lambda _p, v=v: whole(v)) for v in ("sliding", "stts", "stts_z4")]
    try:
        runs, results = interleave(runner, {"x": None}, jobs, reps, True)
    finally:
        nets.coarse.output, nets.fine.output = saved
    sl = summarise(runs[("sliding", "x")], runner.gflops)
    out = {"file": str(path), "shape": list(img.array.shape[:3]), "slices_used": len(vol), "spacing": list(img.spacing or []),
           "fg_fraction": float(truth.mean()), "variants": {}}
    for v in ("sliding", "stts", "stts_z4"):
        s = summarise(runs[(v, "x")], runner.gflops)
        lab = results[(v, "x")].labels
        s.update({"speedup_vs_sliding": sl["median_s"] / s["median_s"], "dice_vs_threshold_truth": dice(lab, truth),
                  "dice_vs_sliding": dice(lab, results[("sliding", "x")].labels)})
        out["variants"][v] = s
        print(f"  CT {path.name} {v}: {s['median_s']:.2f} s, x{s['speedup_vs_sliding']:.2f} vs sliding, "
              f"Dice vs sliding {s['dice_vs_sliding']:.4f}", flush=True)
    return out


def section_refine_sweep(runner: Runner, canvases: dict[str, dict[str, Any]], thresholds: list[float],
                         reps: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """refine's FLOPs-vs-Dice trade-off: refine_threshold swept, against sliding window on the same canvas."""
    from segcli.engines.base import ArrayPlane
    from segcli.engines.direct import sliding
    from segcli.engines.refine import refine

    nets = runner.nets
    S = nets.size
    rows = []
    for k, c in canvases.items():
        pl = ArrayPlane(np.ascontiguousarray(np.broadcast_to(c["grey"], (nets.channels, *c["grey"].shape))))
        jobs = [("sliding", "x", lambda _p, pl=pl: sliding(pl, nets.fine, size=S, overlap=0.25, batch_size=args.batch))]
        settings: dict[str, tuple[float, float | None]] = {}
        for m in [None, *args.min_patch_std]:
            for t in thresholds:
                lab = f"refine t={t:g}" + (f" std>={m:g}" if m else "")
                settings[lab] = (t, m)
                jobs.append((lab, "x", lambda _p, pl=pl, t=t, m=m: refine(
                    pl, nets.coarse, nets.fine, size=S, patches=None, refine_threshold=t, min_patch_std=m,
                    batch_size=args.batch)))
        runs, results = interleave(runner, {"x": None}, jobs, reps, True)
        sl = summarise(runs[("sliding", "x")], runner.gflops)
        sl_lab = np.asarray(results[("sliding", "x")].labels)
        d_sl = dice(sl_lab, c["mask"])
        for lab, _, _ in jobs[1:]:
            r = summarise(runs[(lab, "x")], runner.gflops)
            res = results[(lab, "x")]
            rows.append({"canvas": k, "side": c["side"], "tile_fraction": c["tile_fraction"], "variant": lab,
                         "refine_threshold": settings[lab][0], "min_patch_std": settings[lab][1], **r,
                         "patches_refined": res.info["patches_refined"], "patches_total": res.info["patches_total"],
                         "flops_saved_vs_sliding": 1 - r["flops"] / sl["flops"],
                         "speedup_vs_sliding": sl["median_s"] / r["median_s"],
                         "dice_gt": dice(res.labels, c["mask"]), "dice_gt_sliding": d_sl,
                         "dice_vs_sliding": dice(res.labels, sl_lab)})
            x = rows[-1]
            print(f"  {k} {lab}: {x['patches_refined']}/{x['patches_total']} patches, FLOPs saved "
                  f"{x['flops_saved_vs_sliding']:.0%}, x{x['speedup_vs_sliding']:.2f} time, Dice gt {x['dice_gt']:.4f} "
                  f"(sliding {d_sl:.4f}), vs sliding {x['dice_vs_sliding']:.4f}", flush=True)
    return rows


def openblas_setter() -> Callable[[int], None] | None:
    """``set(n)`` for numpy's bundled OpenBLAS pool (None when it cannot be found)."""
    import ctypes
    import glob

    for lib in glob.glob(os.path.dirname(np.__file__) + ".libs/*openblas*"):
        dll = ctypes.CDLL(lib)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(dll, name):
                return getattr(dll, name)
    return None


def section_blas(runner: Runner, canvases: dict[str, dict[str, Any]], reps: int, threads: int,
                 fns: dict[str, Any]) -> list[dict[str, Any]]:
    """The same stts run with numpy's OpenBLAS at 1 thread vs all cores (what segcli does today), interleaved."""
    from segcli.engines.base import ArrayPlane
    from segcli.runtimes.device import available_cores

    setn = openblas_setter()
    if setn is None:
        print("  OpenBLAS not found; skipped")
        return []
    nets = runner.nets
    many = max(2, available_cores())
    rows = []
    for k, c in canvases.items():
        pl = ArrayPlane(np.ascontiguousarray(np.broadcast_to(c["grey"], (nets.channels, *c["grey"].shape))))

        def with_blas(n: int, pl: Any = pl) -> Any:
            setn(n)
            try:
                return fns["stts"](pl)
            finally:
                setn(threads)

        jobs = [(f"blas={threads}", "x", lambda _p: with_blas(threads)), (f"blas={many}", "x", lambda _p: with_blas(many))]
        runs, _ = interleave(runner, {"x": None}, jobs, reps, True)
        a, b = summarise(runs[(f"blas={threads}", "x")], runner.gflops), summarise(runs[(f"blas={many}", "x")], runner.gflops)
        rows.append({"canvas": k, "side": c["side"], "tile_fraction": c["tile_fraction"], "variant": "stts",
                     f"blas_{threads}": a, f"blas_{many}": b, "slowdown": b["median_s"] / a["median_s"],
                     "blas_threads": [threads, many]})
        print(f"  {k} stts: OpenBLAS {threads} thread(s) {a['median_s']:.2f} s {a['stages_median_s']} | {many} threads "
              f"{b['median_s']:.2f} s {b['stages_median_s']} -> x{rows[-1]['slowdown']:.2f} slower", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dsb2018-nuclei folder (images/, masks/)")
    ap.add_argument("--ct", type=Path, nargs="*", default=[], help="CT volume(s) for the slice-by-slice comparison")
    ap.add_argument("--model", default=None,
                    help="a trained bundle (default: models/nuclei when it exists; 'none' = random U-Net + threshold)")
    ap.add_argument("--size", type=int, default=None, help="network input S (default 64, or the bundle's)")
    ap.add_argument("--features", type=int, default=16, help="U-Net width for random weights")
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="OpenBLAS threads for numpy (default: --threads; read before numpy loads)")
    ap.add_argument("--batch", type=int, default=16, help="engine batch size = predictor max_batch")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (median; >= 5)")
    ap.add_argument("--style", choices=["brightfield", "fluorescence"], default=None,
                    help="canvas look (default: brightfield, fluorescence with a bundle)")
    ap.add_argument("--cell", type=int, default=256, help="tile side on the canvases")
    ap.add_argument("--slide-sizes", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--slide-fraction", type=float, default=0.05)
    ap.add_argument("--slide-variants", nargs="*", default=["sliding", "stts", "stts_z4", "refine"],
                    help="variants on the slides; the one on the --slide-variants-large canvases too, unless given there")
    ap.add_argument("--slide-variants-large", nargs="*", default=None,
                    help="variants on slides above --sliding-once-above pixels (default: --slide-variants)")
    ap.add_argument("--sliding-once-above", type=float, default=40e6,
                    help="canvases above this many pixels run sliding window once (too slow to repeat)")
    ap.add_argument("--sliding-max-pixels", type=float, default=20e6,
                    help="bigger canvases skip sliding window; its time is scaled from the largest measured one")
    ap.add_argument("--sweep-size", type=int, default=1024)
    ap.add_argument("--sweep-cell", type=int, default=128, help="tile side on the sweep canvases")
    ap.add_argument("--sweep-fractions", type=float, nargs="*", default=[0.02, 0.05, 0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--cells-sizes", type=int, nargs="*", default=[32, 64, 128, 256])
    ap.add_argument("--cells-images", type=int, default=3)
    ap.add_argument("--loop-cells-sizes", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--max-downscale", type=float, default=None,
                    help="stts rough pass cap (default 16 = segcli's huge-image default; 4 with a trained bundle)")
    ap.add_argument("--refine-threshold", type=float, default=0.05)
    ap.add_argument("--refine-thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--min-patch-std", type=float, nargs="*", default=[0.02],
                    help="refine_sweep: also run with refine's flat-patch skip at these std thresholds")
    ap.add_argument("--t-rough", type=float, default=0.04)
    ap.add_argument("--t-fine", type=float, default=0.1)
    ap.add_argument("--ct-slices", type=int, default=40, help="at most this many slices per volume (every k-th)")
    ap.add_argument("--parts", nargs="*", default=["sweep", "slides", "loop", "cells", "ct", "blas"])
    ap.add_argument("--blas-fractions", type=float, nargs="*", default=[0.1, 1.0], help="canvases of the blas part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--replot", type=Path, nargs="*", default=None,
                    help="no measuring: plot the slides of these result JSONs together (e.g. one run per canvas size) to --plot")
    args = ap.parse_args(argv)
    if args.replot:
        parts = [json.loads(p.read_text()) for p in args.replot]
        merged = {**parts[0], "slides": sorted((r for p in parts for r in p.get("slides", [])), key=lambda r: r["side"]),
                  "sweep": [], "cells": [], "refine_sweep": []}
        plot(merged, args.plot or Path("speed-slides.png"))
        return
    if args.model is None and (Path(__file__).resolve().parent.parent / "models" / "nuclei" / "segcli.json").exists():
        args.model = str(Path(__file__).resolve().parent.parent / "models" / "nuclei")
    if args.model == "none":
        args.model = None
    if args.max_downscale is None:
        # A trained coarse network saw dsb2018 images (256-700 px) at S: factors ~2-5; keep it there.
        args.max_downscale = 4.0 if args.model else 16.0
    args.style = args.style or ("fluorescence" if args.model else "brightfield")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from bench_runtimes import machine_info

    from segcli.engines.base import ArrayPlane

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    info["OPENBLAS_NUM_THREADS"] = os.environ.get("OPENBLAS_NUM_THREADS")
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="segcli-speed-") as tmp:
        nets = Nets(args, Path(tmp))
        conv = [conv_throughput(7)]
        gflops = conv[0]["gflops"]
        print(f"network: {nets.desc}\nconv throughput: {gflops:.1f} GFLOP/s ({args.threads} thread(s)); "
              f"load {os.getloadavg()}", flush=True)
        runner = Runner(nets, gflops)
        fns = variant_fns(nets, args)
        val = None
        if args.model:
            from segcli.bundle import load_bundle

            split = (load_bundle(args.model).raw.get("training") or {}).get("split") or {}
            val = set(split.get("val") or []) or None
        tiles = load_tiles(args.data, args.cell, rng, val)
        if val is not None and len(tiles) < 3:
            val, tiles = None, load_tiles(args.data, args.cell, rng)
        print(f"{len(tiles)} tiles of {args.cell}² ({'the bundle val split' if val else 'all grey images'})", flush=True)
        result: dict[str, Any] = {"network": nets.desc, "machine": info, "settings": {**{k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in vars(args).items() if k not in ("ct",)}, "ct": [str(p) for p in args.ct],
                                  "S": nets.size, "tiles_available": len(tiles),
                                  "tiles_from": "bundle val split" if val else "all grey dsb2018 images"}, "goals": GOALS, "anchors": ANCHORS,
                                  "reference_stts_over_direct": REF_STTS_OVER_DIRECT}
        variants = ["sliding", "stts", "stts_z4", "refine"]
        # Warm-up plane: every variant runs once on it, untimed, before a section's timed rounds.
        wc = make_canvas(max(args.sweep_size, 4 * args.cell), 0.1, tiles, cell=args.cell, style=args.style, seed=999)
        warm = ArrayPlane(np.broadcast_to(wc["grey"], (nets.channels, *wc["grey"].shape)))
        if "sweep" in args.parts:
            print(f"\n== sweep: {args.sweep_size}² canvases, tile fractions {args.sweep_fractions}", flush=True)
            sweep_tiles = load_tiles(args.data, args.sweep_cell, np.random.default_rng(args.seed), val)
            canv = {f"f={f:g}": make_canvas(args.sweep_size, f, sweep_tiles, cell=args.sweep_cell, style=args.style,
                                            seed=args.seed + i) for i, f in enumerate(args.sweep_fractions)}
            mosaic = max(canv, key=lambda k: canv[k]["tile_fraction"])
            # Sliding window's cost does not depend on content: timed on the mosaic in every round,
            # run once on every other canvas for its Dice (its time there is recorded as a check).
            result["sweep"] = canvas_rows(runner, canv, variants, fns, args.reps, False, sliding_on=[mosaic],
                                          warmup_plane=warm)
        if "slides" in args.parts or "loop" in args.parts:
            big = {}
            for i, side in enumerate(args.slide_sizes):
                big[f"slide {side}²"] = make_canvas(side, args.slide_fraction, tiles, cell=args.cell, style=args.style,
                                                    seed=args.seed + 100 + i)
        if "slides" in args.parts:
            result["slides"] = []
            for k, c in big.items():
                print(f"\n== {k}: {c['tiles']} tiles ({c['tile_fraction']:.1%} of the area, nuclei {c['gt_fraction']:.2%})", flush=True)
                once = c["side"] ** 2 > args.sliding_once_above
                est = None
                measured = [r for r in result["slides"] if r["variant"] == "sliding" and not r.get("sliding_estimated")]
                if c["side"] ** 2 > args.sliding_max_pixels and measured:
                    # Sliding window's work is content-independent and linear in its tiles: scale the
                    # largest measured canvas by the tile count (FLOPs scale exactly the same way).
                    ref = max(measured, key=lambda r: r["side"])
                    from segcli.geometry import sliding_grid

                    n = len(sliding_grid((c["side"],) * 2, nets.size, 0.25))
                    n0 = len(sliding_grid((ref["side"],) * 2, nets.size, 0.25))
                    est = {"median_s": ref["median_s"] * n / n0, "flops": ref["flops"] * n / n0,
                           "from": f"{ref['side']}² x {n}/{n0} tiles"}
                    print(f"  sliding window not run at {c['side']}²: estimated {est['median_s']:.0f} s ({est['from']})")
                vs = args.slide_variants_large if once and args.slide_variants_large is not None else args.slide_variants
                if est is None and "sliding" not in vs:
                    vs = ["sliding", *vs]  # the ratios need it
                result["slides"] += canvas_rows(runner, {k: c}, vs, fns, args.reps, once, warmup_plane=warm,
                                                sliding_estimate=est)
        cells_sets = {}
        if "cells" in args.parts or "loop" in args.parts:
            cells = cell_images(args.data, args.cells_images, rng, val)
            if args.style == "brightfield":  # same convention as the canvases (nuclei dark)
                cells = [(1.0 - a, m, n) for a, m, n in cells]
            cells_sets = {s: cells for s in args.loop_cells_sizes}
        if "loop" in args.parts:
            print("\n== batched fine stage vs the reference loop", flush=True)
            first = next(iter(big.values())) if args.slide_sizes else None
            result["loop"] = section_loop(runner, first, args.reps, args, cells_sets)
        if "cells" in args.parts:
            print(f"\n== cells: stts vs direct at S={args.cells_sizes}", flush=True)
            result["cells"] = section_cells(runner, cells, args.cells_sizes, args.reps, args)
        if "refine_sweep" in args.parts:
            print(f"\n== refine: refine_threshold {args.refine_thresholds} vs sliding window", flush=True)
            rt = load_tiles(args.data, args.sweep_cell, np.random.default_rng(args.seed), val)
            rc = {f"{args.sweep_size}² f={f:g}": make_canvas(args.sweep_size, f, rt, cell=args.sweep_cell,
                                                               style=args.style, seed=args.seed + i)
                  for i, f in enumerate(args.blas_fractions)}
            result["refine_sweep"] = section_refine_sweep(runner, rc, args.refine_thresholds, args.reps, args)
        if "blas" in args.parts:
            print("\n== numpy OpenBLAS threads: 1 vs all cores, same stts runs", flush=True)
            bt = load_tiles(args.data, args.sweep_cell, np.random.default_rng(args.seed), val)
            bc = {f"{args.sweep_size}² f={f:g}": make_canvas(args.sweep_size, f, bt, cell=args.sweep_cell,
                                                               style=args.style, seed=args.seed + 50 + i)
                  for i, f in enumerate(args.blas_fractions)}
            result["blas"] = section_blas(runner, bc, args.reps, int(os.environ["OPENBLAS_NUM_THREADS"]), fns)
        if "ct" in args.parts and args.ct:
            print("\n== CT volume(s), slice by slice", flush=True)
            result["ct"] = [section_ct(runner, p, args.reps, args, fns) for p in args.ct]
        conv.append(conv_throughput(7))
    result["conv"] = conv
    result["conv_gflops"] = gflops
    info["loadavg_end"] = os.getloadavg()
    result["wall_total_s"] = time.perf_counter() - t_start
    print(f"\nconv throughput start {conv[0]['gflops']:.1f}, end {conv[-1]['gflops']:.1f} GFLOP/s; "
          f"total {result['wall_total_s'] / 60:.1f} min; load {info['loadavg_start']} -> {info['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
