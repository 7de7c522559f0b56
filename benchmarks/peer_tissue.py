"""The fair peer of issue 30: MONAI's sliding window over the tissue only, as a user would script it.

* tissue: Otsu on the grey level of the slide's lowest pyramid level (``series[0].levels[-1]``; a pyramid-less
  TIFF uses level 0 read whole), tissue = darker than the threshold, small specks (< 0.05 % of that level's
  pixels) dropped, gaps closed (a binary closing of about 64 level-0 pixels) and holes filled; one box per connected component, scaled to level 0 (a level pixel covers
  ``f × f`` level-0 pixels, so a box's edges are multiples of ``f``), clipped to the slide;
* per box: level 0 of the box read (only its JPEG tiles decoded), uint8/255 as one float32 tensor,
  ``monai.inferers.sliding_window_inference`` (roi 256², overlap 0.25, gaussian) with the bundle's ``fine``
  network in torch fp32 (2 threads), mask = blended logits > logit(threshold);
* the mask is written as a tiled zlib TIFF, tile by tile from the boxes' masks (never a full-size array).

Used by ``bench_monai.py --variants monai-tissue`` (its worker mode ``--worker-monai-tissue IN OUT``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def tissue_boxes(path: Path) -> tuple[np.ndarray, dict]:
    """Level-0 boxes ``(N, 4)`` [y0, x0, y1, x1] of the tissue found by Otsu on the lowest pyramid level."""
    import tifffile
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        H, W = levels[0].shape[:2]
        low = levels[-1].asarray()
    h, w = low.shape[:2]
    grey = low[..., :3].astype(np.float32).mean(axis=-1)
    t = float(threshold_otsu(grey))
    fy, fx = H / h, W / w
    r = max(2, round(64 / fy))  # close gaps up to ~64 level-0 px (16 µm at 0.25 µm/px): pale areas stay in
    tissue = ndimage.binary_fill_holes(ndimage.binary_closing(grey < t, iterations=r, border_value=0))
    lab, n = ndimage.label(tissue)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or sizes[i] < 5e-4 * h * w:
            continue
        y0, y1 = int(np.floor(sl[0].start * fy)), min(H, int(np.ceil(sl[0].stop * fy)))
        x0, x1 = int(np.floor(sl[1].start * fx)), min(W, int(np.ceil(sl[1].stop * fx)))
        boxes.append([y0, x0, y1, x1])
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    return b, {"level_shape": [h, w], "factor": round(fy, 3), "otsu": round(t, 1), "closing_px": r, "components": int(n),
               "boxes": len(b), "tissue_fraction_of_level": round(float(tissue.mean()), 4),
               "box_mpixels": round(float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum()) / 1e6, 2)}


def write_mask(out: Path, shape: tuple[int, int], boxes: np.ndarray, masks: list[np.ndarray], tile: int = 512) -> None:
    """A tiled zlib uint8 TIFF of ``shape``: 0 everywhere but inside ``boxes``, where ``masks`` are pasted."""
    import tifffile

    H, W = shape

    def tiles():
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                t = np.zeros((tile, tile), np.uint8)
                for (y0, x0, y1, x1), m in zip(boxes.tolist(), masks, strict=True):
                    a0, a1, b0, b1 = max(y, y0), min(y + tile, y1), max(x, x0), min(x + tile, x1)
                    if a0 < a1 and b0 < b1:
                        t[a0 - y : a1 - y, b0 - x : b1 - x] |= m[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
                yield t

    tifffile.imwrite(out, tiles(), shape=(H, W), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="minisblack")


def worker_monai_tissue(inp: Path, out: Path, sw_batch: int, torch_setup, read_region, roi: int,
                        overlap: float) -> dict:
    """Otsu boxes, then ``sliding_window_inference`` box by box; writes the mask, returns a report."""
    import tifffile
    from monai.inferers import sliding_window_inference

    t0 = time.perf_counter()
    torch, bundle, net = torch_setup()
    assert bundle.normalization == {"kind": "dtype"}, bundle.normalization
    threshold = float(bundle.params.get("threshold", 0.5)) if isinstance(bundle.params, dict) else 0.5
    zt = float(np.log(threshold / (1 - threshold)))  # sigmoid(z) > t  <=>  z > logit(t)
    t_load = time.perf_counter()
    boxes, tinfo = tissue_boxes(inp)
    with tifffile.TiffFile(inp) as tf:
        H, W = tf.series[0].levels[0].shape[:2]
    t_tissue = time.perf_counter()
    windows = [0]

    def predictor(b):
        windows[0] += int(b.shape[0])
        return net(b)

    masks, t_read, t_inf = [], 0.0, 0.0
    with torch.inference_mode():
        for y0, x0, y1, x1 in boxes.tolist():
            a = time.perf_counter()
            x = torch.from_numpy(read_region(inp, y0, x0, y1 - y0, x1 - x0)[..., :3]).permute(2, 0, 1)[None]
            x = x.float().div_(255.0)
            b = time.perf_counter()
            logits = sliding_window_inference(x, roi_size=(roi, roi), sw_batch_size=sw_batch, predictor=predictor,
                                              overlap=overlap, mode="gaussian")
            masks.append((logits[0, 0] > zt).numpy().astype(np.uint8))
            t_read += b - a
            t_inf += time.perf_counter() - b
    t_boxes = time.perf_counter()
    write_mask(out, (H, W), boxes, masks)
    t_end = time.perf_counter()
    return {"shape": [H, W], "windows": windows[0], "sw_batch_size": sw_batch, "threshold": threshold,
            "tissue": tinfo, "boxes": boxes.tolist(),
            "seconds": {"setup": round(t_load - t0, 2), "tissue": round(t_tissue - t_load, 2),
                        "read_and_tensor": round(t_read, 2), "sliding_window_inference": round(t_inf, 2),
                        "boxes_total": round(t_boxes - t_tissue, 2), "write": round(t_end - t_boxes, 2),
                        "total": round(t_end - t0, 2)}}
