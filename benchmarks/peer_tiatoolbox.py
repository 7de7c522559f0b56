"""tiatoolbox's SemanticSegmentor as a peer (issue 30): run with tiatoolbox's own Python, not segcli's.

tiatoolbox pins its own torch (2.1.3: torch 2.12 with its CUDA wheels, 6.5 GB installed; with torch 2.13 pinned pip
falls back to tiatoolbox 1.3.2, whose torchvision has no CPU build here), so it lives in a separate environment
and segcli is never imported here. The network is ``nuclei-he``'s fine U-Net with its object
logit (``bench_monai._ObjectLogit``), traced to TorchScript by ``bench_monai.py`` in segcli's environment:

    python3 -m venv TIA && TIA/bin/pip install tiatoolbox "setuptools<81"
    TIA/bin/python benchmarks/peer_tiatoolbox.py SLIDE MASK.tif --model NET.pt --threshold 0.5

Settings as the other peers: 256² patches at the slide's baseline resolution, stride 192 (overlap 0.25), batch 8,
2 threads, tiatoolbox's own tissue mask (``auto_generate_mask``, Otsu on a thumbnail); tiatoolbox merges the
overlapping patches' probabilities. The mask (probability > threshold) is written as a tiled uint8 TIFF. One JSON
line on stdout: windows, the tissue mask's share, timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("mask", type=Path)
    ap.add_argument("--model", type=Path, required=True, help="TorchScript of the network (object logit)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    import tifffile
    import torch
    import zarr
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.models.models_abc import ModelABC

    torch.set_num_threads(args.threads)
    net = torch.jit.load(str(args.model)).eval()
    windows = [0]

    class Peer(ModelABC):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):  # noqa: ANN001
            return self.net(x)

        @staticmethod
        def infer_batch(model, batch_data, *, device="cpu"):  # noqa: ANN001, ARG004
            x = batch_data.to(dtype=torch.float32).permute(0, 3, 1, 2).div_(255.0)  # the bundle's value / 255
            windows[0] += int(x.shape[0])
            with torch.inference_mode():
                p = torch.sigmoid(model(x))
            return torch.cat([1.0 - p, p], 1).permute(0, 2, 3, 1).numpy()  # background, object

    io = IOSegmentorConfig(input_resolutions=[{"units": "baseline", "resolution": 1.0}],
                           output_resolutions=[{"units": "baseline", "resolution": 1.0}],
                           patch_input_shape=[256, 256], patch_output_shape=[256, 256], stride_shape=[192, 192],
                           save_resolution={"units": "baseline", "resolution": 1.0})
    seg = SemanticSegmentor(model=Peer(), batch_size=args.batch, num_workers=0, device="cpu", verbose=False)
    work = Path(tempfile.mkdtemp(prefix="tia-"))
    t_setup = time.perf_counter()
    try:
        out = seg.run([args.slide], patch_mode=False, ioconfig=io, save_dir=work / "out", output_type="zarr",
                      auto_get_mask=True, return_probabilities=True)
        t_pred = time.perf_counter()
        path = next(iter(out.values())) if isinstance(out, dict) else out[0]
        store = zarr.open(str(path), mode="r")
        prob = store["probabilities"]
        with tifffile.TiffFile(args.slide) as tf:
            H, W = tf.pages[0].shape[:2]
        tile = 512

        def tiles():
            for y in range(0, H, tile):
                band = np.zeros((min(tile, H - y), W), bool)
                got = np.asarray(prob[y : min(y + tile, H, prob.shape[0]), : min(W, prob.shape[1]), 1])
                band[: got.shape[0], : got.shape[1]] = got > args.threshold
                for x in range(0, W, tile):
                    t = np.zeros((tile, tile), np.uint8)
                    b = band[:, x : x + tile]
                    t[: b.shape[0], : b.shape[1]] = b
                    yield t

        tifffile.imwrite(args.mask, tiles(), shape=(H, W), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                         metadata=None)
        t_end = time.perf_counter()
        keys, shape = sorted(store.keys()), list(prob.shape)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"shape": [H, W], "windows": windows[0], "threshold": args.threshold, "zarr": keys,
                      "probabilities_shape": shape,
                      "seconds": {"setup": round(t_setup - t0, 2), "predict": round(t_pred - t_setup, 2),
                                  "write": round(t_end - t_pred, 2), "total": round(t_end - t0, 2)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
