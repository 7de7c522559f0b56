"""Segment-then-segment (Benčević et al., Sensors 2023): rough pass, components, full-res crops, fine pass.

Differences from the reference code, each a deliberate fix:

* the rough pass keeps the aspect ratio (letterboxed) unless ``keep_aspect=False``;
* a padded square larger than the image is clamped to it instead of being dropped (recall hole);
* ``keep_coarse`` fills pixels that no crop reached with the rough mask (second recall hole);
* crops share the size S, so the fine pass runs in batches instead of one crop at a time;
* resizing is area-averaged when shrinking (thin objects survive) and bilinear when enlarging.

Bounded memory and scale on gigapixel images (the rule, so a bigger image is never silently worse):

* **Fusion** never holds a full-resolution float canvas: crop probabilities are max-fused into a
  :class:`~segcli.fusion.FuseStore` that keeps only the tiles crops touched (binary: 1 byte
  per pixel with exact thresholding; on disk, outside RSS, when ``spill_dir`` is given).
  Pixels no crop reached come from the rough map, upsampled per window (``keep_coarse``) or are
  background.
* **Rough pass scale**: with ``f = max(H, W) / S`` the factor between full resolution and a
  whole-image rough pass, and ``max_downscale`` the largest factor the coarse network may see (from
  the bundle's ``max_downscale``, or ``mpp_coarse / mpp_image`` when both are known), the rough
  pass runs on the whole image at S when ``f ≤ max_downscale``; otherwise it runs as a batched
  sliding window (tiles of S, 25 % overlap, Gaussian blending) over the image downscaled by
  ``max_downscale``, so a nucleus stays as many pixels wide on a 40k² slide as on a 4k² one.
* **Fine pass zoom**: a box whose side exceeds ``S × max_zoom`` is not squeezed into one S×S crop;
  it is covered by overlapping tiles of side ``S × max_zoom`` (25 % overlap), each seen at zoom
  ``max_zoom``, and each tile writes only its core (the overlaps split half-way), so tile borders
  never add false positives to the OR fusion.
* ``Result.info`` records ``rough_factor``, ``rough_tiled``, ``rough_shape``, ``boxes_tiled`` and
  ``fine_inputs`` (number of network inputs), so reports say what was done.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from segcli.engines.base import ArrayPlane, Plane, ProgressFn, Result, Timer, batched, rough_input
from segcli.engines.direct import sliding, window_weight
from segcli.fusion import (
    FUSION_RULES,
    BlendStore,
    CoarseFill,
    FuseStore,
    LazyLabels,
    fold_probs,
    foreground,
    make_fusion,
)
from segcli.geometry import (
    component_boxes,
    crop_boxes,
    scale_boxes,
    sliding_grid,
    square_pad_shift,
    valid_boxes,
)
from segcli.params import DEFAULT_PARAMS as D
from segcli.params import default_pad
from segcli.resize import letterbox, resize
from segcli.runtimes.predictor import Predictor
from segcli.tissue import box_windows, content_mask


def fine_inputs(plane: Plane, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops at full resolution, letterboxed to squares, resized to S×S: ``(N, C, S, S)``."""
    out = np.empty((len(boxes), plane.channels, size, size), dtype=np.float32)
    for i, box in enumerate(boxes):
        crop, _ = letterbox(plane.region(box))
        out[i] = resize(crop, (size, size), "area")
    return out


def paste_back(probs: np.ndarray, box: np.ndarray, foreground_only: bool = False) -> np.ndarray:
    """Undo :func:`fine_inputs` for one crop: S×S probabilities → the box's (h, w).

    Two classes: the foreground alone is resized and the background is its complement (the resize is linear
    and its weights sum to one), half the work of a photo's fusion; ``foreground_only``: ``(1, h, w)``, the
    foreground alone, for a store that keeps nothing else (max fusion of a binary task)."""
    h, w = int(box[2] - box[0]), int(box[3] - box[1])
    side = max(h, w)
    if len(probs) == 2:
        fg = resize(probs[1:2], (side, side), "bilinear")[:, :h, :w]
        return fg if foreground_only else np.concatenate([1.0 - fg, fg])
    return resize(probs, (side, side), "bilinear")[:, :h, :w]


#: The tiled rough pass takes a pyramid level as its overview when the level is at most this much coarser than
#: ``max_downscale`` (an 8000² slide's ×4 level for a ×3.91 overview: 16 tiles decoded instead of level 0's 256).
SNAP_TO_LEVEL = 1.05


def rough_pass(
    plane: Plane,
    coarse: Predictor,
    *,
    size: int,
    keep_aspect: bool = True,
    max_downscale: float | None = None,
    batch_size: int = 16,
    overlap: float = 0.25,
) -> tuple[np.ndarray, dict[str, object]]:
    """Rough probabilities ``(K, h, w)`` and what was done; tiled when the image is too big for one S pass."""
    H, W = plane.shape
    factor = max(H, W) / size
    if max_downscale is None or factor <= max_downscale:
        x, (h, w) = rough_input(plane, size, keep_aspect)
        rough = coarse(x[None])[0][:, :h, :w]
        return rough, {"rough_factor": round(factor, 3), "rough_tiled": False, "rough_shape": [h, w]}
    f = float(max_downscale)
    # a pyramid level at most 5 % coarser serves as the overview itself: no finer level decoded whole for it
    f = min([v for v in getattr(plane, "factors", []) if f <= v <= f * SNAP_TO_LEVEL] or [f])
    hw = (max(1, math.ceil(H / f)), max(1, math.ceil(W / f)))
    low, where, ginfo = _overview_and_glass(plane, hw)
    try:
        res = sliding(low, coarse, size=size, overlap=overlap, batch_size=batch_size, return_probs=True,
                      where=where)
    finally:
        if hasattr(low, "close"):
            low.close()
    assert res.probs is not None
    if where is not None:
        _glass_is_background(res.probs, where)
    info = {"rough_factor": round(max(H / hw[0], W / hw[1]), 3), "rough_tiled": True, "rough_shape": list(hw),
            "rough_tiles": res.info.get("tiles", 0), "rough_tiles_glass": res.info.get("tiles_skipped", 0), **ginfo}
    # A huge slide's rough map lives through the whole fine pass: half precision halves it (2500² × 2 classes:
    # 50 → 25 MB at 40k²); it only places crops and fills uncovered pixels, so 3 decimals are plenty.
    return res.probs.astype(np.float16), info


def _glass_is_background(probs: np.ndarray, where: np.ndarray) -> None:
    """Set the rough map to background on bare glass (``where`` False, grown by one of its pixels, a quarter
    overview pixel, so tissue edges keep their windows): the coarse network's specks on the glass around a piece
    of tissue placed fine windows there. On a 16000² slide of 13 MoNuSeg tiles nuclei-he's boundary network's
    rough map put 548 windows, 429 with this (Dice 0.8224 → 0.8216); the binary network's 350 became 351."""
    keep = np.pad(where, 1)  # grown by one pixel (8-neighbours), in numpy: the engines need no scipy
    keep = np.logical_or.reduce([keep[1 + dy : keep.shape[0] - 1 + dy, 1 + dx : keep.shape[1] - 1 + dx]
                                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    h, w = probs.shape[1:]  # each rough pixel looks up the quarter-grid pixel that holds its centre
    ry = np.minimum(((np.arange(h) + 0.5) * keep.shape[0] / h).astype(np.int64), keep.shape[0] - 1)
    rx = np.minimum(((np.arange(w) + 0.5) * keep.shape[1] / w).astype(np.int64), keep.shape[1] - 1)
    up = keep[ry[:, None], rx[None, :]]
    glass = ~up
    probs[0][glass] = 1
    probs[1:, glass] = 0


def _overview_and_glass(plane: Plane, hw: tuple[int, int]) -> tuple[Plane, np.ndarray | None, dict]:
    """The rough pass's overview at ``hw`` as a Plane, and where it is not bare glass (segcli.tissue).

    Glass is found on a quarter of the overview (not grown: on the 16000² and 8000² test-tile slides a margin
    of one quarter pixel changed Dice by < 0.001 and cost 28 more coarse tiles at 8000²). When a coarser pyramid
    level serves that quarter and the slide's normalisation needs no statistics, the overview is then made only
    where the coarse network looks (:class:`~segcli.io.lazyplane.LevelView`). Otherwise finding the glass decodes
    the overview's own level whole anyway, so the overview is made in that one pass (a slide reader keeps it in a
    temporary file, read back by region) and the glass found on it, band by band: on a 40000² slide without a
    pyramid, a glass pass and then the view by region decoded its 6084 tiles 25106 times (19.7 GB, 4.1 passes),
    most of a 148 s rough pass; its pass also sets the statistics of a normalisation that needs them.
    """
    q = (max(1, hw[0] // 4), max(1, hw[1] // 4))
    coarser = hasattr(plane, "choose_level") and plane.choose_level(q) > plane.choose_level(hw)
    if coarser and getattr(plane, "level_view", None) is not None and getattr(plane, "_stateless", False):
        where, info = content_mask(plane.downscaled(q), margin=0)
        if where is not None:
            return plane.level_view(hw), where, {**info, "overview": "by region"}
    low = plane.overview_plane(hw) if hasattr(plane, "overview_plane") else ArrayPlane(plane.downscaled(hw))
    spilled = not isinstance(low, ArrayPlane)
    try:  # a spilled overview downscales band by band (SpilledOverview.downscaled)
        where, info = content_mask(plane.downscaled(q) if coarser else low.downscaled(q), margin=0)
    except BaseException:
        if hasattr(low, "close"):
            low.close()
        raise
    return low, where, ({**info, "overview": "one pass"} if spilled else info)


def stts(
    plane: Plane,
    coarse: Predictor,
    fine: Predictor,
    *,
    size: int,
    pad: int | None = None,
    threshold: float = D["threshold"],
    keep_aspect: bool = D["keep_aspect"],
    min_side: int = D["min_side"],
    min_component: int = D["min_component"],
    keep_coarse: bool = D["keep_coarse"],
    batch_size: int = D["batch_size"],
    return_probs: bool = False,
    progress: ProgressFn | None = None,
    max_downscale: float | None = None,
    max_zoom: float | None = None,
    spill_dir: str | os.PathLike | None = None,
    lazy: bool = False,
    prefetch: bool = False,
    fusion: str = "max",
    own_margin: int | None = None,
    crop_mode: str = "components",
    overlap: float = D["overlap"],
    fuse_cache: int = 64 * 2**20,
    rough_batch: int | None = None,
    fold_boundary: tuple[int, int] | None = None,
    on_fused: Callable[[LazyLabels, int], None] | None = None,
    blend: str = D["blend"],
    look: str = "rough",
) -> Result:
    """Segment one 2D image with segment-then-segment; see the module docstring.

    ``crop_mode="grid"`` replaces the component crops by the windows of a full-resolution sliding grid (side S,
    ``overlap``) over the rough foreground, or with ``look="tissue"`` over a thumbnail's tissue as the tissue-masked
    peers place them (:func:`tissue_windows_on_thumbnail`; the rough pass where no glass is found): a sliding
    window that skips glass, in bounded memory, how a ``sliding`` bundle runs on a slide too big to hold.

    ``lazy=True`` returns :class:`~segcli.fusion.LazyLabels` (``labels.read_probs(box)``), not full-size arrays.

    ``fusion`` chooses how overlapping crops combine (:data:`~segcli.fusion.FUSION_RULES`): ``max``
    (default, the paper's OR), ``mean``, ``centre`` (Gaussian-weighted mean) or ``own-box`` (each crop
    writes only inside its object's unpadded box grown by ``own_margin`` px, default pad // 2, max
    among those). Rules other than ``max`` hold dense arrays and need ``lazy=False``. ``blend``
    (segcli.params.BLENDS): what the ``gaussian`` fusion averages (a bounded sliding run's windows).

    ``fold_boundary`` (a network's (boundary class, object class)): where to look is decided with the boundary
    added to its object, as a run without instances (folded networks) sees it: an ``--instances`` run looks alike.
    ``on_fused(labels, y)`` (with ``lazy``): called as the fine pass goes with the lazy labels it will return and
    the row above which they are final, last with the image's height (a slide's mask and instance split follow).
    """
    timer = Timer()
    H, W = plane.shape
    pad = default_pad(size) if pad is None else pad
    with timer.stage("rough"):
        seen = tissue_windows_on_thumbnail(plane, size, overlap) if crop_mode == "grid" and look == "tissue" else None
        rough, rinfo = rough_pass(plane, coarse, size=size, keep_aspect=keep_aspect, max_downscale=max_downscale,
                                  batch_size=rough_batch or batch_size) if seen is None else (_nothing(fine), seen[1])
    own = None
    with timer.stage("components"):
        fg = foreground(fold_probs(rough, fold_boundary), threshold)
        if seen is not None:
            boxes = seen[0]
        elif crop_mode == "grid":
            boxes = tissue_windows(fg, (H, W), size, overlap)
        elif fusion == "own-box":
            margin = pad // 2 if own_margin is None else int(own_margin)
            boxes, own = boxes_and_own(fg, (H, W), pad, margin, min_size=min_component, min_side=min_side)
        else:
            boxes = crop_boxes(fg, (H, W), pad, min_size=min_component, min_side=min_side)
    res = fine_pass(plane, fine, boxes, rough, size=size, threshold=threshold, keep_coarse=keep_coarse,
                    batch_size=batch_size, return_probs=return_probs, timer=timer, progress=progress,
                    max_zoom=max_zoom, spill_dir=spill_dir, lazy=lazy, prefetch=prefetch, fusion=fusion,
                    own_boxes=own, fuse_cache=fuse_cache, on_fused=on_fused, nested=fold_boundary, blend=blend)
    res.info.update(rinfo, **({"blend": blend} if fusion == "gaussian" else {}))
    if crop_mode == "grid":
        res.info["windows"] = {"kept": int(len(boxes)), "grid": int(len(sliding_grid((H, W), size, overlap)))}
    return res


def _nothing(net: Predictor) -> np.ndarray:
    """A one-pixel rough map of background, for a run whose windows were placed without a rough pass."""
    rough = np.zeros((net.n_classes, 1, 1), np.float32)
    rough[0] = 1.0
    return rough


#: The longest side of the thumbnail a bounded sliding run finds tissue on (float32 RGB: 12 MB at most).
THUMBNAIL_SIDE = 1024


def tissue_windows_on_thumbnail(plane: Plane, size: int, overlap: float) -> tuple[np.ndarray, dict[str, object]] | None:
    """The grid windows over the tissue of a brightfield slide, found on a thumbnail; None when no glass is found.

    The thumbnail is 1/16 of a window a pixel (×16 for S=256), coarser past :data:`THUMBNAIL_SIDE`; parts' boxes
    are grown by half a thumbnail pixel, the most by which the tissue's edge can lie beyond it. On the 8000² and
    16000² slides of MoNuSeg test tiles this placed 350 windows where the coarse network's map placed 370 and 468,
    in 0.2-0.3 s where its rough pass took 1.1-2.8 s (benchmarks/bench_monai.py)."""
    H, W = plane.shape
    f = max(size / 16.0, max(H, W) / THUMBNAIL_SIDE, 1.0)
    q = (max(1, math.ceil(H / f)), max(1, math.ceil(W / f)))
    where, info = content_mask(plane.downscaled(q), margin=0)
    if where is None:
        return None
    margin = math.ceil(max(H / q[0], W / q[1]) / 2)
    boxes = box_windows(where, (H, W), size, overlap, margin=margin)
    return boxes, {"look": "tissue", "tissue_shape": list(q), "tissue_margin_px": margin, "rough_tiles": 0, **info}


def tissue_windows(fg_low: np.ndarray, image_shape: tuple[int, int], size: int, overlap: float) -> np.ndarray:
    """The windows (side ``size``) over the rough mask's foreground: a grid per part
    (:func:`segcli.tissue.box_windows`), or the slide-wide grid's windows that touch it when fewer."""
    return box_windows(fg_low, image_shape, size, overlap)


def boxes_and_own(mask: np.ndarray, image_shape: tuple[int, int], pad: int, margin: int, *, min_size: int = 1,
                  min_side: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~segcli.geometry.crop_boxes` and, for each kept crop, its component's full-resolution box
    before squaring and padding, grown by ``margin`` px and clipped to the image (``own-box`` fusion)."""
    raw = component_boxes(mask, min_size=min_size)
    if mask.shape != tuple(image_shape):
        raw = scale_boxes(raw, mask.shape, image_shape)
    raw = np.asarray(raw, dtype=np.int64).reshape(-1, 4)
    sq = square_pad_shift(raw, image_shape, pad)
    keep = valid_boxes(sq, image_shape, min_side)
    H, W = image_shape
    own = raw[keep] + np.asarray([-margin, -margin, margin, margin], dtype=np.int64)
    own = np.clip(own, 0, [H, W, H, W])
    return sq[keep], own


def _cores(start: int, stop: int, starts: list[int], tile: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` among overlapping tiles: each owns up to half-way into its overlaps."""
    out = []
    for i, s in enumerate(starts):
        a = start if i == 0 else (s + starts[i - 1] + tile) // 2
        b = stop if i == len(starts) - 1 else (starts[i + 1] + s + tile) // 2
        out.append((a, b))
    return out


def zoom_tiles(boxes: np.ndarray, size: int, max_zoom: float | None,
               overlap: float = 0.25) -> tuple[np.ndarray, np.ndarray, int]:
    """Network inputs for ``boxes``: ``(crops, writes, n_tiled)``.

    A box of side ≤ ``S × max_zoom`` is one crop writing itself; a bigger box becomes overlapping
    tiles of side ``S × max_zoom`` whose write regions (cores) partition the box.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if max_zoom is None or len(boxes) == 0:
        return boxes, boxes, 0
    t = max(size, int(round(size * max_zoom)))
    crops: list[list[int]] = []
    writes: list[list[int]] = []
    n_tiled = 0
    for y0, x0, y1, x1 in boxes.tolist():
        if max(y1 - y0, x1 - x0) <= t:
            crops.append([y0, x0, y1, x1])
            writes.append([y0, x0, y1, x1])
            continue
        n_tiled += 1
        grid = sliding_grid((y1 - y0, x1 - x0), t, overlap)
        ys = sorted({int(v) for v in grid[:, 0]})
        xs = sorted({int(v) for v in grid[:, 1]})
        th, tw = int(grid[0, 2] - grid[0, 0]), int(grid[0, 3] - grid[0, 1])
        cy = _cores(0, y1 - y0, ys, th)
        cx = _cores(0, x1 - x0, xs, tw)
        for yi, ty in enumerate(ys):
            for xi, tx in enumerate(xs):
                crops.append([y0 + ty, x0 + tx, y0 + ty + th, x0 + tx + tw])
                writes.append([y0 + cy[yi][0], x0 + cx[xi][0], y0 + cy[yi][1], x0 + cx[xi][1]])
    return np.asarray(crops, np.int64).reshape(-1, 4), np.asarray(writes, np.int64).reshape(-1, 4), n_tiled


def _check_fusion(fusion: str, lazy: bool) -> None:
    """A known fusion rule, and one the chosen path can hold (only ``max`` streams to a spilled store)."""
    if fusion not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {fusion!r}; expected one of {', '.join(FUSION_RULES)}")
    if lazy and fusion not in ("max", "gaussian"):
        raise ValueError(f"fusion {fusion!r} needs the in-memory path (lazy=False)")


def _parents(boxes: np.ndarray, size: int, max_zoom: float | None) -> np.ndarray:
    """The box each fine input comes from: zoom_tiles keeps box order and puts a box's tiles together."""
    counts = [len(zoom_tiles(np.asarray(b)[None], size, max_zoom)[0]) for b in np.asarray(boxes).reshape(-1, 4)]
    return np.repeat(np.arange(len(counts)), counts)


def _final_rows(writes: np.ndarray, chunks: list[tuple[int, ...]], height: int) -> list[int]:
    """For each chunk of windows, in order: the row above which the labels are final once it is fused (the
    lowest top edge of the windows still to run; ``height`` after the last)."""
    order = [i for c in chunks for i in c]
    tops = np.r_[np.asarray(writes, np.int64)[order, 0] if order else [], height].astype(np.int64)
    below = np.minimum.accumulate(tops[::-1])[::-1]  # the lowest top edge from each window on
    return below[np.cumsum([len(c) for c in chunks], dtype=np.int64)].tolist()


def _lazy_labels(store: object, fill: CoarseFill | None) -> LazyLabels:
    """The labels of a bounded run, read window by window from its store (fill: the rough map's where no window
    reached, with ``keep_coarse``)."""
    assert isinstance(store, FuseStore | BlendStore)
    return LazyLabels(store, fill, fill)


def _notifier(on_fused: Callable[[LazyLabels, int], None] | None, labels: LazyLabels | None, writes: np.ndarray,
              chunks: list[tuple[int, ...]], height: int) -> Callable[[int | None], None]:
    """``fused_rows(c)`` after chunk ``c`` (None: all done) tells ``on_fused`` which rows are final; called once
    here with row 0, so a reader can start before the first window runs."""
    if on_fused is None or labels is None:
        return lambda c: None
    final = _final_rows(writes, chunks, height)
    on_fused(labels, 0)
    return lambda c: on_fused(labels, height if c is None else final[c])


def _filled(p: np.ndarray, threshold: float) -> bool:
    """Whether a window's output is foreground from edge to edge, looked at one pixel in 64 first: nearly every
    window has background, and the whole argmax of a three-class window cost 1.7 s of a 40000² slide's run."""
    if p.shape[0] == 1:  # a binary task's foreground alone (paste_back's foreground_only)
        return bool((p[0, ::8, ::8] > threshold).all()) and bool((p[0] > threshold).all())
    return bool(foreground(p[:, ::8, ::8], threshold).all()) and bool(foreground(p, threshold).all())


def _blend_rule(blend: str) -> dict[str, object]:
    """The Gaussian fusion's arguments for a blend mode (segcli.params.BLENDS): what it sums, under which map."""
    return {"logits": blend == "nnunet", "weight_for": lambda hw: window_weight(hw, blend)}


def fine_pass(
    plane: Plane,
    fine: Predictor,
    boxes: np.ndarray,
    rough: np.ndarray,
    *,
    size: int,
    threshold: float,
    keep_coarse: bool,
    batch_size: int,
    return_probs: bool,
    timer: Timer,
    progress: ProgressFn | None = None,
    max_zoom: float | None = None,
    spill_dir: str | os.PathLike | None = None,
    lazy: bool = False,
    prefetch: bool = False,
    fusion: str = "max",
    own_boxes: np.ndarray | None = None, fuse_cache: int = 64 * 2**20,
    on_fused: Callable[[LazyLabels, int], None] | None = None, nested: tuple[int, int] | None = None,
    blend: str = D["blend"],
) -> Result:
    """Run the fine network on ``boxes`` in batches and fuse by per-class maximum (OR for binary).

    Memory: the fusion store (only tiles crops touched), one batch of crops and the rough map; full
    arrays are built at the end only when ``lazy`` is false. ``fusion`` picks another rule (see
    :func:`stts`); ``own_boxes`` (one per box) are the write regions of ``own-box`` fusion.
    """
    _check_fusion(fusion, lazy)
    (H, W), K = plane.shape, rough.shape[0]
    fg_only = K == 2 and fusion == "max"  # FuseStore keeps a binary task's foreground alone
    crops, writes, n_tiled = zoom_tiles(boxes, size, max_zoom)
    parents = _parents(boxes, size, max_zoom) if fusion == "own-box" and own_boxes is not None else None
    store = make_fusion(fusion, (H, W), K, threshold, exact=return_probs and not lazy, spill_dir=spill_dir, nested=nested,
                        cache_bytes=fuse_cache, labels_only=not (return_probs or lazy), **_blend_rule(blend))
    chunks = list(batched(list(range(len(crops))), batch_size))
    fill = CoarseFill(rough, (H, W), threshold)
    lazy_labels = _lazy_labels(store, fill if keep_coarse else None) if lazy else None
    fused_rows = _notifier(on_fused, lazy_labels, writes, chunks, H)
    pool = ThreadPoolExecutor(1, thread_name_prefix="segcli-crops") if prefetch and len(chunks) > 1 else None
    try:
        nxt = pool.submit(fine_inputs, plane, crops[chunks[0]], size) if pool and chunks else None
        done = 0
        filled = 0  # fine outputs that are foreground from edge to edge: a sign of a wrong model or input
        for ci, chunk in enumerate(chunks):
            with timer.stage("crops"):
                # Decoding the next batch's tiles (zlib releases the GIL) overlaps with this batch's network.
                xb = nxt.result() if nxt is not None else fine_inputs(plane, crops[chunk], size)
                nxt = pool.submit(fine_inputs, plane, crops[chunks[ci + 1]], size) \
                    if pool is not None and ci + 1 < len(chunks) else None
            with timer.stage("fine"):
                pb = fine(xb)
            with timer.stage("fuse"):
                for j, i in enumerate(chunk):
                    cy0, cx0 = int(crops[i][0]), int(crops[i][1])
                    wy0, wx0, wy1, wx1 = (int(v) for v in writes[i])
                    p = paste_back(pb[j], crops[i], fg_only)[:, wy0 - cy0 : wy1 - cy0, wx0 - cx0 : wx1 - cx0]
                    filled += _filled(p, threshold)
                    if fusion == "max":
                        store.aggregate(writes[i], p)
                    else:
                        own = own_boxes[parents[i]] if parents is not None and own_boxes is not None else None
                        store.aggregate(writes[i], p, crop=crops[i], own=own)  # type: ignore[call-arg]
            done += len(chunk)
            fused_rows(ci)
            if progress:
                progress("fine", done, len(crops))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    info: dict[str, object] = {"crops": int(len(boxes)), "boxes": boxes.tolist(), "fine_inputs": int(len(crops)),
                               "boxes_tiled": int(n_tiled), "fused_tiles": int(store.touched_tiles),
                               "fine_inputs_filled": int(filled)}
    if lazy_labels is not None:
        fused_rows(None)
        return Result(lazy_labels, None, timer.t, info)  # type: ignore[arg-type]
    with timer.stage("fuse"):
        labels, probs = store.finalize(return_probs, fill if keep_coarse else None)
    return Result(labels, probs, timer.t, info)
