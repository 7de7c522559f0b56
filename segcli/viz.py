"""Pictures a person looks at: mask overlays (``--preview``) and ARSM resolution maps (``--arsm-maps``).

A preview is the fastest way to see that a mask landed on the anatomy and not one voxel off; the
ARSM maps show, per class, which resolution branch the gate chose (the paper's Figures 7-8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segcli.resize import resize

# Distinct colours for up to 10 classes (class 0 is never drawn).
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.float32)
RES_COLOURS = np.array([[215, 48, 39], [252, 141, 89], [145, 191, 219], [69, 117, 180]], dtype=np.uint8)
MAX_SIDE = 768


def _to_rgb8(img: np.ndarray) -> np.ndarray:
    """(H, W, C) of any dtype → uint8 RGB with a 1-99 percentile stretch per image."""
    a = img.astype(np.float32)
    if a.shape[-1] == 1 or a.shape[-1] == 2:
        a = np.repeat(a[..., :1], 3, axis=-1)
    a = a[..., :3]
    lo, hi = np.percentile(a[np.isfinite(a)], [1, 99]) if np.isfinite(a).any() else (0.0, 1.0)
    a = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return (np.nan_to_num(a) * 255).astype(np.uint8)


def overlay(img: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB picture of ``img`` (H, W, C) with ``labels`` blended in and their outlines drawn."""
    from scipy import ndimage

    h, w = labels.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    rgb = _to_rgb8(np.moveaxis(resize(np.moveaxis(img, -1, 0), (oh, ow), "area"), 0, -1)).astype(np.float32)
    lab = labels
    if (oh, ow) != (h, w):
        ys = (np.arange(oh) * h // oh).astype(int)
        xs = (np.arange(ow) * w // ow).astype(int)
        lab = labels[np.ix_(ys, xs)]
    colours = PALETTE[np.minimum(lab, len(PALETTE) - 1)]
    fg = lab > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
    edge = fg & ~ndimage.binary_erosion(fg)
    rgb[edge] = colours[edge]
    return rgb.astype(np.uint8)


def preview(image: Any, labels: np.ndarray, out_png: Path, n_slices: int = 3) -> Path:
    """Write a PNG overlay; a volume shows ``n_slices`` slices through the labelled region side by side."""
    from PIL import Image

    from segcli.io.atomic import atomic_path

    arr = image.array if hasattr(image, "array") else image
    if labels.ndim == 2:
        pic = overlay(arr, labels)
    else:
        zs = np.nonzero(labels.reshape(labels.shape[0], -1).any(1))[0]
        lo, hi = (int(zs[0]), int(zs[-1])) if len(zs) else (0, labels.shape[0] - 1)
        picks = np.unique(np.linspace(lo, hi, n_slices + 2)[1:-1].round().astype(int)) if hi > lo else [lo]
        tiles = [overlay(arr[z], labels[z]) for z in picks]
        hmax = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, hmax - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
        pic = np.concatenate(tiles, axis=1)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        Image.fromarray(pic).save(tmp, format="PNG")
    return out_png


def arsm_maps(module: Any, x: np.ndarray, classes: list[str], out_dir: Path, stem: str) -> list[Path]:
    """Per class, a PNG coloured by the resolution the ARSM gate picked (dark red = full resolution).

    ``x`` is the normalised rough-pass input ``(C, H, W)``. Raises ValueError for a network with no gate.
    """
    import torch
    from PIL import Image

    from segcli.io.atomic import atomic_path

    if not hasattr(module, "gate_maps"):
        raise ValueError("the coarse network has no ARSM gate (train with --arch arsm)")
    with torch.no_grad():
        idx = module.gate_maps(torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32)))[0].numpy()
    names = classes if idx.shape[0] == len(classes) else [classes[-1]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(names):
        p = out_dir / f"{stem}_arsm_{k}_{name}.png"
        with atomic_path(p) as tmp:
            Image.fromarray(RES_COLOURS[idx[k]]).save(tmp, format="PNG")
        paths.append(p)
    return paths


def write_preview_for(report: Any) -> Path | None:
    """The ``--preview`` PNG beside a finished mask (``NAME_seg_preview.png``); None if not applicable."""
    from segcli import io

    if report.status not in ("ok", "empty") or not report.output:
        return None
    img = io.open_image(report.input)
    if int(np.prod(img.spatial_shape)) > 200_000_000:
        raise ValueError("image too large for a preview")
    mask = io.open_image(report.output).array[..., 0]
    out = Path(report.output)
    name = out.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".tif", ".tiff", ".png"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return preview(img, mask, out.with_name(f"{name}_preview.png"))


def write_arsm_maps_for(segmenter: Any, path: Path, out_dir: Path) -> list[Path]:
    """``--arsm-maps``: gate maps of the bundle's coarse network on the rough-pass input of ``path``.

    Volumes use their middle slice along the slicing axis.
    """
    from segcli import io
    from segcli.api import slice_axis
    from segcli.engines.base import ArrayPlane, rough_input

    img = io.open_image(path)
    kind = "volume" if img.ndim == 3 else "2d"
    bundle = segmenter.bundle_for(kind)
    x = segmenter.prepare(img.array, bundle, path)
    if x.ndim == 4:  # (Z, C, Y, X) → middle slice along the slicing axis
        axis = slice_axis(img.spacing)
        x = np.moveaxis(np.moveaxis(np.moveaxis(x, 1, -1), axis, 0), -1, 1)
        x = x[x.shape[0] // 2]
    size = segmenter.size or bundle.input_size
    rough, (h, w) = rough_input(ArrayPlane(x), size, bool(segmenter.param(bundle, "keep_aspect")))
    stem = Path(path).name.split(".")[0]
    module = bundle.load_module("coarse")
    paths = arsm_maps(module, rough, bundle.classes, out_dir, stem)
    return paths
