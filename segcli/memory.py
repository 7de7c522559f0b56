"""Memory budget: parse ``--max-memory``, estimate what a run would allocate, refuse before allocating.

Users of nnU-Net/TotalSegmentator/tiatoolbox lose hours to the OOM killer on big inputs (anchors (c)
1, 2, 11). segcli estimates the peak of the in-memory path from the header alone (shape, dtype,
channels) and, when it would not fit, either takes the bounded path (segment-then-segment over a lazy
TIFF) or stops with a one-line message naming the file, the estimate and the way out.

Estimates are deliberately simple sums of the big arrays (the interpreter, the networks and small
buffers are covered by a fixed overhead); they only need to be right within a factor that the
budget's headroom absorbs.
"""

from __future__ import annotations

import os
import re
from typing import Any

from segcli.errors import InputError, UsageError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Interpreter + torch + networks + small buffers, not counted in the per-array estimates.
OVERHEAD = 600 * 10**6
# Above this many pixels a TIFF goes through the lazy (bounded-memory) path whatever the budget.
LAZY_PIXELS = 64 * 10**6
# Decoded bytes per slab of a streamed volume; the ITK buffer and the reoriented copy double it.
SLAB_BYTES = 64 * 2**20


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
                method: str, size: int, return_probs: bool) -> int:
    """Peak bytes of the in-memory 2D path: decoded image, normalised copy, engine buffers, outputs."""
    H, W = (int(v) for v in shape)
    px = H * W
    total = px * channels * itemsize  # decoded image
    # Normalised float32 (C, H, W), held up to three times at the peak (the normaliser's temporary, the
    # channel-first copy, the engine's plane): a 9000² RGB refine run peaked at 3.6 GB where one copy
    # predicted 1.9 GB (benchmarks/README.md, bench_slide findings).
    total += px * model_channels * 4 * 3
    total += px  # uint8 labels
    k_fuse = 1 if n_classes == 2 else n_classes
    if method == "sliding":
        total += px * (n_classes + 1) * 4  # float accumulator + weights
    elif method == "stts":
        total += px * (k_fuse * 4 if return_probs or n_classes > 2 else 1)  # fusion store
    if return_probs:
        total += px * n_classes * 4
    return total + OVERHEAD


def estimate_volume(shape: tuple[int, ...], channels: int, itemsize: int, *, model_channels: int, n_classes: int,
                    return_probs: bool, streamed: bool = False) -> int:
    """Peak bytes of a volume: the decoded array (or one slab when streamed), the uint8 mask, its
    reoriented copy for the writer and (optionally) probabilities.

    Slices are normalised one at a time (see :class:`segcli.engines.volume.SlicePlane`), so no float
    copy of the volume is counted.
    """
    vox = 1
    for s in shape:
        vox *= int(s)
    decoded = 3 * SLAB_BYTES if streamed else vox * channels * itemsize
    total = decoded + 2 * vox + OVERHEAD
    if return_probs:
        total += 2 * vox * n_classes * 4  # stacked per-slice probabilities + the writer's copy
    return total


def check_fits(estimate: int, limit: int, path: Any, what: str, hint: str, share: int = 1) -> None:
    """Raise a one-line InputError when ``estimate`` exceeds ``limit``, before anything is allocated.

    ``share`` > 1: ``limit`` is one file's share of the budget while ``share - 1`` more are read ahead.
    """
    if estimate > limit:
        whose = (f"its 1/{share} share of the {human(limit * share)} budget (--max-memory) while {share - 1} "
                 "more file(s) are read ahead; --prefetch 0 gives one file all of it" if share > 1
                 else f"the {human(limit)} budget (--max-memory)")
        raise InputError(f"{what} needs about {human(estimate)} of memory, more than {whose}; {hint}", path)


def fine_batch(limit: int, channels: int, size: int, n_classes: int, zoom: float, wanted: int) -> int:
    """Largest fine-pass batch ≤ ``wanted`` whose crops, inputs and outputs fit in a quarter of the budget."""
    per_item = 4 * size * size * (channels + 2 * n_classes) + 4 * channels * int(size * zoom) ** 2
    return max(1, min(wanted, (limit // 4) // max(per_item, 1)))


def check_in_memory(seg: Any, kind: str, shape: tuple[int, ...], channels: int, itemsize: int,
                    path: Any) -> None:
    """Refuse, with the estimate, an in-memory run that would exceed the budget."""
    bundle = seg.bundle_for(kind)
    probabilities = seg.options.probabilities
    if kind == "volume":
        est = estimate_volume(shape, channels, itemsize, model_channels=bundle.in_channels,
                              n_classes=bundle.n_classes, return_probs=probabilities)
        check_volume_fits(seg, est, shape, path)
        return
    p = seg.plan_for(bundle)
    est = estimate_2d(shape, channels, itemsize, model_channels=bundle.in_channels,  # type: ignore[arg-type]
                      n_classes=bundle.n_classes, method=p.method, size=p.size, return_probs=probabilities)
    hint = "use --method stts on a .tif input, which is read by region" if p.method != "stts" \
        else "save the image as a tiled TIFF so it can be read by region"
    check_fits(est, seg.budget, path, f"--method {p.method} on this {shape[0]}x{shape[1]} image", hint, share=seg.budget_share)


def check_volume_fits(seg: Any, est: int, shape: tuple[int, ...], path: Any) -> None:
    """Refuse a volume whose estimate exceeds the budget, with the way out that fits its options."""
    hint = ("drop --probabilities or write a .nii.gz (probabilities are then streamed to disk)"
            if seg.options.probabilities else "raise --max-memory or crop the volume")
    check_fits(est, seg.budget, path, f"this {'x'.join(map(str, shape))} volume", hint, share=seg.budget_share)


def env_budget() -> str | None:
    """``SEGCLI_MAX_MEMORY`` from the environment (the CLI flag wins)."""
    return os.environ.get("SEGCLI_MAX_MEMORY") or None
