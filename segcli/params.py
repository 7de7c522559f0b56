"""Method parameters: every default, type and allowed range, in one place.

A value is looked up in this order: an explicit option (the CLI flag or the Python caller), the
bundle's ``params``, then :data:`DEFAULT_PARAMS`. Engines take their parameters as keyword arguments
whose defaults come from here, so a default can never disagree between the planner, the engines and
training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from segcli.errors import UsageError


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: default, the type it is cast to, and its inclusive range (None = open)."""

    default: Any
    kind: type
    lo: float | None = None
    hi: float | None = None
    optional: bool = False  # None is a meaningful value (e.g. "no refine threshold")


#: Every method parameter. ``pad`` None means ``default_pad(S)``; ``patch_size`` None means S.
SPECS: dict[str, ParamSpec] = {
    "threshold": ParamSpec(0.5, float, 0.0, 1.0),
    "pad": ParamSpec(None, int, 0, None, optional=True),
    "keep_aspect": ParamSpec(True, bool),
    "min_side": ParamSpec(5, int, 1, None),
    "min_component": ParamSpec(1, int, 1, None),
    "keep_coarse": ParamSpec(False, bool),
    "patches": ParamSpec(8, int, 0, None, optional=True),  # refine: patches refined (None: all above threshold)
    "criterion": ParamSpec("pixel", str),
    "refine_threshold": ParamSpec(None, float, None, None, optional=True),
    "min_patch_std": ParamSpec(None, float, 0.0, None, optional=True),  # refine: skip flatter patches
    "patch_size": ParamSpec(None, int, 8, None, optional=True),  # refine: full-resolution patch side
    "overlap": ParamSpec(0.25, float, 0.0, 0.95),
    "blend": ParamSpec("probs", str),  # sliding: what overlapping windows average (BLENDS)
    "batch_size": ParamSpec(16, int, 1, 4096),
    "min_volume": ParamSpec(1, int, 1, None),
    "lung_gate": ParamSpec(False, object),  # volumes: keep only lesions in aerated lung; true or a dict of settings
}

#: Method parameters and their defaults; a bundle overrides them, options override the bundle.
DEFAULT_PARAMS: dict[str, Any] = {k: s.default for k, s in SPECS.items()}

#: Criteria the refine engine ranks patches by.
CRITERIA = ("pixel", "mean")

#: What a sliding window averages where windows overlap (segcli.fusion): ``probs``, the probabilities under
#: segcli's analytic Gaussian; ``nnunet``, the logits under nnU-Net's discretised Gaussian, then softmax (what
#: an imported nnU-Net bundle records, so its masks are nnUNetv2_predict's).
BLENDS = ("probs", "nnunet")

#: Rough-pass factor cap and fine-pass zoom used on images above ``lazy_pixels`` when neither the user
#: nor the bundle sets one (see segcli.engines.stts for the rule).
HUGE_MAX_DOWNSCALE = 16.0
HUGE_MAX_ZOOM = 4.0

#: Default tile side of big TIFF masks.
TILE_SIZE = 512


def default_pad(size: int) -> int:
    """The reference's crop padding k = S / 8 full-resolution pixels."""
    return int(size) // 8


def lookup(params: dict[str, Any], key: str, input_size: int) -> Any:
    """``key`` from a bundle's ``params``, else its default (``pad`` follows the input size)."""
    if key not in SPECS:
        raise KeyError(key)
    v = params.get(key, SPECS[key].default)
    if key == "pad" and v is None:
        return default_pad(input_size)
    return v


def check_range(name: str, value: float | int, lo: float | None, hi: float | None, flag: str | None = None) -> None:
    """A UsageError naming the option when ``value`` is NaN or outside ``[lo, hi]``."""
    flag = flag or "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number, not {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise UsageError(f"{flag} must be between {lo:g} and {hi:g}, not {value:g}")
        raise UsageError(f"{flag} must be >= {lo:g}, not {value:g}" if lo is not None else
                         f"{flag} must be <= {hi:g}, not {value:g}")


def check_param(key: str, value: Any) -> Any:
    """An explicit method parameter, cast to its type and checked against its range."""
    spec = SPECS.get(key)
    if spec is None:
        raise UsageError(f"unknown method parameter {key!r}; known: {', '.join(SPECS)}")
    if value is None:
        return None
    if spec.kind is object:
        return value
    try:
        v = spec.kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{key.replace('_', '-')} must be a {spec.kind.__name__}, not {value!r}") from None
    if spec.kind in (int, float):
        check_range(key, v, spec.lo, spec.hi)
    if key == "criterion" and v not in CRITERIA:
        raise UsageError(f"--criterion must be {' or '.join(repr(c) for c in CRITERIA)}, not {v!r}")
    if key == "blend" and v not in BLENDS:
        raise UsageError(f"blend must be {' or '.join(repr(c) for c in BLENDS)}, not {v!r}")
    return v
