"""Fine-pass throughput of the U-Net on CPU: torch (contiguous), torch channels_last, ONNX Runtime.

Why this shape of benchmark: the fine pass (a batch of S x S crops through the U-Net) dominates
segment-then-segment on CPU, and the machines it runs on are shared, so runs of A and B are
*interleaved* (one call of each variant per round, order rotated every round) and every variant is
reported as a ratio to torch measured in the same rounds; absolute numbers drift with the load,
ratios much less. Each variant goes through its Predictor, i.e. exactly what the engines call
(including the sigmoid/softmax and the numpy copies).

    python benchmarks/bench_runtimes.py --sizes 64 128 256 --batch 8 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

VARIANTS = ("torch", "torch_cl", "ort")
LABELS = {"torch": "torch CPU (contiguous)", "torch_cl": "torch channels_last", "ort": "ONNX Runtime CPU"}


def machine_info(threads: int) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    from segcli.runtimes.device import available_cores

    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {
        "cpu": cpu,
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "loadavg_start": os.getloadavg(),
    }


def build_predictors(features: int, max_size: int, threads: int, batch: int, tmp: Path) -> tuple[dict[str, Any], int]:
    """The three predictors over identical weights (deep copies: channels_last converts in place)."""
    import torch

    from segcli.export import export_module
    from segcli.nets import build, param_count
    from segcli.runtimes.onnx_backend import OnnxPredictor
    from segcli.runtimes.torch_backend import TorchPredictor

    torch.manual_seed(0)
    net = build("unet", in_channels=3, out_channels=1, features=features).eval()
    path = tmp / f"unet{features}.onnx"
    path.write_bytes(export_module(net, in_channels=3, input_size=max_size).SerializeToString())
    preds = {
        "torch": TorchPredictor(copy.deepcopy(net), n_classes=2, in_channels=3, max_batch=batch),
        "torch_cl": TorchPredictor(copy.deepcopy(net), n_classes=2, in_channels=3, max_batch=batch, channels_last=True),
        "ort": OnnxPredictor.from_file(path, n_classes=2, in_channels=3, max_batch=batch, threads=threads),
    }
    return preds, param_count(net)


def time_interleaved(preds: dict[str, Any], x: np.ndarray, reps: int, warmup: int) -> tuple[dict[str, list[float]], float]:
    """Per-variant call times; one call of each variant per round, the order rotated each round."""
    names = list(preds)
    outs = {}
    for _ in range(warmup):
        for n in names:
            outs[n] = preds[n](x)
    agree = max(float(np.abs(outs[n] - outs[names[0]]).max()) for n in names)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            preds[n](x)
            times[n].append(time.perf_counter() - t)
    return times, agree


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from segcli.runtimes.device import available_cores

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    info = machine_info(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-bench-") as tmp:
        for features in args.features:
            preds, params = build_predictors(features, max(args.sizes), threads, args.batch, Path(tmp))
            for size in args.sizes:
                x = np.random.default_rng(size).standard_normal((args.batch, 3, size, size)).astype(np.float32)
                times, agree = time_interleaved(preds, x, args.reps, args.warmup)
                base = statistics.median(times["torch"])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    q = np.percentile(ts, [25, 75])
                    rows.append({
                        "model": f"unet f={features}", "features": features, "params": params, "size": size,
                        "batch": args.batch, "variant": name, "median_ms": 1e3 * med, "p25_ms": 1e3 * q[0],
                        "p75_ms": 1e3 * q[1], "min_ms": 1e3 * min(ts), "crops_per_s": args.batch / med,
                        "mpix_per_s": args.batch * size * size / med / 1e6, "speedup_vs_torch": base / med,
                        "max_prob_diff_vs_torch": agree, "runs": len(ts),
                    })
                print(table(rows[-len(times):], header=not rows[:-len(times)]), flush=True)
    info["loadavg_end"] = os.getloadavg()
    return {"machine": info, "settings": {"sizes": args.sizes, "batch": args.batch, "reps": args.reps,
                                          "warmup": args.warmup, "features": args.features}, "results": rows}


def table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Markdown rows: median ms per batch, crops/s, MPixel/s and the speed-up over torch."""
    out = []
    if header:
        out += ["| model | S | variant | median ms / batch | crops/s | MPixel/s | vs torch |",
                "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['size']} | {LABELS[r['variant']]} | "
                   f"{r['median_ms']:.1f} | {r['crops_per_s']:.1f} | {r['mpix_per_s']:.2f} | {r['speedup_vs_torch']:.2f}x |")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["results"]}, key=lambda m: -int(m.split("=")[1]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for v in VARIANTS:
            rs = sorted((r for r in result["results"] if r["model"] == model and r["variant"] == v), key=lambda r: r["size"])
            ax.plot([r["size"] for r in rs], [r["mpix_per_s"] for r in rs], marker="o", label=LABELS[v])
            for r in rs:
                if v != "torch":
                    ax.annotate(f"{r['speedup_vs_torch']:.2f}x", (r["size"], r["mpix_per_s"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["settings"]["sizes"], [str(s) for s in result["settings"]["sizes"]])
        ax.set_xlabel("crop size S (px)")
        ax.set_ylabel("MPixel/s (higher is better)")
        ax.set_title(f"{model}, batch {result['settings']['batch']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"fine pass on {m['cores_available']} cores ({m['cpu']}); torch {m['torch']}, ORT {m['onnxruntime']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="crop sizes S")
    ap.add_argument("--batch", type=int, default=8, help="crops per call (the fine-pass batch)")
    ap.add_argument("--features", type=int, nargs="+", default=[32, 16], help="U-Net widths (32 = 7.76M params)")
    ap.add_argument("--reps", type=int, default=7, help="timed rounds (median reported; at least 5 advised)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the cores available)")
    ap.add_argument("--omp-wait-policy", choices=["passive", "active"], default=None,
                    help="set OMP_WAIT_POLICY for torch's OpenMP before torch loads (default: leave the environment)")
    ap.add_argument("--json", type=Path, default=None, help="write all results and machine info here")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of MPixel/s per size here")
    args = ap.parse_args(argv)
    if args.omp_wait_policy:
        if "torch" in sys.modules:
            sys.exit("--omp-wait-policy must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    result = run(args)
    print(f"\nmachine: {json.dumps(result['machine'])}")
    best = {}
    for r in result["results"]:
        key = (r["model"], r["size"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    print("fastest: " + "; ".join(f"{m} S={s}: {LABELS[r['variant']]}" for (m, s), r in best.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
