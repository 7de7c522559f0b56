"""What ``--preview`` costs: one compact picture alone, or a whole batch with and without previews.

    python benchmarks/bench_preview.py --data ../shared/data/kvasir-seg --n 30 --rounds 5
    python benchmarks/bench_preview.py --batch FRAMES/ --model polyp --rounds 5 [--json OUT.json]

The first form reads the first ``--n`` images and masks (sorted) of a dataset folder (``images/``, ``masks/``),
draws and writes each preview once to warm fonts and caches, then reports the CPU time per preview (min and
median of the rounds). Compare versions by running it from each checkout in turn, interleaved.

The second runs ``segcli predict FRAMES/ -o OUT/ --model M -q`` and the same with ``--preview``, interleaved
after one warm-up pair, each a fresh process into a fresh folder: wall and CPU (user + sys, ``os.wait4``) per
run, the load beside each, and the median ratio; it checks that every frame got its preview.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segcli import viz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="dataset folder with images/ and masks/")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=Path, help="a folder of photos: time whole batches with and without --preview")
    ap.add_argument("--model", default="polyp")
    ap.add_argument("--json", type=Path, help="write the batch runs here")
    args = ap.parse_args()
    if args.batch is not None:
        _batch(args.batch, args.model, args.rounds, args.json)
        return
    if args.data is None:
        ap.error("give --data or --batch")
    imgs = sorted((args.data / "images").iterdir())[: args.n]
    masks = sorted((args.data / "masks").iterdir())[: args.n]
    data = [(np.asarray(Image.open(i).convert("RGB")), (np.asarray(Image.open(m).convert("L")) > 0).astype(np.uint8))
            for i, m in zip(imgs, masks, strict=True)]
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        per = _rounds(data, Path(tmp), args.rounds)
    print(f"{len(data)} previews, {args.rounds} rounds: CPU per preview min {min(per):.2f} ms, "
          f"median {statistics.median(per):.2f} ms")


def _rounds(data: list[tuple[np.ndarray, np.ndarray]], out: Path, rounds: int) -> list[float]:
    def once() -> float:
        t = time.process_time()
        for k, (a, lab) in enumerate(data):
            viz.preview(a, lab, out / f"{k}_seg_preview.jpg", classes=["background", "object"],
                        normalization={"kind": "dtype"}, title=f"{k}.jpg · polyp (stts)", compact=True)
        return (time.process_time() - t) / len(data) * 1000

    once()  # fonts and caches warm
    return [once() for _ in range(rounds)]


def _run(frames: Path, model: str, out: Path, preview: bool) -> dict[str, float]:
    """One ``segcli predict`` process: wall, CPU and the load when it started."""
    cmd = [sys.executable, "-m", "segcli", "predict", str(frames), "-o", str(out), "--model", model, "-q"]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd + (["--preview"] if preview else []))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return {"load": round(load, 2), "wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3)}


def _batch(frames: Path, model: str, rounds: int, json_out: Path | None) -> None:
    n = sum(1 for p in frames.iterdir() if p.is_file())
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-preview-batch-") as tmp:
        for r in range(rounds + 1):  # round 0 warms the ONNX cache and the page cache
            pair = {}
            for preview in (False, True):
                out = Path(tmp) / f"r{r}-{int(preview)}"
                pair[preview] = _run(frames, model, out, preview)
                if preview:
                    made = len(list(out.glob("*_preview.jpg")))
                    if made != n:
                        raise SystemExit(f"{made} previews for {n} frames")
                shutil.rmtree(out)
            if r == 0:
                continue
            ratio = pair[True]["wall_s"] / pair[False]["wall_s"]
            runs.append({"plain": pair[False], "preview": pair[True], "wall_ratio": round(ratio, 3),
                         "cpu_ratio": round(pair[True]["cpu_s"] / pair[False]["cpu_s"], 3)})
            print(f"round {r}: plain {pair[False]['wall_s']:.2f} s wall / {pair[False]['cpu_s']:.2f} s CPU "
                  f"(load {pair[False]['load']:.2f}), --preview {pair[True]['wall_s']:.2f} / "
                  f"{pair[True]['cpu_s']:.2f} s (load {pair[True]['load']:.2f}): {ratio:.2f}x")
    med = statistics.median(r["wall_ratio"] for r in runs)
    med_cpu = statistics.median(r["cpu_ratio"] for r in runs)
    print(f"{n} photos, {rounds} interleaved pairs: --preview costs {med:.2f}x the plain batch's wall time "
          f"(median; CPU {med_cpu:.2f}x)")
    if json_out is not None:
        json_out.write_text(json.dumps({"frames": n, "model": model, "rounds": runs, "median_wall_ratio": med,
                                        "median_cpu_ratio": med_cpu}, indent=1) + "\n")


if __name__ == "__main__":
    main()
