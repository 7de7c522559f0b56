"""The training stages of each method: how batches are cut (inputs as inference builds them) and how a
stage is validated. Each function returns a :class:`segcli.train.loop.Stage` that ``fit`` trains; see
:mod:`segcli.train` for what each method's stages are."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from segcli.geometry import patch_grid, scale_boxes, select_patches, uncertainty_scores
from segcli.methods import TABLE
from segcli.params import default_pad
from segcli.runtimes.predictor import logits_to_probs
from segcli.train.config import TrainConfig
from segcli.train.data import (
    CoarseCache,
    coarse_input,
    crop_to_input,
    crop_to_target,
    patch_region,
    patch_to_input,
    patch_to_target,
    to_float,
)
from segcli.train.loop import Stage, predict_logits
from segcli.train.stts_crops import CropSampler, rough_maps, stts_validation


def _chunks(order: np.ndarray, bs: int) -> list[np.ndarray]:
    """Batches of ``bs``; a trailing batch of one joins the previous one (BatchNorm needs two)."""
    out = [order[i : i + bs] for i in range(0, len(order), bs)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out[-1]])
        out.pop()
    return out


def _n_steps(n: int, bs: int) -> int:
    """Steps per epoch for ``n`` items, counted as :func:`_chunks` cuts them."""
    return len(_chunks(np.arange(n), bs)) if n else 0


def score_batch(logits: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None, pooled: bool = False) -> dict[str, float]:
    """Validation Dice (foreground classes) and, for K > 2, mIoU (all classes) on network outputs.

    Per-image means (as papers report), or pooled over the set with ``pooled`` (patches, where
    one patch's Dice is too unstable to average). ``valid`` crops each letterboxed image.
    """
    n = len(logits)
    if n == 0:
        return {}
    binary = logits.shape[1] == 1
    k = 2 if binary else logits.shape[1]
    conf = np.zeros((n, k, 3), dtype=np.int64)  # tp, fp, fn per image and class
    for i in range(n):
        lg, t = logits[i], target[i]
        if valid is not None:
            h, w = valid[i]
            lg, t = lg[:, :h, :w], t[:, :h, :w]
        if binary:
            p = (lg[0] > 0).astype(np.int64)
            g = (t[0] >= 0.5).astype(np.int64)
        else:
            p = lg.argmax(0)
            g = t.argmax(0)
        for c in range(k):
            pc, gc = p == c, g == c
            tp = int(np.count_nonzero(pc & gc))
            conf[i, c] = (tp, int(np.count_nonzero(pc)) - tp, int(np.count_nonzero(gc)) - tp)
    if pooled:
        conf = conf.sum(0, keepdims=True)
    tp, fp, fn = conf[..., 0], conf[..., 1], conf[..., 2]
    den = 2 * tp + fp + fn
    dice = np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)
    union = tp + fp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), 1.0)
    out = {"dice": float(dice[:, 1:].mean())}
    if not binary:
        out["miou"] = float(iou.mean())
    return out


# --------------------------------------------------------------------------------------------- stages
def coarse_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str, log: Callable[[str], None]) -> Any:
    """The coarse network on whole images at S (refine S1: random S crops of a 1.05·S image)."""
    S = cfg.size
    train_side = int(round(TABLE[cfg.method].coarse_train_scale * S))
    t0 = time.perf_counter()
    train_cache = CoarseCache.build(ds.train, train_side, ds.n_out, ds.uint8)
    val_cache = CoarseCache.build(ds.val, S, ds.n_out, ds.uint8)
    log(f"coarse inputs cached at {train_side}x{train_side} in {time.perf_counter() - t0:.1f} s "
        f"({(train_cache.x.nbytes + train_cache.y.nbytes + val_cache.x.nbytes + val_cache.y.nbytes) / 2**20:.0f} MiB)")
    n = len(ds.train)

    def batches(rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx in _chunks(rng.permutation(n), cfg.batch_size):
            x = to_float(train_cache.x[idx])
            y = train_cache.y[idx].astype(np.float32)
            if train_side > S:  # refine S1: random S×S crop of the 1.05·S image
                off = rng.integers(0, train_side - S + 1, size=(len(idx), 2))
                x = np.stack([x[j, :, a : a + S, b : b + S] for j, (a, b) in enumerate(off)])
                y = np.stack([y[j, :, a : a + S, b : b + S] for j, (a, b) in enumerate(off)])
            yield x, y

    def validate(m: Any) -> dict[str, float]:
        if not len(val_cache.x):
            return {}
        logits = predict_logits(m, to_float(val_cache.x), device, 2 * cfg.batch_size, cfg.amp)
        return score_batch(logits, val_cache.y.astype(np.float32), val_cache.valid)

    return Stage("coarse", index, model, cfg.epochs, _n_steps(n, cfg.batch_size), batches, validate, loss_fn)


def stts_fine_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str,
                    log: Callable[[str], None], s1: Any) -> Any:
    """stts' fine network on the crops inference gives it (see :mod:`segcli.train.stts_crops`).

    ``crops_per_image`` crops per image per epoch, each from the trained coarse network's rough-mask
    components or (``gt_share`` of them) from the ground truth's; validated by the stts engine at
    full resolution on the val images, so the kept checkpoint is the best full pipeline.
    """
    S = cfg.size
    pad = cfg.pad if cfg.pad is not None else default_pad(S)
    k = max(1, cfg.crops_per_image)
    t0 = time.perf_counter()
    train_maps = rough_maps(s1, ds.train, S, device)
    val_maps = rough_maps(s1, ds.val, S, device)
    gt_share = {"rough": 0.5, "rough-only": 0.0, "gt": 1.0}[cfg.fine_crops]
    sampler = CropSampler(pad, cfg.jitter, gt_share)
    n_rough = sum(len(m.boxes) for m in train_maps)
    log(f"stts fine: rough pass on {len(ds.train)} + {len(ds.val)} images in {time.perf_counter() - t0:.1f} s; "
        f"{n_rough} rough components (train); crops {cfg.fine_crops} (ground truth share {gt_share:g}), "
        f"{k} per image per epoch, pad {pad} px, jitter ±{cfg.jitter} px")
    n = len(ds.train)

    def batches(rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx in _chunks(rng.permutation(np.repeat(np.arange(n), k)), cfg.batch_size):
            xs, ys = [], []
            for i in idx:
                s = ds.train[i]
                box = sampler.box(s, train_maps[i].boxes, rng)
                xs.append(crop_to_input(s.get_image(), box, S))
                ys.append(crop_to_target(s.mask, box, S, ds.n_out))
            yield np.stack(xs), np.stack(ys)

    def predict(m: Any, x: np.ndarray) -> np.ndarray:
        return logits_to_probs(predict_logits(m, x, device, 2 * cfg.batch_size, cfg.amp))

    validate = stts_validation(ds.val, val_maps, S, pad, len(ds.classes), predict, 2 * cfg.batch_size)
    epochs = cfg.fine_epochs or max(1, math.ceil(cfg.epochs / k))
    return Stage("fine", index, model, epochs, _n_steps(n * k, cfg.batch_size), batches, validate, loss_fn)


def rough_scores(model: Any, samples: list[Any], size: int, patch: int, criterion: str, device: str,
                 batch_size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: the full-res patch grid and S1's uncertainty score per patch (the refine engine's ranking)."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        xs, hws = zip(*(coarse_input(s.get_image(), size) for s in chunk), strict=True)
        probs = logits_to_probs(predict_logits(model, np.stack(xs), device, batch_size))
        for s, p, (h, w) in zip(chunk, probs, hws, strict=True):
            grid = patch_grid(s.shape, patch)
            low = scale_boxes(grid, s.shape, (h, w))
            low[:, 2] = np.maximum(low[:, 2], low[:, 0] + 1)
            low[:, 3] = np.maximum(low[:, 3], low[:, 1] + 1)
            out.append((grid, uncertainty_scores(p[:, :h, :w], low, criterion)))
    return out


def refine_fine_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str,
                       log: Callable[[str], None], s1: Any) -> Any:
    """refine's S2 on full-res patches, most of them where the trained S1 is least certain."""
    S = cfg.size
    P = cfg.patch_size or S
    k = max(1, cfg.patches)
    t0 = time.perf_counter()
    train_scores = rough_scores(s1, ds.train, S, P, cfg.criterion, device)
    val_scores = rough_scores(s1, ds.val, S, P, cfg.criterion, device)
    tops = [select_patches(sc, n=k) for _, sc in train_scores]
    log(f"refine S2: S1 uncertainty ranked {sum(len(g) for g, _ in train_scores)} train patches of {P} px "
        f"in {time.perf_counter() - t0:.1f} s; sampling {cfg.sampling}, {k} patches per image per epoch")
    n = len(ds.train)
    uncertain = cfg.sampling == "uncertain"

    def batches(rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        items = np.repeat(np.arange(n), k)
        for idx in _chunks(rng.permutation(items), cfg.batch_size):
            xs, ys = [], []
            for i in idx:
                s = ds.train[i]
                grid, _ = train_scores[i]
                if uncertain and rng.random() < 0.75:
                    j = int(tops[i][rng.integers(len(tops[i]))])
                else:
                    j = int(rng.integers(len(grid)))
                box = patch_region(s.shape, grid[j], P // 4, rng)
                xs.append(patch_to_input(s.get_image(), box, S))
                ys.append(patch_to_target(s.mask, box, S, ds.n_out))
            yield np.stack(xs), np.stack(ys)

    vx, vy = [], []
    for s, (grid, sc) in zip(ds.val, val_scores, strict=True):
        img = s.get_image()
        for j in select_patches(sc, n=k):
            vx.append(patch_to_input(img, grid[j], S))
            vy.append(patch_to_target(s.mask, grid[j], S, ds.n_out))
    val_x = np.stack(vx).astype(np.float16) if vx else np.zeros((0,))
    val_y = np.stack(vy).astype(np.float16) if vy else np.zeros((0,))

    def validate(m: Any) -> dict[str, float]:
        if not len(val_x):
            return {}
        logits = predict_logits(m, val_x.astype(np.float32), device, 2 * cfg.batch_size, cfg.amp)
        return score_batch(logits, val_y.astype(np.float32), pooled=True)

    epochs = cfg.fine_epochs or cfg.epochs
    return Stage("fine", index, model, epochs, _n_steps(n * k, cfg.batch_size), batches, validate, loss_fn)
