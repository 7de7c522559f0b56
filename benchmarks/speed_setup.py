"""bench_speed's inputs and runners: slide-like canvases from dsb2018 tiles, the threshold "networks" with their
FLOP counts, the conv2d throughput of this process, the method variants and the interleaved runner.
Split from bench_speed.py (module size); numpy is imported by bench_speed first, after pinning OpenBLAS."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Reference figures printed beside ours.
REF_STTS_OVER_DIRECT = (3.5, 4.9)  # reference stts vs a single pass, cells, S = 32..256
ANCHORS = {"NMSW (CPU)": 11.0, "TotalSegmentator ROI crop (CPU)": 32.0}
GOALS = {"stts_vs_sliding_speedup": 8.0, "dice_tolerance": 0.01, "batched_vs_loop": 3.0, "refine_flops_saved": 0.60}

# -- data ------------------------------------------------------------------------------------------------


def load_tiles(data: Path, cell: int, rng: np.random.Generator,
               only: set[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cell``² crops of the grey fluorescence images of dsb2018 (float in [0, 1], bool mask), one per image.

    ``only``: restrict to these case stems (a trained bundle's val split: held-out tiles).
    """
    from PIL import Image

    out = []
    for f in sorted((data / "images").glob("*.png")):
        if only is not None and f.stem not in only:
            continue
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float32) / 255.0
        if np.abs(a[..., 0] - a[..., 1]).max() > 0 or a.mean() > 0.3 or min(a.shape[:2]) < cell:
            continue  # colour (H&E) or too small
        m = np.asarray(Image.open(data / "masks" / f.name)) > 0
        y = int(rng.integers(0, a.shape[0] - cell + 1))
        x = int(rng.integers(0, a.shape[1] - cell + 1))
        out.append((a[y : y + cell, x : x + cell, 0].copy(), m[y : y + cell, x : x + cell].copy()))
    if not out:
        sys.exit(f"no grey fluorescence tiles of at least {cell}² under {data}/images")
    return out


def cell_images(data: Path, n: int, rng: np.random.Generator,
                only: set[str] | None = None) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Whole grey dsb2018 images (the 'cells' set of the reference), ``n`` of them (from ``only`` if given)."""
    from PIL import Image

    fs = []
    for f in sorted((data / "images").glob("*.png")):
        if only is not None and f.stem not in only:
            continue
        a = np.asarray(Image.open(f).convert("RGB"))
        if np.abs(a[..., 0].astype(int) - a[..., 1]).max() == 0 and a.mean() < 0.3 * 255:
            fs.append(f)
    pick = sorted(rng.choice(len(fs), size=min(n, len(fs)), replace=False).tolist())
    out = []
    for i in pick:
        a = np.asarray(Image.open(fs[i]).convert("L")).astype(np.float32) / 255.0
        out.append((a, np.asarray(Image.open(data / "masks" / fs[i].name)) > 0, fs[i].stem[:12]))
    return out


def make_canvas(side: int, fraction: float, tiles: list, *, cell: int, style: str, seed: int) -> dict[str, Any]:
    """A ``side``² canvas: glass with faint noise and tiles on a fraction of the ``cell``-grid (1.0 = mosaic)."""
    rng = np.random.default_rng(seed)
    n = side // cell
    cells = n * n
    k = cells if fraction >= 1.0 else max(1, int(round(fraction * cells)))
    chosen = rng.choice(cells, size=k, replace=False)
    dark = np.abs(rng.normal(0.02, 0.01, size=(side, side))).astype(np.float32)  # glass "darkness"
    mask = np.zeros((side, side), np.uint8)
    for j, c in enumerate(chosen.tolist()):
        y, x = (c // n) * cell, (c % n) * cell
        img, m = tiles[int(rng.integers(len(tiles)))] if fraction < 1.0 else tiles[j % len(tiles)]
        if rng.random() < 0.5:
            img, m = img[:, ::-1], m[:, ::-1]
        dark[y : y + cell, x : x + cell] = img
        mask[y : y + cell, x : x + cell] = m
    grey = 1.0 - dark if style == "brightfield" else dark
    return {"side": side, "tile_fraction": k / cells, "gt_fraction": float(mask.mean()), "tiles": int(k),
            "grey": grey, "mask": mask}


# -- predictors ------------------------------------------------------------------------------------------


def ramp(batch: np.ndarray, t: float, polarity: str, k: float = 50.0) -> np.ndarray:
    """identity_probs with a threshold: p = clip(0.5 + k (v - t)), v = intensity or darkness of channel 0."""
    v = batch[:, :1] if polarity == "bright" else 1.0 - batch[:, :1]
    p = np.clip(0.5 + k * (v - t), 0.0, 1.0).astype(np.float32)
    return np.concatenate([1.0 - p, p], axis=1)


class Costed:
    """A Predictor that runs a real network (time, FLOPs) and returns ``output(batch)`` (or the network's).

    Records how many inputs of each (C, H, W) it saw, for the FLOP count.
    """

    backend = "python"
    device = "cpu"

    def __init__(self, net: Any, output: Callable[[np.ndarray], np.ndarray] | None, name: str) -> None:
        self.net = net
        self.output = output
        self.name = name
        self.n_classes = 2
        self.in_channels = net.in_channels
        self.shapes: Counter[tuple[int, int, int]] = Counter()
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.shapes[tuple(int(s) for s in batch.shape[1:])] += int(batch.shape[0])
        p = self.net(batch)
        return self.output(batch) if self.output is not None else p

    def reset(self) -> None:
        self.shapes.clear()
        self.calls = 0


class Nets:
    """The coarse and fine predictors, their torch modules (for FLOPs) and how outputs are produced."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        import torch

        from segcli.nets import build, param_count

        self.model = args.model
        self.polarity = "bright" if args.style == "fluorescence" else "dark"
        if args.model:
            from segcli.bundle import load_bundle
            from segcli.runtimes import make_predictor

            bundle = load_bundle(args.model)
            self.size = args.size or bundle.input_size
            self.channels = bundle.in_channels
            mods = {r: bundle.load_module(r) for r in ("coarse", "fine")}
            preds = {r: make_predictor(bundle, r, backend=args.backend, max_batch=args.batch) for r in mods}
            outs: dict[str, Any] = {"coarse": None, "fine": None}
            self.desc = f"bundle {args.model} ({bundle.name}), trained weights"
        else:
            torch.manual_seed(0)
            self.size = args.size or 64
            self.channels = 3
            mods = {r: build("unet", in_channels=3, out_channels=1, features=args.features).eval()
                    for r in ("coarse", "fine")}
            preds = {}
            for r, m in mods.items():
                if args.backend == "onnx":
                    from segcli.export import export_module
                    from segcli.runtimes.onnx_backend import OnnxPredictor

                    path = tmp / f"{r}.onnx"
                    path.write_bytes(export_module(m, in_channels=3, input_size=self.size).SerializeToString())
                    preds[r] = OnnxPredictor.from_file(path, n_classes=2, in_channels=3, max_batch=args.batch,
                                                       threads=args.threads)
                else:
                    from segcli.runtimes.torch_backend import TorchPredictor

                    # make_predictor's CPU setting: channels_last.
                    preds[r] = TorchPredictor(m, n_classes=2, in_channels=3, max_batch=args.batch, channels_last=True)
            pol = self.polarity
            outs = {"coarse": lambda b: ramp(b, args.t_rough, pol), "fine": lambda b: ramp(b, args.t_fine, pol)}
            self.desc = (f"U-Net features={args.features} ({param_count(mods['fine']) / 1e6:.2f}M params), random "
                         f"weights; outputs = intensity threshold (rough t={args.t_rough}, fine t={args.t_fine}, "
                         f"on {'darkness' if pol == 'dark' else 'intensity'})")
        self.modules = mods
        self.coarse = Costed(preds["coarse"], outs["coarse"], "coarse")
        self.fine = Costed(preds["fine"], outs["fine"], "fine")
        self._flops: dict[tuple[str, tuple[int, int, int]], int] = {}

    def flops_per_input(self, role: str, shape: tuple[int, int, int]) -> int:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        key = (role, shape)
        if key not in self._flops:
            x = torch.zeros((1, *shape))
            with FlopCounterMode(display=False) as fc, torch.inference_mode():
                self.modules[role](x)
            self._flops[key] = int(fc.get_total_flops())
        return self._flops[key]

    def take_flops(self) -> dict[str, Any]:
        """FLOPs and inputs since the last call, per role; resets the counters."""
        out: dict[str, Any] = {}
        for role, p in (("coarse", self.coarse), ("fine", self.fine)):
            out[f"{role}_inputs"] = sum(p.shapes.values())
            out[f"{role}_calls"] = p.calls
            out[f"{role}_flops"] = sum(n * self.flops_per_input(role, s) for s, n in p.shapes.items())
            p.reset()
        out["flops"] = out["coarse_flops"] + out["fine_flops"]
        return out


# -- machine throughput ------------------------------------------------------------------------------------


def conv_throughput(reps: int) -> dict[str, float]:
    """GFLOP/s of a large 3x3 conv2d (64 -> 64 channels, 4x128², channels_last) in this process."""
    import torch

    x = torch.randn(4, 64, 128, 128).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    flops = 2 * 4 * 64 * 64 * 9 * 128 * 128
    ts = []
    with torch.inference_mode():
        torch.nn.functional.conv2d(x, w, padding=1)
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            ts.append(time.perf_counter() - t)
    return {"gflops": flops / statistics.median(ts) / 1e9, "gflops_best": flops / min(ts) / 1e9}


# -- engines ---------------------------------------------------------------------------------------------


def variant_fns(nets: Nets, args: argparse.Namespace) -> dict[str, Callable[[Any], Any]]:
    from segcli.engines.direct import direct, sliding
    from segcli.engines.refine import refine
    from segcli.engines.stts import stts

    S, b = nets.size, args.batch
    return {
        "sliding": lambda pl: sliding(pl, nets.fine, size=S, overlap=0.25, batch_size=b),
        # Fine pass at native resolution (boxes larger than S are tiled): the Dice-parity setting.
        "stts": lambda pl: stts(pl, nets.coarse, nets.fine, size=S, batch_size=b, max_downscale=args.max_downscale,
                                max_zoom=1.0),
        # Segmenter's setting for images above 64 MPixel: crops seen at up to 4x downscale.
        "stts_z4": lambda pl: stts(pl, nets.coarse, nets.fine, size=S, batch_size=b,
                                   max_downscale=args.max_downscale, max_zoom=4.0),
        # Every patch whose rough uncertainty exceeds the threshold is re-segmented at native resolution.
        "refine": lambda pl: refine(pl, nets.coarse, nets.fine, size=S, patches=None,
                                    refine_threshold=args.refine_threshold, batch_size=b),
        # The paper's setting on small images: one rough pass at S, every crop squeezed to S.
        "stts_paper": lambda pl: stts(pl, nets.coarse, nets.fine, size=S, batch_size=b),
        "direct": lambda pl: direct(pl, nets.coarse, size=S),
    }


def reference_loop(plane: Any, fine: Any, boxes: np.ndarray, size: int, threshold: float = 0.5) -> tuple[np.ndarray, dict[str, float]]:
    """The reference code's fine stage: per crop, nearest resize to S, batch of 1, nearest back, OR."""
    H, W = plane.shape
    canvas = np.zeros((H, W), dtype=bool)
    t = {"crops": 0.0, "fine": 0.0, "fuse": 0.0}
    for y0, x0, y1, x1 in np.asarray(boxes, dtype=np.int64).tolist():
        t0 = time.perf_counter()
        crop = plane.region((y0, x0, y1, x1))
        h, w = y1 - y0, x1 - x0
        iy = np.minimum((np.arange(size) * h) // size, h - 1)
        ix = np.minimum((np.arange(size) * w) // size, w - 1)
        x = np.ascontiguousarray(crop[:, iy[:, None], ix[None, :]])[None]
        t1 = time.perf_counter()
        p = fine(x)[0, 1]
        t2 = time.perf_counter()
        oy = np.minimum((np.arange(h) * size) // h, size - 1)
        ox = np.minimum((np.arange(w) * size) // w, size - 1)
        canvas[y0:y1, x0:x1] |= p[oy[:, None], ox[None, :]] > threshold
        t3 = time.perf_counter()
        t["crops"] += t1 - t0
        t["fine"] += t2 - t1
        t["fuse"] += t3 - t2
    return canvas.astype(np.uint8), t


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from segcli import metrics

    return metrics.dice(np.asarray(a) > 0, np.asarray(b) > 0)


class Runner:
    """Runs variants, records wall time, stage timings and FLOPs per run."""

    def __init__(self, nets: Nets, gflops: float) -> None:
        self.nets = nets
        self.gflops = gflops

    def once(self, fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        self.nets.take_flops()
        t = time.perf_counter()
        res = fn()
        wall = time.perf_counter() - t
        rec = {"wall_s": wall, **self.nets.take_flops()}
        return res, rec


def summarise(runs: list[dict[str, Any]], gflops: float) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    med = statistics.median(walls)
    stages: dict[str, float] = {}
    for k in {k for r in runs for k in r.get("stages", {})}:
        stages[k] = statistics.median(r.get("stages", {}).get(k, 0.0) for r in runs)
    flops = runs[-1]["flops"]
    limit = flops / (gflops * 1e9)
    out = {"runs": len(walls), "median_s": med, "p25_s": float(np.percentile(walls, 25)),
           "p75_s": float(np.percentile(walls, 75)), "min_s": min(walls), "stages_median_s": stages,
           "flops": flops, "gflop": flops / 1e9, "limit_s": limit, "measured_over_limit": med / limit if limit else None,
           "network_s_at_peak": limit}
    for k in ("coarse_inputs", "fine_inputs", "coarse_flops", "fine_flops"):
        out[k] = runs[-1][k]
    out["unaccounted_s"] = med - sum(stages.values())
    return out


def interleave(runner: Runner, planes: dict[str, Any], jobs: list[tuple[str, str, Callable[[Any], Any]]], reps: int,
               warmup: bool | str, single: set[str] = frozenset()) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], dict[tuple[str, str], Any]]:
    """``jobs`` = (label, plane key, fn); one run of each per round, order rotated; returns runs and first results.

    ``warmup=True``: one untimed run of every job first; ``warmup=<plane key>``: one untimed run of
    every label on that (small) plane only, which warms the same code paths at a fraction of the cost.
    Jobs in ``single`` run once (in the first round): too slow to repeat.
    """
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(lab, pk): [] for lab, pk, _ in jobs}
    results: dict[tuple[str, str], Any] = {}
    if warmup is True:
        for lab, pk, fn in jobs:
            if lab not in single:
                res, _ = runner.once(lambda fn=fn, pk=pk: fn(planes[pk]))
                results[(lab, pk)] = res
    elif warmup:
        seen = set()
        for lab, _, fn in jobs:
            if lab not in seen:
                seen.add(lab)
                runner.once(lambda fn=fn: fn(planes[warmup]))
    for r in range(reps):
        order = jobs[r % len(jobs):] + jobs[: r % len(jobs)]
        for lab, pk, fn in order:
            if lab in single and r > 0:
                continue
            res, rec = runner.once(lambda fn=fn, pk=pk: fn(planes[pk]))
            rec["stages"] = dict(res.timings) if hasattr(res, "timings") else rec.get("stages", {})
            rec["info"] = {k: v for k, v in (res.info.items() if hasattr(res, "info") else []) if k != "boxes"
                           and not isinstance(v, list)}
            runs[(lab, pk)].append(rec)
            results.setdefault((lab, pk), res)
        print(f"  round {r + 1}/{reps} done, load {os.getloadavg()[0]:.1f}", flush=True)
    return runs, results
