"""``bench_memory.py --sweep``: is ``--max-memory`` a contract? Peak RSS per budget, per input, as a user runs it.

Every cell runs ``/usr/bin/time -v python -m segcli predict INPUT -o OUT --max-memory B --json`` (or
``segcli evaluate`` for the mask pair) in a subprocess and records the peak RSS ("Maximum resident set
size"), the exit code and, for a refusal, its first line. A cell passes when the peak is at most the
budget + 5 %, or when the run was refused up front (exit 2) with a message naming the minimum.

Inputs (``--cases``; made in ``--workdir`` and kept there, so a later call reuses them):

* ``svs16k`` / ``svs40k``: SVS-like JPEG pyramids of real MoNuSeg H&E tiles on glass (bench_slide.py);
* ``svs20x16k``: the same layout scanned at 20x (0.5 µm/px, 8000²): the mpp rule resamples it to 16000²;
* ``tiled16k`` / ``flat16k`` / ``striped16k`` (and ``...40k``): zlib TIFFs of the same kind of slide, tiled with
  a pyramid, tiled without one, and striped (bench_memory.write_images);
* ``ct``: a 512²x1000 CT (int16 NIfTI, synthetic body and lungs), ``photos``: 100 Kvasir photos with
  ``--workers 2``; ``eval12k``: ``segcli evaluate`` on a 12000² tiled mask pair.

    python benchmarks/bench_memory.py --sweep --data /work/shared/data/monuseg \\
        --kvasir /work/shared/data/kvasir-seg --budgets 400 600 800 1200 --cases svs16k flat16k eval12k
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MB = 10**6


def _slide_case(work: Path, name: str, data: Path) -> Path:
    import bench_memory as bm
    import bench_slide as bs

    size = int(re.search(r"(\d+)k$", name).group(1)) * 1000  # type: ignore[union-attr]
    tiles = bs.load_tiles(data)
    if name.startswith("svs"):
        path = work / f"{name}.svs"
        if not path.exists():
            if "20x" in name:  # half the pixels at twice the pixel size: 20x
                bs.MPP, bs.MAG = 0.5, 20
                small = [{**t, "img": bs.area_down(t["img"][: t["img"].shape[0] // 2 * 2, : t["img"].shape[1] // 2 * 2], 2)}
                         for t in bs.place(size // 2, [(n, i, m) for n, i, m in tiles], 0.05, 0)]
                bs.write_slide(path, size // 2, small, 0)
                bs.MPP, bs.MAG = 0.25, 40
            else:
                bs.write_slide(path, size, bs.place(size, tiles, 0.05, 0), 0)
        return path
    bm.glass_level = 236
    places = bm.placements(size, [t[1] for t in tiles[:12]], dense=False)
    kind = name[: -len(f"{size // 1000}k")]
    path = work / f"{name}.tif"
    if not path.exists():
        tiled, striped = bm.write_images(work, size, places, name, pyramid=kind == "tiled", striped_too=kind == "striped")
        (striped if kind == "striped" else tiled).rename(path)
        for p in (tiled, striped):
            if p is not None and p.exists():
                p.unlink()
    return path


def _ct_case(work: Path) -> Path:
    import SimpleITK as sitk

    path = work / "ct512x1000.nii.gz"
    if not path.exists():
        z, y, x = np.ogrid[:1000, :512, :512]
        body = ((y - 256) ** 2 + (x - 256) ** 2) < 220**2
        lung = (((y - 256) ** 2 / 1.5 + (x - 170) ** 2) < 70**2) | (((y - 256) ** 2 / 1.5 + (x - 342) ** 2) < 70**2)
        vol = np.where(body, 40, -1000).astype(np.int16) + np.zeros((1000, 1, 1), np.int16)
        vol[:, lung[0]] = -850
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((0.7, 0.7, 1.0))
        sitk.WriteImage(img, str(path), useCompression=True)
    return path


def _photos_case(work: Path, kvasir: Path) -> Path:
    folder = work / "photos100"
    if not folder.exists():
        folder.mkdir()
        for f in sorted((kvasir / "images").glob("*.jpg"))[:100]:
            shutil.copy(f, folder / f.name)
    return folder


def _eval_case(work: Path) -> Path:
    import tifffile
    from scipy import ndimage

    root = work / "eval12k"
    if not (root / "gt" / "s.tif").exists():
        rng = np.random.default_rng(0)
        n = 12000
        for sub in ("pred", "gt"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        g = np.zeros((n, n), np.uint8)
        for y0 in range(0, n, 1000):
            g[y0 : y0 + 1000] = ndimage.binary_dilation(rng.random((1000, n)) < 0.0006, iterations=6)
        tifffile.imwrite(root / "gt" / "s.tif", g * 255, tile=(512, 512), compression="zlib")
        p = np.roll(g, 3, axis=1) | (rng.random((n, n)) < 0.0001)
        tifffile.imwrite(root / "pred" / "s.tif", p.astype(np.uint8), tile=(512, 512), compression="zlib")
    return root


def make_case(work: Path, name: str, data: Path, kvasir: Path) -> tuple[list[str], str]:
    """(the segcli arguments before ``--max-memory``, a label) of one sweep input."""
    out = work / "out"
    out.mkdir(exist_ok=True)
    if name == "ct":
        return ["predict", str(_ct_case(work)), "-o", str(out / "ct_seg.nii.gz")], "CT 512²x1000"
    if name == "photos":
        return ["predict", str(_photos_case(work, kvasir)), "-o", str(out / "photos"), "--workers", "2"], \
            "100 photos, --workers 2"
    if name == "eval12k":
        root = _eval_case(work)
        return ["evaluate", str(root / "pred"), str(root / "gt")], "evaluate 12000² pair"
    return ["predict", str(_slide_case(work, name, data)), "-o", str(out / f"{name}_seg.tif")], name


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants now, from /proc (bytes; shared pages counted in each)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, pp in parent.items() if pp == p and c not in tree)
    total = 0
    for p in tree:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def run_cell(args: list[str], budget_mb: int, timeout: float) -> dict:
    """One cell: the peak is the larger of ``/usr/bin/time -v``'s (one process) and the sum of the RSS of
    the whole process tree sampled every 0.1 s (the parent and its ``--workers`` children)."""
    import threading

    # segcli evaluate has no budget option: its streamed peak is compared with the budget as it is
    budget = [] if args[0] == "evaluate" else ["--max-memory", f"{budget_mb}MB"]
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "segcli", *args, *budget, "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    tree = [0]

    def sample() -> None:
        while proc.poll() is None:
            tree[0] = max(tree[0], tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=timeout)
    sampler.join()
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    wall = time.perf_counter() - t0
    peak_kb = int(next((x.split(":")[1] for x in r.stderr.splitlines() if "Maximum resident" in x), "0"))
    errors = [x for x in r.stderr.splitlines() if x.startswith("segcli: error:")]
    refused = r.returncode == 2 and bool(errors) and "needs at least" in errors[0]
    peak = max(peak_kb * 1024, tree[0]) / MB
    verdict = "refused up front" if refused else ("ok" if r.returncode == 0 and peak <= 1.05 * budget_mb else "FAIL")
    row = {"budget_mb": budget_mb, "peak_rss_mb": round(peak, 1), "peak_tree_sampled_mb": round(tree[0] / MB, 1),
           "exit": r.returncode, "seconds": round(wall, 1),
           "verdict": verdict, "load": os.getloadavg()[0]}
    if errors:
        row["message"] = errors[0]
    if r.returncode == 0 and args[0] == "predict":
        try:
            files = json.loads(r.stdout)["files"]
            plan = next((f["info"].get("memory_plan") for f in files if f["info"].get("memory_plan")), None)
            row["plan"] = {k: plan[k] for k in ("batch", "rough_batch", "planned_peak_mb")} if plan else None
        except (ValueError, KeyError):
            pass
    return row


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    seen = {r["case"] for r in rows}
    cases = [c for c in LABELS if c in seen] + sorted(seen - set(LABELS))
    colors = plt.get_cmap("tab20").colors
    for i, case in enumerate(cases):
        style = {"color": colors[i % 20], "marker": "osD^v<>"[i % 7]}
        rs = sorted((r for r in rows if r["case"] == case), key=lambda r: r["budget_mb"])
        ok = [r for r in rs if r["verdict"] != "refused up front"]
        ax.plot([r["budget_mb"] for r in ok], [r["peak_rss_mb"] for r in ok], "-", label=LABELS.get(case, case),
                **style)
        ref = [r for r in rs if r["verdict"] == "refused up front"]
        ax.plot([r["budget_mb"] for r in ref], [40 + 15 * i for _ in ref], "x", ms=11, mew=2, color=style["color"])
    b = sorted({r["budget_mb"] for r in rows})
    ax.plot(b, b, "k--", label="budget")
    ax.plot(b, [1.05 * v for v in b], "k:", label="budget +5 %")
    ax.set_xlabel("--max-memory (MB)")
    ax.set_ylabel("peak RSS of the process tree (MB); x = refused up front")
    ax.set_title("segcli peak memory against its budget")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Cells of ``old`` and ``new``, one per (case, budget): a newer run of a cell replaces the older one."""
    cells = {(r["case"], r["budget_mb"]): r for r in old}
    cells.update({(r["case"], r["budget_mb"]): r for r in new})
    return list(cells.values())


def _cell_text(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["verdict"] == "refused up front":
        m = re.search(r"needs at least ([0-9.]+ [MG]B)", r.get("message", ""))
        return f"refused, needs {m.group(1) if m else '?'} (exit 2)"
    plan = r.get("plan") or {}
    batch = f" (batch {plan['batch']}/{plan['rough_batch']})" if plan.get("batch") else ""
    return f"{r['peak_rss_mb']:.0f} MB {'ok' if r['verdict'] == 'ok' else '**FAIL**'}{batch}"


#: How the table names each case, in its order.
LABELS = {f"{kind}{k}k": f"{k}000² {what}" for k in (16, 40) for kind, what in (
    ("svs", "SVS-like JPEG pyramid"), ("tiled", "zlib TIFF, tiled, pyramid"), ("flat", "zlib TIFF, tiled, no pyramid"),
    ("striped", "zlib TIFF, striped"), ("svs20x", "SVS at 20× (resampled ×2 by the mpp rule)"))}
LABELS.update({"CT 512²x1000": "CT 512²×1000 (.nii.gz, streamed)", "100 photos, --workers 2": "100 Kvasir photos, --workers 2",
               "evaluate 12000² pair": "`segcli evaluate`, 12000² pair (no budget option: peak vs budget)"})


def table(rows: list[dict]) -> str:
    """The sweep as a Markdown table: one row per input, one column per budget."""
    budgets = sorted({r["budget_mb"] for r in rows})
    seen = {r["case"] for r in rows}
    cases = list(LABELS) + sorted(seen - set(LABELS))  # every input the issue asks for, run or not
    cell = {(r["case"], r["budget_mb"]): r for r in rows}
    out = ["| input | " + " | ".join(f"{b} MB" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    out += [f"| {LABELS.get(c, c)} | " + " | ".join(_cell_text(cell.get((c, b))) for b in budgets) + " |" for c in cases]
    return "\n".join(out)


def report(results: Path, extra: list[Path]) -> None:
    """Merge JSON-lines cell files into ``results/bench_memory_sweep.json``, redraw the plot, print the table."""
    path = results / "bench_memory_sweep.json"
    doc = json.loads(path.read_text()) if path.exists() else {"cells": []}
    new = [json.loads(line) for f in extra for line in f.read_text().splitlines() if line.strip()]
    doc["cells"] = merge(doc["cells"], new)
    path.write_text(json.dumps(doc, indent=1))
    plot(doc["cells"], results / "bench_memory_sweep.png")
    print(table(doc["cells"]))


def sweep(args) -> None:
    """Run the (case x budget) cells; results merged into ``args.results``/bench_memory_sweep.json (+ PNG)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    work = args.workdir or Path("/tmp/segcli-budget-sweep")
    work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "bench_memory_sweep.json"
    doc = json.loads(out.read_text()) if out.exists() else {"cells": []}
    for name in args.cases:
        cmd, label = make_case(work, name, args.data, args.kvasir)
        for b in args.budgets:
            row = {"case": label, **run_cell(cmd, b, args.timeout)}
            doc["cells"] = merge(doc["cells"], [row])
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(doc, indent=1))
    plot(doc["cells"], args.results / "bench_memory_sweep.png")
    print(table(doc["cells"]))
