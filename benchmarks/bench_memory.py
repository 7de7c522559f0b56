"""Peak RSS and wall time of segmenting huge TIFFs, bounded (lazy) path against the in-memory path.

Images are built on the fly in a temp folder from REAL dsb2018-nuclei tiles (never committed): a
"slide" of a few real tiles on near-white glass with faint noise at 4k², 16k² and 40k² (RGB), and a
dense 4k² mosaic of tiles; each written as a tiled (512², zlib) pyramidal BigTIFF and as a plain
striped TIFF, both streamed so the generator itself never holds the image.

Each measurement runs in a child process (this script with ``--child``) that calls
``Segmenter.predict_file`` and reports its own peak RSS (``ru_maxrss``), so runs never share a heap.

    .venv/bin/python benchmarks/bench_memory.py --data ../shared/data/dsb2018-nuclei

It uses the shipped ``models/nuclei`` bundle (``--model`` for another). Without one, a small
random-weights U-Net bundle is made (head bias set so bare glass is background): RSS and how time scales with crops stay meaningful,
the masks do not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from segcli.memory import peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent
TILE = 512
GLASS = {"bright": 236, "dark": 8}  # slide-glass grey level: brightfield scan, or fluorescence background
glass_level = GLASS["bright"]


def load_tiles(data: Path, n: int, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    files = sorted((data / "images").glob("*.png"))
    rng = np.random.default_rng(seed)
    out = []
    for f in rng.permutation(files)[:n]:
        a = np.asarray(Image.open(f).convert("RGB"))
        out.append(a)
    return out


def placements(size: int, tiles: list[np.ndarray], dense: bool, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """Where real tiles go: a dense grid (mosaic) or a few spread over the slide."""
    rng = np.random.default_rng(seed)
    out = []
    if dense:
        y = 0
        i = 0
        while y < size:
            x, row_h = 0, 0
            while x < size:
                t = tiles[i % len(tiles)]
                i += 1
                out.append((y, x, t))
                x += t.shape[1]
                row_h = max(row_h, t.shape[0])
            y += row_h
        return out
    for t in tiles:
        y, x = rng.integers(0, size - t.shape[0]), rng.integers(0, size - t.shape[1])
        out.append((int(y), int(x), t))
    return out


def render(box: tuple[int, int, int, int], places, step: int, seed: int) -> np.ndarray:
    """Pixels of ``box`` (in level coordinates, level = 1/step) of the procedural slide."""
    y0, x0, y1, x1 = box
    rng = np.random.default_rng((seed, y0, x0, step))
    img = (glass_level + rng.integers(-2, 3, (y1 - y0, x1 - x0, 3))).astype(np.uint8)
    for py, px, t in places:
        ty0, tx0 = py // step, px // step
        th, tw = -(-t.shape[0] // step), -(-t.shape[1] // step)
        a0, b0, a1, b1 = max(y0, ty0), max(x0, tx0), min(y1, ty0 + th), min(x1, tx0 + tw)
        if a0 < a1 and b0 < b1:
            sub = t[::step, ::step]
            img[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = sub[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
    return img


def write_images(folder: Path, size: int, places, name: str, seed: int = 0, pyramid: bool = True,
                 striped_too: bool = True) -> tuple[Path, Path | None]:
    """A tiled BigTIFF (with a pyramid of SubIFDs unless ``pyramid`` is False) and a striped TIFF."""
    import tifffile

    tiled, striped = folder / f"{name}_tiled.tif", folder / f"{name}_striped.tif"
    levels = 1
    while pyramid and size / 2**levels >= 1024:
        levels += 1

    def tiles(step: int, n: int):
        for y in range(0, n, TILE):
            for x in range(0, n, TILE):
                yield render((y, x, min(y + TILE, n), min(x + TILE, n)), places, step, seed)

    kw = {"compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    with tifffile.TiffWriter(tiled, bigtiff=True) as tw:
        tw.write(tiles(1, size), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), subifds=levels - 1,
                 resolution=(40000, 40000), resolutionunit=3, **kw)
        for lv in range(1, levels):
            n = -(-size // 2**lv)
            tw.write(tiles(2**lv, n), shape=(n, n, 3), dtype=np.uint8, tile=(TILE, TILE), subfiletype=1, **kw)
    if not striped_too:
        return tiled, None

    def strips():  # tifffile takes non-tiled iterators as already-encoded strips
        for y in range(0, size, 64):
            yield zlib.compress(render((y, 0, min(y + 64, size), size), places, 1, seed).tobytes(), 1)

    with tifffile.TiffWriter(striped, bigtiff=size * size * 3 > 2**31) as tw:
        tw.write(strips(), shape=(size, size, 3), dtype=np.uint8, rowsperstrip=64,
                 resolution=(40000, 40000), resolutionunit=3, compression="zlib", photometric="rgb")
    return tiled, striped


def make_bench_bundle(folder: Path, data: Path) -> Path:
    """A random-weights bundle whose head bias makes bare glass background (probability ~0.1)."""
    import torch

    sys.path.insert(0, str(REPO))
    from segcli.bundle import save_bundle
    from segcli.nets import build
    from segcli.resize import resize

    torch.manual_seed(0)
    config = {"features": 8, "depth": 3}
    glass = torch.full((1, 3, 256, 256), 236 / 255.0)
    real = torch.from_numpy(np.stack([resize(np.moveaxis(t, -1, 0) / 255.0, (256, 256)) for t in
                                      load_tiles(data, 8, seed=1)]).astype(np.float32))
    nets = {}
    for role in ("coarse", "fine"):
        m = build("unet", in_channels=3, out_channels=1, **config).eval()
        head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            # Random weights barely separate anything: amplify the head along the glass → tissue
            # direction and put the threshold half-way, so real tiles fire and bare glass never does.
            head.bias.zero_()
            g, r = float(m(glass).mean()), float(m(real).median())
            head.weight.mul_(8.0 / (r - g))
            g, r = float(m(glass).max()), float(m(real).median())
            head.bias.fill_(-(g + r) / 2)
        nets[role] = ("unet", config, m)
    return save_bundle(folder / "bench-random", name="bench-random", method="stts", classes=["background", "nucleus"],
                       in_channels=3, input_size=256, normalization={"kind": "dtype"}, networks=nets,
                       info={"task": "benchmark only: random weights"})


def find_bundle() -> Path | None:
    """The shipped nuclei model (trained on dsb2018, stts U-Net), when the checkout has it."""
    shipped = REPO / "models" / "nuclei"
    return shipped if (shipped / "segcli.json").is_file() else None


def child(args: argparse.Namespace) -> None:
    """One measured run: segment one file, print a JSON line with peak RSS and the report."""
    sys.path.insert(0, str(REPO))
    from segcli.api import Segmenter

    kw = json.loads(args.kwargs)
    t = time.perf_counter()
    seg = Segmenter(args.bundle, method=args.method, threads=2, **kw)
    rep = seg.predict_file(args.input, args.output)
    wall = time.perf_counter() - t
    rss = peak_rss_bytes()  # own peak: ru_maxrss would carry the driver's
    print(json.dumps({"status": rep.status, "error": rep.error, "wall_s": wall, "peak_rss": rss,
                      "info": rep.info, "seconds": rep.seconds}))


def measure(bundle: Path, method: str, path: Path, out: Path, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", "--bundle", str(bundle), "--method", method, "--input", str(path),
           "--output", str(out), "--kwargs", json.dumps(kw)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        return {"status": "crashed", "error": r.stderr[-400:], "wall_s": None, "peak_rss": None}
    return json.loads(r.stdout.strip().splitlines()[-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/dsb2018-nuclei")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 40000])
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--bundle"), ap.add_argument("--method"), ap.add_argument("--input"), ap.add_argument("--output")
    ap.add_argument("--kwargs", default="{}")
    ap.add_argument("--model", type=Path, default=None, help="bundle folder (default: models/nuclei)")
    ap.add_argument("--glass", choices=sorted(GLASS), default=None,
                    help="background of the canvases (default: dark with a trained bundle, which saw mostly "
                         "fluorescence, bright with random weights)")
    ap.add_argument("--no-pyramid", action="store_true",
                    help="only the slide sizes, as tiled TIFFs WITHOUT a pyramid (the rough view is then "
                         "decimated from level 0 tile run by tile run); skips the mosaic check, the striped "
                         "files and the in-memory rows; results go to bench_memory_nopyramid.json")
    ap.add_argument("--sweep", action="store_true", help="the budget sweep of benchmarks/budget_sweep.py "
                    "(--data is then the monuseg folder)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[400, 600, 800, 1200], help="MB (--sweep)")
    ap.add_argument("--cases", nargs="+", default=["svs16k", "tiled16k", "flat16k", "striped16k", "svs20x16k",
                                                   "svs40k", "tiled40k", "flat40k", "striped40k", "svs20x40k",
                                                   "ct", "photos", "eval12k"], help="sweep inputs (--sweep)")
    ap.add_argument("--kvasir", type=Path, default=REPO.parent / "shared/data/kvasir-seg")
    ap.add_argument("--workdir", type=Path, default=None, help="sweep inputs are made and kept here")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--report", type=Path, nargs="*", default=None,
                    help="merge these JSON-lines cell files into results/bench_memory_sweep.json, redraw its plot "
                         "and print the sweep's table (no runs)")
    args = ap.parse_args()
    if args.report is not None:
        from budget_sweep import report

        report(args.results, args.report)
        return
    if args.sweep:
        from budget_sweep import sweep

        sweep(args)
        return
    if args.no_pyramid:
        no_pyramid(args)
        return
    if args.child:
        child(args)
        return
    import tifffile

    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-mem-", dir=args.tmp))
    print(f"# temp folder {tmp} (deleted at the end); disk free {shutil.disk_usage(tmp).free / 1e9:.0f} GB")
    global glass_level
    bundle = args.model or find_bundle()
    bundle_note = f"trained bundle {bundle}" if bundle else "random-weights U-Net bundle (features 8, depth 3, S=256)"
    glass_level = GLASS[args.glass or ("dark" if bundle else "bright")]
    bundle_note += f", glass grey level {glass_level}"
    if bundle is None:
        bundle = make_bench_bundle(tmp, args.data)
    knobs = {"max_downscale": 16, "max_zoom": 4}  # the same scale rule on every path
    rows: list[dict] = []
    try:
        tiles = load_tiles(args.data, 12)
        all_tiles = load_tiles(args.data, 52)
        # Correctness: dense 4k mosaic, bounded vs in-memory, same knobs.
        places = placements(4096, all_tiles, dense=True)
        t0 = time.perf_counter()
        tiled, striped = write_images(tmp, 4096, places, "mosaic4k")
        print(f"# mosaic written in {time.perf_counter() - t0:.0f} s")
        # The striped file has no pyramid, so both paths see the same rough input (a pyramid level is the
        # file's own downsampling, not segcli's area average, so it legitimately gives other boxes).
        mem = measure(bundle, "stts", striped, tmp / "mosaic_mem.tif", lazy_pixels=10**12, **knobs)
        lazy = measure(bundle, "stts", striped, tmp / "mosaic_lazy.tif", lazy_pixels=0, **knobs)
        a, b = tifffile.imread(tmp / "mosaic_mem.tif"), tifffile.imread(tmp / "mosaic_lazy.tif")
        correctness = {"equal": bool(np.array_equal(a, b)), "dice": dice(a > 0, b > 0),
                       "differing_pixels": int((a != b).sum()), "fg_fraction": float((a > 0).mean())}
        print("# mosaic 4k bounded vs in-memory:", correctness)
        rows.append({"image": "mosaic 4096² striped", "path": "in-memory stts", **_row(mem)})
        rows.append({"image": "mosaic 4096² striped", "path": "bounded stts", **_row(lazy)})
        for size in args.sizes:
            need = size * size * 3 * 0.6 * 2 + 2e9
            if shutil.disk_usage(tmp).free < need:
                print(f"# skip {size}: not enough disk")
                continue
            t0 = time.perf_counter()
            tiled, striped = write_images(tmp, size, placements(size, tiles, dense=False), f"slide{size}")
            gen_s = time.perf_counter() - t0
            print(f"# slide {size}² written in {gen_s:.0f} s ({tiled.stat().st_size / 1e9:.2f} + "
                  f"{striped.stat().st_size / 1e9:.2f} GB)")
            label = f"slide {size}²"
            for kind, path in (("tiled pyramid", tiled), ("striped", striped)):
                r = measure(bundle, "stts", path, tmp / "o.tif", lazy_pixels=0, **knobs)
                rows.append({"image": f"{label} {kind}", "path": "bounded stts", **_row(r)})
                print(rows[-1], flush=True)
            raw = size * size * 3
            if raw * 6 < 0.6 * _available():  # the in-memory paths only where they can fit
                r = measure(bundle, "stts", tiled, tmp / "o.tif", lazy_pixels=10**12, max_memory=10**12, **knobs)
                rows.append({"image": f"{label} tiled pyramid", "path": "in-memory stts (full read)", **_row(r)})
                print(rows[-1], flush=True)
                if size <= 4096:
                    r = measure(bundle, "sliding", tiled, tmp / "o.tif", lazy_pixels=10**12, max_memory=10**12)
                    rows.append({"image": f"{label} tiled pyramid", "path": "in-memory sliding", **_row(r)})
                    print(rows[-1], flush=True)
            r = measure(bundle, "direct", tiled, tmp / "o.tif", max_memory="1.5GB")
            rows.append({"image": f"{label} tiled pyramid", "path": "direct, --max-memory 1.5GB", **_row(r)})
            print(rows[-1], flush=True)
            for p in (tiled, striped):
                p.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = {"bundle": bundle_note, "correctness_mosaic4k": correctness, "rows": rows}
    (args.results / "bench_memory.json").write_text(json.dumps(out, indent=1))
    plot(rows, args.results / "bench_memory.png")
    print(json.dumps(out, indent=1))


def no_pyramid(args: argparse.Namespace) -> None:
    """Peak RSS of the bounded path on tiled TIFFs without a pyramid, one size after the other."""
    global glass_level
    tmp = Path(tempfile.mkdtemp(prefix="segcli-bench-mem-", dir=args.tmp))
    bundle = args.model or find_bundle()
    glass_level = GLASS[args.glass or ("dark" if bundle else "bright")]
    rows: list[dict] = []
    try:
        if bundle is None:
            bundle = make_bench_bundle(tmp, args.data)
        tiles = load_tiles(args.data, 12)
        for size in args.sizes:
            t0 = time.perf_counter()
            tiled, _ = write_images(tmp, size, placements(size, tiles, dense=False), f"flat{size}",
                                    pyramid=False, striped_too=False)
            print(f"# {size}² tiled, no pyramid, written in {time.perf_counter() - t0:.0f} s "
                  f"({tiled.stat().st_size / 1e9:.2f} GB)", flush=True)
            r = measure(bundle, "stts", tiled, tmp / "o.tif", lazy_pixels=0, max_downscale=16, max_zoom=4)
            rows.append({"image": f"slide {size}² tiled, no pyramid", "path": "bounded stts", **_row(r)})
            print(rows[-1], flush=True)
            tiled.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = {"bundle": str(bundle), "glass": glass_level, "rows": rows}
    (args.results / "bench_memory_nopyramid.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _row(r: dict) -> dict:
    info = r.get("info") or {}
    return {"status": r.get("status"), "error": (r.get("error") or "")[:160] or None,
            "wall_s": round(r["wall_s"], 1) if r.get("wall_s") else None,
            "peak_rss_mb": round(r["peak_rss"] / 1e6) if r.get("peak_rss") else None,
            "crops": info.get("crops"), "fine_inputs": info.get("fine_inputs"),
            "rough_tiled": info.get("rough_tiled"), "levels_read": info.get("levels_read"),
            "decoded_mb": info.get("decoded_mb")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if not r["image"].startswith("slide") or r["status"] != "ok":
            continue
        side = int(r["image"].split()[1].rstrip("²"))
        key = f"{r['path']} ({r['image'].split('² ')[1]})"
        series.setdefault(key, []).append((side * side / 1e6, r["peak_rss_mb"], r["wall_s"]))
    for key, pts in series.items():
        pts.sort()
        x = [p[0] for p in pts]
        ax1.plot(x, [p[1] for p in pts], "o-", label=key)
        ax2.plot(x, [p[2] for p in pts], "o-", label=key)
    for ax, name in ((ax1, "peak RSS (MB)"), (ax2, "wall time (s)")):
        ax.set_xscale("log")
        ax.set_xlabel("image size (MPixel, RGB)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    ax1.axhline(1500, color="grey", ls="--", lw=0.8)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
