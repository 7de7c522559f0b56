"""This tree against an earlier release on a batch of photos, as a user runs both: whole processes, in turn.

Issue 19's goal: ``segcli predict`` over 100 Kvasir frames with the default settings has at least twice the
throughput of release 0.1.0, and one image with an ONNX bundle starts and finishes in under 1.5 s. Each round
runs the release, then this tree, then this tree on the one bundled sample; ratios come from the same round,
because absolute times drift on a shared machine. Masks of the two versions are compared frame by frame.

    git worktree add /tmp/segcli-0.1.0 3bc2de1
    python benchmarks/bench_release.py --data ../shared/data/kvasir-seg --before /tmp/segcli-0.1.0 \
        --n 100 --rounds 3 --json benchmarks/results/kvasir100-vs-0.1.0-issue19.json

Both versions run under this interpreter (the release's own code, from its folder). Before the rounds, one
untimed run of each fills the caches (this tree's first-use ONNX exports), so no timed run includes an export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch import build_folder  # noqa: E402
from bench_runtimes import machine_info  # noqa: E402
from bench_slide import load, run_timed, time_v  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "models" / "polyp" / "sample" / "polyp.jpg"


def run(tree: Path, inputs: Path, out: Path, model: str, timeout: float) -> dict:
    """One ``segcli predict`` process from ``tree``'s code: wall, CPU, peak RSS and the load around it."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "segcli", "predict", str(inputs), "-o", str(out) + "/",
           "--model", model, "-q"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = load()["loadavg"][0]
    r, wall = run_timed(cmd, env, timeout, "bench_release", cwd=tree)  # python -m takes segcli from the cwd
    row = {"wall_s": round(wall, 3), **time_v(r.stderr), "returncode": r.returncode, "load_before": before,
           "load_after": load()["loadavg"][0]}
    row["cpu_s"] = round(row.get("user_s", 0.0) + row.get("sys_s", 0.0), 2)
    if r.returncode != 0:
        row["stderr_tail"] = r.stderr[-2000:]
    return row


def code_of(tree: Path) -> str:
    """Where ``python -m segcli`` run as :func:`run` runs it takes its code from (must be ``tree``)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import segcli; print(segcli.__file__)"], cwd=tree, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)}, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"segcli from {tree} would run {out}")
    return out


def mask_agreement(a: Path, b: Path) -> dict:
    """Per-frame Dice between two output folders' masks (1.0 when both are empty)."""
    from PIL import Image

    dice, identical = [], 0
    for fa in sorted(a.glob("*_seg.png")):
        fb = b / fa.name
        if not fb.exists():
            continue
        x, y = np.asarray(Image.open(fa)) > 0, np.asarray(Image.open(fb)) > 0
        identical += int(np.array_equal(x, y))
        s = int(x.sum()) + int(y.sum())
        dice.append(1.0 if s == 0 else 2.0 * int((x & y).sum()) / s)
    return {"frames": len(dice), "identical": identical, "dice_mean": round(float(np.mean(dice)), 5) if dice else None,
            "dice_min": round(float(np.min(dice)), 5) if dice else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder with images/ (kvasir-seg)")
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the earlier release (3bc2de1 = 0.1.0)")
    ap.add_argument("--model", default=str(REPO / "models" / "polyp"),
                    help="the bundle both versions run (default: this tree's polyp, which 0.1.0 also reads)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not (args.before / "segcli" / "__init__.py").is_file():
        raise SystemExit(f"--before {args.before}: not a segcli checkout")

    work = Path(tempfile.mkdtemp(prefix="segcli-bench-release-"))
    frames = work / "frames"
    build_folder(args.data, args.n, frames)
    trees = {"before": args.before.resolve(), "this": REPO}
    code = {name: code_of(tree) for name, tree in trees.items()}
    print(f"{args.n} frames in {frames}; code {code}; warm-up runs (not counted)", flush=True)
    for name, tree in trees.items():
        w = run(tree, frames, work / f"warm-{name}", args.model, args.timeout)
        if w["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{w.get('stderr_tail')}")
    run(REPO, SAMPLE, work / "warm-one", "polyp", args.timeout)

    rows = []
    for r in range(1, args.rounds + 1):
        for name, tree in trees.items():
            row = {"variant": name, "round": r, **run(tree, frames, work / f"{name}-{r}", args.model, args.timeout)}
            rows.append(row)
            print(f"round {r} {name:6s} wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s  "
                  f"rss {row.get('peak_rss_mb')} MB  load {row['load_before']}", flush=True)
        one = {"variant": "one-image", "round": r, **run(REPO, SAMPLE, work / f"one-{r}", "polyp", args.timeout)}
        rows.append(one)
        print(f"round {r} one    wall {one['wall_s']:6.2f} s  cpu {one['cpu_s']:6.2f} s", flush=True)

    def by(variant: str, key: str) -> list[float]:
        return [row[key] for row in rows if row["variant"] == variant]

    ratios = [b / t for b, t in zip(by("before", "wall_s"), by("this", "wall_s"), strict=True)]
    cpu_ratios = [b / t for b, t in zip(by("before", "cpu_s"), by("this", "cpu_s"), strict=True)]
    summary = {
        "throughput_ratio_wall_per_round": [round(x, 2) for x in ratios],
        "throughput_ratio_wall_median": round(statistics.median(ratios), 2),
        "cpu_ratio_per_round": [round(x, 2) for x in cpu_ratios],
        "one_image_wall_s": by("one-image", "wall_s"),
        "one_image_cpu_s": by("one-image", "cpu_s"),
        "masks": mask_agreement(work / f"before-{args.rounds}", work / f"this-{args.rounds}"),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        doc = {"what": f"{args.n} frames of {args.data.name}, segcli predict --model {args.model}, {args.before} "
                       "(earlier release) vs this tree, interleaved; plus one-image runs of the bundled polyp sample",
               "command": " ".join(sys.argv), "code": code, "machine": machine_info(os.cpu_count() or 1), "rows": rows, "summary": summary}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
