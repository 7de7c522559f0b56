"""Training options: :class:`TrainConfig` (every ``segcli train`` flag), its checks, and the command line
that reproduces it. Read by the stages (:mod:`segcli.train.stages`) and the orchestration
(:mod:`segcli.train`)."""

from __future__ import annotations

import inspect
import re
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from segcli.errors import UsageError
from segcli.methods import TRAINABLE, roles
from segcli.nets import available
from segcli.params import CRITERIA, DEFAULT_PARAMS

METHODS = TRAINABLE  # the methods segcli.methods marks trainable
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
    pad: int | None = None  # default segcli.params.default_pad(S)
    fine_init: str = "random"  # or "coarse"
    fine_crops: str = "rough"  # stts: rough | rough-only | gt (see segcli.train.stts_crops)
    crops_per_image: int = 8  # stts: fine crops per image per epoch
    patches: int = DEFAULT_PARAMS["patches"]
    patch_size: int | None = None  # default S
    sampling: str = "uncertain"  # or "uniform"
    criterion: str = DEFAULT_PARAMS["criterion"]
    patience: int | None = None
    time_limit: float | None = None  # seconds of training
    stage_split: float = 0.5
    device: str = "auto"
    amp: bool = True
    augment: bool = True
    stain_jitter: float = 0.0  # HED stain jitter amplitude (RGB H&E; 0 = off), see train.augment
    boundary: int = 0  # > 0: targets background / object / boundary of this width from instances/ (see train.data)
    endoscopy_jitter: float = 0.0  # colour/blur/zoom/highlight strength (RGB endoscopy; 0 = off), see train.endoscopy
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
    init: str | None = None  # bundle to fine-tune from (segcli.train.init_from)

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


def check_config(cfg: TrainConfig) -> None:
    """Refuse an unusable configuration (exit 2) before any data is read."""
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r} for training; use {', '.join(METHODS)}")
    if cfg.size < 8:
        raise UsageError(f"--size must be at least 8, got {cfg.size}")
    if cfg.epochs < 1 or (cfg.fine_epochs is not None and cfg.fine_epochs < 1):
        raise UsageError("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not 0 <= cfg.boundary <= 16:
        raise UsageError(f"--boundary must be a width in px from 1 to 16 (0 = off), got {cfg.boundary}")
    if not 0.0 <= cfg.stain_jitter < 1.0:
        raise UsageError(f"--stain-jitter must be in [0, 1), got {cfg.stain_jitter}")
    if not 0.0 <= cfg.endoscopy_jitter <= 1.0:
        raise UsageError(f"--endoscopy-jitter must be in [0, 1], got {cfg.endoscopy_jitter}")
    if cfg.fine_init not in ("random", "coarse"):
        raise UsageError(f"--fine-init must be random or coarse, not {cfg.fine_init!r}")
    if cfg.sampling not in ("uncertain", "uniform"):
        raise UsageError(f"--sampling must be uncertain or uniform, not {cfg.sampling!r}")
    if cfg.criterion not in CRITERIA:
        raise UsageError(f"--criterion must be {' or '.join(CRITERIA)}, not {cfg.criterion!r}")
    if cfg.fine_crops not in ("rough", "rough-only", "gt"):
        raise UsageError(f"--fine-crops must be rough, rough-only or gt, not {cfg.fine_crops!r}")
    if cfg.crops_per_image < 1:
        raise UsageError(f"--crops-per-image must be at least 1, got {cfg.crops_per_image}")
    if cfg.jitter < 0:
        raise UsageError("--jitter must be >= 0")
    if not 0.0 < cfg.stage_split < 1.0:
        raise UsageError("stage_split must be in (0, 1)")
    if cfg.fine_init == "coarse" and len(roles(cfg.method)) < 2:
        raise UsageError("--fine-init coarse needs a two-stage method (stts or refine)")
    if cfg.fine_init == "coarse" and (cfg.fine_arch or cfg.arch) != cfg.arch:
        raise UsageError("--fine-init coarse needs the same architecture for both stages")

    archs = available()
    for a in {cfg.arch, cfg.fine_arch or cfg.arch}:
        if a not in archs:
            raise UsageError(f"unknown architecture {a!r}; known: {', '.join(sorted(archs))}")


def net_config(cfg: TrainConfig, arch: str) -> dict[str, Any]:
    """The arch config stored in the bundle: ``--arch-config`` plus ``--features`` where it applies."""
    conf = dict(cfg.arch_config)
    if cfg.features is not None:
        params = inspect.signature(available()[arch].factory).parameters
        if "features" not in params:
            raise UsageError(f"--features does not apply to architecture {arch!r}; use --arch-config")
        conf["features"] = int(cfg.features)
    return conf


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

