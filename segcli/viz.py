"""Pictures a person looks at: mask previews (``--preview``), error maps, ARSM resolution maps (``--arsm-maps``).

A preview is the fastest way to see that a mask landed on the anatomy and not one voxel off. Each class is
drawn as a full-opacity contour over a light fill, in a colour-blind-safe colour (Okabe-Ito), with a legend
giving class names and areas or volumes. A small image is shown beside its overlay; a large one is
downscaled first and its contours are traced on the downscaled mask, so they stay visible. A volume shows a
few axial slices through the segmented region, each labelled with its slice index, windowed the way the
bundle normalises intensities. :func:`error_preview` draws false positives and false negatives against a
ground truth for ``segcli evaluate``. Every PNG is written to a temporary file and renamed into place.

Only numpy, scipy.ndimage and Pillow are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segcli import io
from segcli.bundle import load_bundle
from segcli.drawing import (
    ERROR_ALPHA,
    FN_COLOUR,
    FP_COLOUR,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_SIDE,
    PAIR_MAX_SIDE,
    RES_COLOURS,
    SIDE_BY_SIDE_WIDTH,
    SLICE_MAX_SIDE,
    SLICE_MIN_SIDE,
    TP_COLOUR,
    LegendEntry,
    Preview,
    amount_text,
    blend,
    compose,
    contour_width,
    draw_plane,
    edges,
    label_counts,
    legend_entries,
    paint_labels,
    to_rgb8,
    window_for,
)
from segcli.errors import SegcliError
from segcli.io import is_image_path
from segcli.io.atomic import atomic_path, split_extension

#: ``compact`` previews (a batch's --preview): panel sides half those of a standalone preview.
COMPACT_PAIR_SIDE, COMPACT_MAX_SIDE, COMPACT_MIN_SIDE = 320, 480, 192


def _array_of(image: Any) -> np.ndarray:
    return image.array if hasattr(image, "array") else np.asarray(image)


def _file_slice(image: Any, z: int, n: int) -> tuple[str, int]:
    """The axis letter and index in the file's own voxel order of canonical axial slice ``z``."""
    perm = getattr(image, "meta", {}).get("signed_perm") if hasattr(image, "meta") else None
    try:
        p = np.asarray(perm, dtype=float)
        a = int(np.flatnonzero(p[:, 2])[0])  # the original sitk axis that canonical z comes from
        return "xyz"[a], (z if p[a, 2] > 0 else n - 1 - z)
    except (TypeError, ValueError, IndexError):
        return "z", z


def _pick_slices(score: np.ndarray, n: int) -> list[int]:
    """``n`` slices evenly spaced through the slices with ``score`` > 0, or through all of them."""
    zs = np.flatnonzero(score > 0)
    lo, hi = (int(zs[0]), int(zs[-1])) if len(zs) else (0, len(score) - 1)
    if hi - lo + 1 <= n:
        return list(range(lo, hi + 1))
    picks = np.linspace(lo, hi, n + 2)[1:-1] if len(zs) else np.linspace(lo, hi, n)
    return sorted({int(round(v)) for v in picks})


def _spacing_of(image: Any, spacing: Sequence[float] | None) -> tuple[float, ...] | None:
    if spacing is not None:
        return tuple(float(s) for s in spacing)
    sp = getattr(image, "spacing", None)
    return tuple(float(s) for s in sp) if sp else None


def render_preview(image: Any, labels: np.ndarray, *, classes: Sequence[str] | None = None,
                   spacing: Sequence[float] | None = None, normalization: dict[str, Any] | None = None,
                   title: str = "", n_slices: int = 4, compact: bool = False) -> Preview:
    """Draw the preview of ``labels`` over ``image`` in memory.

    ``image`` is an array (H, W[, C]) or (Z, Y, X[, C]) or a :class:`segcli.io.LoadedImage` (whose spacing
    and orientation are then used); ``classes`` names class ids (index 0 = background, never drawn);
    ``normalization`` is the bundle's spec and chooses the display window. ``compact`` (a batch's
    ``--preview``) draws at half the size: a quarter of the pixels to blend, trace and compress.
    """
    arr = _array_of(image)
    pair_side, max_side, min_side = (COMPACT_PAIR_SIDE, COMPACT_MAX_SIDE, COMPACT_MIN_SIDE) if compact \
        else (PAIR_MAX_SIDE, MAX_SIDE, MIN_SIDE)
    labels = np.asarray(labels)
    if labels.ndim == arr.ndim:  # image without a channel axis
        arr = arr[..., None]
    if labels.ndim not in (2, 3) or arr.shape[: labels.ndim] != labels.shape:
        raise ValueError(f"mask shape {labels.shape} does not match image shape {arr.shape}")
    sp = _spacing_of(image, spacing)
    entries = legend_entries(labels, classes, sp)
    empty = not any(e.count for e in entries)
    win = window_for(arr, normalization)
    banner = "nothing found"
    notes = [banner] if empty else []
    if classes and classes[0].lower() not in ("background", "bg", "0"):
        notes.append(f"class 0 ({classes[0]}) is not drawn")
    if labels.ndim == 2:
        h, w = labels.shape
        if w < SIDE_BY_SIDE_WIDTH and not compact:  # a batch's preview: the overlay alone, half the pixels
            rgb, lab = draw_plane(arr, labels, sp, pair_side, min_side, win)
            ov = rgb.copy()
            paint_labels(ov, lab)
            panels = [(rgb, "image", "", (h, w), None), (ov, "overlay", "", (h, w), None)]
            layout = "side-by-side"
        else:
            rgb, lab = draw_plane(arr, labels, sp, max_side, min_side, win)
            paint_labels(rgb, lab)
            panels = [(rgb, "overlay", "", (h, w), None)]
            layout = "overlay"
            if rgb.shape[1] < w:
                notes.append(f"shown at {rgb.shape[1] / w:.2g}× of {w}×{h} px; contours traced at this scale")
        picture, placed, box, texts = compose(panels, title, entries, notes, [len(panels) - 1] if empty else [],
                                              banner)
        return Preview(picture, title, entries, placed, box, texts, empty, [], None, layout)
    nz = labels.shape[0]
    score = (labels.reshape(nz, -1) > 0).sum(1)
    picks = _pick_slices(score, n_slices)
    panels = []
    for z in picks:
        rgb, lab = draw_plane(arr[z], labels[z], sp, SLICE_MAX_SIDE, SLICE_MIN_SIDE, win)
        paint_labels(rgb, lab)
        axis, k = _file_slice(image, z, nz)
        panels.append((rgb, "overlay", f"{axis}={k}/{nz}", labels.shape[1:], z))
    unit = " HU (the bundle's CT window)" if (normalization or {}).get("kind") == "ct_window" else ""
    notes.append(f"{'volumes' if sp else 'voxel counts'} over all {nz} slices; "
                 f"grey levels {win[0]:.4g} to {win[1]:.4g}{unit}")
    banner_on = list(range(len(panels))) if empty else []
    picture, placed, box, texts = compose(panels, title, entries, notes, banner_on, banner)
    return Preview(picture, title, entries, placed, box, texts, empty, picks, None, "slices")


def _as_image(pixels: Any) -> Any:
    """A Pillow image of ``pixels`` (an RGB array, or already an image)."""
    # lazy: Pillow loads only where a picture is read or written
    from PIL import Image

    return pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels))


def save_png(pixels: Any, out_png: str | Path, level: int = 3, durable: bool = True) -> Path:
    """Write an RGB array as PNG atomically (temporary file beside it, then ``os.replace``); ``level`` is
    zlib's (1 for a batch's compact previews: 1.1x the bytes of level 3 in half the time); ``durable=False``
    (a batch's previews) skips the fsync."""
    out_png = Path(out_png)
    with atomic_path(out_png, durable=durable) as tmp:
        # zlib level 3: 1.2x the bytes of optimize=True in 1/20 of the time (0.26 s against 5.8 s on a
        # 1364x1150 preview), which had made --preview 26x slower than the batch it illustrates
        _as_image(pixels).save(tmp, format="PNG", compress_level=level)
    return out_png


def save_jpeg(pixels: Any, out_jpg: str | Path, durable: bool = True) -> Path:
    """Write an RGB array as JPEG atomically: quality 90 without chroma subsampling, so one-pixel coloured
    contours keep their colour (1 ms and ~40 KB for a 480-px preview, against PNG's 8 ms and 140 KB)."""
    out_jpg = Path(out_jpg)
    with atomic_path(out_jpg, durable=durable) as tmp:
        _as_image(pixels).save(tmp, format="JPEG", quality=90, subsampling=0)
    return out_jpg


def preview(image: Any, labels: np.ndarray, out_path: Path, n_slices: int = 4, *,
            classes: Sequence[str] | None = None, spacing: Sequence[float] | None = None,
            normalization: dict[str, Any] | None = None, title: str = "", compact: bool = False) -> Path:
    """Write the picture of :func:`render_preview` to ``out_path`` (JPEG for ``.jpg``/``.jpeg``, else PNG)."""
    pv = render_preview(image, labels, classes=classes, spacing=spacing, normalization=normalization,
                        title=title, n_slices=n_slices, compact=compact)
    if Path(out_path).suffix.lower() in (".jpg", ".jpeg"):
        return save_jpeg(pv.image, out_path, durable=not compact)
    return save_png(pv.image, out_path, level=1 if compact else 3, durable=not compact)


# ------------------------------------------------------------------------------------------- errors


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either mask (1.0 when both are empty)."""
    cp, ct = label_counts(pred), label_counts(truth)
    ids = [c for c in range(1, 256) if cp[c] or ct[c]]
    if not ids:
        return 1.0
    scores = []
    for c in ids:
        inter = int(((pred == c) & (truth == c)).sum())
        scores.append(2.0 * inter / (cp[c] + ct[c]))
    return float(np.mean(scores))


def _as_ids(a: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Class ids of a mask; a 0/255 binary mask against a 0/1 one is read as 0/1 (as evaluate does)."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1 and other.ndim == 2:
        a = a[..., 0]
    if a.dtype.kind == "f":
        a = np.rint(a)
    if a.max(initial=0) == 255 and np.all((a == 0) | (a == 255)) and np.asarray(other).max(initial=0) <= 1:
        return (a > 0).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _paint_errors(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray) -> None:
    """Fill false positives and negatives, outline the correctly found region, on the drawn plane."""
    t = contour_width(*pred.shape)
    tp = (pred > 0) & (pred == truth)
    fp = (pred > 0) & (pred != truth)
    fn = (truth > 0) & (pred == 0)
    for m, col in ((fp, FP_COLOUR), (fn, FN_COLOUR)):
        e = edges(m, 1)
        blend(rgb, m & ~e, col, ERROR_ALPHA)
        rgb[e] = col
    rgb[edges(tp, max(1, t - 1))] = TP_COLOUR


def error_preview(image: Any, pred: np.ndarray, truth: np.ndarray, classes: Sequence[str] | None,
                  out_path: str | Path | None, *, spacing: Sequence[float] | None = None,
                  normalization: dict[str, Any] | None = None, title: str = "", n_slices: int = 4,
                  fov: np.ndarray | None = None) -> Preview:
    """Where a prediction fails: false positives (magenta) and false negatives (cyan) over the image, the
    correctly found region outlined (yellow), a legend with their areas and the image's Dice in the title.

    A pixel predicted as the wrong class counts as a false positive. ``image`` may be None (a grey
    background). With a field-of-view mask ``fov`` (as ``evaluate --fov``), only pixels inside it are scored
    and the outside is shown darkened. Writes ``out_path`` atomically unless it is None; returns what was drawn (``.path`` set).
    """
    arr, pred_a, truth_a = _error_inputs(image, pred, truth)
    sp = _spacing_of(image, spacing)
    outside = None
    if fov is not None:
        inside = np.asarray(fov).reshape(pred_a.shape) > 0
        outside = ~inside
        pred_a, truth_a = np.where(inside, pred_a, 0).astype(np.uint8), np.where(inside, truth_a, 0).astype(np.uint8)
    fp = (pred_a > 0) & (pred_a != truth_a)
    fn = (truth_a > 0) & (pred_a == 0)
    tp = (pred_a > 0) & (pred_a == truth_a)
    total = pred_a.size
    nd = pred_a.ndim
    entries = [
        LegendEntry(1, "false positive", FP_COLOUR, amount_text(int(fp.sum()), total, sp, nd), int(fp.sum())),
        LegendEntry(2, "false negative", FN_COLOUR, amount_text(int(fn.sum()), total, sp, nd), int(fn.sum())),
        LegendEntry(3, "correct (outline)", TP_COLOUR, amount_text(int(tp.sum()), total, sp, nd), int(tp.sum())),
    ]
    dice, full_title, notes = _dice_title(pred_a, truth_a, classes, title)
    win = window_for(arr, normalization)
    if outside is not None and outside.any():
        arr = to_rgb8(arr, win)
        arr[outside] //= 3
        win = (0.0, 255.0)
        notes.append("outside the field of view: darkened, not scored")
    nothing = not (fp.any() or fn.any() or tp.any())
    if nd == 2:
        panels, picks, layout = _error_panels_2d(image, arr, pred_a, truth_a, sp, win)
    else:
        panels, picks, layout = _error_panels_slices(image, arr, pred_a, truth_a, fp | fn, sp, win, n_slices)
    banner_on = [i for i, p in enumerate(panels) if p[1] == "errors"] if nothing else []
    picture, placed, box, texts = compose(panels, full_title, entries, notes, banner_on, "nothing in either mask")
    pv = Preview(picture, full_title, entries, placed, box, texts, nothing, picks, dice, layout)
    if out_path is not None:
        pv.path = save_png(picture, out_path)
    return pv


def _error_inputs(image: Any, pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image (grey when None) channel-last, and both masks as class ids; shapes must agree."""
    pred_a = np.asarray(pred)
    truth_a = np.asarray(truth)
    pred_a, truth_a = _as_ids(pred_a, truth_a), _as_ids(truth_a, pred_a)
    if pred_a.shape != truth_a.shape:
        raise ValueError(f"prediction {pred_a.shape} and ground truth {truth_a.shape} differ in shape")
    if image is None:
        arr = np.full((*pred_a.shape, 1), 96, np.uint8)
    else:
        arr = _array_of(image)
        if arr.ndim == pred_a.ndim:
            arr = arr[..., None]
        if arr.shape[: pred_a.ndim] != pred_a.shape:
            raise ValueError(f"image {arr.shape} and masks {pred_a.shape} differ in shape")
    return arr, pred_a, truth_a


def _dice_title(pred_a: np.ndarray, truth_a: np.ndarray, classes: Sequence[str] | None,
                title: str) -> tuple[float, str, list[str]]:
    """The image's Dice, the title that shows it, and a note with each class's Dice when there are several."""
    dice = _dice(pred_a, truth_a)
    names = list(classes) if classes else None
    per_class = []
    if names and len(names) > 2:
        for c in range(1, len(names)):
            if (pred_a == c).any() or (truth_a == c).any():
                d = _dice((pred_a == c).astype(np.uint8), (truth_a == c).astype(np.uint8))
                per_class.append(f"{names[c]} {d:.3f}")
    head = f"{title} · " if title else ""
    full_title = f"{head}Dice {dice:.3f}" + (f" (mean of {len(per_class)} classes)" if per_class else "")
    notes = ["Dice per class: " + ", ".join(per_class)] if per_class else []
    return dice, full_title, notes


def _error_panels_2d(image: Any, arr: np.ndarray, pred_a: np.ndarray, truth_a: np.ndarray,
                     sp: tuple[float, ...] | None, win: tuple[float, float]) -> tuple[list[Any], list[int], str]:
    """A 2D image's errors panel, beside the plain image when it is narrow enough."""
    h, w = pred_a.shape
    side = w < SIDE_BY_SIDE_WIDTH
    ms = PAIR_MAX_SIDE if side else MAX_SIDE
    rgb, lab = draw_plane(arr, pred_a, sp, ms, MIN_SIDE, win)
    _, tru = draw_plane(arr[..., :1], truth_a, sp, ms, MIN_SIDE, (0.0, 1.0))
    ov = rgb.copy()
    _paint_errors(ov, lab, tru)
    panels = [(rgb, "image", "", (h, w), None)] if side and image is not None else []
    panels.append((ov, "errors", "", (h, w), None))
    return panels, [], "side-by-side" if len(panels) == 2 else "overlay"


def _error_panels_slices(image: Any, arr: np.ndarray, pred_a: np.ndarray, truth_a: np.ndarray, wrong: np.ndarray,
                         sp: tuple[float, ...] | None, win: tuple[float, float],
                         n_slices: int) -> tuple[list[Any], list[int], str]:
    """A volume's errors on the slices with the most of them, in slice order; else evenly through the masks."""
    nz = pred_a.shape[0]
    err = wrong.reshape(nz, -1).sum(1)
    picks = (sorted(int(z) for z in np.argsort(-err, kind="stable")[:n_slices] if err[z] > 0)
             or _pick_slices(((pred_a > 0) | (truth_a > 0)).reshape(nz, -1).sum(1), n_slices))
    panels = []
    for z in picks:
        rgb, lab = draw_plane(arr[z], pred_a[z], sp, SLICE_MAX_SIDE, SLICE_MIN_SIDE, win)
        _, tru = draw_plane(arr[z][..., :1], truth_a[z], sp, SLICE_MAX_SIDE, SLICE_MIN_SIDE, (0.0, 1.0))
        _paint_errors(rgb, lab, tru)
        axis, k = _file_slice(image, z, nz)
        panels.append((rgb, "errors", f"{axis}={k}/{nz}", pred_a.shape[1:], z))
    return panels, picks, "slices"


def find_source_image(case: str, folders: Sequence[str | Path]) -> Path | None:
    """The image file named ``case`` (any image extension) in the first of ``folders`` that has one."""
    for d in folders:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and not p.name.startswith(".") and split_extension(p.name)[0] == case and is_image_path(p):
                return p
    return None


def write_error_previews(result: dict[str, Any], out_dir: str | Path, *, images: str | Path | None = None,
                         log: Callable[[str], None] | None = None) -> list[Path]:
    """``segcli evaluate --preview DIR``: one ``CASE_errors.png`` per scored case of an :func:`evaluate` result.

    The picture is drawn over the case's source image, looked up by name in ``images``, or else beside the
    ground-truth folder and in the prediction folder; without one, over grey. The case's spacing and
    field-of-view mask (``fov_dir``) come from the result. A case that cannot be drawn is
    reported through ``log`` and skipped.
    """
    classes_map = result.get("classes") or {}
    classes = [classes_map[k] for k in sorted(classes_map, key=int)] if classes_map else None
    out_dir = Path(out_dir)
    written = []
    unfound: list[str] = []
    folders: list[Any] = []
    for case in result.get("cases", []):
        name = case["case"]
        try:
            pred_img = io.open_image(case["prediction"])
            truth_img = io.open_image(case["ground_truth"])
            folders = [images] if images is not None else source_folders(Path(case["prediction"]).parent,
                                                                           Path(case["ground_truth"]).parent)
            src = find_source_image(name, folders)
            if src is None:
                unfound.append(name)
            image = io.open_image(src) if src is not None else None
            if image is not None and image.spatial_shape != truth_img.spatial_shape:
                image = None
            if int(np.prod(truth_img.spatial_shape)) > MAX_PIXELS:
                raise ValueError("image too large for a preview")
            fov = None
            if result.get("fov_dir"):
                fov_path = find_source_image(name, [result["fov_dir"]])
                fov = io.open_image(fov_path).array[..., 0] if fov_path is not None else None
            sp = case.get("spacing") or truth_img.spacing
            pv = error_preview(image, pred_img.array[..., 0], truth_img.array[..., 0], classes,
                               out_dir / f"{name}_errors.png", spacing=sp, title=name, fov=fov)
            written.append(pv.path)
        except (SegcliError, ValueError, OSError) as exc:
            if log:
                log(f"case {name}: no error preview: {exc}")
    if unfound and log:
        where = ", ".join(str(f) for f in folders) if images is None else str(images)
        log(f"{len(unfound)} error map(s) drawn over grey: no source image named like case {unfound[0]!r} in {where}; "
            "pass --images FOLDER")
    return written


def source_folders(pred_dir: Path, gt_dir: Path) -> list[Path]:
    """Where an error map's source image may be when --images is not given: ``images/`` beside the
    prediction or ground-truth folder (the layout of nnU-Net, MONAI and segcli's own examples), the
    predictions folder itself (``segcli predict`` writes NAME_seg.png beside NAME.png), then the parents."""
    out: list[Path] = []
    for d in (pred_dir.parent / "images", gt_dir.parent / "images", pred_dir, gt_dir.parent, pred_dir.parent):
        if d not in out and d.resolve() != gt_dir.resolve():
            out.append(d)
    return out


# ------------------------------------------------------------------------------------------- ARSM maps


def arsm_maps(module: Any, x: np.ndarray, classes: list[str], out_dir: Path, stem: str) -> list[Path]:
    """Per class, a PNG coloured by the resolution the ARSM gate picked (dark red = full resolution).

    ``x`` is the normalised rough-pass input ``(C, H, W)``. Raises ValueError for a network with no gate.
    """
    # lazy: torch costs ~1.3 s to import
    import torch

    if not hasattr(module, "gate_maps"):
        raise ValueError("the coarse network has no ARSM gate (train with --arch arsm)")
    with torch.no_grad():
        idx = module.gate_maps(torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32)))[0].numpy()
    names = classes if idx.shape[0] == len(classes) else [classes[-1]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [save_png(RES_COLOURS[idx[k]], out_dir / f"{stem}_arsm_{k}_{name}.png") for k, name in enumerate(names)]


# ------------------------------------------------------------------------------------------- CLI hooks


def _bundle_info(report: Any, segmenter: Any, kind: str) -> tuple[list[str] | None, dict[str, Any] | None]:
    """Class names and normalisation for a report: from the segmenter's bundle, else a shipped bundle of
    the report's model name whose classes match, else names from the report and no normalisation."""
    names = list(getattr(report, "voxel_counts", {}) or {})
    bundle = None
    ran = getattr(report, "model", None)
    if segmenter is not None:  # the bundle that ran (the content of the input chose it), not a default by kind
        loaded = [b for b in segmenter.bundles if b.name == ran]
        if loaded:
            bundle = loaded[0]
        elif ran is None:
            try:
                bundle = segmenter.bundle_for(kind)
            except Exception:  # noqa: BLE001 - best effort: fall back to the report's names
                bundle = None
    if bundle is None and getattr(report, "model", None):
        try:
            b = load_bundle(report.model)
            bundle = b if b.output_classes[1:] == names else None
        except Exception:  # noqa: BLE001
            bundle = None
    if bundle is not None:
        return list(bundle.output_classes), dict(bundle.normalization)
    return (["background", *names] if names else None), None


def write_preview_for(report: Any, *, segmenter: Any = None, normalization: dict[str, Any] | None = None
                      ) -> Path | None:
    """The ``--preview`` picture beside a finished mask (``NAME_seg_preview.jpg``); None if not applicable.

    Pass the ``segmenter`` (``segcli.api.Segmenter``) that made the report so that the display window
    follows its bundle's normalisation; without it a shipped bundle of the report's model name is used.
    """
    if report.status not in ("ok", "empty") or not report.output:
        return None
    img = io.open_image(report.input)
    if int(np.prod(img.spatial_shape)) > MAX_PIXELS:
        raise ValueError("image too large for a preview")
    mask = io.open_image(report.output).array[..., 0]
    classes, norm = _bundle_info(report, segmenter, "volume" if img.ndim == 3 else "2d")
    out = Path(report.output)
    stem = split_extension(out.name)[0]
    model = getattr(report, "model", None)
    method = getattr(report, "method", None)
    title = Path(report.input).name + (f" · {model}" if model else "") + (f" ({method})" if method else "")
    return preview(img, mask, out.with_name(f"{stem}_preview.jpg"), classes=classes,
                   normalization=normalization or norm, title=title)


def write_arsm_maps_for(segmenter: Any, path: Path, out_dir: Path) -> list[Path]:
    """``--arsm-maps``: gate maps of the bundle's coarse network on the rough-pass input of ``path``.

    Volumes use their middle slice along the slicing axis.
    """
    # lazy: brings scipy
    from segcli.engines.base import ArrayPlane, rough_input
    from segcli.geometry import slice_axis

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
    stem = split_extension(Path(path).name)[0]
    module = bundle.load_module("coarse")
    return arsm_maps(module, rough, bundle.classes, out_dir, stem)
