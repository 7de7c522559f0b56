"""Peak RSS and wall time of segmenting big CT volumes: slab-streamed reading against the whole read.

The volumes are built on the fly (never committed) by resampling the REAL abdominal CT
``ct-example/images/abdomen_3mm.nii.gz`` (122×101×112 at 3 mm) onto a 512×512 in-plane grid with
``--slices`` slices (600 by default, as a thin-slice CT would have), int16 in HU, written as .nii.gz.

Each measurement runs in a child process (this script with ``--child``) that calls
``Segmenter.predict_file`` and reports its own peak RSS (``ru_maxrss``), so runs never share a heap.
The two paths must give the same mask (checked voxel for voxel).

    .venv/bin/python benchmarks/bench_volume.py --data ../shared/data/ct-example --slices 300 600 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segcli.memory import peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent


def make_volume(src: Path, out: Path, slices: int, side: int = 512) -> tuple[int, ...]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    size, spacing = img.GetSize(), img.GetSpacing()
    new_size = (side, side, slices)
    # The first and last samples land on the first and last voxels: nothing is extrapolated (an extrapolated
    # slice would be all air, -1024, and join the lungs to the outside air).
    new_spacing = tuple(spacing[i] * (size[i] - 1) / (new_size[i] - 1) for i in range(3))
    res = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), new_spacing,
                        img.GetDirection(), -1024, sitk.sitkInt16)
    sitk.WriteImage(res, str(out), useCompression=True)
    return tuple(res.GetSize())


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from segcli.api import Segmenter

    t = time.perf_counter()
    seg = Segmenter(args.model, threads=args.threads, stream_volumes=args.stream == "1",
                    overrides={"lung_gate": False} if args.no_gate else None)
    rep = seg.predict_file(args.input, args.output, probabilities=args.probabilities)
    wall = time.perf_counter() - t
    rss = peak_rss_bytes()  # own peak: ru_maxrss would carry the driver's
    print(json.dumps({"status": rep.status, "error": rep.error, "wall_s": wall, "peak_rss": rss,
                      "seconds": rep.seconds, "info": rep.info, "voxel_counts": rep.voxel_counts}))


def measure(model: str, path: Path, out: Path, stream: bool, threads: int, probabilities: bool = False,
            gate: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--input", str(path), "--output", str(out),
           "--stream", "1" if stream else "0", "--threads", str(threads)] + (["--probabilities"] if probabilities else []) \
        + ([] if gate else ["--no-gate"])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"status": "crashed", "error": r.stderr[-400:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/ct-example")
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 600, 1000])
    ap.add_argument("--model", default="covid-ct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--probabilities", action="store_true", help="also measure runs that write probabilities")
    ap.add_argument("--gate", action="store_true", help="also measure the streamed run with the bundle's lung gate off")
    ap.add_argument("--no-gate", action="store_true", help=argparse.SUPPRESS)  # child: lung gate off
    ap.add_argument("--input"), ap.add_argument("--output"), ap.add_argument("--stream")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import SimpleITK as sitk
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-vol-", dir=args.tmp))
    rows = []
    try:
        for n in args.slices:
            vol = tmp / f"ct512x512x{n}.nii.gz"
            shape = make_volume(args.data / "images/abdomen_3mm.nii.gz", vol, n)
            raw_mb = int(np.prod(shape)) * 2 / 1e6
            masks = {}
            runs = [(True, False, True), (False, False, True)] + ([(True, True, True), (False, True, True)] if args.probabilities else []) \
                + ([(True, False, False)] if args.gate else [])
            for stream, probs, gate in runs:
                out = tmp / f"m{int(stream)}{int(probs)}{int(gate)}.nii.gz"
                r = measure(args.model, vol, out, stream, args.threads, probs, gate)
                path = ("streamed slabs" if stream else "whole read") + (" + probabilities" if probs else "") \
                    + ("" if gate else ", lung gate off")
                row = {"volume": "x".join(map(str, shape)), "int16_mb": round(raw_mb), "file_mb": round(vol.stat().st_size / 1e6),
                       "path": path, "status": r.get("status"),
                       "error": (r.get("error") or "")[:200] or None,
                       "wall_s": round(r["wall_s"], 1) if r.get("wall_s") else None,
                       "peak_rss_mb": round(r["peak_rss"] / 1e6) if r.get("peak_rss") else None,
                       "read_s": round((r.get("seconds") or {}).get("read", 0), 2),
                       "write_s": round((r.get("seconds") or {}).get("write", 0), 2),
                       "lung_gate_s": round((r.get("seconds") or {}).get("lung_gate", 0), 2),
                       "lesion_voxels": sum((r.get("voxel_counts") or {}).values()) if r.get("voxel_counts") else None}
                rows.append(row)
                print(row, flush=True)
                if out.exists() and not probs and gate:
                    masks[stream] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
                for f in tmp.glob("m*.nii.gz"):
                    if f.name.endswith("_probs.nii.gz"):
                        f.unlink()
            if len(masks) == 2:
                for r in rows[-len(runs):]:
                    if "gate off" not in r["path"]:
                        r["masks_equal"] = bool(np.array_equal(masks[True], masks[False]))
            vol.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import onnxruntime

    machine = {"cores": __import__("os").cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
               "python": platform.python_version(), "threads": args.threads}
    out = {"machine": machine, "model": args.model, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_volume.json").write_text(json.dumps(out, indent=1))
    plot(rows, args.results / "bench_volume.png")
    print(json.dumps(out, indent=1))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({r["path"] for r in rows}):
        pts = [(r["int16_mb"], r["peak_rss_mb"], r["wall_s"]) for r in rows if r["path"] == label and r["status"] == "ok"]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=label)
    sizes = sorted({r["int16_mb"] for r in rows})
    ax1.plot(sizes, sizes, "k:", label="the int16 volume itself")
    ax1.set(xlabel="volume size (MB of int16)", ylabel="peak RSS (MB)", title="memory")
    ax2.set(xlabel="volume size (MB of int16)", ylabel="wall time (s)", title="time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
