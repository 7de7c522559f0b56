"""Training: ``train(data, out, method=..., ...)`` writes a complete bundle that ``segcli predict`` loads.

Methods and how each stage is trained (the inputs mirror inference exactly, through the same
geometry/resize functions the engines use):

* ``direct``: one network on whole images, long side S, aspect kept, edge-padded to S×S.
* ``stts`` (segment-then-segment, Benčević et al. 2023): the coarse network as ``direct``; the fine
  network on crops of the GROUND TRUTH's connected components, jittered by ±``jitter`` px on
  (top, left, height, width) before squaring, squared and padded by ``pad`` (S//8) full-res px and
  shifted inside the image (``geometry.crop_boxes``' steps), letterboxed (edge) when clamped to a
  rectangle and area-resized to S×S. One random crop per image per epoch; the whole image when it
  has no foreground. ``fine_init="coarse"`` starts the fine network from the coarse weights.
* ``refine`` (uncertainty-patch refinement, Cruz et al. 2023): S1 trains at low resolution with the
  paper's scale-and-crop augmentation expressed in S: the image is resized so its long side is
  ``round(1.05·S)`` (aspect kept, edge-padded square), then a random S×S crop is taken (the paper
  resizes to (1/8 + 5 %)·hi and crops hi/8; here hi/8 = S). Validation uses the plain S×S rough
  input. S2 trains on full-resolution grid patches of ``patch_size`` px (default S) area-resized to
  S×S, as the refine engine cuts them; ``patches`` patches per image per epoch, each shifted by up
  to ±patch/4 px. With ``sampling="uncertain"`` 3 in 4 patches come from the image's ``patches``
  most uncertain grid cells under S1 (``geometry.uncertainty_scores``, the engine's ranking), the
  rest uniformly; scores are computed ONCE after S1 finishes (S1 is frozen by then, so recomputing
  per epoch would give the same numbers). S2 validation uses each val image's top patches.

Stage budgets: each stage gets ``epochs`` (``fine_epochs`` for the second, default the same);
``time_limit`` (training time, data loading excluded, counted across resumes) is split
``stage_split`` / rest between the two stages, the second getting whatever the first left.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import BundleError, DatasetError, UsageError
from segcli.train.loop import Reporter, TrainingInterrupted

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "parse_duration", "train", "CHECKPOINT", "METRICS"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
METHODS = ("stts", "refine", "direct")
STAGES = {"stts": ("coarse", "fine"), "refine": ("coarse", "fine"), "direct": ("coarse",)}
#: Options a ``--resume`` may change; everything else comes from the checkpoint.
RESUME_OVERRIDES = frozenset({"epochs", "fine_epochs", "time_limit", "patience", "quiet", "device", "cache_gb",
                              "threads", "amp", "val_full_res", "workers"})


@dataclass
class TrainConfig:
    """Every training option; the defaults are the ones ``segcli train`` uses."""

    data: str | None = None
    out: str | None = None
    method: str = "stts"
    arch: str = "unet"
    fine_arch: str | None = None  # default: arch
    size: int = 256  # S: network input side for both stages
    epochs: int = 50
    fine_epochs: int | None = None  # default: epochs
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    features: int | None = None
    arch_config: dict[str, Any] = field(default_factory=dict)
    loss: str | None = None  # default per method (losses.default_loss)
    class_weights: list[float] | None = None
    val_fraction: float = 0.2
    splits: str | None = None
    seed: int = 0
    channels: str = "keep"
    normalization: dict[str, Any] | None = None  # default chosen from the data (data.choose_normalization)
    jitter: int = 16
    pad: int | None = None  # default S // 8
    fine_init: str = "random"  # or "coarse"
    patches: int = 8
    patch_size: int | None = None  # default S
    sampling: str = "uncertain"  # or "uniform"
    criterion: str = "pixel"
    patience: int | None = None
    time_limit: float | None = None  # seconds of training
    stage_split: float = 0.5
    device: str = "auto"
    amp: bool = True
    augment: bool = True
    stain_jitter: float = 0.0  # HED stain jitter amplitude (RGB H&E; 0 = off), see train.augment
    cache_gb: float = 4.0
    workers: int = 2
    # Torch intra-op threads (None: the cores available). On a machine shared with other jobs, 1 is
    # much faster than 2: OpenMP's spin-waiting threads get descheduled (measured 5-10x slower steps
    # with 2 threads under a load of 4 on 2 cores; OMP_WAIT_POLICY=PASSIVE also avoids it).
    threads: int | None = None
    name: str | None = None
    val_full_res: bool = True
    quiet: bool = False
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    out: Path
    training: dict[str, Any]
    stages: dict[str, dict[str, Any]]


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from ``600``, ``"600"``, ``"90s"``, ``"10m"``, ``"1.5h"`` or ``"1h30m"``."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text).strip():
        raise UsageError(f"--time-limit {value!r}: use seconds or a duration like 90s, 10m, 1h30m")
    return float(sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


# --------------------------------------------------------------------------------------------- helpers
def _check_config(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r} for training; use {', '.join(METHODS)}")
    if cfg.size < 8:
        raise UsageError(f"--size must be at least 8, got {cfg.size}")
    if cfg.epochs < 1 or (cfg.fine_epochs is not None and cfg.fine_epochs < 1):
        raise UsageError("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if cfg.fine_init not in ("random", "coarse"):
        raise UsageError(f"--fine-init must be random or coarse, not {cfg.fine_init!r}")
    if cfg.sampling not in ("uncertain", "uniform"):
        raise UsageError(f"--sampling must be uncertain or uniform, not {cfg.sampling!r}")
    if cfg.criterion not in ("pixel", "mean"):
        raise UsageError(f"--criterion must be pixel or mean, not {cfg.criterion!r}")
    if cfg.jitter < 0:
        raise UsageError("--jitter must be >= 0")
    if not 0.0 <= cfg.stain_jitter < 1.0:
        raise UsageError(f"--stain-jitter must be in [0, 1), got {cfg.stain_jitter}")
    if not 0.0 < cfg.stage_split < 1.0:
        raise UsageError("stage_split must be in (0, 1)")
    if cfg.fine_init == "coarse" and cfg.method == "direct":
        raise UsageError("--fine-init coarse needs a two-stage method (stts or refine)")
    if cfg.fine_init == "coarse" and (cfg.fine_arch or cfg.arch) != cfg.arch:
        raise UsageError("--fine-init coarse needs the same architecture for both stages")
    from segcli.nets import available

    archs = available()
    for a in {cfg.arch, cfg.fine_arch or cfg.arch}:
        if a not in archs:
            raise UsageError(f"unknown architecture {a!r}; known: {', '.join(sorted(archs))}")


def net_config(cfg: TrainConfig, arch: str) -> dict[str, Any]:
    """The arch config stored in the bundle: ``--arch-config`` plus ``--features`` where it applies."""
    from segcli.nets import available

    conf = dict(cfg.arch_config)
    if cfg.features is not None:
        params = inspect.signature(available()[arch].factory).parameters
        if "features" not in params:
            raise UsageError(f"--features does not apply to architecture {arch!r}; use --arch-config")
        conf["features"] = int(cfg.features)
    return conf


def _build_net(arch: str, conf: dict[str, Any], in_ch: int, out_ch: int, seed: int) -> Any:
    import torch

    from segcli.nets import build

    torch.manual_seed(seed)  # the initial weights depend on the seed and the stage only
    try:
        return build(arch, in_channels=in_ch, out_channels=out_ch, **conf)
    except BundleError as exc:
        raise UsageError(str(exc)) from None


def _chunks(order: np.ndarray, bs: int) -> list[np.ndarray]:
    """Batches of ``bs``; a trailing batch of one joins the previous one (BatchNorm needs two)."""
    out = [order[i : i + bs] for i in range(0, len(order), bs)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out[-1]])
        out.pop()
    return out


def _n_steps(n: int, bs: int) -> int:
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
def _coarse_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str, log: Callable[[str], None]) -> Any:
    from segcli.train.data import CoarseCache, to_float
    from segcli.train.loop import Stage, predict_logits

    S = cfg.size
    train_side = int(round(1.05 * S)) if cfg.method == "refine" else S
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


def _stts_fine_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str, log: Callable[[str], None]) -> Any:
    from segcli.train.data import crop_candidates, crop_to_input, crop_to_target, fine_box
    from segcli.train.loop import Stage, predict_logits

    S = cfg.size
    pad = cfg.pad if cfg.pad is not None else S // 8
    n = len(ds.train)

    def batches(rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx in _chunks(rng.permutation(n), cfg.batch_size):
            xs, ys = [], []
            for i in idx:
                s = ds.train[i]
                box = fine_box(s, pad, cfg.jitter, rng)
                img = s.get_image()
                xs.append(crop_to_input(img, box, S))
                ys.append(crop_to_target(s.mask, box, S, ds.n_out))
            yield np.stack(xs), np.stack(ys)

    # Validation: every unjittered GT crop of every val image (whole image when empty), fixed.
    vx, vy = [], []
    rng0 = np.random.default_rng(0)
    for s in ds.val:
        _, boxes = crop_candidates(s.boxes, s.shape, pad, 0, rng0)
        if len(boxes) == 0:
            boxes = np.array([[0, 0, s.shape[0], s.shape[1]]])
        img = s.get_image()
        for b in boxes[:16]:
            vx.append(crop_to_input(img, b, S))
            vy.append(crop_to_target(s.mask, b, S, ds.n_out))
    val_x = np.stack(vx).astype(np.float16) if vx else np.zeros((0,))
    val_y = np.stack(vy).astype(np.float16) if vy else np.zeros((0,))
    log(f"fine stage: {len(vx)} validation crops, pad {pad} px, jitter ±{cfg.jitter} px")

    def validate(m: Any) -> dict[str, float]:
        if not len(val_x):
            return {}
        logits = predict_logits(m, val_x.astype(np.float32), device, 2 * cfg.batch_size, cfg.amp)
        return score_batch(logits, val_y.astype(np.float32))

    epochs = cfg.fine_epochs or cfg.epochs
    return Stage("fine", index, model, epochs, _n_steps(n, cfg.batch_size), batches, validate, loss_fn)


def rough_scores(model: Any, samples: list[Any], size: int, patch: int, criterion: str, device: str,
                 batch_size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: the full-res patch grid and S1's uncertainty score per patch (the refine engine's ranking)."""
    from segcli.geometry import patch_grid, scale_boxes, uncertainty_scores
    from segcli.runtimes import logits_to_probs
    from segcli.train.data import coarse_input
    from segcli.train.loop import predict_logits

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


def _refine_fine_stage(ds: Any, cfg: TrainConfig, model: Any, loss_fn: Any, index: int, device: str,
                       log: Callable[[str], None], s1: Any) -> Any:
    from segcli.geometry import select_patches
    from segcli.train.data import patch_region, patch_to_input, patch_to_target
    from segcli.train.loop import Stage, predict_logits

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


# --------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: Path, doc: dict[str, Any]) -> None:
    """Atomic ``torch.save``: a kill at any moment leaves the previous checkpoint intact."""
    import torch

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(doc, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint is tensors and plain containers, never code."""
    import torch

    if not path.is_file():
        raise UsageError(f"no {CHECKPOINT} to resume from", path.parent)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read checkpoint: {type(exc).__name__}: {exc}", path) from None
    if not isinstance(doc, dict) or doc.get("format") != "segcli-train-checkpoint":
        raise UsageError("not a segcli training checkpoint", path)
    return doc


def _trim_metrics(path: Path, done: dict[str, int], current: tuple[str, int] | None) -> None:
    """After a kill, drop metric lines past the checkpoint so the log matches the resumed run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        st, ep = rec.get("stage"), int(rec.get("epoch", 0))
        if st in done and ep <= done[st] or current is not None and st == current[0] and ep <= current[1]:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def cli_equivalent(cfg: TrainConfig) -> str:
    """The ``segcli train`` command that reproduces ``cfg`` (recorded when none was given)."""
    default = TrainConfig()
    args = ["segcli", "train", "--data", str(cfg.data), "-o", str(cfg.out)]
    skip = {"data", "out", "command", "quiet", "arch_config", "normalization", "class_weights"}
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in skip or v == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            args += [flag, str(v)]
    for k, v in cfg.arch_config.items():
        args += ["--arch-config", f"{k}={v}"]
    if cfg.class_weights:
        args += ["--class-weights", ",".join(str(w) for w in cfg.class_weights)]
    return shlex.join(args)


# --------------------------------------------------------------------------------------------- main
def train(
    data: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    reporter: Reporter | None = None,
    **options: Any,
) -> TrainResult:
    """Train ``method`` on the dataset at ``data`` and write a complete bundle to ``out``.

    ``options`` are :class:`TrainConfig` fields (``method``, ``size``, ``epochs``, ...); ``None``
    values mean "default". With ``resume=DIR`` the configuration comes from ``DIR/checkpoint.pt``
    and only :data:`RESUME_OVERRIDES` may change. Raises :class:`TrainingInterrupted` (exit 130)
    after saving a checkpoint on Ctrl-C, DatasetError for a bad dataset before any training.
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    if "time_limit" in given:
        given["time_limit"] = parse_duration(given["time_limit"])
    ckpt: dict[str, Any] | None = None
    if resume is not None:
        rdir = Path(resume)
        ckpt = load_checkpoint(rdir / CHECKPOINT)
        saved = dict(ckpt["config"])
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
        ignored = []
        for k, v in given.items():
            if k in RESUME_OVERRIDES:
                setattr(cfg, k, v)
            elif k != "command" and v != saved.get(k):
                ignored.append(k)
        if data is not None and Path(data).resolve() != Path(cfg.data).resolve():
            ignored.append("data")
        if out is not None and Path(out).resolve() != rdir.resolve():
            raise UsageError(f"--resume {rdir} writes into that folder; drop -o or make it the same folder")
        cfg.out = str(rdir)
    else:
        if data is None or out is None:
            raise UsageError("training needs --data DATASET and -o OUTPUT (or --resume DIR)")
        cfg = TrainConfig(data=str(data), out=str(out), **{k: v for k, v in given.items() if k not in ("data", "out")})
        ignored = []
    if given.get("command"):
        cfg.command = given["command"]
    _check_config(cfg)
    reporter = reporter or Reporter(cfg.quiet)
    log = reporter.log
    if ignored:
        log(f"resume: keeping the checkpoint's {', '.join(sorted(ignored))} (only {', '.join(sorted(RESUME_OVERRIDES))} may change)")
    out_dir = Path(cfg.out)
    if ckpt is None and (out_dir / CHECKPOINT).exists():
        raise UsageError(f"{out_dir} already holds a training run; continue it with --resume {out_dir} or pick a new folder")
    return _run(cfg, ckpt, reporter)


def _setup_determinism(seed: int, device: str) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def _run(cfg: TrainConfig, ckpt: dict[str, Any] | None, reporter: Reporter) -> TrainResult:
    from segcli.runtimes.device import resolve_device, set_threads
    from segcli.train.augment import AugmentConfig
    from segcli.train.data import load_dataset
    from segcli.train.loop import FitOptions, StopFlag, fit
    from segcli.train.losses import default_loss, make_loss

    log = reporter.log
    device = resolve_device(cfg.device)
    threads = set_threads(cfg.threads)
    _setup_determinism(cfg.seed, device)
    t_start = time.perf_counter()
    ds = load_dataset(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, splits_file=cfg.splits,
                      channels=cfg.channels, normalization=cfg.normalization, cache_gb=cfg.cache_gb,
                      workers=cfg.workers, log=log)
    if ckpt is not None and (list(ckpt["split"]["train"]) != ds.split.train or list(ckpt["split"]["val"]) != ds.split.val):
        raise DatasetError("the dataset's cases changed since the checkpoint was written; cannot resume", cfg.data)
    if cfg.normalization is None:
        cfg.normalization = ds.normalization  # recorded, so a resume normalises identically
    if cfg.stain_jitter and cfg.augment and (ds.in_channels != 3 or (cfg.normalization or {}).get("kind") != "dtype"):
        raise UsageError("--stain-jitter needs RGB images with the dtype normalisation (8-bit H&E; try --channels rgb)")
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    metrics_path = out_dir / METRICS
    if cfg.command is None:
        cfg.command = cli_equivalent(cfg)

    loss_name = cfg.loss or default_loss(cfg.method, ds.n_out)
    try:
        loss_fn = make_loss(loss_name, ds.n_out, cfg.class_weights)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = FitOptions(lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, schedule=cfg.schedule,
                      patience=cfg.patience, device=device, amp=cfg.amp,
                      augment=AugmentConfig(stain=cfg.stain_jitter) if cfg.augment else None, seed=cfg.seed)
    stage_names = STAGES[cfg.method]
    arch_of = {"coarse": cfg.arch, "fine": cfg.fine_arch or cfg.arch}
    conf_of = {r: net_config(cfg, arch_of[r]) for r in stage_names}

    finished: dict[str, dict[str, Any]] = dict(ckpt["finished"]) if ckpt else {}
    current = ckpt.get("current") if ckpt else None
    if ckpt is not None:
        done = {k: int(v["summary"]["epochs_run"]) for k, v in finished.items()}
        _trim_metrics(metrics_path, done, (current["stage"], int(current["epoch"])) if current else None)
        log(f"resuming {out_dir}: " + (f"{current['stage']} stage after epoch {current['epoch']}" if current
                                       else f"stages done: {', '.join(finished) or 'none'}"))
    else:
        metrics_path.write_text("")

    def doc(current_state: dict[str, Any] | None) -> dict[str, Any]:
        return {"format": "segcli-train-checkpoint", "version": 1, "config": cfg.to_dict(),
                "split": {"train": ds.split.train, "val": ds.split.val},
                "finished": finished, "current": current_state}

    def log_metrics(rec: dict[str, Any]) -> None:
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(_jsonable(rec)) + "\n")

    hint = f"; continue with --resume {out_dir}"
    models: dict[str, Any] = {}
    with StopFlag() as stop:
        for idx, role in enumerate(stage_names):
            model = _build_net(arch_of[role], conf_of[role], ds.in_channels, ds.n_out, cfg.seed * 1000 + idx)
            if role in finished:
                model.load_state_dict(finished[role]["state"])
                models[role] = model.to(device)
                continue
            if role == "fine" and cfg.fine_init == "coarse" and not (current and current["stage"] == "fine"):
                model.load_state_dict(finished["coarse"]["state"])
            if role == "coarse":
                stage = _coarse_stage(ds, cfg, model, loss_fn, idx, device, log)
            elif cfg.method == "stts":
                stage = _stts_fine_stage(ds, cfg, model, loss_fn, idx, device, log)
            else:
                stage = _refine_fine_stage(ds, cfg, model, loss_fn, idx, device, log, models["coarse"])
            if cfg.time_limit is not None:
                spent = sum(float(v["summary"]["time_s"]) for v in finished.values())
                share = cfg.stage_split if (len(stage_names) == 2 and idx == 0) else 1.0
                stage.time_budget = max(cfg.time_limit * share - spent, 0.0) if idx == 0 else max(cfg.time_limit - spent, 0.0)
            resume_state = current if current and current["stage"] == role else None
            log(f"stage {role}: {arch_of[role]} {conf_of[role]}, {sum(p.numel() for p in model.parameters()):,} params, "
                f"{stage.epochs} epochs x {stage.steps_per_epoch} steps, loss {loss_name}, device {device} ({threads} threads)"
                + (f", budget {stage.time_budget:.0f} s" if stage.time_budget is not None else ""))
            result = fit(stage, opts, save=lambda st: save_checkpoint(ckpt_path, doc(st)), log_metrics=log_metrics,
                         stop=stop, reporter=reporter, resume=resume_state, checkpoint_hint=hint)
            finished[role] = {"state": result.best_state, "summary": result.summary}
            current = None
            save_checkpoint(ckpt_path, doc(None))
            models[role] = stage.model
            log(f"stage {role} done: best val dice {result.summary['val_dice']} at epoch {result.summary['best_epoch']}, "
                f"{result.summary['epochs_run']} epochs, stopped by {result.summary['stopped']}, {result.summary['time_s']} s")

    stages = {r: dict(finished[r]["summary"]) for r in stage_names}
    training = _training_section(cfg, ds, stages, loss_name, device, time.perf_counter() - t_start)
    _write_bundle(out_dir, cfg, ds, models, arch_of, conf_of, training)
    if cfg.val_full_res and ds.val:
        try:
            full = full_res_validation(out_dir, ds, cfg, device)
        except Exception as exc:  # an extra: the bundle is already written, never lose the run over it
            log(f"full-resolution validation skipped: {type(exc).__name__}: {exc}")
            full = None
        if full is not None:
            training["val_full_res"] = full
            training["val_score"] = full["dice"]
            training["val_score_kind"] = f"{cfg.method} Dice at full resolution on the val split (mean over cases)"
            _write_bundle(out_dir, cfg, ds, models, arch_of, conf_of, training)
            log(f"full resolution ({cfg.method}, {full['cases']} val cases): dice {full['dice']:.4f}  iou {full['iou']:.4f}  "
                f"precision {full['precision']:.4f}  recall {full['recall']:.4f}  object recall {full['object_recall']:.4f}  "
                f"({full['seconds']:.1f} s)")
    log(f"bundle written to {out_dir}")
    return TrainResult(out_dir, training, stages)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def _training_section(cfg: TrainConfig, ds: Any, stages: dict[str, dict[str, Any]], loss_name: str, device: str,
                      seconds: float) -> dict[str, Any]:
    import torch

    last_role = list(stages)[-1]
    last = stages[last_role]
    kind = {"coarse": "whole images", "fine": "GT crops" if cfg.method == "stts" else "S1's most uncertain patches"}[last_role]
    return _jsonable({
        "command": cfg.command,
        "dataset": ds.spec.name,
        "dataset_path": str(Path(cfg.data).resolve()),
        "layout": ds.spec.layout,
        "licence": ds.spec.licence,
        "modality": ds.spec.modality,
        "split": ds.split.to_dict(),
        "slice_axis": ds.slice_axis,
        "train_samples": len(ds.train),
        "val_samples": len(ds.val),
        "epochs": cfg.epochs,
        "fine_epochs": cfg.fine_epochs or cfg.epochs if cfg.method != "direct" else None,
        "stages": stages,
        "val_score": last.get("val_dice"),
        "val_score_kind": f"{last_role}-stage Dice at S on the val split ({kind})",
        "loss": loss_name,
        "optimizer": cfg.optimizer,
        "schedule": cfg.schedule,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "augment": cfg.augment,
        "stain_jitter": cfg.stain_jitter,
        "jitter": cfg.jitter if cfg.method == "stts" else None,
        "fine_init": cfg.fine_init if cfg.method != "direct" else None,
        "sampling": cfg.sampling if cfg.method == "refine" else None,
        "seed": cfg.seed,
        "channels": cfg.channels,
        "device": device,
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "config": cfg.to_dict(),
    })


def _write_bundle(out_dir: Path, cfg: TrainConfig, ds: Any, models: dict[str, Any], arch_of: dict[str, str],
                  conf_of: dict[str, dict[str, Any]], training: dict[str, Any]) -> None:
    from segcli.bundle import save_bundle

    S = cfg.size
    params: dict[str, Any] = {"threshold": 0.5, "keep_aspect": True}
    if cfg.method == "stts":
        params.update(pad=cfg.pad if cfg.pad is not None else S // 8, min_side=5, min_component=1)
    elif cfg.method == "refine":
        params.update(patches=cfg.patches, patch_size=cfg.patch_size or S, criterion=cfg.criterion)
    fg = ", ".join(ds.classes[1:])
    info = {"task": f"{fg} segmentation ({ds.spec.modality or 'images'})", "dataset": ds.spec.name,
            "licence": ds.spec.licence, "modality": ds.spec.modality,
            "description": f"trained with segcli train --method {cfg.method} on {ds.spec.name}"}
    nets = {r: (arch_of[r], conf_of[r], models[r].cpu()) for r in models}
    save_bundle(out_dir, name=cfg.name or out_dir.resolve().name, method=cfg.method, classes=ds.classes,
                in_channels=ds.in_channels, input_size=S, normalization=ds.normalization, networks=nets,
                params=params, info=_jsonable(info), training=_jsonable(training))


def full_res_validation(bundle_dir: Path, ds: Any, cfg: TrainConfig, device: str) -> dict[str, Any]:
    """Score the finished bundle on the val cases exactly as ``segcli predict`` would run it."""
    from segcli import metrics
    from segcli.api import Segmenter
    from segcli.errors import EmptyImageError
    from segcli.train.data import _read_case

    t0 = time.perf_counter()
    seg = Segmenter(bundle_dir, backend="torch", device=device, channels=cfg.channels, threads=cfg.threads)
    by_stem = {c.stem: c for c in ds.spec.cases}
    K = len(ds.classes)
    rows = []
    hits = objs = 0
    for stem in ds.split.val:
        case = by_stem[stem]
        img, mask, sp, vol = _read_case(case)
        try:
            res, _ = seg.segment_array(img, kind="volume" if vol else "2d", spacing=sp, path=case.images[0])
        except EmptyImageError:
            res = None
        labels = np.zeros(mask.shape, np.uint8) if res is None else res.labels
        m = metrics.case_metrics(labels, mask, range(1, K), spacing=sp, with_hd95=False)
        rows.append([[m[c][k] for k in ("dice", "iou", "precision", "recall")] for c in range(1, K)])
        hits += sum(m[c]["hit"] for c in range(1, K))
        objs += sum(m[c]["objects"] for c in range(1, K))
    a = np.asarray(rows, dtype=np.float64)  # (cases, classes, 4)
    mean = a.mean(axis=(0, 1))
    return {"cases": len(rows), "dice": float(mean[0]), "iou": float(mean[1]), "precision": float(mean[2]),
            "recall": float(mean[3]), "object_recall": hits / objs if objs else float("nan"),
            "seconds": round(time.perf_counter() - t0, 1)}
