"""What ``--instances`` costs on a slide: interleaved runs with and without it, on the same file (issue 29).

    python benchmarks/bench_slide.py --data ../shared/data/monuseg --sizes 40000 --model models/nuclei-he \
        --workdir /tmp/bs --results /tmp/bs.json --no-geojson-gt          # makes /tmp/bs/slide40000.svs
    python benchmarks/bench_instance_cost.py /tmp/bs/slide40000.svs --model nuclei-he --rounds 3 \
        --json benchmarks/results/instance-cost-40k.json

Each round runs ``segcli predict SLIDE -o OUT --model M --geojson --json -q`` and then the same with
``--instances``, each in its own process; wall time, the child's user + system CPU and peak RSS come from
``os.wait4``, the stage times and counts from the run's JSON report. The machine's load is printed beside each
run: on a shared machine compare the ratios within a round, not the times across rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("read", "rough", "fine", "fuse", "write")


def run(slide: Path, model: str, out: Path, instances: bool) -> dict:
    """One ``segcli predict`` in a child process, timed from here."""
    cmd = [sys.executable, "-m", "segcli", "predict", str(slide), "-o", str(out), "--model", model,
           "--geojson", "--json", "-q"] + (["--instances"] if instances else [])
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {os.waitstatus_to_exitcode(status)}")
        stdout.seek(0)
        doc = json.loads(stdout.read())
    f = doc["files"][0]
    info = f["info"]
    return {"instances": instances, "load": round(load, 2), "wall_s": round(wall, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stages": {k: round(f["seconds"].get(k, 0.0), 2) for k in STAGES},
            "windows": info.get("crops"), "features": info.get("geojson", {}).get("features"),
            "voxel_counts": f.get("voxel_counts"),
            "instances_info": info.get("instances")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the runs and ratios here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="segcli-instcost-") as tmp:
        for r in range(args.rounds):
            pair = [run(args.slide, args.model, Path(tmp) / f"{r}-{k}", k) for k in (False, True)]
            ratio = {"wall": round(pair[1]["wall_s"] / pair[0]["wall_s"], 3),
                     "cpu": round(pair[1]["cpu_s"] / pair[0]["cpu_s"], 3)}
            rows.append({"round": r + 1, "plain": pair[0], "instances": pair[1], "ratio": ratio})
            for p in pair:
                st = " ".join(f"{k} {v:.1f}" for k, v in p["stages"].items())
                print(f"round {r + 1} {'inst ' if p['instances'] else 'plain'} load {p['load']:.2f} wall "
                      f"{p['wall_s']:.1f} s cpu {p['cpu_s']:.1f} s rss {p['peak_rss_mb']:.0f} MB | {st} | "
                      f"features {p['features']}", flush=True)
            same = pair[0]["voxel_counts"] == pair[1]["voxel_counts"]
            print(f"round {r + 1} ratio wall {ratio['wall']:.2f} cpu {ratio['cpu']:.2f}; mask class counts "
                  f"{'the same' if same else 'DIFFER'} with and without --instances", flush=True)
    med = {k: statistics.median(row["ratio"][k] for row in rows) for k in ("wall", "cpu")}
    print(f"median ratio over {len(rows)} rounds: wall {med['wall']:.2f}, cpu {med['cpu']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"slide": str(args.slide), "model": args.model, "rounds": rows,
                                         "median_ratio": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
