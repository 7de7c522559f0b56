"""MONAI's sliding window against segcli, same network (nuclei-he's ``fine`` U-Net), same images (issue 19).

Two inputs, both built from real MoNuSeg H&E training tiles (1000² at 0.25 µm/px):

* ``slide``: the SVS-like slide of ``bench_slide.py`` (16k², about 5 % tissue on glass, JPEG pyramid),
  scored against the placed tiles' masks with ``bench_slide.score`` (sparse ground truth);
* ``mosaic``: a dense 4×4 mosaic of the first 16 tiles (4000², no glass) as a plain RGB PNG, scored
  against its full mask (the worst case for crop-based methods).

Variants, each a subprocess under ``/usr/bin/time -v`` (peak RSS, wall):

* ``monai``: ``monai.inferers.sliding_window_inference`` (roi 256², overlap 0.25, gaussian, sw_batch_size
  the fastest of 8/16/32 on one 1000² tile) on the whole image as one float32 tensor (uint8/255, the
  bundle's ``dtype`` normalisation), the bundle's ``fine`` module in torch fp32, ``torch.inference_mode``,
  2 threads; mask = blended logits > 0 (= sigmoid > 0.5, the bundle's threshold);
* segcli ``predict --model nuclei-he --json`` with: ``--method sliding --backend torch --precision fp32``;
  no flags (default); ``--method stts`` with torch fp32, ONNX Runtime fp32, int8, bf16; ``--method refine``.

Per variant: seconds, MPixel/s, Dice / precision / recall, peak RSS, network inputs, and the FLOP floor
(inputs × FLOPs per 256² input / this machine's FLOP/s on a batch of 16 256² inputs, torch fp32; also ORT fp32,
ORT int8 and torch bf16). The machine is shared: the load average is stored next to every figure, variants
run interleaved, and ratios are what to quote.

    python benchmarks/bench_monai.py --data /work/shared/data/monuseg --results benchmarks/results/monai
    python benchmarks/bench_monai.py --data /work/shared/data/monuseg --quick --results /tmp/monai-quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_slide as bs  # noqa: E402  (load_tiles, place, write_slide, score, time_v, report_of, load)
import peer_tissue  # noqa: E402  (MONAI over the tissue only: Otsu boxes, sliding_window_inference per box)

REPO = HERE.parent
MODEL = "nuclei-he"
ROI = 256
OVERLAP = 0.25
THREADS = 2

SEGCLI_VARIANTS = {
    "sliding-torch-fp32": ["--method", "sliding", "--backend", "torch", "--precision", "fp32"],
    "default": [],
    "stts-torch-fp32": ["--method", "stts", "--backend", "torch", "--precision", "fp32"],
    "stts-ort-fp32": ["--method", "stts", "--precision", "fp32"],
    "stts-int8": ["--method", "stts", "--precision", "int8"],  # refused: coarse has no int8 export (see README)
    "stts-auto": ["--method", "stts"],  # precision auto: fine on its int8 export, coarse on ORT fp32
    "stts-bf16": ["--method", "stts", "--precision", "bf16"],
    "refine": ["--method", "refine"],
}
PEERS = ("monai", "monai-tissue", "tiatoolbox")
#: tiatoolbox's own Python (``--tia-python``): it pins its own torch and numpy, so it runs apart (peer_tiatoolbox.py)
TIA: dict[str, Path] = {}
#: segcli's default run from another copy of the code (``--baseline-repo``: e.g. ``git archive`` of main)
BASELINE = "default-baseline"
ALL_VARIANTS = [*PEERS, *SEGCLI_VARIANTS, BASELINE]
BASELINE_REPO: list[Path] = []


# -- worker modes (run in subprocesses) ---------------------------------------------------------------------

def _torch_setup():
    import torch

    torch.set_num_threads(THREADS)
    from segcli.bundle import load_bundle

    bundle = load_bundle(MODEL)
    net = bundle.load_module("fine").eval()
    if bundle.boundary is not None:  # a boundary class: the peers threshold one object logit, as for a binary net
        net = _ObjectLogit(torch, net, bundle.boundary)
    return torch, bundle, net


def _torchscript_peer_net() -> dict:
    """The peers' network (object logit) traced to TorchScript for tiatoolbox's environment, and its threshold."""
    torch, bundle, net = _torch_setup()
    path = Path(tempfile.gettempdir()) / f"bench_monai-peer-{os.getpid()}.pt"
    with torch.inference_mode():
        torch.jit.trace(net.eval(), torch.rand(1, 3, ROI, ROI)).save(str(path))
    threshold = float(bundle.params.get("threshold", 0.5)) if isinstance(bundle.params, dict) else 0.5
    return {"model": path, "threshold": threshold}


def _ObjectLogit(torch, net, boundary):  # noqa: N802  (a torch module built where torch is imported)
    """The logit of P(object or its boundary) = logsumexp(z_obj, z_boundary) - logsumexp(other classes): blended
    and thresholded at 0 by the peers exactly as a binary network's single logit is."""
    b, obj = boundary

    class ObjectLogit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            z = self.net(x)
            fg = torch.zeros(z.shape[1], dtype=torch.bool)
            fg[[b, obj]] = True
            return torch.logsumexp(z[:, fg], 1, keepdim=True) - torch.logsumexp(z[:, ~fg], 1, keepdim=True)

    return ObjectLogit().eval()


def _read_rgb(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tf.series[0].levels[0].asarray()
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def worker_monai(inp: Path, out: Path, sw_batch: int) -> dict:
    """The whole image as one float32 tensor through MONAI's sliding window; writes the mask, prints a report."""
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    torch, bundle, net = _torch_setup()
    assert bundle.normalization == {"kind": "dtype"}, bundle.normalization
    threshold = float(bundle.params.get("threshold", 0.5)) if isinstance(bundle.params, dict) else 0.5
    t_load = time.perf_counter()
    img = _read_rgb(inp)
    H, W = img.shape[:2]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(255.0)  # (1, 3, H, W) float32, uint8/255
    del img
    t_read = time.perf_counter()
    windows = [0]

    def predictor(b):
        windows[0] += int(b.shape[0])
        return net(b)

    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=(ROI, ROI), sw_batch_size=sw_batch, predictor=predictor,
                                          overlap=OVERLAP, mode="gaussian")
    del x
    t_inf = time.perf_counter()
    # sigmoid(z) > t  <=>  z > logit(t); for t = 0.5 that is z > 0 (no float32 sigmoid copy of the whole image)
    zt = float(np.log(threshold / (1 - threshold)))
    mask = (logits[0, 0] > zt).numpy().astype(np.uint8)
    del logits
    if out.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(out, mask, tile=(512, 512), compression="zlib", photometric="minisblack")
    else:
        from PIL import Image

        Image.fromarray(mask).save(out)
    t_end = time.perf_counter()
    return {"shape": [H, W], "windows": windows[0], "sw_batch_size": sw_batch, "threshold": threshold,
            "seconds": {"setup": round(t_load - t0, 2), "read_and_tensor": round(t_read - t_load, 2),
                        "sliding_window_inference": round(t_inf - t_read, 2), "threshold_and_write": round(t_end - t_inf, 2),
                        "total": round(t_end - t0, 2)}}


def worker_pick(tile: Path) -> dict:
    """Time sw_batch_size 8/16/32 on one 1000² tile, interleaved over 2 rounds; the fastest (min) wins."""
    from monai.inferers import sliding_window_inference

    torch, _, net = _torch_setup()
    x = torch.from_numpy(_read_rgb(tile)).permute(2, 0, 1)[None].float().div_(255.0)
    times: dict[int, list[float]] = {8: [], 16: [], 32: []}
    with torch.inference_mode():
        sliding_window_inference(x[..., :512, :512], (ROI, ROI), 8, net, overlap=OVERLAP, mode="gaussian")  # warm-up
        for _ in range(2):
            for b in times:
                t0 = time.perf_counter()
                sliding_window_inference(x, (ROI, ROI), b, net, overlap=OVERLAP, mode="gaussian")
                times[b].append(round(time.perf_counter() - t0, 3))
    best = min(times, key=lambda b: min(times[b]))
    return {"image": str(tile), "shape": list(x.shape[-2:]), "seconds": {str(k): v for k, v in times.items()},
            "chosen": best, "load": bs.load()}


def worker_flops() -> dict:
    """FLOPs of the fine network per 256² input, and FLOP/s of a batch of 16 (torch fp32/bf16, ORT fp32/int8)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch, bundle, net = _torch_setup()
    x1 = torch.rand(1, 3, ROI, ROI)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(x1)
    flops = int(fc.get_total_flops())
    xb = torch.rand(16, 3, ROI, ROI)
    out: dict = {"flops_per_input": flops, "batch": 16, "threads": THREADS, "load_before": bs.load(), "throughput": {}}

    def timed(fn, reps: int = 2) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def rec(name: str, secs: float) -> None:
        out["throughput"][name] = {"batch_seconds": round(secs, 3), "flops_per_s": round(16 * flops / secs),
                                   "gflops_per_s": round(16 * flops / secs / 1e9, 2)}

    with torch.inference_mode():
        rec("torch-fp32", timed(lambda: net(xb)))
        try:
            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    net(xb)
            rec("torch-bf16", timed(bf16))
        except Exception as exc:  # noqa: BLE001
            out["throughput"]["torch-bf16"] = {"error": repr(exc)}
    try:
        import onnxruntime as ort

        from segcli.runtimes.onnx_cache import cached_export

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        xn = xb.numpy()
        data, source = cached_export(bundle, "fine")
        if data is not None:
            s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            name = s.get_inputs()[0].name
            rec("ort-fp32", timed(lambda: s.run(None, {name: xn})))
            out["throughput"]["ort-fp32"]["source"] = source
        int8 = Path(bundle.path) / bundle.networks["fine"].int8
        s8 = ort.InferenceSession(str(int8), so, providers=["CPUExecutionProvider"])
        name8 = s8.get_inputs()[0].name
        rec("ort-int8", timed(lambda: s8.run(None, {name8: xn})))
        out["throughput"]["ort-int8"]["note"] = "FLOP/s counted as the fp32 network's FLOPs (int8 ops)"
    except Exception as exc:  # noqa: BLE001
        out["throughput"]["ort"] = {"error": repr(exc)}
    out["load_after"] = bs.load()
    return out


# -- inputs ---------------------------------------------------------------------------------------------------

def make_mosaic(src: list, n: int, path: Path) -> np.ndarray:
    """An n×n mosaic of the first n² tiles (sorted names), as a PNG; returns its 0/1 mask."""
    from PIL import Image

    th, tw = src[0][1].shape[:2]
    img = np.empty((n * th, n * tw, 3), np.uint8)
    mask = np.empty((n * th, n * tw), np.uint8)
    for k in range(n * n):
        _, im, m = src[k % len(src)]
        r, c = divmod(k, n)
        img[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = im
        mask[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = m
    Image.fromarray(img).save(path, compress_level=1)
    return mask


def score_full(pred_path: Path, gt: np.ndarray) -> dict:
    from PIL import Image

    p = np.asarray(Image.open(pred_path)) > 0
    if p.ndim == 3:
        p = p[..., 0]
    g = gt > 0
    assert p.shape == g.shape, (p.shape, g.shape)
    tp, pf, gf = int((p & g).sum()), int(p.sum()), int(g.sum())
    return {"dice": round(2 * tp / max(1, pf + gf), 4), "precision": round(tp / max(1, pf), 4),
            "recall": round(tp / max(1, gf), 4), "tp_px": tp, "pred_fg_px": pf, "gt_fg_px": gf}


# -- runs -----------------------------------------------------------------------------------------------------

def run_variant(name: str, inp: Path, kind: str, out: Path, sw_batch: int, timeout: float) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    code = BASELINE_REPO[0] if name == BASELINE else REPO
    env = {**os.environ, "PYTHONPATH": str(code) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if name == "tiatoolbox":
        mask = out / (inp.stem + "_seg.tif")
        cmd = ["/usr/bin/time", "-v", str(TIA["python"]), str(HERE / "peer_tiatoolbox.py"), str(inp), str(mask),
               "--model", str(TIA["model"]), "--threshold", str(TIA["threshold"]), "--threads", str(THREADS)]
    elif name in PEERS:
        mask = out / (inp.stem + ("_seg.tif" if kind == "slide" else "_seg.png"))
        cmd = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), f"--worker-{name}", str(inp),
               str(mask), "--sw-batch", str(sw_batch)]
    else:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "segcli", "predict", str(inp), "-o", str(out) + "/",
               "--model", MODEL, "--json", *SEGCLI_VARIANTS.get(name, [])]
    before = bs.load()
    print(f"  [{name}] $ {' '.join(cmd[2:])}   [load {before['loadavg']}]", flush=True)
    proc, wall = bs.run_timed(cmd, env, timeout, "bench_monai", cwd=code)
    stdout, stderr = proc.stdout, proc.stderr
    after = bs.load()
    shown = (["tiatoolbox SemanticSegmentor (peer_tiatoolbox.py)", *cmd[4:]] if name == "tiatoolbox" else
             [f"monai.inferers.sliding_window_inference (this script's --worker-{name})", *cmd[4:]] if name in PEERS
             else ["segcli", *cmd[5:]])
    row: dict = {"variant": name, "input": kind, "command": " ".join(shown), "code": str(code),
                 "returncode": proc.returncode,
                 "wall_s": round(wall, 2), **bs.time_v(stderr), "load_before": before, "load_after": after}
    if proc.returncode != 0:
        row["stderr_tail"] = stderr[-3000:]
        print(f"  FAILED rc={proc.returncode}\n{stderr[-2000:]}", flush=True)
        return row
    if name in PEERS:
        rep = json.loads(stdout.strip().splitlines()[-1])
        row["report"] = rep
        row["inputs"] = rep["windows"]
    else:
        rep = bs.report_of(stdout)
        info = dict(rep.get("info") or {})
        info.pop("voxel_counts", None)
        row["report"] = {"info": info, **{k: rep[k] for k in ("status", "method", "model", "backend", "providers",
                                                              "precision", "seconds", "shape", "warnings") if k in rep}}
        row["inputs"] = info.get("fine_inputs", info.get("tiles", info.get("windows")))
        for k in ("crops", "windows", "tiles", "patches", "resampled", "mpp", "provider", "backend", "precision"):
            if k in info:
                row[k] = info[k]
    return row


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kinds = [k for k in ("slide", "mosaic") if doc["summary"].get(k)]
    if not kinds:
        return
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=True):
        s = doc["summary"][k]
        names = [v for v in ALL_VARIANTS if v in s and s[v].get("mpix_per_s_vs_monai") is not None]
        vals = [s[v]["mpix_per_s_vs_monai"] for v in names]
        bars = ax.bar(range(len(names)), vals, color=["#888" if v == "monai" else "#1f77b4" for v in names])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(min(vals + [1]) / 1.5, max(vals + [1]) * 1.6)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        for b, v, n in zip(bars, vals, names, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}×\nD {s[n]['dice']:.3f}", ha="center",
                    va="bottom", fontsize=7)
        mp = doc["inputs"][k]["mpixels"]
        ax.set_title(f"{k} ({doc['inputs'][k]['shape'][0]}², {mp:.0f} MPixel): MPixel/s vs MONAI", fontsize=9)
    la = doc.get("load_end", {}).get("loadavg")
    fig.suptitle(f"bench_monai.py: nuclei-he fine U-Net, segcli vs monai.inferers.sliding_window_inference "
                 f"(2 shared cores; load at end {la})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summarise(doc: dict) -> None:
    fl = doc.get("flops") or []
    fpi = fl[0]["flops_per_input"] if fl else None
    best = {}
    for f in fl:
        for b, t in f["throughput"].items():
            if "flops_per_s" in t:
                best[b] = max(best.get(b, 0), t["flops_per_s"])
    backend_of = {"monai": "torch-fp32", "monai-tissue": "torch-fp32", "tiatoolbox": "torch-fp32", BASELINE: "ort-int8", "sliding-torch-fp32": "torch-fp32", "default": "ort-int8",
                  "stts-torch-fp32": "torch-fp32", "stts-ort-fp32": "ort-fp32", "stts-int8": "ort-int8",
                  "stts-auto": "ort-int8", "stts-bf16": "torch-bf16", "refine": "ort-int8"}
    doc["summary"] = {}
    for kind, meta in doc["inputs"].items():
        rows = [r for r in doc["runs"] if r["input"] == kind and r.get("score")]
        out: dict = {}
        for v in ALL_VARIANTS:
            rs = [r for r in rows if r["variant"] == v]
            if not rs:
                continue
            secs = float(np.median([r["wall_s"] for r in rs]))
            r0 = rs[0]
            e = {"runs": len(rs), "wall_s": [r["wall_s"] for r in rs], "seconds_median": round(secs, 2),
                 "mpix_per_s": round(meta["mpixels"] / secs, 3), "dice": r0["score"]["dice"],
                 "precision": r0["score"]["precision"], "recall": r0["score"]["recall"],
                 "peak_rss_mb": max(r.get("peak_rss_mb") or 0 for r in rs), "inputs": r0.get("inputs"),
                 "loadavg": [r["load_before"]["loadavg"] for r in rs],
                 "cpu_s": [round((r.get("user_s") or 0) + (r.get("sys_s") or 0), 2) for r in rs],
                 "cpu_percent": [r.get("cpu_percent") for r in rs]}
            e["cpu_s_median"] = float(np.median(e["cpu_s"]))
            if fpi and e["inputs"]:
                ref = best.get("torch-fp32")
                own = best.get(backend_of.get(v, ""), ref)
                if ref:
                    e["floor_s_torch_fp32"] = round(e["inputs"] * fpi / ref, 2)
                    e["seconds_over_floor_torch_fp32"] = round(secs / e["floor_s_torch_fp32"], 2)
                if own:
                    e["floor_backend"] = backend_of.get(v)
                    e["floor_s_own_backend"] = round(e["inputs"] * fpi / own, 2)
                    e["seconds_over_floor_own_backend"] = round(secs / e["floor_s_own_backend"], 2)
            out[v] = e
        if "monai" in out:
            m = out["monai"]["mpix_per_s"]
            mc = out["monai"]["cpu_s_median"]
            for v in list(out):
                out[v]["mpix_per_s_vs_monai"] = round(out[v]["mpix_per_s"] / m, 3)
                out[v]["cpu_s_monai_over_this"] = round(mc / out[v]["cpu_s_median"], 3) if out[v]["cpu_s_median"] else None
            out["ratios"] = {f"{v} vs monai (speed)": out[v]["mpix_per_s_vs_monai"] for v in ALL_VARIANTS if v in out}
            out["ratios_cpu_time"] = {f"{v} vs monai (monai CPU s / this CPU s)": out[v]["cpu_s_monai_over_this"]
                                      for v in ALL_VARIANTS if v in out}
        if "monai-tissue" in out:  # the fair peer (issue 30): its median wall / CPU over this variant's
            pw, pc = out["monai-tissue"]["seconds_median"], out["monai-tissue"]["cpu_s_median"]
            for v in [v for v in ALL_VARIANTS if v in out]:
                out[v]["peer_wall_over_this"] = round(pw / out[v]["seconds_median"], 3)
                out[v]["peer_cpu_over_this"] = round(pc / out[v]["cpu_s_median"], 3) if out[v]["cpu_s_median"] else None
                out[v]["dice_minus_peer"] = round(out[v]["dice"] - out["monai-tissue"]["dice"], 4)
                # round by round (the two ran back to back, under the same load): peer / this
                pairs = [(p, r) for p in rows if p["variant"] == "monai-tissue" for r in rows
                         if r["variant"] == v and r.get("round") == p.get("round")]
                out[v]["peer_over_this_by_round"] = [
                    {"round": p.get("round"), "wall": round(p["wall_s"] / r["wall_s"], 3),
                     "cpu": round(((p.get("user_s") or 0) + (p.get("sys_s") or 0))
                                  / max(1e-9, (r.get("user_s") or 0) + (r.get("sys_s") or 0)), 3),
                     "load": [p["load_before"]["loadavg"][0], r["load_before"]["loadavg"][0]]} for p, r in pairs]
        doc["summary"][kind] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="monuseg folder (images/*.png, masks/*.png)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks/results/monai",
                    help="prefix: writes PREFIX-slide.json, PREFIX-mosaic.json and PREFIX.png")
    ap.add_argument("--slide-size", type=int, default=16000)
    ap.add_argument("--coverage", type=float, default=0.05, help="fraction of the slide covered by tiles")
    ap.add_argument("--each-tile-once", action="store_true",
                    help="place every tile of --data once (coverage = tiles' area / slide area), e.g. the 14 "
                         "MoNuSeg test tiles: 5.5 %% of 16000², 22 %% of 8000²")
    ap.add_argument("--mosaic", type=int, default=4, help="mosaic of N×N 1000² tiles (default 4: 4000²)")
    ap.add_argument("--quick", action="store_true", help="8000² slide and a 2000² mosaic")
    ap.add_argument("--inputs", nargs="+", default=["mosaic", "slide"], choices=["mosaic", "slide"])
    ap.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    ap.add_argument("--slide-variants", nargs="+", default=None, choices=ALL_VARIANTS,
                    help="variants on the slide (default: --variants)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the segcli variants and monai-tissue, "
                    "alternating order (MONAI whole-image runs once)")
    ap.add_argument("--stop-at", default=None, help="HH:MM (UTC): start no run after this time")
    ap.add_argument("--tia-python", type=Path, default=None,
                    help="the Python of an environment with tiatoolbox (variant tiatoolbox; see peer_tiatoolbox.py)")
    ap.add_argument("--baseline-repo", type=Path, default=None,
                    help=f"a copy of segcli (with models/) whose default run is the variant {BASELINE}")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--sw-batch", type=int, default=None, help="skip the 8/16/32 pick and use this")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP/s measurements (runs to be merged)")
    ap.add_argument("--replot", action="store_true", help="only redraw PREFIX.png from PREFIX-slide/-mosaic.json")
    ap.add_argument("--worker-monai", nargs=2, type=Path, metavar=("INPUT", "MASK"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-monai-tissue", nargs=2, type=Path, metavar=("INPUT", "MASK"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-pick", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker_monai:
        print(json.dumps(worker_monai(*args.worker_monai, args.sw_batch or 16)))
        return
    if args.worker_monai_tissue:
        print(json.dumps(peer_tissue.worker_monai_tissue(*args.worker_monai_tissue, args.sw_batch or 16, _torch_setup,
                                                         bs.read_region, ROI, OVERLAP)))
        return
    if args.worker_pick:
        print(json.dumps(worker_pick(args.worker_pick)))
        return
    if args.worker_flops:
        print(json.dumps(worker_flops()))
        return
    if args.replot:
        parts = [json.loads(Path(f"{args.results}-{k}.json").read_text()) for k in ("slide", "mosaic")
                 if Path(f"{args.results}-{k}.json").is_file()]
        merged = {"inputs": {}, "summary": {}, "load_end": parts[-1].get("load_end") if parts else None}
        for k, p in zip([k for k in ("slide", "mosaic") if Path(f"{args.results}-{k}.json").is_file()], parts,
                        strict=True):
            summarise(p)
            Path(f"{args.results}-{k}.json").write_text(json.dumps(p, indent=1, default=str) + "\n")
            merged["inputs"].update(p["inputs"])
            merged["summary"].update({k: v for k, v in p["summary"].items() if v})
        plot(merged, Path(f"{args.results}.png"))
        return
    if args.data is None:
        ap.error("--data is required")

    if args.quick:
        args.slide_size, args.mosaic = 8000, 2
    if args.baseline_repo is not None:
        BASELINE_REPO.append(args.baseline_repo.resolve())
    if "tiatoolbox" in (args.slide_variants or args.variants):
        if args.tia_python is None:
            ap.error("variant tiatoolbox needs --tia-python (tiatoolbox's own environment)")
        TIA.update(python=args.tia_python, **_torchscript_peer_net())
    # An installed segcli runs from byte-compiled modules (pip compiles them at install, as it did MONAI's); a
    # checkout run with PYTHONDONTWRITEBYTECODE=1 (as on this machine) would compile ~80 modules in every run
    # (0.2 s), for segcli and the baseline alike (bench_photo_floor.py does the same)
    import compileall

    for root in (REPO, *BASELINE_REPO):
        compileall.compile_dir(root / "segcli", quiet=1)
    stop = None
    if args.stop_at:
        hh, mm = map(int, args.stop_at.split(":"))
        now = time.gmtime()
        stop = time.mktime(time.struct_time((now.tm_year, now.tm_mon, now.tm_mday, hh, mm, 0, 0, 0, 0))) - time.timezone
    work, tmp = bs.make_workdir(args.workdir, "bench_monai-", args.results)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def sub(*a: str) -> dict:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *a], capture_output=True, text=True,
                           cwd=REPO, env=env, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])

    import monai
    import onnxruntime
    import torch

    doc: dict = {"argv": sys.argv, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                             "monai": monai.__version__, "onnxruntime": onnxruntime.__version__,
                             "platform": platform.platform()},
                 "settings": {"model": MODEL, "roi": ROI, "overlap": OVERLAP, "mode": "gaussian", "threads": THREADS,
                              "monai_input": "whole image, one float32 tensor, uint8/255", "monai_threshold":
                              "blended logits > logit(threshold) (= sigmoid > 0.5)"},
                 "load_start": bs.load(), "inputs": {}, "runs": [], "flops": []}
    files = {k: Path(f"{args.results}-{k}.json") for k in ("slide", "mosaic")}

    def save() -> None:
        summarise(doc)
        for k, f in files.items():
            if k in doc["inputs"]:
                part = {**doc, "inputs": {k: doc["inputs"][k]}, "runs": [r for r in doc["runs"] if r["input"] == k],
                        "summary": {k: doc["summary"].get(k)}}
                f.write_text(json.dumps(part, indent=1, default=str) + "\n")

    try:
        src = bs.load_tiles(args.data)
        prepared: dict = {}
        if "mosaic" in args.inputs:
            n = args.mosaic
            p = work / f"mosaic{n * 1000}.png"
            gt = make_mosaic(src, n, p)
            prepared["mosaic"] = (p, gt)
            doc["inputs"]["mosaic"] = {"path": str(p), "shape": list(gt.shape), "mpixels": gt.size / 1e6,
                                       "tiles": [s[0] for s in src[: n * n]], "gt_fg_px": int(gt.sum()),
                                       "format": "RGB PNG, no metadata"}
        if "slide" in args.inputs:
            size = args.slide_size
            th, tw = src[0][1].shape[:2]
            coverage = len(src) * th * tw / size**2 if args.each_tile_once else args.coverage
            placed = bs.place(size, src, coverage, 0)
            p = work / f"slide{size}-{args.data.name}-{coverage:.4f}.svs"
            print(f"slide {size}²: {len(placed)} tiles -> {p}", flush=True)
            if p.is_file() and args.workdir is not None:  # same tiles, coverage and seed: the same slide
                meta = {"path": str(p), "bytes": p.stat().st_size, "reused": True}
            else:
                meta = bs.write_slide(p, size, placed, 0)
            prepared["slide"] = (p, placed)
            doc["inputs"]["slide"] = {**meta, "shape": [size, size], "mpixels": size * size / 1e6,
                                      "tiles_placed": len(placed), "gt_fg_px": int(sum(int(t["mask"].sum()) for t in placed)),
                                      "tissue_fraction": round(len(placed) * th * tw / size**2, 4),
                                      "data": str(args.data), "tile_names": [t["name"] for t in placed],
                                      "format": "bench_slide.py SVS-like JPEG pyramid, 0.25 um/px, seed 0"}
        if not args.no_flops:
            print("FLOPs and FLOP/s ...", flush=True)
            doc["flops"].append(sub("--worker-flops"))
            print(json.dumps(doc["flops"][-1]["throughput"]), flush=True)
        if args.sw_batch:
            sw = args.sw_batch
            doc["sw_batch_pick"] = {"chosen": sw, "given": True}
        else:
            tile = work / "pick-tile.png"
            from PIL import Image

            Image.fromarray(src[0][1]).save(tile)
            doc["sw_batch_pick"] = sub("--worker-pick", str(tile))
            sw = doc["sw_batch_pick"]["chosen"]
        print(f"sw_batch_size {sw}: {doc['sw_batch_pick']}", flush=True)
        save()
        for kind in args.inputs:
            inp, gt = prepared[kind]
            variants = args.variants if kind == "mosaic" or not args.slide_variants else args.slide_variants
            for rnd in range(args.repeat):
                order = variants if rnd % 2 == 0 else variants[::-1]
                for v in order:
                    if (v == "monai" and rnd > 0) or (v in ("monai-tissue", "tiatoolbox") and kind != "slide"):
                        continue
                    if stop is not None and time.time() > stop:
                        doc.setdefault("skipped", []).append({"input": kind, "variant": v, "round": rnd,
                                                              "why": f"past --stop-at {args.stop_at}"})
                        continue
                    out = work / f"out-{kind}-{v}-{rnd}"
                    row = run_variant(v, inp, kind, out, sw, args.timeout)
                    row["round"] = rnd
                    if row["returncode"] == 0:
                        masks = sorted(out.glob("*_seg.*"))
                        t1 = time.perf_counter()
                        row["score"] = bs.score(masks[0], args.slide_size, gt) if kind == "slide" \
                            else score_full(masks[0], gt)
                        row["score"]["per_tile_dice"] = [t["dice"] for t in row["score"].pop("per_tile", [])]
                        row["score_seconds"] = round(time.perf_counter() - t1, 1)
                        print(f"    wall {row['wall_s']} s, RSS {row.get('peak_rss_mb')} MB, inputs {row.get('inputs')}, "
                              f"Dice {row['score']['dice']} (P {row['score']['precision']}, R {row['score']['recall']})"
                              f", load {row['load_after']['loadavg']}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    doc["runs"].append(row)
                    save()
        if not args.no_flops and (stop is None or time.time() < stop):
            doc["flops"].append(sub("--worker-flops"))
    finally:
        doc["load_end"] = bs.load()
        save()
        try:
            plot(doc, Path(f"{args.results}.png"))
        except Exception as exc:  # noqa: BLE001
            print(f"no plot: {exc!r}")
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
