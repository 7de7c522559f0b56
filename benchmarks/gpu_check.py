"""GPU checks of issue 19, as one script for a lent GPU machine (the `device` tool): under 10 minutes.

Needs only what the repository carries: the inputs are built from the bundled samples (no
``../shared``), so it runs on a bare GPU machine with torch, numpy, scipy, tifffile, pillow, typer and
rich (``PYTHONPATH=.``; SimpleITK, pydicom, highdicom and shapely are not imported for these inputs).

1. **Parity** (Dice of masks ≥ 0.999): CUDA torch fp32 and CUDA torch ``--half`` against the CPU
   (ONNX Runtime fp32) on the bundled polyp frame and on a 4096² H&E mosaic with
   ``--method sliding``; ONNX Runtime's CUDA provider too when the installed onnxruntime has it
   (the GPU wheel, 250 MB, is too big to carry to a bare machine: the script says so when absent).
2. **Throughput** on a 16384² slide, 5 % tissue (the bundled MoNuSeg-style tile, flipped and rotated, on
   glass; tiled TIFF with 0.25 µm/px): MPixel/s of the default route (rough pass, then windows over
   tissue only) and of ``--method sliding`` over every window, on CUDA (fp32 and fp16), plus the CPU
   default for the ratio.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out "$OUT"        # writes gpu_check.json there

Exit 0 when every parity check passed, 1 when one failed, 2 when no CUDA device is usable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GLASS = (235, 232, 238)


def _tile() -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(REPO / "models/nuclei-he/sample/he_prostate_CH-5767.png").convert("RGB"))


def _variants(t: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(t, k) if f == 0 else np.rot90(t[:, ::-1], k) for f in (0, 1) for k in range(4)]


def mosaic(path: Path, side: int) -> Path:
    """A dense H&E mosaic (no glass) of the bundled tile's 8 orientations, as a plain TIFF."""
    import tifffile

    v = _variants(_tile())
    h = min(x.shape[0] for x in v)
    w = min(x.shape[1] for x in v)
    img = np.zeros((side, side, 3), np.uint8)
    i = 0
    for y in range(0, side, h):
        for x in range(0, side, w):
            t = v[i % len(v)][:h, :w]
            img[y : y + h, x : x + w] = t[: side - y, : side - x]
            i += 1
    tifffile.imwrite(path, img, resolution=(40000, 40000), resolutionunit="CENTIMETER", tile=(512, 512),
                     compression="zlib", photometric="rgb")
    return path


def slide(path: Path, side: int, tissue: float = 0.05, seed: int = 0) -> Path:
    """Glass with the tile at random non-overlapping places covering about ``tissue`` of the area."""
    import tifffile

    rng = np.random.default_rng(seed)
    v = _variants(_tile())
    img = np.empty((side, side, 3), np.uint8)
    img[:] = GLASS
    img += rng.integers(0, 3, size=(1, side, 3), dtype=np.uint8)  # slight noise, cheap
    placed: list[tuple[int, int, int, int]] = []
    area = 0
    while area < tissue * side * side:
        t = v[rng.integers(len(v))]
        h, w = t.shape[:2]
        y, x = int(rng.integers(0, side - h)), int(rng.integers(0, side - w))
        if any(y < b[2] and b[0] < y + h and x < b[3] and b[1] < x + w for b in placed):
            continue
        img[y : y + h, x : x + w] = t
        placed.append((y, x, y + h, x + w))
        area += h * w
    tifffile.imwrite(path, img, resolution=(40000, 40000), resolutionunit="CENTIMETER", tile=(512, 512),
                     compression="zlib", photometric="rgb")
    return path


def run(path: Path, out: Path, **opts: object) -> tuple[np.ndarray, float, dict]:
    from segcli.api import Segmenter
    from segcli.io import open_image

    seg = Segmenter(**opts)
    t0 = time.perf_counter()
    rep = seg.predict_file(path, out)
    dt = time.perf_counter() - t0
    if rep.status != "ok":
        raise RuntimeError(f"{path.name} {opts}: {rep.status} {rep.error}")
    mask = np.asarray(open_image(out).array)[..., 0] if out.suffix.lower() in (".tif", ".tiff", ".png") else None
    return mask, dt, {"providers": rep.providers, "info": {k: v for k, v in (rep.info or {}).items() if k != "boxes"}}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a > 0, b > 0
    s = int(x.sum()) + int(y.sum())
    return 1.0 if s == 0 else 2.0 * int((x & y).sum()) / s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--slide-side", type=int, default=16384)
    ap.add_argument("--mosaic-side", type=int, default=4096)
    a = ap.parse_args()
    import onnxruntime as ort
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(), "cpus": os.cpu_count()}
    print(json.dumps(env), flush=True)
    if not env["cuda"]:
        print("no CUDA device is usable: nothing to check", file=sys.stderr)
        return 2
    ort_cuda = "CUDAExecutionProvider" in env["ort_providers"]
    res: dict = {"env": env, "parity": [], "throughput": [],
                 "ort_cuda": "checked" if ort_cuda else "not checked: this onnxruntime has no CUDA provider"}
    ok = True
    with tempfile.TemporaryDirectory(prefix="segcli-gpu-") as tmp:
        tmpd = Path(tmp)
        cases = [(REPO / "models/polyp/sample/polyp.jpg", "polyp", {}, "png"),
                 (mosaic(tmpd / "mosaic.tif", a.mosaic_side), "nuclei-he", {"method": "sliding"}, "tif")]
        for path, model, extra, ext in cases:
            # The reference is CPU fp32 (auto would pick a bundle's checked int8 variant, which is not parity).
            ref, t_ref, _ = run(path, tmpd / f"ref-{model}.{ext}", model=model, device="cpu", precision="fp32", **extra)
            gpu = [("cuda torch fp32", {"device": "cuda", "backend": "torch"}),
                   ("cuda torch fp16", {"device": "cuda", "backend": "torch", "half": True})]
            if ort_cuda:
                gpu.append(("cuda onnxruntime fp32", {"device": "cuda", "backend": "onnx"}))
            for label, o in gpu:
                m, t, rep = run(path, tmpd / f"{label.replace(' ', '-')}-{model}.{ext}", model=model, **extra, **o)
                d = dice(ref, m)
                ok &= d >= 0.999
                row = {"input": path.name, "model": model, "variant": label, "dice_vs_cpu": round(d, 5),
                       "seconds": round(t, 2), "cpu_seconds": round(t_ref, 2), "providers": rep["providers"]}
                res["parity"].append(row)
                print(json.dumps(row), flush=True)
        big = slide(tmpd / "slide.tif", a.slide_side)
        mpx = a.slide_side**2 / 1e6
        for label, o in [("default, cuda fp32", {"device": "cuda", "backend": "torch"}),
                         ("default, cuda fp16", {"device": "cuda", "backend": "torch", "half": True}),
                         ("sliding, cuda fp32", {"device": "cuda", "backend": "torch", "method": "sliding"}),
                         ("sliding, cuda fp16", {"device": "cuda", "backend": "torch", "half": True, "method": "sliding"}),
                         ("default, cpu fp32 (onnxruntime)", {"device": "cpu", "precision": "fp32"}),
                         ("default, cpu auto (int8 where the bundle has a checked variant)", {"device": "cpu"})]:
            _, t, rep = run(big, tmpd / f"slide-{len(res['throughput'])}.tif", model="nuclei-he", **o)
            row = {"variant": label, "seconds": round(t, 2), "mpixel_per_s": round(mpx / t, 2), "info": rep["info"]}
            res["throughput"].append(row)
            print(json.dumps(row), flush=True)
    res["parity_ok"] = bool(ok)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
