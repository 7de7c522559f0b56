"""The method table: which methods exist, which networks each needs, and which can be trained.

Prediction (segcli.plan), bundles (segcli.bundle) and training (segcli.train) all read this one
table, so adding a method is one row here plus its engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """A coarse-to-fine (or baseline) method: its network roles and whether ``segcli train`` makes it."""

    name: str
    roles: tuple[str, ...]  # the predictors its engine takes, in order
    trainable: bool
    summary: str
    engine: str  # "module:function" of its 2D engine, imported when first used
    params: tuple[str, ...]  # method parameters (segcli.params) its engine takes besides size and threshold
    volume_engine: str | None = None  # a 3D engine ("module:function"); None: the 2D engine slice by slice
    volume_params: tuple[str, ...] = ()
    rough_pass: bool = True  # starts with one pass over the whole image downscaled to S (prefetched in batches)
    fusion: str = ""  # how window predictions become one mask, on the route that holds the image
    # its engine takes ``fold_boundary``: a slide's --instances run (the network keeps its boundary class) then
    # decides where to look, and its blended mask, as the folded network of a run without instances does
    folds_boundary: bool = False
    # The bounded (tiled TIFF) route: the method whose engine runs there (itself, or a stand-in reading only a
    # rough view and windows); None: the method needs the whole image, and the route refuses it up front.
    bounded: str | None = None
    bounded_kwargs: tuple[tuple[str, Any], ...] = ()  # fixed engine arguments of the bounded variant
    bounded_params: tuple[str, ...] = ()  # this method's parameters handed on to the bounded variant
    bounded_fusion: str = ""  # the bounded variant's fusion rule when it differs from ``fusion``
    # Training (``segcli train``, trainable methods only):
    fine_stage: str | None = None  # "module:function" building the fine network's stage; None: one stage
    coarse_train_scale: float = 1.0  # the coarse stage trains on random S crops of images this much larger
    train_loss: str | None = None  # the default loss; None: Dice + BCE (one output channel) or Dice + CE
    train_params: tuple[str, ...] = ()  # method parameters a trained bundle records besides threshold, keep_aspect
    train_options: tuple[str, ...] = ()  # training settings only this method reads (recorded in its training record)
    fine_val_kind: str = ""  # what the fine stage's validation Dice is measured on


TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("stts", ("coarse", "fine"), True,
               "segment-then-segment: rough pass, crops of its components, fine pass", "segcli.engines.stts:stts",
               ("pad", "keep_aspect", "min_side", "min_component", "keep_coarse", "batch_size"),
               "segcli.engines.volume:stts_volume",  # components in 3D: one crop set across slices
               ("pad", "keep_aspect", "min_side", "min_volume", "keep_coarse", "batch_size"),
               fusion="fine crops fused by max (OR for one class) into a one-byte store, spilled to disk",
               bounded="stts", folds_boundary=True, fine_stage="segcli.train.stages:stts_fine_stage",
               train_params=("pad", "min_side", "min_component"),
               train_options=("jitter", "fine_crops", "crops_per_image"), fine_val_kind="GT crops"),
        Method("refine", ("coarse", "fine"), True,
               "rough pass, then the most uncertain patches at full resolution", "segcli.engines.refine:refine",
               ("patch_size", "patches", "refine_threshold", "criterion", "min_patch_std", "keep_aspect",
                "batch_size"), fusion="uncertain patches overwrite the upscaled rough map",
               fine_stage="segcli.train.stages:refine_fine_stage", coarse_train_scale=1.05, train_loss="focal+dice",
               train_params=("patches", "patch_size", "criterion"), train_options=("sampling",),
               fine_val_kind="S1's most uncertain patches"),
        Method("direct", ("coarse",), True,
               "one network on the downscaled image (the papers' baseline)", "segcli.engines.direct:direct",
               ("keep_aspect",), fusion="none: one window, upscaled"),
        Method("sliding", ("fine",), False,
               "full-resolution sliding window with Gaussian blending (MONAI/nnU-Net)", "segcli.engines.direct:sliding",
               ("overlap", "batch_size", "blend"), rough_pass=False,
               fusion="Gaussian-weighted mean of overlapping windows (MONAI/nnU-Net)",
               # full-resolution grid windows, only over tissue (a thumbnail's, else stts' rough pass), blended by
               # the same Gaussian as in memory (fusion.BlendStore): one fusion rule on both routes
               bounded="stts", folds_boundary=True,
               bounded_kwargs=(("crop_mode", "grid"), ("max_zoom", None), ("fusion", "gaussian"), ("look", "tissue")),
               bounded_params=("overlap", "blend"),
               bounded_fusion="the same Gaussian blend, over the grid windows on the tissue a thumbnail shows "
                              "(the coarse network's rough pass where no glass is found)"),
    )
}

#: Every method ``segcli predict`` runs, in the order help texts list them.
METHODS: tuple[str, ...] = tuple(TABLE)
#: Methods ``segcli train`` makes bundles for.
TRAINABLE: tuple[str, ...] = tuple(m.name for m in TABLE.values() if m.trainable)
#: Methods the bounded (tiled TIFF) route runs, itself or through a stand-in engine.
BOUNDED: tuple[str, ...] = tuple(m.name for m in TABLE.values() if m.bounded)
#: Network roles a bundle may hold.
ROLES: tuple[str, ...] = ("coarse", "fine")


def roles(method: str) -> tuple[str, ...]:
    """The network roles ``method`` runs (a KeyError for an unknown method)."""
    return TABLE[method].roles


def _load(spec: str) -> Callable[..., Any]:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def engine(method: str, volume: bool = False) -> Callable[..., Any]:
    """The 2D engine function of ``method``, or its 3D one with ``volume`` (a KeyError if it has none)."""
    spec = TABLE[method].volume_engine if volume else TABLE[method].engine
    if spec is None:
        raise KeyError(f"{method} has no volume engine")
    return _load(spec)


def fine_stage(method: str) -> Callable[..., Any]:
    """The function that builds the fine network's training stage of ``method`` (a KeyError if it has none)."""
    spec = TABLE[method].fine_stage
    if spec is None:
        raise KeyError(f"{method} trains no fine network")
    return _load(spec)
