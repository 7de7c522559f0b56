"""The fit loop of one stage: optimiser, LR schedule, validation, best weights, stop rules, checkpoints.

A stage is described by a :class:`Stage` (model, batch source, validation, loss); the loop knows
nothing about methods. Stop rules: the epoch count, ``patience`` epochs without a better validation
score, the stage's time budget (checked after every batch, so a long epoch cannot overrun it),
and SIGINT. After every epoch the whole state (model, optimiser, scheduler, AMP scaler, best
weights, numpy/torch/python RNG states) is handed to ``save`` and written atomically, so a
``kill -9`` loses at most the running epoch and ``--resume`` continues bit-exactly from the last
finished one. A checkpoint holds only tensors and plain containers (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import math
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segcli.errors import SegcliError
from segcli.train.augment import AugmentConfig, augment
from segcli.train.losses import LossFn

Batch = tuple[np.ndarray, np.ndarray]


class TrainingInterrupted(SegcliError):
    """Ctrl-C during training: a resumable checkpoint was written (exit code 130, as shells expect)."""

    exit_code = 130


#: Longest gap between two mid-stage checkpoints (seconds of wall time).
CHECKPOINT_EVERY_S = 30.0


@dataclass
class Stage:
    """One network's training: ``batches(rng)`` yields one epoch of (x, soft target) numpy batches."""

    name: str
    index: int
    model: torch.nn.Module
    epochs: int
    steps_per_epoch: int
    batches: Callable[[np.random.Generator], Iterator[Batch]]
    validate: Callable[[torch.nn.Module], dict[str, float]]
    loss_fn: LossFn
    time_budget: float | None = None  # seconds for this stage (None: no limit)


@dataclass
class FitOptions:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    patience: int | None = None
    device: str = "cpu"
    amp: bool = True  # fp16 autocast on CUDA; bf16 autocast on a CPU with native bf16 (see cpu_bf16)
    cpu_bf16: bool = False  # set by segcli.train when amp is on, the device is the CPU and it computes bf16
    channels_last: bool = False  # NHWC activations (faster convolutions on the CPU)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0


@dataclass
class StageResult:
    best_state: dict[str, torch.Tensor]
    summary: dict[str, Any]


class StopFlag:
    """SIGINT → a flag the loop polls between batches; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        try:
            self._prev = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        except ValueError:  # not the main thread: no signal handling, Ctrl-C behaves as usual
            self._installed = False
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._prev)


class Prefetch:
    """Run a batch iterator in a background thread, ``depth`` batches ahead of the training step.

    Cutting and resizing full-resolution crops is numpy work that releases the GIL, so it overlaps
    the network's step. One producer thread consumes the sampling RNG in the same order as a plain
    loop would, so the batches (and the run) are identical with or without it.
    """

    _END = object()

    def __init__(self, it: Iterator[Batch], depth: int = 2) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="segcli-batches")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator[Batch]) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the producer (a time limit or Ctrl-C ended the epoch early) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.05)
        self._thread.join()


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)
    raise SegcliError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def lr_factor(schedule: str, total_steps: int | list[int],
              time_frac: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Per-step LR multiplier: cosine to 1 % of the base, poly (nnU-Net, power 0.9), or constant.

    ``total_steps`` may be a one-element list, read at every step, so that a time-limited run can
    shorten its schedule once it knows how many epochs fit. ``time_frac`` (the share of the time budget
    spent) makes the schedule follow whichever runs out first, steps or time: an estimate from the first
    epochs that turns out optimistic (a machine that gets busier) still ends the run annealed.
    """
    holder = total_steps if isinstance(total_steps, list) else [total_steps]

    def frac(step: int) -> float:
        total = max(1, holder[0])
        by_time = min(max(time_frac(), 0.0), 1.0) if time_frac is not None else 0.0
        return max(min(step, total) / total, by_time)

    def cosine(step: int) -> float:
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac(step)))

    def poly(step: int) -> float:
        return max(1.0 - frac(step), 0.0) ** 0.9 + 1e-3

    table = {"cosine": cosine, "poly": poly, "constant": lambda step: 1.0, "none": lambda step: 1.0}
    if schedule not in table:
        raise SegcliError(f"unknown schedule {schedule!r}; use cosine, poly or constant")
    return table[schedule]


def rng_state(np_rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
    """All random states as plain containers and tensors (safe for ``weights_only`` loading)."""
    st: dict[str, Any] = {
        "numpy": np_rng.bit_generator.state,
        "torch_aug": gen.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any], np_rng: np.random.Generator, gen: torch.Generator) -> None:
    np_rng.bit_generator.state = st["numpy"]
    gen.set_state(st["torch_aug"])
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _optimizer_step(optim: torch.optim.Optimizer) -> int:
    """The optimiser's own step counter (Adam keeps one per parameter): proof that a resume restored it."""
    steps = [int(st["step"]) for st in optim.state_dict()["state"].values() if "step" in st]
    return max(steps) if steps else 0


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # contiguous(): a channels_last model's 4D weights are NHWC-strided, and safetensors wants plain layout.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def predict_logits(model: torch.nn.Module, x: np.ndarray, device: str, batch_size: int = 32, amp: bool = False) -> np.ndarray:
    """Logits for a numpy batch, in chunks, eval mode, no grad (validation and S1 scoring)."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)).to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp and device.startswith("cuda")):
                outs.append(model(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


class Reporter:
    """Progress: a rich bar on a terminal, one line per epoch otherwise, nothing with ``quiet``."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._progress: Any = None
        self._task: Any = None

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.console.print(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def stage_start(self, name: str, epochs: int, steps: int, start_epoch: int) -> None:
        if not self.live:
            return
        # lazy: rich.progress costs ~50 ms to import; only a shown progress bar needs it
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(f"{name} {start_epoch + 1}/{epochs}", total=steps, loss="-", info="")

    def step(self, name: str, epoch: int, epochs: int, done: int, steps: int, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=steps, loss=f"{loss:.4f}",
                                  description=f"{name} {epoch + 1}/{epochs}")

    def epoch_end(self, rec: dict[str, Any], eta_s: float) -> None:
        score = rec.get("val_dice")
        text = (f"{rec['stage']} epoch {rec['epoch']}/{rec['epochs']}  loss {rec['train_loss']:.4f}  "
                f"val dice {score:.4f}" if score is not None else
                f"{rec['stage']} epoch {rec['epoch']}/{rec['epochs']}  loss {rec['train_loss']:.4f}")
        if rec.get("val_miou") is not None:
            text += f"  mIoU {rec['val_miou']:.4f}"
        text += f"  {rec['epoch_s']:.1f} s" + ("  *" if rec.get("best") else "") + f"  ETA {_fmt_eta(eta_s)}"
        if self._progress is not None:
            self._progress.update(self._task, info=f"val {score:.3f}" if score is not None else "")
            self._progress.console.print(text)
        else:
            self.log(text)

    def stage_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def undertrained_note(stages: dict[str, dict[str, Any]], out: Any) -> str | None:
    """One line when the time limit stopped a stage before it finished its first epoch: such a model is
    written (the user asked for the limit) but never in silence."""
    short = [f"{name} after {s.get('steps', 0)} of {s['steps_per_epoch']} steps of its first epoch"
             for name, s in stages.items()
             if s.get("stopped") == "time" and int(s.get("steps") or 0) < int(s.get("steps_per_epoch") or 0)]
    if not short:
        return None
    return (f"warning: the time limit stopped training ({'; '.join(short)}); the model is undertrained. "
            f"Continue it with: segcli train --resume {out} --time-limit 30m")


def _fmt_eta(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _StageRun:
    """The mutable state of one stage's training (network, optimiser, RNGs, best weights, counters), so that
    :func:`fit` reads as the epoch's steps and a checkpoint is one method."""

    def __init__(self, stage: Stage, opts: FitOptions) -> None:
        """Build the optimiser, schedule, scaler and generators in the order that fixes the random streams."""
        self.stage, self.opts = stage, opts
        self.dev = dev = opts.device
        self.model = stage.model.to(dev)
        if opts.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optim = make_optimizer(opts.optimizer, self.model.parameters(), opts.lr, opts.weight_decay)
        self.total_steps = [stage.epochs * stage.steps_per_epoch]  # shortened when a time budget allows fewer epochs
        self._epoch_t0: float | None = None  # start of the running epoch (its time is not yet in self.elapsed)
        self.elapsed = 0.0  # read by the schedule's first call, in LambdaLR's constructor
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.optim, lr_factor(opts.schedule, self.total_steps, self._time_frac if stage.time_budget else None))
        self.use_amp = opts.amp and dev.startswith("cuda")
        self.use_bf16 = opts.cpu_bf16 and dev == "cpu"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.np_rng = np.random.default_rng([opts.seed, stage.index])
        self.gen = torch.Generator().manual_seed(opts.seed * 7919 + stage.index)
        self.start_epoch, self.best_score, self.best_epoch, self.bad, self.elapsed = 0, -math.inf, 0, 0, 0.0
        self.best_state = _copy_state(self.model)
        self.best_val: dict[str, float] = {}
        self.steps_done = 0
        self.epoch_times: list[float] = []

    def _time_frac(self) -> float:
        """The share of the stage's time budget spent so far, the running epoch included."""
        running = time.perf_counter() - self._epoch_t0 if self._epoch_t0 is not None else 0.0
        return (self.elapsed + running) / max(float(self.stage.time_budget or 0.0), 1e-9)

    def restore(self, resume: dict[str, Any]) -> None:
        """Continue from a saved stage state: weights, optimiser, schedule, scaler, counters and RNGs."""
        self.model.load_state_dict(resume["model"])
        self.optim.load_state_dict(resume["optimizer"])
        self.sched.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            self.scaler.load_state_dict(resume["scaler"])
        self.best_state = resume["best_state"]
        self.best_score, self.best_epoch, self.bad = (float(resume["best_score"]), int(resume["best_epoch"]),
                                                      int(resume["bad_epochs"]))
        self.start_epoch, self.elapsed = int(resume["epoch"]), float(resume["elapsed"])
        self.steps_done = int(resume.get("steps", 0))
        self.total_steps[0] = int(resume.get("schedule_steps", self.total_steps[0]))
        self.best_val = dict(resume.get("best_val", {}))
        set_rng_state(resume["rng"], self.np_rng, self.gen)

    def state(self, epoch: int) -> dict[str, Any]:
        """The whole stage state for a checkpoint (what :meth:`restore` reads back)."""
        return {
            "stage": self.stage.name, "epoch": epoch, "steps": self.steps_done, "elapsed": self.elapsed,
            "schedule_steps": self.total_steps[0],
            "model": _copy_state(self.model), "optimizer": self.optim.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else {},
            "best_state": self.best_state, "best_val": self.best_val, "best_score": self.best_score,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad,
            "rng": rng_state(self.np_rng, self.gen),
        }

    def _autocast(self) -> Any:
        """fp16 autocast on CUDA, bf16 on a CPU that computes it natively, else nothing."""
        if self.use_amp:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=self.use_bf16)

    def train_epoch(self, epoch: int, t0: float, stop: StopFlag, reporter: Reporter) -> tuple[list[float], bool]:
        """One epoch's optimiser steps; stops early on Ctrl-C or the time budget. Returns (losses, out of time)."""
        stage, opts, dev, model = self.stage, self.opts, self.dev, self.model
        self.model.train()
        losses: list[float] = []
        out_of_time = False
        self._epoch_t0 = t0
        batches = Prefetch(stage.batches(self.np_rng))
        try:
            for xb, yb in batches:
                x = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(dev)
                y = torch.from_numpy(np.ascontiguousarray(yb, dtype=np.float32)).to(dev)
                if opts.augment is not None:
                    x, y = augment(x, y, self.gen, opts.augment)
                if opts.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.optim.zero_grad(set_to_none=True)
                with self._autocast():
                    if hasattr(model, "compute_loss"):
                        loss = model.compute_loss(x, y, stage.loss_fn)
                    else:
                        out = model(x)
                if not hasattr(model, "compute_loss"):
                    loss = stage.loss_fn(out.float(), y)  # the loss in fp32 whatever the autocast
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optim)
                self.scaler.update()
                self.sched.step()
                self.steps_done += 1
                losses.append(float(loss.detach()))
                reporter.step(stage.name, epoch, stage.epochs, len(losses), stage.steps_per_epoch, float(np.mean(losses)))
                if stop.requested:
                    break
                # Checked after every step, in every stage: a stage whose budget is already spent makes one step.
                if stage.time_budget is not None and self.elapsed + time.perf_counter() - t0 >= stage.time_budget:
                    out_of_time = True
                    break
        finally:
            self._epoch_t0 = None  # the caller adds the epoch to self.elapsed
            batches.close()  # the producer is stopped before any RNG state is read
        return losses, out_of_time

    def score(self, epoch: int, val: dict[str, float], losses: list[float]) -> bool:
        """Record the epoch's validation; keeps the best weights. True when the score improved."""
        score = val.get("dice")
        if score is None or not math.isfinite(score):
            score = -float(np.mean(losses)) if losses else -math.inf
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad = score, epoch + 1, 0
            self.best_state = _copy_state(self.model)
            self.best_val = {k: float(v) for k, v in val.items() if v is not None}
        else:
            self.bad += 1
        return improved

    def fit_schedule(self, epoch: int, dt: float, reporter: Reporter) -> None:
        """Shorten the LR schedule to the epochs the time budget allows, so a time-limited run still anneals."""
        stage = self.stage
        # Measured on the 2nd epoch: the 1st pays one-off warm-up costs.
        fit_epochs = epoch + 1 + int(max(stage.time_budget - self.elapsed, 0.0) // max(dt, 1e-6))
        if fit_epochs < stage.epochs and fit_epochs * stage.steps_per_epoch < self.total_steps[0]:
            self.total_steps[0] = max(fit_epochs, epoch + 2) * stage.steps_per_epoch
            reporter.log(f"{stage.name}: about {fit_epochs} of {stage.epochs} epochs fit the time budget; "
                         "LR schedule shortened to match")

    def record(self, epoch: int, losses: list[float], val: dict[str, float], dt: float, improved: bool,
               out_of_time: bool) -> dict[str, Any]:
        """The epoch's line in metrics.jsonl."""
        return {
            "stage": self.stage.name, "epoch": epoch + 1, "epochs": self.stage.epochs,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "val_dice": val.get("dice"), "val_miou": val.get("miou"),
            "lr": float(self.optim.param_groups[0]["lr"]), "epoch_s": round(dt, 3), "elapsed_s": round(self.elapsed, 3),
            "steps": self.steps_done, "best": improved, "partial": out_of_time,
        }

    def eta(self, epoch: int) -> float:
        """Seconds left: the mean of the last epochs times those remaining, capped by the time budget."""
        remaining = self.stage.epochs - epoch - 1
        eta = float(np.mean(self.epoch_times[-3:])) * remaining
        if self.stage.time_budget is not None:
            eta = min(eta, max(self.stage.time_budget - self.elapsed, 0.0))
        return eta

    def summary(self, stopped: str) -> dict[str, Any]:
        """The stage's summary for the checkpoint and the bundle."""
        return {
            "epochs_run": self.start_epoch + len(self.epoch_times),
            "best_epoch": self.best_epoch,
            "val_dice": self.best_val.get("dice"),
            "val_miou": self.best_val.get("miou"),
            "stopped": stopped,
            "time_s": round(self.elapsed, 1),
            "steps": self.steps_done,
            "steps_per_epoch": self.stage.steps_per_epoch,
            "mean_epoch_s": round(float(np.mean(self.epoch_times)), 3) if self.epoch_times else None,
            "optimizer_step": _optimizer_step(self.optim),
        }


def fit(
    stage: Stage,
    opts: FitOptions,
    *,
    save: Callable[[dict[str, Any]], None],
    log_metrics: Callable[[dict[str, Any]], None],
    stop: StopFlag,
    reporter: Reporter,
    resume: dict[str, Any] | None = None,
    checkpoint_hint: str = "",
) -> StageResult:
    """Train ``stage`` to its end (epochs, patience, time budget); returns the best weights.

    ``save`` receives the stage state after every epoch (and on Ctrl-C); ``resume`` is such a
    state. Raises :class:`TrainingInterrupted` after saving when SIGINT was received.
    """
    run = _StageRun(stage, opts)
    if resume is not None:
        run.restore(resume)
    stopped = "epochs"
    last_save: float | None = None
    reporter.stage_start(stage.name, stage.epochs, stage.steps_per_epoch, run.start_epoch)
    try:
        # A stage whose budget the previous stage used up still makes ONE optimiser step (then validates once):
        # a limit is a limit, and the run says the model is undertrained (see undertrained_note).
        starved = stage.time_budget is not None and stage.time_budget - run.elapsed <= 0 and run.start_epoch == 0
        for epoch in range(run.start_epoch, stage.epochs):
            if stage.time_budget is not None and run.elapsed >= stage.time_budget and not (starved and epoch == 0):
                stopped = "time"
                break
            t0 = time.perf_counter()
            losses, out_of_time = run.train_epoch(epoch, t0, stop, reporter)
            if stop.requested:
                run.elapsed += time.perf_counter() - t0
                # Keep the partial epoch's progress; resuming repeats this epoch's index.
                save(run.state(epoch))
                raise TrainingInterrupted(f"interrupted during {stage.name} epoch {epoch + 1}; "
                                          f"resumable checkpoint saved{checkpoint_hint}")
            val = stage.validate(run.model)
            improved = run.score(epoch, val, losses)
            dt = time.perf_counter() - t0
            run.elapsed += dt
            run.epoch_times.append(dt)
            if stage.time_budget is not None and len(run.epoch_times) == 2 and not out_of_time:
                run.fit_schedule(epoch, dt, reporter)
            rec = run.record(epoch, losses, val, dt, improved, out_of_time)
            # The log line first, then the checkpoint: a kill between the two leaves a line past the checkpoint,
            # which --resume trims and writes again (the other order lost the line for good).
            log_metrics(rec)
            # A checkpoint after the first epoch, then at most every CHECKPOINT_EVERY_S: with 1-s epochs a
            # save per epoch (model, optimiser and best weights through torch.save) cost a quarter of the run.
            # The stage's end is saved by the caller; a kill loses at most that long, and --resume trims
            # the metric lines past the checkpoint.
            now = time.perf_counter()
            if last_save is None or now - last_save >= CHECKPOINT_EVERY_S:
                save(run.state(epoch + 1))
                last_save = now
            reporter.epoch_end(rec, run.eta(epoch))
            if out_of_time or starved:
                stopped = "time"
                break
            if opts.patience is not None and run.bad >= opts.patience:
                stopped = "patience"
                break
    finally:
        reporter.stage_end()
    run.model.load_state_dict(run.best_state)
    return StageResult(run.best_state, run.summary(stopped))
