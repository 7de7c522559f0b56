"""What a file's content tells before and around its run: the model chosen for it (segcli.choose), the
normalisation and conversions that will run (reported as notes), inputs that are no files at all, and the
``--preview`` drawn in the writer thread. Split from :mod:`segcli.pipeline` to keep it short."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli import viz
from segcli.bundle import model_index
from segcli.choose import content_kind, guess_note, volume_kind
from segcli.errors import InputError, SegcliError
from segcli.inferer import RunContext
from segcli.io.naming import preview_path
from segcli.job import Job
from segcli.prepare import describe, intensity

if TYPE_CHECKING:
    from segcli.bundle import Bundle


def chosen_kind(options: Any, img: Any, kind: str) -> str:
    """The content kind serving an image read whole: ``kind`` with --model; else what its pixels tell
    (segcli.choose), and a grey image with --window is a CT export."""
    if options.model is not None:
        return kind
    kind = content_kind(img.array, "volume" if img.ndim == 3 else kind)
    return "ct-slice" if options.window is not None and kind in ("grey", "fluorescence") else kind


def model_choice_note(ctx: RunContext, job: Job) -> None:
    """No --model: the one-line note when the bundle chosen from the content is a guess (models/index.json)."""
    if ctx.options.model is None:
        note = guess_note(job.route.kind, ctx.bundle_for(job.route.kind).name, model_index())
        job.rep.notes.extend([note] if note else [])


def intensity_notes(ctx: RunContext, job: Job, bundle: Bundle, dtype: Any, in_memory_2d: bool) -> None:
    """The normalisation that runs (``info["normalization"]``) and the conversions made for the user (notes)."""
    if in_memory_2d:
        plan = intensity(bundle, dtype, job.route.img.channels, ctx.options.channels, ctx.options.window, job.path)
        job.rep.notes.extend(plan.notes)
        job.rep.info["normalization"] = plan.description
    else:
        job.rep.info["normalization"] = describe(bundle.normalization)


def refuse_special(path: Path) -> None:
    """A FIFO, socket or device as input: refused at once (reading a FIFO with no writer waits forever)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # missing or unreadable: the reader's own message names it
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise InputError(f"is a {what}, not a regular file; segcli reads images from files and folders "
                         "(save the stream to a file first)", path)


def streamed_kind(vol: Any, samples: int = 3) -> str:
    """The content kind of a streamed volume from a few slices (CT in HU or not): segcli.choose.volume_kind."""
    n = int(vol.spatial_shape[0])
    lows = []
    for z in sorted({int(n * (k + 1) / (samples + 1)) for k in range(samples)}):
        block = vol.block(0, min(z, n - 1), min(z, n - 1) + 1)
        if block.size and block.dtype.kind in "uif":
            lows.append(float(np.nanmin(block)) if block.dtype.kind == "f" else float(block.min()))
    return volume_kind(min(lows) if lows else -1000.0)


def write_preview(ctx: RunContext, job: Job, img: Any, labels: np.ndarray, kind: str) -> Path:
    """``--preview`` here, in the writer thread, from the pixels and mask already in memory (no second
    decode), drawn small; a failure fails the file (its outputs removed), never a silent exit 0."""
    assert job.out is not None
    bundle = ctx.bundle_for(kind)
    t = time.perf_counter()
    title = f"{job.path.name} · {bundle.name} ({job.rep.method})"
    try:
        target = viz.preview(img, labels, preview_path(job.out), classes=bundle.output_classes,
                             normalization=bundle.normalization, title=title, compact=True)
    except (ValueError, MemoryError) as exc:
        raise SegcliError(f"preview not written: {exc}", job.path) from None
    job.rep.seconds["preview"] = time.perf_counter() - t
    return target
