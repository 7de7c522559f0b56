"""The floor for photos: a minimal ONNX Runtime loop doing segcli's stts, interleaved with ``segcli predict``.

Issue 30 asks the 100-frame Kvasir batch to come within 1.15x of "a minimal ONNX Runtime loop over the same
networks". This is that loop, written to do exactly the work ``segcli predict FRAMES -o OUT -q --model polyp``
does per frame, with none of segcli's structure around it:

* decode the JPEG with Pillow; normalise as the bundle says (``dtype``: value / 255, channel-first float32);
* rough pass: area-resize to the aspect-kept grid of long side S, edge-pad to S x S, the coarse network,
  sigmoid, ``p > threshold``;
* components (OpenCV's connectedComponentsWithStats, 8-connected: 0.03 s to import where scipy.ndimage takes
  0.3-0.4 s; segcli labels photos with it too), boxes scaled to full resolution (floor / ceil), squared on
  the long side, padded by the bundle's ``pad``, shifted inside, clamped, ``min_side`` filter
  (segcli.geometry.crop_boxes);
* fine pass on all crops of the frame in one ``session.run``: each crop edge-padded to a square,
  area-resized to S x S; outputs bilinear-resized back, cut to the box, ``p > threshold`` OR-ed into the
  mask (segcli's max fusion through exact 1-byte codes gives exactly this OR for a binary bundle);
* the mask written as PNG by Pillow, **atomically with fsync** (temporary name, fsync the file, rename,
  fsync the folder), as segcli.io.atomic does, so the comparison is fair.

The resize weights are segcli.resize's (same formulas, float32, same contraction order), copied here so the
loop imports no segcli module. The ONNX graphs are the very files segcli's predictors were built from (found by
building segcli's own predictors in the driver: the ONNX cache entry, or the bundle's int8 export when segcli
picks it), run with segcli's session options (segcli.runtimes.onnx_backend.make_session: arena on, memory
pattern off, sequential, all graph optimisations, no spinning) and its thread count, with segcli.cli's
environment (``OPENBLAS_NUM_THREADS=1``, ``OMP_WAIT_POLICY=PASSIVE``; without the first, numpy's second BLAS
thread made this loop 2x slower than segcli on the loaded 2-core machine).

**Two loops.** ``loop-seq`` does one frame after another. ``loop-io`` overlaps decoding (one reader thread, two
frames ahead, which also normalises and makes the rough pass's input) and writing (one writer thread) with the
networks, as segcli.pipeline.run_many does; it is the floor the ratio is taken against (the faster of the two
in each round: nearly always loop-io on the loaded 2-core machine; loop-seq won the odd round by < 2 %).

**Fairness.** segcli's modules are byte-compiled before the first round, as ``pip install`` leaves them (with
``PYTHONDONTWRITEBYTECODE=1`` a source checkout would otherwise recompile every module in every run). Every run is
its own process (the loop: ``python bench_photo_floor.py --loop ...``), so start-up
(imports, two sessions) counts the same way: wall time from spawn to exit, into a fresh output folder. Each
round runs five variants in an order that rotates by round: loop-seq, loop-io and ``segcli predict`` on all
frames, and loop-io and segcli on the first frame alone (``@1``), which splits each total into start-up and a
per-frame cost ((T_n - T_1) / (n - 1)). The 1-minute load average is read before each run and the children's
CPU seconds (user + system) are recorded. After the rounds the masks are compared frame by frame (Dice, and
the frames that differ at all): a floor that does less work than segcli is not a floor.

    python benchmarks/bench_photo_floor.py --frames /work/frames100 --rounds 10 \
        --json benchmarks/results/photo-floor.json

On a shared or loaded machine the absolute figures are indicative only; rely on the per-round ratios.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

T_START = time.perf_counter()


# -- the loop (its own process: imports nothing from segcli) ---------------------------------------------------


def loop_main(args: argparse.Namespace) -> int:
    # segcli.cli's settings, made before numpy and ONNX Runtime load: one BLAS thread (numpy only runs the small
    # resize products) and passive OpenMP waiting
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    t_imp = time.perf_counter()
    from functools import lru_cache

    import cv2
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    t_imports = time.perf_counter() - t_imp

    @lru_cache(maxsize=256)
    def rmat(n_in: int, n_out: int, mode: str) -> np.ndarray:
        """segcli.resize.resize_matrix: bilinear (half-pixel) or exact area when shrinking."""
        m = np.zeros((n_out, n_in), dtype=np.float64)
        scale = n_in / n_out
        if mode == "bilinear" or n_out >= n_in:
            c = np.clip((np.arange(n_out) + 0.5) * scale - 0.5, 0, n_in - 1)
            i0 = np.floor(c).astype(np.int64)
            i1 = np.minimum(i0 + 1, n_in - 1)
            f = c - i0
            np.add.at(m, (np.arange(n_out), i0), 1.0 - f)
            np.add.at(m, (np.arange(n_out), i1), f)
        else:
            edges = np.arange(n_out + 1) * scale
            j = np.arange(n_in)
            blk = np.minimum(edges[1:, None], j + 1.0) - np.maximum(edges[:-1, None], j)
            np.maximum(blk, 0.0, out=blk)
            m[:] = blk / blk.sum(axis=1, keepdims=True)
        return m.astype(np.float32)

    def resize(x: np.ndarray, oh: int, ow: int, mode: str) -> np.ndarray:
        h, w = x.shape[-2:]
        if (h, w) == (oh, ow):
            return x
        ry, rx = rmat(h, oh, mode), rmat(w, ow, mode)
        if oh * w <= h * ow:
            return np.matmul(np.matmul(ry, x), rx.T)
        return np.matmul(ry, np.matmul(x, rx.T))

    def session(path: str) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = True
        so.enable_mem_pattern = False
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def fg(logits: np.ndarray) -> np.ndarray:
        """Foreground of a one-logit output exactly as segcli decides it: sigmoid(l) > t in float32."""
        p = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
        return p > args.threshold

    t_ses = time.perf_counter()
    coarse, fine = session(args.coarse), session(args.fine)
    cin, fin = coarse.get_inputs()[0].name, fine.get_inputs()[0].name
    t_sessions = time.perf_counter() - t_ses

    S, pad = args.size, args.pad
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = dict.fromkeys(("decode", "normalise", "downscale", "rough", "components", "crops", "fine", "fuse",
                            "write"), 0.0)
    clock = time.perf_counter
    n_crops = [0]

    def add(name: str, t0: float) -> float:
        t = clock()
        stages[name] += t - t0  # from two threads at most, never the same key at once
        return t

    def read(name: str) -> tuple:
        """Decode, normalise, the rough pass's input: what segcli's reader thread does (stage_2d, prime)."""
        t = clock()
        with Image.open(os.path.join(args.frames, name)) as im:
            rgb = np.asarray(im.convert("RGB"))
            dpi = im.info.get("dpi")
        t = add("decode", t)
        x = np.moveaxis(rgb.astype(np.float32) / 255.0, -1, 0)  # (3, H, W) view, like segcli.prepare
        t = add("normalise", t)
        H, W = x.shape[1:]
        s = S / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        low = np.pad(resize(x, h, w, "area"), ((0, 0), (0, S - h), (0, S - w)), mode="edge")
        add("downscale", t)
        return name, dpi, x, low, h, w

    def compute(item: tuple) -> tuple:
        name, dpi, x, low, h, w = item
        H, W = x.shape[1:]
        t = clock()
        rough = fg(coarse.run(None, {cin: low[None]})[0][0, 0, :h, :w])
        t = add("rough", t)
        n, _, cstats, _ = cv2.connectedComponentsWithStats(rough.view(np.uint8), connectivity=8)
        boxes = []
        for cx, cy, cw, ch, _area in cstats[1:n]:
            y0, x0 = int(np.floor(cy * H / h)), int(np.floor(cx * W / w))
            y1 = min(H, int(np.ceil((cy + ch) * H / h - 1e-9)))
            x1 = min(W, int(np.ceil((cx + cw) * W / w - 1e-9)))
            bh, bw = y1 - y0, x1 - x0
            side = max(bh, bw) + 2 * pad
            x0 -= (bh - bw) // 2 if bw < bh else 0
            y0 -= (bw - bh) // 2 if bh < bw else 0
            y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
            y0, x0 = y0 - max(y0 + side - H, 0), x0 - max(x0 + side - W, 0)
            b = (max(y0, 0), max(x0, 0), min(y0 + side, H), min(x0 + side, W))
            if b[2] - b[0] >= args.min_side and b[3] - b[1] >= args.min_side:
                boxes.append(b)
        t = add("components", t)
        mask = np.zeros((H, W), np.uint8)
        if boxes:
            xb = np.empty((len(boxes), 3, S, S), np.float32)
            for i, (y0, x0, y1, x1) in enumerate(boxes):
                c = x[:, y0:y1, x0:x1]
                m = max(y1 - y0, x1 - x0)
                if (y1 - y0, x1 - x0) != (m, m):
                    c = np.pad(c, ((0, 0), (0, m - (y1 - y0)), (0, m - (x1 - x0))), mode="edge")
                xb[i] = resize(c, S, S, "area")
            t = add("crops", t)
            logits = fine.run(None, {fin: xb})[0][:, 0]  # (N, S, S): one logit per pixel
            t = add("fine", t)
            p = 1.0 / (1.0 + np.exp(-logits))
            for i, (y0, x0, y1, x1) in enumerate(boxes):
                m = max(y1 - y0, x1 - x0)
                up = resize(p[i], m, m, "bilinear")[: y1 - y0, : x1 - x0]
                mask[y0:y1, x0:x1] |= up > args.threshold
            add("fuse", t)
            n_crops[0] += len(boxes)
        return name, dpi, mask

    def write(item: tuple) -> None:
        """PNG, atomically and durably, as segcli.io.atomic.atomic_path does."""
        name, dpi, mask = item
        t = clock()
        final = out_dir / (Path(name).stem + "_seg.png")
        tmp = out_dir / f".{final.name}.partial"
        Image.fromarray(mask).save(tmp, format="PNG", **({"dpi": dpi} if dpi else {}))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fd = os.open(out_dir, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        add("write", t)

    cpu = dict.fromkeys(("read", "compute", "write"), 0.0)  # thread CPU seconds of each step, all frames

    def on_cpu(step: str, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(item: Any) -> Any:
            t = time.thread_time()
            out = fn(item)
            cpu[step] += time.thread_time() - t
            return out
        return run

    read, compute, write = on_cpu("read", read), on_cpu("compute", compute), on_cpu("write", write)
    names = sorted(os.listdir(args.frames))
    t_loop = clock()
    if args.mode == "seq":
        for name in names:
            write(compute(read(name)))
    else:  # "io": one reader thread two frames ahead and one writer thread, as segcli.pipeline.run_many
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            ahead = deque(reader.submit(read, n) for n in names[:2])
            todo = iter(names[2:])
            last = None
            while ahead:
                item = ahead.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    ahead.append(reader.submit(read, nxt))
                out = compute(item)
                if last is not None:
                    last.result()
                last = writer.submit(write, out)
            if last is not None:
                last.result()
    t_frames = clock() - t_loop
    print(json.dumps({"imports_s": round(t_imports, 4), "sessions_s": round(t_sessions, 4),
                      "frames_s": round(t_frames, 4), "crops": n_crops[0], "mode": args.mode,
                      "process_to_loop_end_s": round(clock() - T_START, 4),
                      "stages_s": {k: round(v, 4) for k, v in stages.items()},
                      "thread_cpu_s": {k: round(v, 4) for k, v in cpu.items()},
                      "process_cpu_s": round(time.process_time(), 4)}))
    return 0


# -- the driver ---------------------------------------------------------------------------------------------------


def segcli_graphs(model: str) -> dict[str, object]:
    """The ONNX files segcli's own predictors were built from for ``model``, and the session settings it uses."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import hashlib

    from segcli.api import Segmenter
    from segcli.params import default_pad

    seg = Segmenter(model)
    bundle = seg.bundle_for("2d")
    p = seg.plan_for(bundle)
    nets = seg.predictors(bundle)
    out: dict[str, object] = {"model": bundle.name, "method": p.method, "size": p.size,
                              "threshold": float(p["threshold"]), "min_side": int(p["min_side"]),
                              "pad": int(p["pad"]) if p["pad"] is not None else default_pad(p.size)}
    for role in ("coarse", "fine"):
        pr = nets(role)
        data = pr.model_source if isinstance(pr.model_source, bytes) else Path(str(pr.model_source)).read_bytes()
        src = Path(pr.source)
        if hashlib.sha256(src.read_bytes()).digest() != hashlib.sha256(data).digest():
            raise SystemExit(f"{src} is not the graph segcli's {role} session was built from")
        so = pr.session.get_session_options()
        out[role] = {"path": str(src), "precision": pr.metadata.get("precision", "?"), "threads": pr.threads,
                     "intra_op_threads": so.intra_op_num_threads, "outputs": pr.session.get_outputs()[0].shape}
    if p.method != "stts" or bundle.n_classes != 2:
        raise SystemExit("the loop reproduces stts on a binary bundle only")
    return out


def timed(cmd: list[str]) -> dict[str, object]:
    """Wall and CPU seconds of one child process, with the 1-minute load average read just before."""
    load = os.getloadavg()[0]
    ru0 = os.times()
    t0 = time.perf_counter()
    cp = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = os.times()
    if cp.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({cp.returncode}):\n{cp.stderr[-3000:]}")
    cpu = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
    return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 3), "load1": round(load, 2), "stdout": cp.stdout}


def dice_table(a_dir: Path, b_dir: Path) -> dict[str, object]:
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in a_dir.glob("*.png"))
    if names != sorted(p.name for p in b_dir.glob("*.png")):
        raise SystemExit("the loop and segcli wrote different file sets")
    dices, differ, pixels = [], [], 0
    for n in names:
        a = np.asarray(Image.open(a_dir / n)) > 0
        b = np.asarray(Image.open(b_dir / n)) > 0
        s = int(a.sum()) + int(b.sum())
        dices.append(1.0 if s == 0 else 2.0 * int((a & b).sum()) / s)
        d = int((a != b).sum())
        if d:
            differ.append(n)
            pixels += d
    return {"frames": len(names), "dice_min": round(min(dices), 6), "dice_mean": round(sum(dices) / len(dices), 6),
            "frames_differing": len(differ), "pixels_differing": pixels, "differing": differ[:20]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", default="/work/frames100", help="folder of frames (all are run, sorted)")
    ap.add_argument("--model", default="polyp")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the rounds here")
    ap.add_argument("--keep", type=Path, help="keep the outputs here instead of a temporary folder")
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)  # the child: run the loop only
    ap.add_argument("--mode", choices=("seq", "io"), default="seq", help=argparse.SUPPRESS)
    for a in ("--coarse", "--fine", "--out"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    for a, t in (("--threads", int), ("--size", int), ("--pad", int), ("--min-side", int), ("--threshold", float)):
        ap.add_argument(a, type=t, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop:
        return loop_main(args)

    g = segcli_graphs(args.model)
    # an installed segcli runs from byte-compiled modules (pip compiles them at install); a checkout run with
    # PYTHONDONTWRITEBYTECODE=1 (as on this machine) would otherwise compile ~80 modules in every run (0.2 s)
    import compileall

    compileall.compile_dir(Path(__file__).resolve().parent.parent / "segcli", quiet=1)
    threads = int(g["fine"]["threads"])  # type: ignore[index]
    print(f"graphs: coarse {g['coarse']['path']} ({g['coarse']['precision']}), "  # type: ignore[index]
          f"fine {g['fine']['path']} ({g['fine']['precision']}); {threads} intra-op threads")  # type: ignore[index]
    frames = Path(args.frames)
    n = len(os.listdir(frames))
    root = args.keep or Path(tempfile.mkdtemp(prefix="photo-floor-"))
    one = root / "first-frame"  # the first frame alone: start-up against per-frame cost
    one.mkdir(parents=True, exist_ok=True)
    first = sorted(os.listdir(frames))[0]
    if not (one / first).exists():
        (one / first).symlink_to((frames / first).resolve())
    loop_cmd = [sys.executable, __file__, "--loop", "--coarse", g["coarse"]["path"],  # type: ignore[index]
                "--fine", g["fine"]["path"], "--threads", str(threads), "--size", str(g["size"]),  # type: ignore[index]
                "--pad", str(g["pad"]), "--min-side", str(g["min_side"]), "--threshold", str(g["threshold"])]
    variants = ("loop-seq", "loop-io", "segcli", "loop-io@1", "segcli@1")
    rounds = []
    for r in range(args.rounds):
        res: dict[str, object] = {}
        order = variants[r % 5:] + variants[: r % 5]  # each variant in each place in turn
        for which in order:
            out = root / f"r{r}-{which.replace('@', '-at')}"
            src, k = (one, 1) if which.endswith("@1") else (frames, n)
            if which.startswith("loop"):
                rec = timed([*loop_cmd, "--mode", which[5:].split("@")[0], "--frames", str(src), "--out", str(out)])
                rec["inside"] = json.loads(str(rec.pop("stdout")).strip().splitlines()[-1])
            else:
                rec = timed([sys.executable, "-m", "segcli", "predict", str(src), "-o", str(out), "-q",
                             "--model", args.model])
                rec.pop("stdout")
            rec["images_per_s"] = round(k / float(rec["wall_s"]), 2)  # type: ignore[arg-type]
            res[which] = rec
        res["order"] = list(order)
        floor = min(("loop-seq", "loop-io"), key=lambda v: res[v]["wall_s"])  # type: ignore[index]
        res["floor"] = floor
        for v in ("loop-seq", "loop-io"):
            res[f"ratio_wall_{v}"] = round(res["segcli"]["wall_s"] / res[v]["wall_s"], 3)  # type: ignore[index]
            res[f"ratio_cpu_{v}"] = round(res["segcli"]["cpu_s"] / res[v]["cpu_s"], 3)  # type: ignore[index]
        res["ratio_wall"] = res[f"ratio_wall_{floor}"]
        # start-up (a one-frame run) and the marginal cost of a frame ((T_n - T_1) / (n - 1)), loop-io vs segcli
        for v in ("loop-io", "segcli"):
            for key in ("wall_s", "cpu_s"):
                res[f"{v}_startup_{key}"] = res[f"{v}@1"][key]  # type: ignore[index]
                res[f"{v}_per_frame_ms_{key[:-2]}"] = round(1000 * (res[v][key] - res[f"{v}@1"][key]) / max(1, n - 1), 2)  # type: ignore[index,operator]
        rounds.append(res)
        print(f"round {r}: " + "  ".join(
            f"{v} {res[v]['images_per_s']:5.1f} img/s (load {res[v]['load1']:.2f}, cpu {res[v]['cpu_s']:.2f} s)"  # type: ignore[index]
            for v in variants[:3]) + f"  segcli/floor {res['ratio_wall']:.3f}; start-up loop-io "
            f"{res['loop-io_startup_wall_s']:.2f} s, segcli {res['segcli_startup_wall_s']:.2f} s; per frame loop-io "
            f"{res['loop-io_per_frame_ms_wall']:.1f} ms, segcli {res['segcli_per_frame_ms_wall']:.1f} ms", flush=True)
    last = args.rounds - 1
    agree = {v: dice_table(root / f"r{last}-{v}", root / f"r{last}-segcli") for v in ("loop-seq", "loop-io")}
    med = statistics.median
    loads = [r[v]["load1"] for r in rounds for v in variants]  # type: ignore[index]
    summary = {"ratio_wall_vs_floor_median": round(med(r["ratio_wall"] for r in rounds), 3),  # type: ignore[misc]
               **{f"ratio_{k}_{v}_median": round(med(r[f"ratio_{k}_{v}"] for r in rounds), 3)  # type: ignore[misc]
                  for k in ("wall", "cpu") for v in ("loop-seq", "loop-io")},
               **{f"{v}_images_per_s_median": round(med(r[v]["images_per_s"] for r in rounds), 2)  # type: ignore[index]
                  for v in variants},
               **{f"{v}_{k}_median": round(med(r[f"{v}_{k}"] for r in rounds), 3)  # type: ignore[misc]
                  for v in ("loop-io", "segcli") for k in ("startup_wall_s", "startup_cpu_s", "per_frame_ms_wall",
                                                           "per_frame_ms_cpu")},
               "load1_range": [min(loads), max(loads)]}
    print("median images/s: " + ", ".join(f"{v} {summary[f'{v}_images_per_s_median']}" for v in variants[:3]))
    print("median start-up (one-frame run) and per-frame cost ((T_n - T_1) / (n - 1)): " + "; ".join(
        f"{v} {summary[f'{v}_startup_wall_s_median']} s wall / {summary[f'{v}_startup_cpu_s_median']} s CPU, "
        f"{summary[f'{v}_per_frame_ms_wall_median']} ms wall / {summary[f'{v}_per_frame_ms_cpu_median']} ms CPU"
        for v in ("loop-io", "segcli")))
    print(f"segcli / floor (the faster loop of each round) = {summary['ratio_wall_vs_floor_median']} wall; "
          f"segcli / loop-io = {summary['ratio_wall_loop-io_median']} wall, {summary['ratio_cpu_loop-io_median']} CPU; "
          f"segcli / loop-seq = {summary['ratio_wall_loop-seq_median']} wall, "
          f"{summary['ratio_cpu_loop-seq_median']} CPU; load {min(loads)}-{max(loads)} on {os.cpu_count()} CPUs")
    for v, a in agree.items():
        print(f"masks {v} vs segcli: {a['frames']} frames, Dice min {a['dice_min']}, mean {a['dice_mean']}; "
              f"{a['frames_differing']} frames differ ({a['pixels_differing']} pixels)")
    if args.json:
        doc = {"frames": str(frames), "n": n, "graphs": g, "cpus": os.cpu_count(), "rounds": rounds,
               "summary": summary, "agreement": agree,
               "note": "each variant runs as a fresh process into a fresh folder, the order rotating by round; "
                       "all write PNGs atomically with fsync; load1 read before each run; loop-seq does one frame "
                       "after another, loop-io overlaps decoding (one reader thread, two frames ahead) and writing "
                       "(one writer thread) with the networks, as segcli.pipeline.run_many does"}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
