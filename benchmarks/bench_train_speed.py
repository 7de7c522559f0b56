"""Training speed on the CPU (issue 20): images per second before and after bf16 autocast + channels_last.

The same short, fixed, seeded run (``segcli train --method direct``, fixed epochs, no time limit, one torch
thread) is trained by two checkouts: ``--before`` (a worktree of the code before the change: fp32,
contiguous NCHW) and ``--after`` (this checkout: bf16 autocast and channels_last on a CPU with native
bf16; validation always fp32). Runs alternate before/after so machine load hits both alike. Per run:
images per second of the training stage (train images × epochs / stage seconds, validation included as
in a real run) and, robust to a shared machine's load, images per CPU-second of the whole process (one torch
thread, so CPU time is the work done; it includes start-up and data loading, so it understates the
gain), and the final full-resolution validation Dice, which must stay within 0.01.

    python benchmarks/bench_train_speed.py --before /work/wt-stts --data ../shared/data/dsb2018-nuclei \\
        --sizes 64 128 --epochs 30 --json benchmarks/results/train-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(tree: Path, data: Path, size: int, epochs: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "segcli", "train", "--method", "direct", "--arch", "unet", "--features", "16",
           "--data", str(data), "--channels", "rgb", "--size", str(size), "--epochs", str(epochs), "--threads", "1",
           "--seed", "0", "-o", str(out), "-q", *extra]
    load0 = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, check=True, env={**os.environ, "SEGCLI_ONNX_CACHE": "off"})
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    t = json.loads((out / "segcli.json").read_text())["training"]
    st = t["stages"]["coarse"]
    n = t["train_samples"] * st["epochs_run"]
    return {"tree": str(tree), "size": size, "epochs": st["epochs_run"], "stage_s": st["time_s"], "wall_s": round(wall, 1),
            "images_per_s": round(n / st["time_s"], 2), "cpu_s": round(cpu, 1), "images_per_cpu_s": round(n / cpu, 2), "val_dice_full_res": round(t["val_full_res"]["dice"], 4),
            "best_epoch": st["best_epoch"], "train_precision": t.get("train_precision", "fp32 (before)"),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the code before the change")
    ap.add_argument("--after", type=Path, default=REPO)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-train-speed-") as tmp:
        for r in range(a.rounds):
            for size in a.sizes:
                for label, tree in (("before", a.before), ("after", a.after)):
                    res = run(tree.resolve(), a.data.resolve(), size, a.epochs, Path(tmp) / f"{label}-{size}-{r}", [])
                    res["label"] = label
                    rows.append(res)
                    print(json.dumps(res), flush=True)
    summary = {}
    for size in a.sizes:
        b = [x for x in rows if x["size"] == size and x["label"] == "before"]
        f = [x for x in rows if x["size"] == size and x["label"] == "after"]
        ips_b = sum(x["images_per_s"] for x in b) / len(b)
        ips_a = sum(x["images_per_s"] for x in f) / len(f)
        cpu_b = sum(x["images_per_cpu_s"] for x in b) / len(b)
        cpu_a = sum(x["images_per_cpu_s"] for x in f) / len(f)
        summary[str(size)] = {"speedup_cpu_time": round(cpu_a / cpu_b, 2), "speedup_wall": round(ips_a / ips_b, 2),
                              "images_per_cpu_s_before": round(cpu_b, 2), "images_per_cpu_s_after": round(cpu_a, 2),
                              "images_per_s_before": round(ips_b, 2), "images_per_s_after": round(ips_a, 2),
                              "dice_before": [x["val_dice_full_res"] for x in b], "dice_after": [x["val_dice_full_res"] for x in f]}
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                                      "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
