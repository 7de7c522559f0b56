"""Input checks and normalisation: what a network may see, decided before it sees it.

Channel conversion (``--channels``), refusal of unusable pixels (unsupported types, all-NaN), the
"constant image" case (reported as empty, not failed) and the bundle's normalisation. For volumes one
pass over the slabs does the checks and collects the statistics, so no float copy of the volume is
ever made (see :func:`volume_normalizer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from segcli import normalize as norm
from segcli.bundle import Bundle
from segcli.errors import EmptyImageError, InputError
from segcli.io.volstream import ArrayVolume, SlabCache

#: Percentiles of the normalisation of 16-bit and float images given to a model trained on 8-bit ones
#: (per channel, as cellpose and StarDist normalise microscopy).
MICROSCOPY_PERCENTILES = (1.0, 99.8)


@dataclass(frozen=True)
class Intensity:
    """How an input's pixels reach the network: the channel mode and normalisation that actually run,
    and the notes that tell the user (``FileReport.notes``, ``info["normalization"]``)."""

    channels: str
    spec: dict[str, Any]
    window: tuple[float, float] | None
    description: str
    notes: tuple[str, ...] = ()


def intensity(bundle: Bundle, dtype: Any, have: int, channels: str = "keep",
              window: tuple[float, float] | None = None, path: Any = None) -> Intensity:
    """Decide channel conversion and normalisation for an input of ``dtype`` with ``have`` channels.

    * one grey channel (or grey + alpha) to an RGB model converts by itself, with a note; so does RGBA (the
      alpha channel is dropped: the colours are what the network reads);
    * ``window`` (``--window C,W``): an 8-bit export of CT is mapped back to HU before the bundle's CT window;
    * 16-bit, 32-bit and float images given to a model trained on 8-bit ones ("dtype" normalisation, not CT)
      get percentile normalisation per channel instead of a division by their type's range.
    """
    dtype = np.dtype(dtype)
    spec = dict(bundle.normalization)
    notes: list[str] = []
    if channels == "keep" and have in (1, 2) and bundle.in_channels == 3:
        channels = "rgb"
        notes.append(f"grey image repeated into the 3 channels model {bundle.name} takes")
    elif channels == "keep" and have == 4 and bundle.in_channels == 3:  # RGBA exports (QuPath, screenshots)
        channels = "rgb"
        notes.append(f"alpha channel dropped: model {bundle.name} takes the 3 colour channels")
    if window is not None:
        if spec.get("kind") != "ct_window":
            raise InputError(f"--window maps an 8-bit CT export to HU, but model {bundle.name} does not take CT "
                             f"in HU (its normalisation is {spec.get('kind')})", path)
        if dtype.itemsize != 1:
            raise InputError(f"--window declares how an 8-bit export maps to HU, but this image is {dtype} "
                             "(its values may already be HU); drop --window", path)
        c, w = window
        desc = f"8-bit values mapped to HU by --window {c:g},{w:g}, then the CT window {spec['center']:g}/{spec['width']:g}"
        return Intensity(channels, spec, window, desc, tuple(notes))
    if spec.get("kind") == "dtype" and (dtype.kind == "f" or dtype.itemsize > 1) and dtype != np.bool_:
        lo, hi = MICROSCOPY_PERCENTILES
        spec = {"kind": "percentile", "lower": lo, "upper": hi, "per_channel": True}
        desc = f"percentile {lo:g}-{hi:g} % per channel ({dtype} input; model trained on 8-bit images)"
        notes.append(f"{dtype} image normalised by percentiles {lo:g}-{hi:g} % per channel for model {bundle.name}")
        return Intensity(channels, spec, None, desc, tuple(notes))
    return Intensity(channels, spec, None, describe(spec), tuple(notes))


def describe(spec: dict[str, Any]) -> str:
    """A bundle's normalisation in words, for the report."""
    kind = spec.get("kind")
    if kind == "ct_window":
        return f"CT window {spec['center']:g}/{spec['width']:g} HU"
    if kind == "percentile":
        return f"percentile {spec.get('lower', 0.5):g}-{spec.get('upper', 99.5):g} %"
    if kind == "dtype":
        return "value / type range"
    return str(kind)


def prepare(array: np.ndarray, bundle: Bundle, channels: str = "keep", path: Any = None,
            window: tuple[float, float] | None = None) -> np.ndarray:
    """Channel conversion, checks and normalisation: channel-last input → channel-first float32."""
    plan = intensity(bundle, array.dtype, int(array.shape[-1]), channels, window, path)
    a = checked(array, bundle, plan.channels, path)
    if plan.window is not None:
        c, w = plan.window
        a = (c - w / 2.0) + a.astype(np.float32) * (w / 255.0)  # the HU each 8-bit level stood for
    x = norm.normalize(a, plan.spec)
    return np.moveaxis(x, -1, -3 if x.ndim == 3 else 1)  # (C,H,W) or (Z,C,Y,X)


def volume_normalizer(cache: Any, bundle: Bundle, path: Any = None) -> Callable[[np.ndarray], np.ndarray]:
    """One pass over a volume's slabs: the input checks of :func:`checked` and a normaliser for any slice.

    ``fn(slice)`` equals the slice of ``normalize(whole volume)``: the strided subsample behind
    the percentile/min-max/z-score statistics picks the same voxels as ``image_stats`` on the
    whole array, and float "dtype" inputs get the whole volume's finite range.
    """
    spec = bundle.normalization
    dtype = cache.source.dtype
    if not np.issubdtype(dtype, np.number) and dtype != np.bool_:
        raise InputError(f"unsupported pixel type {dtype}", path)
    per_slice = int(np.prod(cache.source.shape[1:3])) * bundle.in_channels
    step = max(1, per_slice * cache.source.shape[0] // norm.SAMPLE_VALUES)
    samples: list[np.ndarray] = []
    lo = hi = None
    is_float = False
    for j0, block in cache.blocks(0):
        flat = block.reshape(-1)
        samples.append(flat[(-j0 * per_slice) % step :: step].copy())  # a view would pin the slab
        is_float = block.dtype.kind == "f"
        chan = block.reshape(-1, block.shape[-1])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN slab
            b_lo = np.nanmin(chan, axis=0) if is_float else chan.min(axis=0)
            b_hi = np.nanmax(chan, axis=0) if is_float else chan.max(axis=0)
        lo = b_lo if lo is None else np.fmin(lo, b_lo)
        hi = b_hi if hi is None else np.fmax(hi, b_hi)
        del block, flat, chan  # before the next slab is decoded: one slab alive at a time
    assert lo is not None and hi is not None
    no_finite = getattr(cache.source, "no_finite_values", None)
    if is_float and (np.all(np.isnan(lo)) or (not lo.any() and not hi.any() and no_finite and no_finite())):
        raise InputError("image holds no finite values (all NaN or infinite)", path)
    if np.array_equal(lo, hi):
        value = lo[0] if lo.size == 1 else tuple(lo.tolist())
        raise EmptyImageError(f"image is constant (every pixel = {value}); nothing to segment", path)
    kind = spec["kind"]
    if kind in ("percentile", "minmax", "zscore"):
        stats = norm.stats_from_sample(np.concatenate(samples), spec)
        return lambda part: norm.normalize(part, spec, stats)
    if kind == "dtype" and is_float:
        fin_lo, fin_hi = float(np.nanmin(lo)), float(np.nanmax(hi))
        if fin_lo < 0 or fin_hi > 1:  # whole-image min-max, as normalize() does for such floats
            eff, st = {"kind": "minmax"}, {"lo": fin_lo, "hi": fin_hi}
            return lambda part: norm.normalize(part, eff, st)
    return lambda part: norm.normalize(part, spec)

def checked(array: np.ndarray, bundle: Bundle, channels: str = "keep", path: Any = None) -> np.ndarray:
    """Channel conversion and the sanity checks of :func:`prepare`, without normalising.

    A constant image (per channel: a uniform colour too) is an EmptyImageError, which callers report
    as "empty", not as a failure.
    """
    a = norm.convert_channels(array, bundle.in_channels, channels, path)
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        raise InputError(f"unsupported pixel type {a.dtype}", path)
    finite = np.isfinite(a) if a.dtype.kind == "f" else None
    if finite is not None and not finite.any():
        raise InputError("image holds no finite values (all NaN or infinite)", path)
    # Constant per channel (a uniform colour, not only a uniform grey): nothing to segment.
    flat = a.reshape(-1, a.shape[-1])
    if _varies(flat):
        return a  # the usual case, decided on a sparse sample without a pass over every pixel
    lo = np.nanmin(flat, axis=0) if finite is not None else flat.min(axis=0)
    hi = np.nanmax(flat, axis=0) if finite is not None else flat.max(axis=0)
    if np.array_equal(lo, hi):
        value = lo[0] if lo.size == 1 else tuple(lo.tolist())
        raise EmptyImageError(f"image is constant (every pixel = {value}); nothing to segment", path)
    return a

def _varies(flat: np.ndarray, samples: int = 4096) -> bool:
    """True when a strided sample of finite pixels already holds two different values (so not constant)."""
    sample = flat[:: max(1, len(flat) // samples)]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample).all(axis=1)]
    return len(sample) > 1 and bool((sample != sample[0]).any())


def slice_normalizer(a: np.ndarray, bundle: Bundle) -> Callable[[np.ndarray], np.ndarray]:
    """A function normalising any part of the in-memory volume ``a`` as ``normalize(a)`` would."""
    return volume_normalizer(SlabCache(ArrayVolume(a), 0), bundle)


#: A mask with more foreground than this share of the image is implausible for every shipped task.
IMPLAUSIBLE_FOREGROUND = 0.95


def mismatch_warnings(bundle: Bundle, dtype: np.dtype, spacing: tuple[float, ...] | None, ndim: int,
                      window: tuple[float, float] | None = None) -> list[str]:
    """What can be told, from the bundle and the input's header alone, about a model fed the wrong kind of image.

    A CT-window model given an 8-bit picture (a PNG or JPEG export of a slice) sees values 0-255 where it
    learned Hounsfield units; a photo model given 16-bit or float data scales it wrongly; a slide model
    with a recorded ``training_mpp`` cannot be matched to an image that says nothing of its pixel size
    (with one, the image is resampled: segcli.plan.physical_factor). The run goes on: these are warnings
    in the report and on stderr.
    """
    out = []
    kind = bundle.normalization.get("kind")
    if kind == "ct_window" and np.dtype(dtype).itemsize == 1 and not window:
        c, w = bundle.normalization.get("center"), bundle.normalization.get("width")
        out.append(f"model {bundle.name} expects CT in Hounsfield units (window {c}/{w}) but this image is 8-bit; "
                   "declare the export's window with --window C,W, or segment the original CT (NIfTI/DICOM)")
    elif kind == "dtype" and ndim == 3 and (np.dtype(dtype).kind == "f" or np.dtype(dtype).itemsize > 2):
        out.append(f"model {bundle.name} was trained on 8/16-bit images scaled by their type range, but this image "
                   f"is {np.dtype(dtype)}")
    modality = str(bundle.info.get("modality") or "")
    if ndim == 3 and bundle.normalization.get("kind") == "dtype" and modality and "CT" not in modality.upper():
        out.append(f"model {bundle.name} was trained on 2D {modality} images; this input is a volume")
    train = bundle.params.get("training_mpp")
    if train and ndim == 2:
        # lazy: brings scipy
        from segcli.plan import MPP_RANGE

        image_mpp = float(spacing[-1]) * 1000.0 if spacing else 0.0
        if not MPP_RANGE[0] <= image_mpp <= MPP_RANGE[1]:
            out.append(f"model {bundle.name} was trained at {float(train):.3g} µm/px but this image carries no "
                       "physical pixel size, so it is used as it is; if it was scanned at another magnification, "
                       "objects appear at another scale")
    return out


def implausible_result(counts: np.ndarray, total: int) -> str | None:
    """A warning when the mask is foreground almost everywhere (a wrong model or wrong normalisation)."""
    if total <= 0:
        return None
    share = 1.0 - float(counts[0]) / total
    if share > IMPLAUSIBLE_FOREGROUND:
        return (f"{share:.0%} of the image is foreground: implausible for this model; check the model, the "
                "image type and its intensities (segcli info)")
    return None
