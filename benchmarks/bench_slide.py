"""An SVS-like slide from REAL MoNuSeg H&E tiles, segmented as a user would: time, peak RSS, Dice, GeoJSON.

The slide (16k², 40k², ... RGB) is bright glass (RGB about (235, 232, 238) with slight noise) with real
MoNuSeg *training* tiles (1000² at 0.25 µm/px, 40×) at random, seeded, non-overlapping positions,
covering about 5 % of the area. Tiles are reused when the slide needs more than the 30 there are, each
reuse rotated/flipped (image and mask alike). It is written like an Aperio SVS with tifffile: JPEG
(YCbCr 4:2:0) 512² tiles, an Aperio ImageDescription with ``MPP = 0.25`` and ``AppMag = 40``, then a
stripped thumbnail, reduced levels (×4, ×16, ... as extra tiled pages), a label and a macro image: the
layout of ``tests/test_slides.py``. The slide is streamed band by band, so the generator never holds it.

The ground truth is kept sparse, a list of (y, x, mask tile), never a full-size mask. Each run is

    /usr/bin/time -v python -m segcli predict slide.svs -o OUT/ --model M --geojson --json

in a subprocess (this worktree on PYTHONPATH). It records the wall time, the peak RSS ("Maximum resident
set size" of /usr/bin/time), the --json report (rough_factor, crops, decoded_mb, levels_read, mpp, the
GeoJSON summary), and Dice / precision / recall of the predicted mask against the tiles' masks. The mask is
read back tile by tile with tifffile: every predicted foreground pixel counts (so foreground on the glass
is a false positive), and only the tiles that overlap a placed MoNuSeg tile are compared with its mask.

    python benchmarks/bench_slide.py --data ../shared/data/monuseg --sizes 16000 40000 \\
        --model nuclei --results benchmarks/results/slide-nuclei.json

The machine is shared: the load average (before and after each run, and ``uptime``) is stored next to
every figure. Slides are made in ``--workdir`` (default: a temporary folder, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TILE = 512  # JPEG tile of the slide
GLASS = (235, 232, 238)
MPP = 0.25
MAG = 40
QUALITY = 90
APERIO = "Aperio Image Library v12.0.15 \r\n"


# -- the slide ---------------------------------------------------------------------------------------------

def xml_mask(xml: Path, shape: tuple[int, int]) -> np.ndarray:
    """0/1 mask from MoNuSeg's XML polygons (one ``Region`` of ``Vertex X= Y=`` per nucleus; pixels whose centre
    lies inside a polygon, ``skimage.draw.polygon``)."""
    import xml.etree.ElementTree as ET

    from skimage.draw import polygon

    out = np.zeros(shape, np.uint8)
    for region in ET.parse(xml).getroot().iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            xs, ys = np.array(pts).T
            out[polygon(ys, xs, shape)] = 1
    return out


def load_tiles(data: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB image, 0/1 mask) for every tile of ``data``: ``images/*.png`` with ``masks/*.png`` (the MoNuSeg
    training set in shared/data), or ``NAME.tif`` with ``NAME.xml`` (the official MoNuSeg test set's layout,
    ``datasets/MoNuSegTestData`` of github.com/ykrmm/monuseg; the XML polygons rasterised by ``xml_mask``)."""
    from PIL import Image

    out = []
    if not (data / "images").is_dir():
        import tifffile

        for x in sorted(data.glob("*.xml")):
            img = tifffile.imread(x.with_suffix(".tif"))[..., :3]
            out.append((x.stem, np.ascontiguousarray(img), xml_mask(x, img.shape[:2])))
        if not out:
            raise SystemExit(f"no images/*.png nor NAME.tif + NAME.xml under {data}")
        return out
    for f in sorted((data / "images").glob("*.png")):
        img = np.asarray(Image.open(f).convert("RGB"))
        mask = (np.asarray(Image.open(data / "masks" / f.name)) > 0).astype(np.uint8)
        if mask.ndim == 3:
            mask = mask[..., 0]
        assert img.shape[:2] == mask.shape, f.name
        out.append((f.stem, img, mask))
    if not out:
        raise SystemExit(f"no images/*.png under {data}")
    return out


def variant(img: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-th of the 8 rotations/flips (k = 0: as is), applied to image and mask alike."""
    r, flip = k % 4, (k // 4) % 2
    img, mask = np.rot90(img, r), np.rot90(mask, r)
    if flip:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def place(size: int, tiles: list, coverage: float, seed: int, gap: int = 64) -> list[dict]:
    """Random non-overlapping positions (seeded) for enough tiles to cover ``coverage`` of the slide."""
    rng = np.random.default_rng(seed)
    th, tw = tiles[0][1].shape[:2]
    n = max(1, int(round(coverage * size * size / (th * tw))))
    order = rng.permutation(len(tiles))
    boxes: list[tuple[int, int, int, int]] = []
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200000:
            raise SystemExit(f"could not place {n} tiles on {size}²")
        y, x = int(rng.integers(0, size - th + 1)), int(rng.integers(0, size - tw + 1))
        if any(y < b[2] + gap and b[0] < y + th + gap and x < b[3] + gap and b[1] < x + tw + gap for b in boxes):
            continue
        i = len(out)
        name, img, mask = tiles[order[i % len(tiles)]]
        k = i // len(tiles)  # first use as is, reuses rotated / flipped
        img, mask = variant(img, mask, k)
        boxes.append((y, x, y + th, x + tw))
        out.append({"y": y, "x": x, "name": name, "variant": k, "img": img, "mask": mask})
    return out


def area_down(a: np.ndarray, f: int) -> np.ndarray:
    """Area-average an (H, W, 3) uint8 array by an integer factor (H, W multiples of f)."""
    h, w = a.shape[0] // f, a.shape[1] // f
    return a[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def write_slide(path: Path, size: int, tiles: list[dict], seed: int) -> dict:
    """Stream an Aperio-layout pyramidal JPEG TIFF; the reduced levels are built from the bands on the way."""
    import tifffile

    rng = np.random.default_rng(seed + 1)
    glass = np.array(GLASS, np.float32)
    noise = [np.clip(glass + rng.normal(0, 1.5, (TILE, TILE, 3)), 0, 255).astype(np.uint8) for _ in range(16)]
    factors = [4 ** k for k in range(1, 8) if size // 4 ** k >= 512] or [4]
    ny, nx = -(-size // TILE), -(-size // TILE)
    f1 = factors[0]
    level1 = np.empty((ny * TILE // f1, nx * TILE // f1, 3), np.uint8)  # built from the bands, cropped below

    def bands():
        for ty in range(ny):
            y0 = ty * TILE
            band = np.empty((TILE, nx * TILE, 3), np.uint8)
            for tx in range(nx):
                band[:, tx * TILE : (tx + 1) * TILE] = noise[int(rng.integers(len(noise)))]
            for t in tiles:
                h, w = t["img"].shape[:2]
                a, b = max(y0, t["y"]), min(y0 + TILE, t["y"] + h)
                if a < b:
                    band[a - y0 : b - y0, t["x"] : t["x"] + w] = t["img"][a - t["y"] : b - t["y"]]
            level1[ty * TILE // f1 : (ty + 1) * TILE // f1] = area_down(band, f1)
            for tx in range(nx):
                yield band[:, tx * TILE : (tx + 1) * TILE]

    tags = f"|AppMag = {MAG}|StripeWidth = 2040|ScanScope ID = SS1234|MPP = {MPP:.4f}|Left = 25.1|Top = 18.2"
    head = f"{APERIO}{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q={QUALITY}"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": QUALITY}, "photometric": "rgb", "metadata": None}
    levels = []
    t0 = time.perf_counter()
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(bands(), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), description=head + tags, **jpeg)
        lv = level1[: size // f1, : size // f1]
        pyramid = {f1: lv}
        for f in factors[1:]:
            prev = pyramid[f // 4]
            pyramid[f] = area_down(prev[: prev.shape[0] // 4 * 4, : prev.shape[1] // 4 * 4], 4)
        small = pyramid[factors[-1]]
        step = max(1, small.shape[1] // 1024)
        thumb = np.ascontiguousarray(small[::step, ::step])
        tw.write(thumb, rowsperstrip=16,
                 description=f"{APERIO}{size}x{size} -> {thumb.shape[1]}x{thumb.shape[0]} - {tags}", **jpeg)
        for f in factors:
            lv = np.ascontiguousarray(pyramid[f])
            tw.write(lv, tile=(TILE, TILE),
                     description=f"{APERIO}{size}x{size} -> {lv.shape[1]}x{lv.shape[0]} - {tags}", **jpeg)
            levels.append([f, lv.shape[0], lv.shape[1]])
        tw.write(np.full((120, 100, 3), 250, np.uint8), compression="lzw", photometric="rgb", subfiletype=1,
                 metadata=None, description=f"{APERIO}label 100x120")
        tw.write(np.full((160, 400, 3), 200, np.uint8), subfiletype=9,
                 description=f"{APERIO}macro 400x160", **{**jpeg, "metadata": None})
    return {"path": str(path), "bytes": path.stat().st_size, "levels": levels,
            "write_seconds": round(time.perf_counter() - t0, 1)}


# -- scoring the predicted mask without holding it -------------------------------------------------------

def score(mask_path: Path, size: int, tiles: list[dict]) -> dict:
    """Dice / precision / recall of a predicted label TIFF against the sparse ground truth, tile by tile."""
    import tifffile

    tp = pred_fg = pred_glass = 0
    per_tp = [0] * len(tiles)
    per_pred = [0] * len(tiles)
    gt_fg = sum(int(t["mask"].sum()) for t in tiles)
    segments = 0
    with tifffile.TiffFile(mask_path) as tf:
        page = tf.pages[0]
        assert page.shape[:2] == (size, size), (page.shape, size)
        decode = page.decode
        fh = tf.filehandle
        for i, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
            data = None
            if n:
                fh.seek(off)
                data = fh.read(n)
            seg, idx, shape = decode(data, i, jpegtables=page.jpegtables)
            if seg is None:  # an empty segment is all zeros
                continue
            segments += 1
            y0, x0 = int(idx[2]), int(idx[3])
            seg = np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2], -1)[..., 0]
            seg = seg[: max(0, size - y0), : max(0, size - x0)] > 0
            h, w = seg.shape
            fg = int(seg.sum())
            pred_fg += fg
            if not fg:
                continue
            inside = 0
            for j, t in enumerate(tiles):
                th, tw = t["mask"].shape
                a0, a1 = max(y0, t["y"]), min(y0 + h, t["y"] + th)
                b0, b1 = max(x0, t["x"]), min(x0 + w, t["x"] + tw)
                if a0 >= a1 or b0 >= b1:
                    continue
                p = seg[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
                g = t["mask"][a0 - t["y"] : a1 - t["y"], b0 - t["x"] : b1 - t["x"]] > 0
                both, np_ = int((p & g).sum()), int(p.sum())
                tp += both
                inside += np_
                per_tp[j] += both
                per_pred[j] += np_
            pred_glass += fg - inside
    fp, fn = pred_fg - tp, gt_fg - tp
    return {"dice": round(2 * tp / max(1, pred_fg + gt_fg), 4), "precision": round(tp / max(1, pred_fg), 4),
            "recall": round(tp / max(1, gt_fg), 4), "tp_px": tp, "fp_px": fp, "fn_px": fn,
            "pred_fg_px": pred_fg, "gt_fg_px": gt_fg, "fp_on_glass_px": pred_glass,
            "pred_fg_fraction_of_slide": round(pred_fg / (size * size), 5), "segments_read": segments,
            "per_tile": [{"name": t["name"], "y": t["y"], "x": t["x"], "gt_px": int(t["mask"].sum()),
                          "pred_px": per_pred[j], "tp_px": per_tp[j],
                          "dice": round(2 * per_tp[j] / max(1, per_pred[j] + int(t["mask"].sum())), 4)}
                         for j, t in enumerate(tiles)],
            # a tile the model calls (almost) all nucleus, or where it finds (almost) nothing
            "tiles_filled": sum(per_pred[j] > 0.9 * t["mask"].size for j, t in enumerate(tiles)),
            "tiles_empty": sum(per_pred[j] < 0.01 * t["mask"].size for j, t in enumerate(tiles)),
            "median_tile_dice": round(float(np.median([2 * per_tp[j] / max(1, per_pred[j] + int(t["mask"].sum()))
                                                       for j, t in enumerate(tiles)])), 4)}


def read_region(path: Path, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Level 0 of a (tiled or striped) TIFF, only the segments that touch the region decoded."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        out = np.zeros((h, w) + tuple(page.shape[2:]), page.dtype)
        fh = tf.filehandle
        th = page.tilelength if page.is_tiled else page.rowsperstrip
        tw = page.tilewidth if page.is_tiled else page.imagewidth
        per_row = -(-page.imagewidth // tw)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                i = ty * per_row + tx
                n = page.databytecounts[i]
                data = None
                if n:
                    fh.seek(page.dataoffsets[i])
                    data = fh.read(n)
                seg, idx, _ = page.decode(data, i, jpegtables=page.jpegtables)
                if seg is None:
                    continue
                seg = np.asarray(seg)
                seg = seg.reshape(seg.shape[-3], seg.shape[-2], -1)
                if seg.shape[-1] == 1:
                    seg = seg[..., 0]
                y0, x0 = int(idx[2]), int(idx[3])
                a0, a1 = max(y, y0), min(y + h, y0 + seg.shape[0])
                b0, b1 = max(x, x0), min(x + w, x0 + seg.shape[1])
                if a0 < a1 and b0 < b1:
                    out[a0 - y : a1 - y, b0 - x : b1 - x] = seg[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
    return out


def plot(doc: dict, png: Path) -> None:
    """Peak RSS, wall time and Dice per size and model, and one placed tile with the masks outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in doc["runs"] if r.get("score")]
    if not runs:
        return
    models = list(dict.fromkeys(r["model"] for r in runs))
    sizes = sorted({r["size"] for r in runs})
    prev = doc.get("preview") or {}
    npv = len(prev.get("pred", {})) if prev else 0
    ncol = 3 + npv
    fig, ax = plt.subplots(1, ncol, figsize=(4.2 * ncol, 4.2))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        label = Path(m).name
        for k, (key, title) in enumerate((("peak_rss_mb", "peak RSS (MB)"), ("wall_s", "wall time (s), shared 2 cores"))):
            vals = [next((r.get(key) or 0 for r in runs if r["model"] == m and r["size"] == s), 0) for s in sizes]
            ax[k].bar(np.arange(len(sizes)) + j * width, vals, width, label=label)
            ax[k].set_xticks(np.arange(len(sizes)) + width * (len(models) - 1) / 2, [f"{s // 1000}k²" for s in sizes])
            ax[k].set_title(title)
        sc = [next((r["score"]["dice"] for r in runs if r["model"] == m and r["size"] == s), 0) for s in sizes]
        ax[2].bar(np.arange(len(sizes)) + j * width, sc, width, label=label)
    ax[2].set_xticks(np.arange(len(sizes)) + width * (len(models) - 1) / 2, [f"{s // 1000}k²" for s in sizes])
    ax[2].set_ylim(0, 1)
    ax[2].set_title("Dice vs the tiles' masks")
    ax[0].legend(fontsize=8)
    for j, (m, lab) in enumerate((prev.get("pred") or {}).items()):
        a = ax[3 + j]
        a.imshow(np.asarray(prev["image"]))
        over = np.zeros(lab.shape + (4,), np.float32)
        over[lab] = (1.0, 0.0, 1.0, 0.35)
        a.imshow(over)
        a.contour(np.asarray(prev["gt"]), levels=[0.5], colors="#00ff00", linewidths=0.5)
        a.set_title(f"{Path(m).name} on {prev['name'][:12]} ({prev['size'] // 1000}k² slide)\n"
                    "prediction magenta, truth outlined green", fontsize=8)
        a.axis("off")
    load = doc.get("load_end", {}).get("loadavg")
    fig.suptitle(f"bench_slide.py: SVS-like JPEG pyramid of MoNuSeg tiles on glass, "
                 f"{doc['slide']['coverage']:.0%} tissue (load average at end {load})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def gt_objects(tiles: list[dict]) -> int:
    """4-connected ground-truth components, as the GeoJSON writer counts (touching nuclei are merged in MoNuSeg masks)."""
    from scipy import ndimage

    return int(sum(ndimage.label(t["mask"])[1] for t in tiles))


def geojson_gt(size: int, tiles: list[dict], path: Path, tile: int = 512) -> dict:
    """The GeoJSON writer alone, on the ground truth: the sparse masks streamed in raster-order tiles.

    This is the writer's throughput at a real nucleus density (a poor model's blobs give few objects), and a
    check of its tile-edge merging: it must count as many 4-connected objects as scipy does on each whole tile.
    """
    import resource

    from segcli.io.geojson import GeoJSONWriter

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    n_tiles = 0
    with GeoJSONWriter(path, ["background", "nucleus"], detection_classes={"nucleus"},
                       spacing=(MPP / 1000, MPP / 1000)) as w:
        for y0 in range(0, size, tile):
            y1 = min(y0 + tile, size)
            row = [t for t in tiles if t["y"] < y1 and y0 < t["y"] + t["mask"].shape[0]]
            for x0 in range(0, size, tile):
                x1 = min(x0 + tile, size)
                lab = np.zeros((y1 - y0, x1 - x0), np.uint8)
                for t in row:
                    th, tw = t["mask"].shape
                    a0, a1 = max(y0, t["y"]), min(y1, t["y"] + th)
                    b0, b1 = max(x0, t["x"]), min(x1, t["x"] + tw)
                    if a0 < a1 and b0 < b1:
                        lab[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = t["mask"][a0 - t["y"] : a1 - t["y"],
                                                                               b0 - t["x"] : b1 - t["x"]]
                w.add_tile(lab, (y0, x0, y1, x1))
                n_tiles += 1
    wall = time.perf_counter() - t0
    summ = dict(w.summary or {})
    n = int(summ.get("features", 0))
    secs = float(summ.get("seconds", 0.0))
    out = {"objects": n, "gt_objects_scipy": gt_objects(tiles), "writer_seconds": secs, "wall_s": round(wall, 2),
           "objects_per_s": round(n / secs, 1) if secs else None, "tiles": n_tiles, "tile": tile,
           "mb": round(path.stat().st_size / 1e6, 2), "max_open_objects": summ.get("max_open_objects"),
           "max_open_vertices": summ.get("max_open_vertices"),
           "bench_process_maxrss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1)}
    path.unlink()
    return out


def check_geojson(path: Path, pred_fg_px: int) -> dict:
    """Polygons valid (shapely), one Polygon per feature, and their total area equal to the mask's foreground."""
    from shapely.geometry import shape

    with open(path) as f:
        feats = json.load(f)["features"]
    types: dict[str, int] = {}
    area, invalid = 0.0, 0
    for ft in feats:
        g = shape(ft["geometry"])
        types[g.geom_type] = types.get(g.geom_type, 0) + 1
        invalid += not g.is_valid
        area += g.area
    return {"features": len(feats), "geometry_types": types, "invalid": invalid, "polygon_area_px": round(area),
            "mask_fg_px": pred_fg_px, "area_matches_mask": abs(area - pred_fg_px) <= 1e-6 * max(1, pred_fg_px)}


# -- one run ---------------------------------------------------------------------------------------------

def load() -> dict:
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"loadavg": [round(v, 2) for v in os.getloadavg()], "uptime": up}


def time_v(stderr: str) -> dict:
    out: dict = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m:
        out["peak_rss_mb"] = round(int(m.group(1)) / 1024, 1)
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["elapsed_s"] = round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))), 2)
    for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                     ("cpu_percent", r"Percent of CPU this job got: (\d+)%")):
        m = re.search(pat, stderr)
        if m:
            out[key] = float(m.group(1))
    return out


def report_of(stdout: str) -> dict:
    """The per-file report from ``--json`` (a list of files, or a dict holding one)."""
    doc = json.loads(stdout)
    if isinstance(doc, dict):
        for key in ("files", "results", "reports"):
            if isinstance(doc.get(key), list) and doc[key]:
                return doc[key][0]
        return doc
    return doc[0]


def make_workdir(workdir: Path | None, prefix: str, results: Path) -> tuple[Path, str | None]:
    """The benchmark's scratch folder (``workdir``, or a new temporary one, returned second so the caller
    deletes it), and the results' folder, both created."""
    tmp = None if workdir is not None else tempfile.mkdtemp(prefix=prefix)
    work = workdir if workdir is not None else Path(tmp)  # type: ignore[arg-type]
    work.mkdir(parents=True, exist_ok=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    return work, tmp


def run_timed(cmd: list[str], env: dict, timeout: float, tag: str,
              cwd: Path = REPO) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` from ``cwd`` (the repository) in its own process group (a timeout ends the whole tree, not
    only /usr/bin/time); returns the completed process and the wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)
        stdout, stderr = proc.communicate()
        stderr += f"\n[{tag}: stopped after the {timeout:.0f} s timeout]"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), time.perf_counter() - t0


def run_one(slide: Path, size: int, tiles: list[dict], model: str, out: Path, extra: list[str], timeout: float) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "segcli", "predict", str(slide), "-o", str(out) + "/",
           "--model", model, "--geojson", "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    bundle = Path(model) / "segcli.json"
    if bundle.is_file():  # a bundle given by path may still be changing: say which one was measured
        import hashlib

        bundle_id = {"segcli_json_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest(),
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bundle.stat().st_mtime))}
    else:
        bundle_id = {"shipped": model}
    before = load()
    print(f"  $ {' '.join(cmd[2:])}   [load {before['loadavg']}]", flush=True)
    r, wall = run_timed(cmd, env, timeout, "bench_slide")
    after = load()
    row: dict = {"size": size, "model": model, "command": " ".join(["segcli", *cmd[5:]]), "returncode": r.returncode,
                 "bundle": bundle_id, "wall_s": round(wall, 1), **time_v(r.stderr), "load_before": before, "load_after": after}
    if r.returncode != 0:
        row["stderr_tail"] = r.stderr[-3000:]
        print(f"  FAILED rc={r.returncode}\n{r.stderr[-3000:]}", flush=True)
        return row
    rep = report_of(r.stdout)
    info = rep.get("info") or {}
    geo = info.get("geojson") or {}
    keys = ("output", "status", "model", "method", "shape", "voxel_counts", "rough_factor", "rough_tiled",
            "rough_shape", "crops", "fine_inputs", "boxes_tiled", "fused_tiles", "decoded_mb", "levels_read",
            "pyramid_levels_in", "segments_decoded", "bounded_memory", "mpp", "magnification", "mpp_source",
            "resampled", "seconds", "warnings")
    row["report"] = {k: info.get(k, rep.get(k)) for k in keys}
    row["report"]["geojson"] = geo
    masks = sorted(p for p in out.glob("*_seg.tif*"))
    if not masks:
        row["error"] = f"no *_seg.tif in {out}: {sorted(p.name for p in out.iterdir())}"
        return row
    t1 = time.perf_counter()
    row["score"] = score(masks[0], size, tiles)
    row["score_seconds"] = round(time.perf_counter() - t1, 1)
    gj = sorted(out.glob("*.geojson"))
    n_obj = geo.get("features") if isinstance(geo, dict) else None
    secs = geo.get("seconds") if isinstance(geo, dict) else None
    row["geojson_objects"] = n_obj
    row["geojson_seconds"] = secs
    row["geojson_objects_per_s"] = round(n_obj / secs, 1) if n_obj and secs else None
    row["geojson_mb"] = round(gj[0].stat().st_size / 1e6, 2) if gj else None
    if gj:
        row["geojson_check"] = check_geojson(gj[0], row["score"]["pred_fg_px"])
    s = row["score"]
    print(f"  rc 0, wall {row['wall_s']} s, peak RSS {row.get('peak_rss_mb')} MB, Dice {s['dice']} "
          f"(P {s['precision']}, R {s['recall']}), objects {n_obj} in {secs} s, load {after['loadavg']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True,
                    help="monuseg folder (images/*.png, masks/*.png) or MoNuSeg test tiles (NAME.tif, NAME.xml)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16000, 40000])
    ap.add_argument("--model", nargs="+", default=["nuclei"], help="bundle name(s) or path(s); each is run per size")
    ap.add_argument("--results", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--coverage", type=float, default=0.05, help="fraction of the slide covered by tissue tiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep slides and outputs here (default: temp, deleted)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per segcli run")
    ap.add_argument("--no-plot", action="store_true", help="no PNG next to the results JSON")
    ap.add_argument("--no-geojson-gt", action="store_true", help="skip the GeoJSON writer run on the ground truth")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more segcli predict flags (last)")
    args = ap.parse_args()

    work, tmp = make_workdir(args.workdir, "bench_slide-", args.results)
    import imagecodecs
    import tifffile

    doc: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__,
                             "platform": platform.platform()},
                 "slide": {"tile": TILE, "jpeg_quality": QUALITY, "mpp": MPP, "magnification": MAG,
                           "coverage": args.coverage, "seed": args.seed, "glass_rgb": GLASS,
                           "data": str(args.data)},
                 "argv": sys.argv[1:], "runs": [], "slides": []}
    preview: dict = {}
    try:
        src = load_tiles(args.data)
        for size in args.sizes:
            placed = place(size, src, args.coverage, args.seed)
            slide = work / f"slide{size}.svs"
            print(f"slide {size}²: {len(placed)} MoNuSeg tiles, writing {slide}", flush=True)
            meta = write_slide(slide, size, placed, args.seed)
            meta.update({"size": size, "tiles_placed": len(placed),
                         "tissue_fraction": round(sum(t["img"].shape[0] * t["img"].shape[1] for t in placed)
                                                  / size ** 2, 4),
                         "gt_fg_px": int(sum(int(t["mask"].sum()) for t in placed)),
                         "gt_objects": gt_objects(placed),
                         "placements": [[t["y"], t["x"], t["name"], t["variant"]] for t in placed]})
            print(f"  {meta['bytes'] / 1e6:.0f} MB in {meta['write_seconds']} s, levels {meta['levels']}", flush=True)
            doc["slides"].append(meta)
            if not args.no_geojson_gt:
                before = load()
                meta["geojson_gt"] = {**geojson_gt(size, placed, work / f"gt{size}.geojson"), "load_before": before,
                                      "load_after": load()}
                g = meta["geojson_gt"]
                print(f"  GeoJSON writer on the ground truth: {g['objects']} objects (scipy: {g['gt_objects_scipy']}) "
                      f"in {g['writer_seconds']} s = {g['objects_per_s']} objects/s, load {g['load_after']['loadavg']}",
                      flush=True)
            for model in args.model:
                row = run_one(slide, size, placed, model, work / f"out{size}-{Path(model).name}", args.extra,
                              args.timeout)
                doc["runs"].append(row)
                if row.get("score") and size == min(args.sizes):
                    t = placed[0]
                    h, w = t["mask"].shape
                    lab = read_region(Path(row["report"]["output"]), t["y"], t["x"], h, w) > 0
                    pv = preview.setdefault("data", {"name": t["name"], "size": size, "image": t["img"][::2, ::2],
                                                     "gt": t["mask"][::2, ::2], "pred": {}})
                    pv["pred"][model] = lab[::2, ::2]
                args.results.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            if tmp is not None:
                slide.unlink()
    finally:
        doc["load_end"] = load()
        args.results.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        if not args.no_plot:
            try:
                plot({**doc, "preview": preview.get("data")}, args.results.with_suffix(".png"))
            except ImportError as exc:  # matplotlib is the bench extra
                print(f"no plot: {exc}")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
