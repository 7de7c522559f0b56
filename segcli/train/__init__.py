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

import json
import math
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segcli import metrics
from segcli.bundle import save_bundle
from segcli.errors import BundleError, DatasetError, EmptyImageError, UsageError
from segcli.inferer import Inferer
from segcli.methods import TABLE, fine_stage, roles
from segcli.nets import build
from segcli.options import PredictOptions
from segcli.params import DEFAULT_PARAMS, default_pad
from segcli.runtimes import cpu_has_bf16
from segcli.runtimes.device import apply_threads, resolve_device, set_threads
from segcli.train.augment import AugmentConfig
from segcli.train.config import (
    METHODS,  # noqa: F401  (importable from segcli.train as before the split)
    RESUME_OVERRIDES,
    TrainConfig,
    TrainResult,
    check_config,
    cli_equivalent,
    net_config,
    parse_duration,
)
from segcli.train.data import load_dataset, read_case
from segcli.train.init_from import apply_init, check_dataset, load_init_weights, role_configs
from segcli.train.loop import FitOptions, Reporter, StopFlag, TrainingInterrupted, fit
from segcli.train.losses import default_loss, make_loss
from segcli.train.stages import (
    coarse_stage,
    refine_fine_stage,  # noqa: F401  (the method table names the fine stages: segcli.methods)
    rough_scores,  # noqa: F401  (importable from segcli.train as before the split)
    score_batch,  # noqa: F401
    stts_fine_stage,  # noqa: F401
)

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "parse_duration", "train", "CHECKPOINT", "METRICS",
           "checkpoint_path"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESUME_SUFFIX = ".resume"


def checkpoint_path(out_dir: Path | str) -> Path:
    """Where a run's resume state lives: BESIDE the bundle (``models/mine.resume/checkpoint.pt``), so the
    bundle folder holds only what inference needs and can be copied or shipped as it is."""
    out = Path(out_dir)
    return out.parent / f"{out.name or out.resolve().name}{RESUME_SUFFIX}" / CHECKPOINT


def _find_checkpoint(run_dir: Path) -> Path:
    """The resume state of the run in ``run_dir``; runs made before 0.9 kept it inside the bundle folder."""
    beside = checkpoint_path(run_dir)
    return beside if beside.exists() or not (run_dir / CHECKPOINT).exists() else run_dir / CHECKPOINT


def _build_net(arch: str, conf: dict[str, Any], in_ch: int, out_ch: int, seed: int) -> Any:
    """A fresh network whose initial weights depend on the seed and the stage only."""
    torch.manual_seed(seed)  # the initial weights depend on the seed and the stage only
    try:
        return build(arch, in_channels=in_ch, out_channels=out_ch, **conf)
    except BundleError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: Path, doc: dict[str, Any]) -> None:
    """Atomic ``torch.save``: a kill at any moment leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(doc, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint is tensors and plain containers, never code."""
    if not path.is_file():
        raise UsageError(f"no training run to resume here (its state would be {path})", path.parent)
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
        ckpt = load_checkpoint(_find_checkpoint(rdir))
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
    if cfg.init and ckpt is None:
        apply_init(cfg)  # the bundle's method, networks, size and normalisation
    check_config(cfg)
    reporter = reporter or Reporter(cfg.quiet)
    log = reporter.log
    if ignored:
        log(f"resume: keeping the checkpoint's {', '.join(sorted(ignored))} (only {', '.join(sorted(RESUME_OVERRIDES))} may change)")
    out_dir = Path(cfg.out)
    if ckpt is None and (checkpoint_path(out_dir).exists() or (out_dir / CHECKPOINT).exists()):
        raise UsageError(f"{out_dir} already holds a training run; continue it with --resume {out_dir} or pick a new folder")
    return _run(cfg, ckpt, reporter)


def _setup_determinism(seed: int, device: str) -> None:
    """Seed every generator and ask torch for deterministic kernels, so a seeded run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


@dataclass
class _Job:
    """What every stage of one run shares, built once by :func:`_run` so the stage loop reads as steps."""

    cfg: TrainConfig
    ds: Any
    device: str
    threads: int
    loss_name: str
    loss_fn: Any
    opts: Any
    arch_of: dict[str, str]
    conf_of: dict[str, dict[str, Any]]
    out_dir: Path
    finished: dict[str, dict[str, Any]]
    current: dict[str, Any] | None

    @property
    def ckpt_path(self) -> Path:
        """Where the checkpoint is written after every epoch: beside the bundle, or where an older run kept it."""
        return _find_checkpoint(self.out_dir)

    @property
    def metrics_path(self) -> Path:
        """The per-epoch metrics log."""
        return self.out_dir / METRICS

    def doc(self, current_state: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint document: config, split, finished stages and the running stage's state."""
        return {"format": "segcli-train-checkpoint", "version": 1, "config": self.cfg.to_dict(),
                "split": {"train": self.ds.split.train, "val": self.ds.split.val},
                "finished": self.finished, "current": current_state}

    def log_metrics(self, rec: dict[str, Any]) -> None:
        """Append one epoch's record to metrics.jsonl."""
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(_jsonable(rec)) + "\n")


def _load_checked_dataset(cfg: TrainConfig, ckpt: dict[str, Any] | None, log: Any) -> Any:
    """Read the dataset; on resume refuse one whose split changed, and record the normalisation chosen."""
    ds = load_dataset(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, splits_file=cfg.splits,
                      channels=cfg.channels, normalization=cfg.normalization, cache_gb=cfg.cache_gb,
                      workers=cfg.workers, log=log, boundary=cfg.boundary)
    if ckpt is not None and (list(ckpt["split"]["train"]) != ds.split.train or list(ckpt["split"]["val"]) != ds.split.val):
        raise DatasetError("the dataset's cases changed since the checkpoint was written; cannot resume", cfg.data)
    if cfg.normalization is None:
        cfg.normalization = ds.normalization  # recorded, so a resume normalises identically
    if cfg.stain_jitter and cfg.augment and (ds.in_channels != 3 or (cfg.normalization or {}).get("kind") != "dtype"):
        raise UsageError("--stain-jitter needs RGB images with the dtype normalisation (8-bit H&E; try --channels rgb)")
    if cfg.endoscopy_jitter and cfg.augment and (ds.in_channels != 3 or (cfg.normalization or {}).get("kind") != "dtype"):
        raise UsageError("--endoscopy-jitter needs RGB images with the dtype normalisation (8-bit frames; try --channels rgb)")
    return ds


def _loss(cfg: TrainConfig, n_out: int) -> tuple[str, Any]:
    """The loss's name (the method's default unless --loss) and the loss function; a bad one is a usage error."""
    loss_name = cfg.loss or default_loss(cfg.method, n_out)
    try:
        return loss_name, make_loss(loss_name, n_out, cfg.class_weights)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _resume_state(ckpt: dict[str, Any] | None, out_dir: Path, log: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The finished stages and the running stage's state; trims or starts metrics.jsonl to match."""
    metrics_path = out_dir / METRICS
    finished: dict[str, dict[str, Any]] = dict(ckpt["finished"]) if ckpt else {}
    current = ckpt.get("current") if ckpt else None
    if ckpt is not None:
        done = {k: int(v["summary"]["epochs_run"]) for k, v in finished.items()}
        _trim_metrics(metrics_path, done, (current["stage"], int(current["epoch"])) if current else None)
        log(f"resuming {out_dir}: " + (f"{current['stage']} stage after epoch {current['epoch']}" if current
                                       else f"stages done: {', '.join(finished) or 'none'}"))
    else:
        metrics_path.write_text("")
    return finished, current


def _make_stage(job: _Job, idx: int, role: str, model: Any, models: dict[str, Any], log: Any) -> Any:
    """The stage of ``role`` for this method, with its share of the time limit."""
    cfg, finished, stage_names = job.cfg, job.finished, roles(job.cfg.method)
    if role == "coarse":
        stage = coarse_stage(job.ds, cfg, model, job.loss_fn, idx, job.device, log)
    else:
        stage = fine_stage(cfg.method)(job.ds, cfg, model, job.loss_fn, idx, job.device, log, models["coarse"])
    if cfg.time_limit is not None:
        spent = sum(float(v["summary"]["time_s"]) for v in finished.values())
        share = cfg.stage_split if (len(stage_names) == 2 and idx == 0) else 1.0
        stage.time_budget = max(cfg.time_limit * share - spent, 0.0) if idx == 0 else max(cfg.time_limit - spent, 0.0)
    return stage


def _train_stages(job: _Job, reporter: Reporter) -> dict[str, Any]:
    """Train every stage not yet finished (resuming the running one); returns the trained networks."""
    cfg, log, current = job.cfg, reporter.log, job.current
    hint = f"; continue with --resume {job.out_dir}"
    models: dict[str, Any] = {}
    with StopFlag() as stop:
        for idx, role in enumerate(roles(cfg.method)):
            model = _build_net(job.arch_of[role], job.conf_of[role], job.ds.in_channels, job.ds.n_out, cfg.seed * 1000 + idx)
            if role in job.finished:
                model.load_state_dict(job.finished[role]["state"])
                models[role] = model.to(job.device)
                continue
            if cfg.init and not (current and current["stage"] == role):
                load_init_weights(model, cfg, role)
            elif role == "fine" and cfg.fine_init == "coarse" and not (current and current["stage"] == "fine"):
                model.load_state_dict(job.finished["coarse"]["state"])
            stage = _make_stage(job, idx, role, model, models, log)
            resume_state = current if current and current["stage"] == role else None
            log(f"stage {role}: {job.arch_of[role]} {job.conf_of[role]}, {sum(p.numel() for p in model.parameters()):,} params, "
                f"{stage.epochs} epochs x {stage.steps_per_epoch} steps, loss {job.loss_name}, device {job.device} "
                f"({job.threads} threads)" + (f", budget {stage.time_budget:.0f} s" if stage.time_budget is not None else ""))
            result = fit(stage, job.opts, save=lambda st: save_checkpoint(job.ckpt_path, job.doc(st)),
                         log_metrics=job.log_metrics, stop=stop, reporter=reporter, resume=resume_state,
                         checkpoint_hint=hint)
            job.finished[role] = {"state": result.best_state, "summary": result.summary}
            current = None
            save_checkpoint(job.ckpt_path, job.doc(None))
            models[role] = stage.model
            log(f"stage {role} done: best val dice {result.summary['val_dice']} at epoch {result.summary['best_epoch']}, "
                f"{result.summary['epochs_run']} epochs, stopped by {result.summary['stopped']}, {result.summary['time_s']} s")
    return models


def _run(cfg: TrainConfig, ckpt: dict[str, Any] | None, reporter: Reporter) -> TrainResult:
    """One training run from a checked config: data, stages, bundle, then the full-resolution score."""
    log = reporter.log
    device = resolve_device(cfg.device)
    threads = set_threads(cfg.threads)
    apply_threads()  # training always runs torch
    _setup_determinism(cfg.seed, device)
    t_start = time.perf_counter()
    ds = _load_checked_dataset(cfg, ckpt, log)

    check_dataset(cfg, ds)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.command is None:
        cfg.command = cli_equivalent(cfg)

    loss_name, loss_fn = _loss(cfg, ds.n_out)
    opts = FitOptions(lr=cfg.lr, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, schedule=cfg.schedule,
                      patience=cfg.patience, device=device, amp=cfg.amp,
                      cpu_bf16=cfg.amp and device == "cpu" and cpu_has_bf16(), channels_last=device == "cpu",
                      augment=AugmentConfig(stain=cfg.stain_jitter, endoscopy=cfg.endoscopy_jitter) if cfg.augment else None, seed=cfg.seed)
    stage_names = roles(cfg.method)
    arch_of = {"coarse": cfg.arch, "fine": cfg.fine_arch or cfg.arch}
    conf_of = role_configs(cfg) or {r: net_config(cfg, arch_of[r]) for r in stage_names}
    finished, current = _resume_state(ckpt, out_dir, log)
    job = _Job(cfg, ds, device, threads, loss_name, loss_fn, opts, arch_of, conf_of, out_dir, finished, current)
    models = _train_stages(job, reporter)

    stages = {r: dict(finished[r]["summary"]) for r in stage_names}
    training = _training_section(cfg, ds, stages, loss_name, device, time.perf_counter() - t_start)
    _write_bundle(out_dir, cfg, ds, models, arch_of, conf_of, training)
    spent = sum(float(st.get("time_s") or 0.0) for st in stages.values())
    if cfg.val_full_res and ds.val and cfg.time_limit is not None and spent >= cfg.time_limit:
        log(f"full-resolution validation skipped: the time limit ({cfg.time_limit:g} s) is spent")
    elif cfg.val_full_res and ds.val:
        _add_full_res_validation(job, models, training, log)
    log(f"bundle written to {out_dir}; the resume state is beside it in {job.ckpt_path.parent} "
        "(delete that folder once no more training of this run is planned)")
    return TrainResult(out_dir, training, stages)


def _add_full_res_validation(job: _Job, models: dict[str, Any], training: dict[str, Any], log: Any) -> None:
    """Score the written bundle as ``segcli predict`` runs it and rewrite it with that score (never fatal)."""
    cfg, ds, out_dir = job.cfg, job.ds, job.out_dir
    try:
        full = full_res_validation(out_dir, ds, cfg, job.device)
    except Exception as exc:  # an extra: the bundle is already written, never lose the run over it
        log(f"full-resolution validation skipped: {type(exc).__name__}: {exc}")
        full = None
    if full is not None:
        training["val_full_res"] = full
        training["val_score"] = full["dice"]
        training["val_score_kind"] = f"{cfg.method} Dice at full resolution on the val split (mean over cases)"
        _write_bundle(out_dir, cfg, ds, models, job.arch_of, job.conf_of, training)
        log(f"full resolution ({cfg.method}, {full['cases']} val cases): dice {full['dice']:.4f}  iou {full['iou']:.4f}  "
            f"precision {full['precision']:.4f}  recall {full['recall']:.4f}  object recall {full['object_recall']:.4f}  "
            f"({full['seconds']:.1f} s)")


def _train_precision(cfg: TrainConfig, device: str) -> str:
    """How the training steps computed (validation and the recorded scores are always fp32)."""
    if cfg.amp and device.startswith("cuda"):
        return "fp16 autocast (CUDA)"
    if cfg.amp and device == "cpu" and cpu_has_bf16():
        return "bf16 autocast, channels_last (CPU)"
    return "fp32" + (", channels_last" if device == "cpu" else "")


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
    last_role = list(stages)[-1]
    last = stages[last_role]
    method = TABLE[cfg.method]
    two_stage = len(method.roles) == 2

    def only(option: str) -> Any:  # a setting the method reads, None for one that ignores it
        return getattr(cfg, option) if option in method.train_options else None

    kind = {"coarse": "whole images", "fine": method.fine_val_kind}[last_role]
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
        "fine_epochs": cfg.fine_epochs or cfg.epochs if two_stage else None,
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
        "endoscopy_jitter": cfg.endoscopy_jitter,
        "jitter": only("jitter"),
        "fine_init": cfg.fine_init if two_stage else None,
        "sampling": only("sampling"),
        "seed": cfg.seed,
        "channels": cfg.channels,
        "device": device,
        "train_precision": _train_precision(cfg, device),
        "fine_crops": only("fine_crops"),
        "crops_per_image": only("crops_per_image"),
        "torch": torch.__version__,
        "seconds": round(seconds, 1),
        "config": cfg.to_dict(),
    })


def _trained_param(name: str, cfg: TrainConfig, S: int) -> Any:
    """A method parameter as a trained bundle records it: the training's own setting, else its default at S."""
    if name == "pad":
        return cfg.pad if cfg.pad is not None else default_pad(S)
    if name == "patch_size":
        return cfg.patch_size or S
    return getattr(cfg, name) if hasattr(cfg, name) else DEFAULT_PARAMS[name]


def _write_bundle(out_dir: Path, cfg: TrainConfig, ds: Any, models: dict[str, Any], arch_of: dict[str, str],
                  conf_of: dict[str, dict[str, Any]], training: dict[str, Any]) -> None:
    S = cfg.size
    params: dict[str, Any] = {"threshold": DEFAULT_PARAMS["threshold"], "keep_aspect": DEFAULT_PARAMS["keep_aspect"]}
    params.update({name: _trained_param(name, cfg, S) for name in TABLE[cfg.method].train_params})
    fg = ", ".join(ds.classes[1:])
    info = {"task": f"{fg} segmentation ({ds.spec.modality or 'images'})", "dataset": ds.spec.name,
            "licence": ds.spec.licence, "modality": ds.spec.modality,
            "description": f"trained with segcli train --method {cfg.method} on {ds.spec.name}"}
    nets = {r: (arch_of[r], conf_of[r], models[r].cpu()) for r in models}
    save_bundle(out_dir, name=cfg.name or out_dir.resolve().name, method=cfg.method, classes=ds.classes,
                in_channels=ds.in_channels, input_size=S, normalization=ds.normalization, networks=nets,
                params=params, info=_jsonable(info), training=_jsonable(training),
                instances=ds.spec.meta.get("instances"))  # dataset.json's boundary class, if it names one


def full_res_validation(bundle_dir: Path, ds: Any, cfg: TrainConfig, device: str) -> dict[str, Any]:
    """Score the finished bundle on the val cases exactly as ``segcli predict`` would run it."""
    t0 = time.perf_counter()
    seg = Inferer(PredictOptions.from_kwargs(bundle_dir, backend="torch", device=device, channels=cfg.channels,
                                             threads=cfg.threads))
    by_stem = {c.stem: c for c in ds.spec.cases}
    K = len(ds.classes)
    rows = []
    hits = objs = 0
    for stem in ds.split.val:
        case = by_stem[stem]
        img, mask, sp, vol = read_case(case)
        try:
            res, _ = seg.segment_array(img, kind="volume" if vol else "2d", spacing=sp, path=case.images[0])
        except EmptyImageError:
            res = None
        # a boundary class is scored as trained, apart from its object (res.parts: the labels before folding)
        labels = np.zeros(mask.shape, np.uint8) if res is None else res.labels if res.parts is None else res.parts
        m = metrics.case_metrics(labels, mask, range(1, K), spacing=sp, with_hd95=False)
        rows.append([[m[c][k] for k in ("dice", "iou", "precision", "recall")] for c in range(1, K)])
        hits += sum(m[c]["hit"] for c in range(1, K))
        objs += sum(m[c]["objects"] for c in range(1, K))
    a = np.asarray(rows, dtype=np.float64)  # (cases, classes, 4); NaN where a class is absent from both
    with np.errstate(invalid="ignore"):
        mean = np.nan_to_num(np.nanmean(a.reshape(-1, 4), axis=0), nan=0.0) if a.size else np.zeros(4)
    return {"cases": len(rows), "dice": float(mean[0]), "iou": float(mean[1]), "precision": float(mean[2]),
            "recall": float(mean[3]), "object_recall": hits / objs if objs else float("nan"),
            "seconds": round(time.perf_counter() - t0, 1)}
