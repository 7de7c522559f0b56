"""Intensity normalisation and channel conversion, both driven by the bundle, never guessed.

A network only works on inputs scaled the way it was trained, so the bundle records the rule
(CT window in HU, percentile or z-score for MRI and microscopy, dtype range for photos) and
inference applies exactly that. Channel conversion (RGB ↔ grey) is explicit for the same reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segcli.errors import InputError, UsageError

KINDS = ("dtype", "scale", "ct_window", "percentile", "zscore", "minmax")

# Rec. 601 luma, the weights Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def validate(spec: dict[str, Any]) -> dict[str, Any]:
    """Check a normalisation spec from a bundle; returns it unchanged."""
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown normalization kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "ct_window" and not {"center", "width"} <= spec.keys():
        raise ValueError("ct_window normalization needs 'center' and 'width' (HU)")
    if kind == "scale" and "factor" not in spec:
        raise ValueError("scale normalization needs 'factor'")
    return spec


SAMPLE_VALUES = 2_000_000  # statistics come from at most about this many voxels


def _sample(x: np.ndarray, max_values: int = SAMPLE_VALUES) -> np.ndarray:
    """A strided subsample for image statistics, so percentiles of a huge image stay cheap."""
    flat = x.reshape(-1)
    step = max(1, flat.size // max_values)
    return flat[::step]


def image_stats(x: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """Per-image statistics a normaliser needs (percentiles, mean/std), from a subsample.

    Computed once per image, so region-by-region normalisation of a huge image stays consistent.
    """
    return stats_from_sample(_sample(np.asarray(x)), spec)


def stats_from_sample(sample: np.ndarray, spec: dict[str, Any]) -> dict[str, float]:
    """:func:`image_stats` from an already drawn subsample (a streamed volume collects it slab by slab)."""
    kind = spec["kind"]
    s = np.asarray(sample).astype(np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"lo": 0.0, "hi": 1.0, "mean": 0.0, "std": 1.0}
    if kind == "percentile":
        lo, hi = np.percentile(s, [spec.get("lower", 0.5), spec.get("upper", 99.5)])
        return {"lo": float(lo), "hi": float(hi)}
    if kind == "minmax":
        return {"lo": float(s.min()), "hi": float(s.max())}
    if kind == "zscore":
        return {"mean": float(s.mean()), "std": float(s.std())}
    return {}


def normalize(x: np.ndarray, spec: dict[str, Any], stats: dict[str, float] | None = None) -> np.ndarray:
    """Apply the bundle's normalisation to an array of any layout; returns float32."""
    kind = spec["kind"]
    src_dtype = x.dtype
    y = np.asarray(x, dtype=np.float32)
    if kind == "percentile" and spec.get("per_channel") and y.ndim >= 3 and stats is None:
        lo_hi = [image_stats(x[..., c], spec) for c in range(x.shape[-1])]
        stats = {"lo": np.array([s["lo"] for s in lo_hi], np.float32),  # type: ignore[dict-item]
                 "hi": np.array([s["hi"] for s in lo_hi], np.float32)}
    if stats is None and kind in ("percentile", "minmax", "zscore"):
        stats = image_stats(x, spec)
    if kind == "dtype":
        if np.issubdtype(src_dtype, np.integer):
            info = np.iinfo(src_dtype)
            # y is a new float32 copy of integer input: divided in place (a slide's regions, one copy fewer)
            if info.min < 0:
                y -= info.min
            y /= float(info.max - info.min) if info.min < 0 else float(info.max)
        elif np.issubdtype(src_dtype, np.bool_):
            pass
        else:  # floats: assume already in [0, 1] only if they look like it, else min-max
            fin = y[np.isfinite(y)]
            if fin.size and (fin.min() < 0 or fin.max() > 1):
                lo, hi = float(fin.min()), float(fin.max())
                y = (y - lo) / (hi - lo if hi > lo else 1.0)
    elif kind == "scale":
        y = y * float(spec["factor"]) + float(spec.get("offset", 0.0))
    elif kind == "ct_window":
        c, w = float(spec["center"]), float(spec["width"])
        y = np.clip((y - (c - w / 2.0)) / w, 0.0, 1.0)
    elif kind in ("percentile", "minmax"):
        lo, hi = np.asarray(stats["lo"], np.float32), np.asarray(stats["hi"], np.float32)
        y = np.clip((y - lo) / np.where(hi > lo, hi - lo, np.float32(1.0)), 0.0, 1.0)
    elif kind == "zscore":
        y = (y - stats["mean"]) / (stats["std"] if stats["std"] > 0 else 1.0)
    else:  # pragma: no cover - validate() guards this
        raise ValueError(kind)
    if src_dtype.kind in "uib" and (kind != "scale" or np.isfinite([float(spec["factor"]),
                                                                     float(spec.get("offset", 0.0))]).all()):
        # integer pixels under finite parameters cannot become NaN or infinite: skip a pass (on a slide of an
        # imported bundle's "scale" normalisation it was 9 % of the run)
        return y.astype(np.float32, copy=False)
    return np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32, copy=False)


def convert_channels(arr: np.ndarray, want: int, mode: str = "keep", path: Any = None) -> np.ndarray:
    """Bring a channel-last array to ``want`` channels under an explicit ``mode``.

    ``keep`` refuses any mismatch with a message saying which flag converts; ``grey`` averages
    RGB(A) with luma weights; ``rgb`` drops alpha or repeats a grey channel three times.
    """
    have = arr.shape[-1]
    if have == want:
        return arr
    if mode == "keep":
        hint = "--channels grey" if want == 1 else "--channels rgb"
        raise InputError(f"image has {have} channel(s) but the model takes {want}; pass {hint} to convert explicitly", path)
    if mode == "grey":
        if want != 1:
            raise UsageError(f"--channels grey gives 1 channel but the model takes {want}")
        if have in (3, 4):
            return (arr[..., :3].astype(np.float32) @ _LUMA)[..., None].astype(arr.dtype if arr.dtype.kind == "f" else np.float32)
        if have == 2:  # grey + alpha
            return arr[..., :1]
    if mode == "rgb":
        if want != 3:
            raise UsageError(f"--channels rgb gives 3 channels but the model takes {want}")
        if have == 4:
            return arr[..., :3]
        if have in (1, 2):
            return np.repeat(arr[..., :1], 3, axis=-1)
    raise InputError(f"cannot convert {have} channel(s) to {want} with --channels {mode}", path)
