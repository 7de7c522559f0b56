"""Batch throughput: one process per file (the naive shell loop) vs one batch process, with and without prefetch.

TotalSegmentator users complain that every file reloads the model (#171, #523, #581). This measures
what loading once saves on a folder of real images, and what overlapping reading/writing with
compute adds on top. Variants are interleaved round by round and reported as ratios from the same
rounds, because absolute times drift on shared machines.

    python benchmarks/bench_batch.py --data ../shared/data/kvasir-seg --model polyp --n 200 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_runtimes import machine_info  # noqa: E402


def build_folder(data: Path, n: int, dest: Path) -> list[Path]:
    """Copy the first n images of a dataset (sorted, so every run uses the same files)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted((data / "images").iterdir())[:n]
    out = []
    for f in files:
        shutil.copy(f, dest / f.name)
        out.append(dest / f.name)
    return out


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with images/")
    ap.add_argument("--model", default="polyp")
    ap.add_argument("--n", type=int, default=200, help="files in the batch folder")
    ap.add_argument("--loop-n", type=int, default=30, help="files run one process each (the slow baseline)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="*", default=[2], help="also measure --workers W")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()

    py = [sys.executable, "-m", "segcli", "predict", "--model", args.model, "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = build_folder(args.data, args.n, tmp / "in")
        loop_files = files[: args.loop_n]
        variants = {
            "batch_no_prefetch": lambda o: run(py + [str(tmp / "in"), "-o", str(o), "--prefetch", "0"]),
            "batch_prefetch": lambda o: run(py + [str(tmp / "in"), "-o", str(o), "--prefetch", "2"]),
        }
        for w in args.workers:
            variants[f"batch_workers{w}"] = lambda o, w=w: run(py + [str(tmp / "in"), "-o", str(o), "--workers", str(w)])
        per_file: dict[str, list[float]] = {k: [] for k in ["loop", *variants]}
        # Warm-up (file cache, first-import costs).
        variants["batch_prefetch"](tmp / "warm")
        for rep in range(args.reps):
            order = list(variants)
            order = order[rep % len(order):] + order[: rep % len(order)]
            for name in order:
                out = tmp / f"out-{name}-{rep}"
                per_file[name].append(variants[name](out) / len(files))
                shutil.rmtree(out)
            if rep < max(1, args.reps // 2):  # the per-file loop is slow: fewer rounds
                t = sum(run(py + [str(f), "-o", str(tmp / "loop") + "/"]) for f in loop_files)
                per_file["loop"].append(t / len(loop_files))
                shutil.rmtree(tmp / "loop")
    med = {k: statistics.median(v) for k, v in per_file.items()}
    result = {
        "machine": machine_info(0),
        "n_batch": args.n, "n_loop": args.loop_n, "reps": args.reps, "model": args.model, "data": str(args.data),
        "seconds_per_file": med,
        "files_per_second": {k: 1.0 / v for k, v in med.items()},
        "speedup_vs_loop": {k: med["loop"] / v for k, v in med.items()},
        "prefetch_gain": med["batch_no_prefetch"] / med["batch_prefetch"],
        "raw": per_file,
    }
    print(json.dumps({k: result[k] for k in ("files_per_second", "speedup_vs_loop", "prefetch_gain")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(med)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(names, [1 / med[n] for n in names], color=["#999"] + ["#3a7"] * (len(names) - 1))
        ax.set_ylabel("files / s")
        ax.set_title(f"segcli predict, {args.n} {args.data.name} images ({result['machine']['cores_available']} cores)")
        for i, n in enumerate(names):
            ax.text(i, 1 / med[n], f"{med['loop'] / med[n]:.1f}×", ha="center", va="bottom")
        plt.xticks(rotation=15)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
