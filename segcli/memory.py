"""Memory budget: parse ``--max-memory``, estimate what a run would allocate, refuse before allocating.

Users of nnU-Net/TotalSegmentator/tiatoolbox lose hours to the OOM killer on big inputs (anchors (c)
1, 2, 11). segcli estimates the peak of the in-memory path from the header alone (shape, dtype,
channels) and, when it would not fit, either takes the bounded path (segment-then-segment over a lazy
TIFF) or stops with a one-line message naming the file, the estimate and the way out.

Estimates here are deliberately simple sums of the big arrays an image brings (decoded, normalised,
mask, accumulators); the interpreter, the networks at batch 1 and a route's working set come from the
run's measured memory plan (:mod:`segcli.memplan`). A file fits when the plan's minimum plus its own
buffers (times the files held at once) fit the budget.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from segcli.errors import InputError, UsageError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Above this many pixels a TIFF goes through the lazy (bounded-memory) path whatever the budget.
LAZY_PIXELS = 64 * 10**6
# Decoded bytes per slab of a streamed volume; the ITK buffer and the reoriented copy double it.
SLAB_BYTES = 64 * 2**20
# Bytes per pixel the instance split holds (--instances, segcli.instances.split_touching over a window or a
# whole image): components, distances (scipy's EDT with its feature transform), seeds, the watershed's
# float64 copy, ids. Measured: a 16000² nuclei-he mask split tile by tile grew RSS by 161 MB, its windows at
# the reach 1536² (68 bytes per window pixel, with the reader's 16 MiB cache and the pending pixels).
INSTANCE_PER_PIXEL = 64


def peak_rss_bytes() -> int:
    """This process's own peak resident set (bytes): ``VmHWM``, the high-water mark of its own address space.

    Not ``ru_maxrss``: on Linux a process started by fork and exec carries its parent's peak into its own
    ``ru_maxrss``, so a segcli run (or its ONNX export child) started from a large Python process (a test
    session, a batch script) reported that process's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # lazy: Unix-only; the fallback where /proc is missing
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def parse_size(value: str | int | float | None) -> int | None:
    """``"2GB"``, ``"1.5G"``, ``"512MiB"``, ``2_000_000_000`` → bytes; ``None``/``"auto"`` → None."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise UsageError(f"--max-memory must be positive, got {value}")
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "auto", "none"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise UsageError(f"--max-memory {value!r} is not a size; use e.g. 2GB, 1500MB or 4GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise UsageError(f"--max-memory must be positive, got {value!r}")
    return n


def available_memory() -> int:
    """Bytes the OS could give us now (MemAvailable, or psutil), with a conservative fallback."""
    try:
        # lazy: psutil is optional (segcli[bench])
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


def budget(max_memory: str | int | None) -> int:
    """The byte budget of one run: the user's ``max_memory``, else 70 % of what is available now."""
    parsed = parse_size(max_memory)
    return parsed if parsed is not None else int(0.7 * available_memory())


def human(n: float) -> str:
    """Bytes as a short human string (``1.6 GB``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


def estimate_2d(shape: tuple[int, int], channels: int, itemsize: int, *, model_channels: int, n_classes: int,
                method: str, size: int, return_probs: bool, instances: bool = False, boundary: bool = False) -> int:
    """Peak bytes an image brings to the in-memory 2D path: decoded image, normalised copies, engine
    buffers, outputs (the networks and the interpreter are the memory plan's, segcli.memplan)."""
    H, W = (int(v) for v in shape)
    px = H * W
    total = px * channels * itemsize  # decoded image
    # Normalised float32 (C, H, W), held up to three times at the peak (the normaliser's temporary, the
    # channel-first copy, the engine's plane): a 9000² RGB refine run peaked at 3.6 GB where one copy
    # predicted 1.9 GB (benchmarks/README.md, bench_slide findings).
    total += px * model_channels * 4 * 3
    total += px * (2 if boundary else 1)  # uint8 labels (and the network's own, a boundary class kept apart)
    k_fuse = 1 if n_classes == 2 else n_classes
    if method == "sliding":
        total += px * (n_classes + 1) * 4  # float accumulator + weights
    elif method == "stts":
        total += px * (k_fuse * 4 if return_probs or n_classes > 2 else 1)  # fusion store
    if return_probs:
        total += px * n_classes * 4
    if instances:  # the whole mask split at once (segcli.instances)
        total += px * INSTANCE_PER_PIXEL
    return total


def estimate_volume(shape: tuple[int, ...], channels: int, itemsize: int, *, model_channels: int, n_classes: int,
                    return_probs: bool, streamed: bool = False) -> int:
    """Peak bytes a volume brings: the decoded array and the uint8 mask with its reoriented copy for the
    writer, or, streamed, three slabs (ITK's buffer, the reoriented copy, the next one) and the mask once
    (written straight into the writer's file-order buffer, then plane by plane: no copy); and
    (optionally) probabilities.

    Slices are normalised one at a time (see :class:`segcli.engines.volume.SlicePlane`), so no float
    copy of the volume is counted.
    """
    vox = 1
    for s in shape:
        vox *= int(s)
    if streamed:
        total = 3 * min(SLAB_BYTES, vox * channels * itemsize) + vox
    else:
        total = vox * channels * itemsize + 2 * vox
    if return_probs:
        total += 2 * vox * n_classes * 4  # stacked per-slice probabilities + the writer's copy
    return total


def run_need(per_process: int, workers: int = 1, parent: int = 0) -> int:
    """What the whole run needs when each of ``workers`` processes needs ``per_process`` bytes and the
    parent that started them holds ``parent`` (its RSS once it released its networks)."""
    return per_process * max(1, workers) + (parent if workers > 1 else 0)


def budget_words(budget: int, user_budget: bool) -> str:
    """How a refusal names the run's budget."""
    return f"--max-memory is {human(budget)}" if user_budget else f"the memory available allows {human(budget)}"


def file_need(seg: Any, kind: str, own: int) -> int:
    """Bytes the whole run needs for one file: the memory plan's minimum (interpreter, networks at batch 1,
    the route's working set) plus the file's own buffers for every file held at once, per worker."""
    per = seg.plan_minimum(kind) + own * seg.budget_share
    return run_need(per, seg.workers, seg.parent_bytes)


def check_file(seg: Any, kind: str, own: int, path: Any, what: str, hint: str) -> None:
    """Refuse one file, before it is decoded, with one line naming it and the minimum it needs.

    ``own``: what the file itself brings (:func:`estimate_2d`, :func:`estimate_volume`). Read-ahead
    files (``seg.budget_share``) and workers (``seg.workers``) are counted as they will be held.
    """
    need = file_need(seg, kind, own)
    if need > seg.run_budget:
        held = [f"{seg.budget_share} files held at once (--prefetch 0 holds one)"] if seg.budget_share > 1 else []
        held += [f"--workers {seg.workers}"] if seg.workers > 1 else []
        how = f" with {' and '.join(held)}" if held else ""
        raise InputError(f"{what} needs at least {human(need)}{how}; "
                         f"{budget_words(seg.run_budget, seg.options.max_memory is not None)}; {hint}", path)


def fits(seg: Any, kind: str, own: int) -> bool:
    """True when a file bringing ``own`` bytes fits the run's budget (see :func:`check_file`)."""
    return file_need(seg, kind, own) <= seg.run_budget


def fine_batch(limit: int, channels: int, size: int, n_classes: int, zoom: float, wanted: int) -> int:
    """Largest fine-pass batch ≤ ``wanted`` whose crops, inputs and outputs fit in a quarter of the budget."""
    per_item = 4 * size * size * (channels + 2 * n_classes) + 4 * channels * int(size * zoom) ** 2
    return max(1, min(wanted, (limit // 4) // max(per_item, 1)))


def image_bytes(seg: Any, kind: str, shape: tuple[int, ...], channels: int, itemsize: int,
                streamed: bool = False, return_probs: bool | None = None) -> int:
    """What one image of ``shape`` brings on the in-memory route of ``kind`` (or a streamed volume)."""
    bundle = seg.bundle_for(kind)
    probs = seg.options.probabilities if return_probs is None else return_probs
    if len(shape) == 3:
        return estimate_volume(shape, channels, itemsize, model_channels=bundle.in_channels,
                               n_classes=bundle.n_classes, return_probs=probs, streamed=streamed)
    p = seg.plan_for(bundle)
    return estimate_2d(shape, channels, itemsize, model_channels=bundle.in_channels,  # type: ignore[arg-type]
                       n_classes=bundle.n_classes, method=p.method, size=p.size, return_probs=probs,
                       instances=bool(getattr(seg.options, "instances", False)),
                       boundary=getattr(bundle, "boundary", None) is not None)


def check_in_memory(seg: Any, kind: str, shape: tuple[int, ...], channels: int, itemsize: int,
                    path: Any) -> None:
    """Refuse, with the minimum it needs, a file whose in-memory run would exceed the budget."""
    est = image_bytes(seg, kind, shape, channels, itemsize)
    if len(shape) == 3:
        check_volume_fits(seg, est, shape, path, kind)
        return
    p = seg.plan_for(seg.bundle_for(kind))
    hint = "use --method stts on a .tif input, which is read by region" if p.method != "stts" \
        else "save the image as a tiled TIFF so it can be read by region"
    check_file(seg, kind, est, path, f"--method {p.method} on this {shape[0]}x{shape[1]} image", hint)


def check_volume_fits(seg: Any, est: int, shape: tuple[int, ...], path: Any, kind: str = "volume") -> None:
    """Refuse a volume whose buffers and the plan's minimum exceed the budget, with the way out that fits."""
    hint = ("drop --probabilities or write a .nii.gz (probabilities are then streamed to disk)"
            if seg.options.probabilities else "raise --max-memory or crop the volume")
    check_file(seg, kind, est, path, f"this {'x'.join(map(str, shape))} volume", hint)


def env_budget() -> str | None:
    """``SEGCLI_MAX_MEMORY`` from the environment (the CLI flag wins)."""
    return os.environ.get("SEGCLI_MAX_MEMORY") or None
