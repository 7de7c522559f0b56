"""Plan: turn (bundle, options) into the exact parameters of the chosen method, then run its engine.

This is the one resolver: options win over the bundle's ``params``, which win over the defaults of
:mod:`segcli.params`. Which engine a method runs and which networks it needs come from the method
table (:mod:`segcli.methods`); the planner only adds what depends on the image (the rough-pass
scale rule of big slides, the fine batch that fits the memory budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from segcli import memory
from segcli.bundle import Bundle
from segcli.engines.base import Plane, ProgressFn, Result, prime_rough_input
from segcli.engines.volume import per_slice
from segcli.methods import TABLE, engine
from segcli.options import PredictOptions
from segcli.params import HUGE_MAX_DOWNSCALE, HUGE_MAX_ZOOM, SPECS, default_pad

#: ``predictor(role)`` → the callable network serving that role (segcli.runtimes).
PredictorFor = Callable[[str], Any]


@dataclass(frozen=True)
class Plan:
    """The resolved parameters of one method for one bundle and one set of options."""

    method: str
    size: int
    params: dict[str, Any]  # every key of segcli.params.SPECS, resolved and cast

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    @property
    def roles(self) -> tuple[str, ...]:
        return TABLE[self.method].roles

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the method's 2D engine takes (before image-dependent additions)."""
        return {"size": self.size, "threshold": self.params["threshold"],
                **{k: self.params[k] for k in TABLE[self.method].params}}


def resolve(bundle: Bundle, options: PredictOptions) -> Plan:
    """Options, then the bundle's params, then the defaults; ``pad`` None becomes S / 8 of the S in use."""
    method = options.method or bundle.method
    size = int(options.size or bundle.input_size)
    params: dict[str, Any] = {}
    for key, spec in SPECS.items():
        v = options.params[key] if key in options.params else bundle.params.get(key, spec.default)
        if key == "pad" and v is None:
            v = default_pad(size)
        if v is not None and spec.kind is not object:
            v = spec.kind(v)
        params[key] = v
    return Plan(method, size, params)


def scale_rule(bundle: Bundle, options: PredictOptions, shape: tuple[int, int],
               spacing: tuple[float, ...] | None) -> dict[str, float | None]:
    """``max_downscale`` and ``max_zoom`` for one image (the rule is in segcli.engines.stts).

    Explicit options win, then the bundle's ``max_downscale``/``max_zoom``/``mpp`` (the µm per pixel
    the coarse network was trained at, used with the image's pixel size); images above
    ``lazy_pixels`` get HUGE_MAX_DOWNSCALE/HUGE_MAX_ZOOM when nothing else says, so a gigapixel slide
    is never squeezed into one S×S pass. Smaller images keep the paper's behaviour.
    """
    params = bundle.params
    caps = [float(v) for v in (options.max_downscale, params.get("max_downscale")) if v]
    coarse_mpp = options.mpp or params.get("mpp")
    if coarse_mpp and spacing:
        image_mpp = float(spacing[-1]) * 1000.0  # mm → µm
        if image_mpp > 0:
            caps.append(max(1.0, float(coarse_mpp) / image_mpp))
    huge = shape[0] * shape[1] > options.lazy_pixels
    max_downscale = min(caps) if caps else (HUGE_MAX_DOWNSCALE if huge else None)
    zoom = options.max_zoom or params.get("max_zoom") or (HUGE_MAX_ZOOM if huge else None)
    return {"max_downscale": max_downscale, "max_zoom": float(zoom) if zoom else None}


#: Pixel sizes (µm) that are physical enough to rescale by: slide and microscopy scans, not a photo's 72 dpi.
MPP_RANGE = (0.05, 50.0)
#: Below this relative difference a slide is used at its own pixel size (no resampling).
MPP_TOLERANCE = 0.1


def physical_factor(bundle: Bundle, spacing: tuple[float, ...] | None) -> tuple[float, float] | None:
    """``(factor, image_mpp)`` when the image must be resampled to the bundle's ``training_mpp``, else None.

    The rule: a bundle trained at ``training_mpp`` µm/px (0.25 for 40× H&E) sees every slide at that
    pixel size. A 20× slide (0.5 µm/px) is read at twice its size (factor 0.5 source pixels per network
    pixel), a 80× one at half; the mask is written on the slide's own grid. Images without a physical pixel
    size (or one outside :data:`MPP_RANGE`, such as a photo's dpi) and sizes within :data:`MPP_TOLERANCE` of
    the training one are used as they are.
    """
    train = bundle.params.get("training_mpp")
    if not train or not spacing:
        return None
    image_mpp = float(spacing[-1]) * 1000.0  # mm → µm
    if not MPP_RANGE[0] <= image_mpp <= MPP_RANGE[1]:
        return None
    factor = float(train) / image_mpp
    if abs(factor - 1.0) <= MPP_TOLERANCE:
        return None
    return factor, image_mpp


def kwargs_2d(plan: Plan, bundle: Bundle, options: PredictOptions, budget: int, shape: tuple[int, int],
              spacing: tuple[float, ...] | None, batch: int | None = None,
              rough_batch: int | None = None) -> dict[str, Any]:
    """The engine's keyword arguments for one image: stts adds the scale rule and a budget-sized batch
    (``batch``: the run's memory plan, segcli.memplan, caps it)."""
    kw = plan.engine_kwargs()
    if batch is not None and "batch_size" in kw:
        kw["batch_size"] = max(1, min(int(kw["batch_size"]), int(batch)))
    if plan.method == "stts":
        rule = scale_rule(bundle, options, shape, spacing)
        kw["batch_size"] = memory.fine_batch(budget, bundle.in_channels, plan.size, bundle.n_classes,
                                             rule["max_zoom"] or 1.0, min(plan["batch_size"], batch or plan["batch_size"]))
        kw.update(rule)
        if rough_batch is not None:
            kw["rough_batch"] = max(1, int(rough_batch))
    return kw


def rough_fold(plan: Plan, bundle: Bundle, kind: str) -> dict[str, Any]:
    """The engine argument that makes a slide's ``--instances`` run (its bundle keeps the boundary class) look
    where a run without instances looks (its networks are folded: stts's rough pass) and, where windows are
    blended (sliding, stts's Gaussian fusion), give the same mask; photos keep one bundle for both."""
    if not TABLE[plan.method].folds_boundary or kind == "2d" or bundle.boundary is None:
        return {}
    return {"fold_boundary": tuple(bundle.boundary)}


@dataclass
class Staged2D:
    """One 2D image made ready for the networks (``Segmenter.stage_2d``): the prepared plane, the
    engine's arguments and, when the bundle rescales by pixel size, ``scale`` = (factor, image µm/px)."""

    bundle: Bundle
    plan: Plan
    plane: Plane
    kwargs: dict[str, Any]
    full_shape: tuple[int, int]
    scale: tuple[float, float] | None = None


def prime_2d(plan: Plan, plane: Plane, kwargs: dict[str, Any]) -> None:
    """Make the plane's downscaled view that the method's rough pass will ask for (it keeps the last one).

    Only for methods that start with one whole-image rough pass; a tiled rough pass (huge images)
    reads its own overview.
    """
    if not TABLE[plan.method].rough_pass or not hasattr(plane, "downscaled"):
        return
    size, keep_aspect = int(kwargs["size"]), bool(kwargs["keep_aspect"])  # a rough-pass method's parameter
    cap = kwargs.get("max_downscale")
    if cap is not None and max(plane.shape) / size > float(cap):
        return
    prime_rough_input(plane, size, keep_aspect)


def run_2d(plan: Plan, plane: Plane, predictor: PredictorFor, kwargs: dict[str, Any], *, return_probs: bool,
           progress: ProgressFn | None, **extra: Any) -> Result:
    """Run the method's engine on one 2D plane (``extra``: engine-specific switches such as ``lazy``)."""
    nets = [predictor(role) for role in plan.roles]
    return engine(plan.method)(plane, *nets, **kwargs, return_probs=return_probs, progress=progress, **extra)


def bounded_variant(plan: Plan) -> tuple[Plan, dict[str, Any]]:
    """What the bounded (tiled TIFF) route runs for ``plan``, from the method table: the stand-in plan and the
    engine arguments it adds (a KeyError for a method that needs the whole image)."""
    method = TABLE[plan.method]
    if method.bounded is None:
        raise KeyError(f"{plan.method} has no bounded variant")
    extra = {**dict(method.bounded_kwargs), **{k: plan[k] for k in method.bounded_params}}
    return Plan(method.bounded, plan.size, plan.params), extra


def run_3d(plan: Plan, planes: Sequence[Plane], predictor: PredictorFor, kwargs_for: Callable[[Plane], dict],
           *, return_probs: bool, progress: ProgressFn | None, out: Any = None, probs_out: Any = None) -> Result:
    """A volume: the method's 3D engine if the table gives one (stts), else its 2D engine slice by slice."""
    method = TABLE[plan.method]
    if method.volume_engine is not None:
        nets = [predictor(role) for role in plan.roles]
        kw = {"size": plan.size, "threshold": plan["threshold"], **{k: plan[k] for k in method.volume_params}}
        return engine(plan.method, volume=True)(planes, *nets, **kw, return_probs=return_probs, progress=progress,
                                                out=out, probs_out=probs_out)
    return per_slice(planes, lambda pl: run_2d(plan, pl, predictor, kwargs_for(pl), return_probs=return_probs,
                                               progress=None), progress, out=out, probs_out=probs_out)
