"""One frozen options object for a prediction run, validated once.

The CLI builds a :class:`PredictOptions` from its flags, Python callers build one directly (or let
:class:`~segcli.api.Segmenter` build it from keyword arguments), and worker processes receive the
same object pickled. Everything that can be wrong with an option is found here, before any model
is loaded or any file read (exit code 2 on the command line).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcli import memory
from segcli.errors import UsageError
from segcli.methods import METHODS
from segcli.params import TILE_SIZE, check_param, check_range
from segcli.runtimes import PRECISIONS, cpu_has_bf16
from segcli.runtimes.device import cuda_possible
from segcli.runtimes.tta import TTA_MODES

BACKENDS = ("auto", "torch", "onnx")
#: ``auto``: the mask format follows ``-o``'s extension, else the input's family (segcli.io);
#: ``dicom-seg``: a DICOM Segmentation referencing the input series (DICOM series inputs only).
OUTPUT_TYPES = ("auto", "dicom-seg")
CHANNEL_MODES = ("keep", "grey", "rgb")


@dataclass(frozen=True)
class PredictOptions:
    """How to segment: model and method, runtime, memory rules and what to write besides the mask.

    ``params`` overrides the bundle's method parameters (threshold, pad, patches, ...; see
    :mod:`segcli.params`); entries that are None are dropped, so a CLI flag left unset keeps the
    bundle's value.
    """

    model: str | None = None
    method: str | None = None
    backend: str = "auto"
    precision: str = "auto"  # segcli.runtimes.PRECISIONS
    onnx_cache: str | None = None  # folder for first-use ONNX exports, or "off" (None: $SEGCLI_ONNX_CACHE or the default)
    device: str = "auto"
    threads: int | None = None
    channels: str = "keep"
    window: tuple[float, float] | None = None  # --window C,W: how an 8-bit CT export maps to HU
    half: bool = False
    tta: str = "none"  # segcli.runtimes.tta.TTA_MODES: average each network input over flips (4x) or flips and transposes (8x)
    size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # Memory and big images (segcli.memory, segcli.engines.stts)
    max_memory: str | int | None = None
    pyramid: bool = False
    mpp: float | None = None
    max_downscale: float | None = None
    max_zoom: float | None = None
    lazy_pixels: int = memory.LAZY_PIXELS
    tile_size: int = TILE_SIZE
    stream_volumes: bool = True  # NIfTI, raw MetaImage and DICOM series decoded slab by slab
    allow_unhashed: bool = False  # load weights without a recorded sha256 (refused otherwise)
    volume: int | None = None  # 1-based volume of a 4D DICOM series (echo, phase, direction, time point)
    series: str | None = None  # which series of a DICOM folder holding several (default: the largest, with a warning)
    # Outputs and batch behaviour
    output_type: str = "auto"
    probabilities: bool = False
    geojson: bool = False  # NAME_seg.geojson: one polygon per object, for QuPath (2D inputs)
    instances: bool = False  # NAME_seg_instances.tif: uint32 object ids, touching objects split (2D, in memory)
    preview: bool = False  # NAME_seg_preview.jpg (drawn by the caller after the mask; counted by skip_existing)
    skip_existing: bool = False
    stats: bool = False
    lock: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, here
        if self.model is not None:
            set_(self, "model", str(self.model))
        if self.method is not None and self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.half:  # the deprecated spelling of --precision fp16
            if self.precision not in ("auto", "fp16"):
                raise UsageError(f"--half is --precision fp16; it cannot go with --precision {self.precision}")
            set_(self, "precision", "fp16")
        if self.precision == "fp16":
            _check_fp16(self.device)
            set_(self, "half", True)
        if self.precision == "bf16":
            _check_bf16(self.backend, self.device)
        if self.tta not in TTA_MODES:
            raise UsageError(f"--tta must be one of {', '.join(TTA_MODES)}, not {self.tta!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise UsageError(f"--output-type must be one of {', '.join(OUTPUT_TYPES)}, not {self.output_type!r}")
        if self.onnx_cache is not None and self.onnx_cache.strip().lower() not in ("off", "0", "none", "false", "no") \
                and Path(self.onnx_cache).expanduser().is_file():
            raise UsageError(f"--onnx-cache {self.onnx_cache} is a file, not a folder (give a folder, or off)")
        if self.onnx_cache is None and (env := os.environ.get("SEGCLI_ONNX_CACHE", "").strip()) \
                and env.lower() not in ("off", "0", "none", "false", "no") and Path(env).expanduser().is_file():
            raise UsageError(f"SEGCLI_ONNX_CACHE={env} is a file, not a folder (set a folder, or off)")
        if self.window is not None:
            set_(self, "window", parse_window(self.window))
        if self.channels not in CHANNEL_MODES:
            raise UsageError(f"--channels must be keep, grey or rgb, not {self.channels!r}")
        set_(self, "params", {k: check_param(k, v) for k, v in dict(self.params or {}).items() if v is not None})
        if self.threads is not None:
            check_range("threads", self.threads, 1, 1024)
        if self.size is not None:
            check_range("size", self.size, 8, 8192)
        if self.volume is not None:
            check_range("volume", self.volume, 1, None)
        for name in ("mpp", "max_downscale", "max_zoom"):
            v = getattr(self, name)
            if v is not None:
                check_range(name, float(v), 1e-6 if name == "mpp" else 1.0, None)
        if self.tile_size % 16 or not 16 <= self.tile_size <= 4096:
            raise UsageError(f"tile size must be a multiple of 16 between 16 and 4096, not {self.tile_size}")
        if self.max_memory is None and memory.env_budget() is not None:
            set_(self, "max_memory", memory.env_budget())
        memory.budget(self.max_memory)  # a malformed --max-memory fails here, not on the first file

    @property
    def budget(self) -> int:
        """The memory budget in bytes (``max_memory``, else a share of what is available)."""
        return memory.budget(self.max_memory)

    def replace(self, **changes: Any) -> PredictOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, model: str | Path | None = None, *, overrides: dict[str, Any] | None = None,
                    **kwargs: Any) -> PredictOptions:
        """The Segmenter's historical keyword form: ``overrides`` is the ``params`` mapping."""
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        params = {**(overrides or {}), **kwargs.pop("params", {})}
        return cls(model=str(model) if model is not None else None, params=params, **kwargs)


def parse_window(value: Any) -> tuple[float, float]:
    """``--window C,W`` (centre and width in HU, as DICOM's Window Center/Width) → (C, W); W must be > 0."""
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        if len(parts) != 2:
            raise ValueError
        c, w = float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        raise UsageError(f"--window takes CENTRE,WIDTH in HU (e.g. -600,1500), not {value!r}") from None
    if not (w > 0 and abs(c) < 1e5 and w < 1e5):
        raise UsageError(f"--window width must be > 0 and both values plausible HU, not {value!r}")
    return c, w


def _check_fp16(device: str | None) -> None:
    """``--precision fp16`` (``--half``) runs on CUDA only; on the CPU it was ignored in silence before."""
    dev = (device or "auto").strip().lower()
    if dev == "cpu" or (dev == "auto" and not cuda_possible()):
        raise UsageError("--precision fp16 runs on CUDA only, and this run is on the CPU; use fp32, bf16 or int8")


def _check_bf16(backend: str, device: str | None) -> None:
    """``--precision bf16`` is checked once, at parse time (exit 2), not in every file's predictor (exit 1)."""
    if backend == "onnx":
        raise UsageError("--precision bf16 runs on torch (ONNX Runtime has no bf16 convolutions on the CPU); "
                         "drop --backend onnx")
    dev = (device or "auto").strip().lower()
    if (dev == "cpu" or (dev == "auto" and not cuda_possible())) and not cpu_has_bf16():
        raise UsageError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); use fp32 or int8")

