"""The model holder: bundles, runtimes and predictors, built once and applied to arrays and volumes.

Like lungmask's ``LMInferer``, an :class:`Inferer` is built once from one
:class:`~segcli.options.PredictOptions` and holds the loaded bundles and their runtimes (one cache for a
whole batch). It knows nothing of files: :mod:`segcli.pipeline` reads, routes and writes them, and
receives a :class:`RunContext` (the run's options, this inferer, the memory share of one file) from
its caller; :class:`segcli.api.Segmenter` is the public façade on top. Nothing here imports the
pipeline or the API.

Volumes arrive in canonical LPS orientation from :mod:`segcli.io` and are sliced along
:func:`segcli.geometry.slice_axis`; the mask goes back in the file's own orientation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcli import lunggate, plan
from segcli.bundle import Bundle, load_bundle, resolve_model
from segcli.engines.base import ArrayPlane, ProgressFn, Result, ScaledLabels, ScaledPlane
from segcli.errors import InputError
from segcli.geometry import slice_axis
from segcli.lunggate import GateParams
from segcli.methods import BOUNDED
from segcli.options import PredictOptions
from segcli.plan import Staged2D
from segcli.prepare import prepare, volume_normalizer


class Inferer:
    """A model (or the shipped default per input kind), a method, a runtime and a device, built once."""

    def __init__(self, options: PredictOptions) -> None:
        from segcli.runtimes.device import resolve_device, set_threads  # torch: imported on first use

        self.options = options
        self.device = resolve_device(options.device)
        self.threads = set_threads(options.threads)
        self.budget = options.budget  # this process's budget: options.budget // workers (segcli.batch)
        self.workers = 1  # > 1: this process is one of W workers and its budget is already its 1/W share
        self._bundles: dict[Path, Bundle] = {}
        self._predictors: dict[tuple[Path, str], Any] = {}
        self._plans: dict[tuple[str, int, bool], Any] = {}  # segcli.memplan.MemoryPlan per (kind, budget)
        self.load_seconds: dict[str, float] = {}  # time spent building predictors (the pipeline's model_load)

    def context(self, file_options: dict[str, Any] | None = None, *, read_ahead: int = 0) -> RunContext:
        """What one run's files see: the options with ``file_options`` (probabilities, skip_existing, stats,
        lock) applied, this inferer, and (``read_ahead`` files held while one computes) each file's share."""
        changes = {k: v for k, v in (file_options or {}).items() if getattr(self.options, k, None) != v}
        options = self.options.replace(**changes) if changes else self.options
        return RunContext(options=options, inferer=self, budget_share=1 + max(0, read_ahead))

    @property
    def bundles(self) -> list[Bundle]:
        """The bundles loaded so far."""
        return list(self._bundles.values())

    # Read-only views of the options that callers (viz, benchmarks) use.
    @property
    def model(self) -> str | None:
        return self.options.model

    @property
    def method(self) -> str | None:
        return self.options.method

    @property
    def size(self) -> int | None:
        return self.options.size

    @property
    def channels(self) -> str:
        return self.options.channels

    @property
    def overrides(self) -> dict[str, Any]:
        return self.options.params

    # -- models ---------------------------------------------------------------------------------
    def bundle_for(self, kind: str) -> Bundle:
        """The bundle serving inputs of ``kind`` ("2d", "slide" or "volume"), loaded once."""
        root = resolve_model(self.options.model, kind).resolve()
        if root not in self._bundles:
            bundle = load_bundle(root)
            bundle.allow_unhashed = self.options.allow_unhashed
            self._bundles[root] = bundle
        return self._bundles[root]

    def plan_for(self, bundle: Bundle) -> plan.Plan:
        """The resolved method and parameters for ``bundle`` (see segcli.plan)."""
        return plan.resolve(bundle, self.options)

    def predictor(self, bundle: Bundle, role: str) -> Any:
        """The runtime serving ``role`` of ``bundle`` (built once: torch or ONNX Runtime)."""
        from segcli.runtimes import make_predictor

        key = (bundle.path.resolve(), role)
        if key not in self._predictors:
            t = time.perf_counter()
            self._predictors[key] = make_predictor(
                bundle, role, backend=self.options.backend, device=self.device,
                max_batch=int(self.param(bundle, "batch_size")), half=self.options.half,
                onnx_cache=self.options.onnx_cache, precision=self.options.precision,
            )
            # model loading, and the ONNX export on first use: a stage of the file that needed it (pipeline)
            self.load_seconds["total"] = self.load_seconds.get("total", 0.0) + time.perf_counter() - t
        return self._predictors[key]

    def set_predictor(self, bundle: Bundle, role: str, predictor: Any) -> None:
        """Serve ``role`` of ``bundle`` with ``predictor`` (a wrapper, a quantised model: segcli.quantize)."""
        self._predictors[(bundle.path.resolve(), role)] = predictor

    def predictors(self, bundle: Bundle) -> Callable[[str], Any]:
        """``role → predictor`` for ``bundle``, as the planner's engines ask for them."""
        return lambda role: self.predictor(bundle, role)

    def roles(self, bundle: Bundle) -> tuple[str, ...]:
        return self.plan_for(bundle).roles

    def warm_up(self, kind: str = "2d") -> Bundle:
        """Load the bundle and build its predictors now, so a bad model fails once, up front."""
        bundle = self.bundle_for(kind)
        for role in self.roles(bundle):
            self.predictor(bundle, role)
        return bundle

    def memory_plan(self, kind: str, bounded: bool | None = None) -> Any:
        """The run's :class:`segcli.memplan.MemoryPlan` for inputs of ``kind``, made once before work.

        Raises :class:`segcli.memplan.BudgetError` (a usage error) when even batch 1 does not fit. The
        networks and the interpreter are held once per process, so a read-ahead sibling plans with the
        whole process budget (its images are checked against their share: :class:`RunContext`).
        """
        from segcli import memplan

        budget = self.budget
        bounded = kind == "slide" if bounded is None else bounded
        key = (kind, budget, bounded)
        if key not in self._plans:
            bundle = self.warm_up(kind)
            base = memplan.rss_now()  # before measuring: measuring sessions may leave allocator slack behind
            p = self.plan_for(bundle)
            costs, hows = {}, set()
            # A bounded route runs the method table's bounded variant (sliding: stts over tissue windows).
            roles = plan.bounded_variant(p)[0].roles if bounded and p.method in BOUNDED else p.roles
            for role in roles:
                table, how = memplan.network_cost(self.predictor(bundle, role), p.size, bundle.in_channels,
                                                  bundle.n_classes)
                costs[role] = table
                hows.add(how)
            wanted = int(p["batch_size"])
            if "batch_size" not in self.options.params and not self.device.startswith("cuda"):
                wanted = min(wanted, memplan.FAST_BATCH)
            self._plans[key] = memplan.make_plan(
                budget=budget, kind="slide" if bounded else kind, name=bundle.name, base=base, costs=costs,
                how="estimated" if "estimated" in hows else "measured", size=p.size,
                channels=bundle.in_channels, n_classes=bundle.n_classes, zoom=float(self.options.max_zoom or bundle.params.get("max_zoom") or 1.0),
                wanted=wanted, workers=self.workers, user_budget=self.options.max_memory is not None)
        return self._plans[key]

    def providers(self, bundle: Bundle) -> dict[str, str]:
        """The runtime actually serving each role (e.g. CPUExecutionProvider, torch-cpu)."""
        out = {}
        for role in self.roles(bundle):
            pred = self.predictor(bundle, role)
            prec = getattr(pred, "metadata", {}).get("precision", "fp32")
            out[role] = f"{pred.backend}:{getattr(pred, 'provider', pred.device)}" + (f":{prec}" if prec != "fp32" else "")
        return out

    def param(self, bundle: Bundle, key: str) -> Any:
        """One resolved method parameter (options, then bundle, then default)."""
        return self.plan_for(bundle)[key]

    # -- arrays ---------------------------------------------------------------------------------
    def prepare(self, array: np.ndarray, bundle: Bundle, path: Any = None) -> np.ndarray:
        """Channel conversion and normalisation: channel-last input → channel-first float32."""
        return prepare(array, bundle, self.options.channels, path, self.options.window)

    def segment_array(
        self,
        array: np.ndarray,
        *,
        kind: str = "2d",
        spacing: tuple[float, ...] | None = None,
        return_probs: bool = False,
        progress: ProgressFn | None = None,
        path: Any = None,
        budget: int | None = None,
    ) -> tuple[Result, Bundle]:
        """Segment a channel-last array: ``(H, W, C)`` for 2D or ``(Z, Y, X, C)`` for a volume."""
        if array.ndim not in (3, 4):
            raise InputError(f"expected (H, W, C) or (Z, Y, X, C), got shape {array.shape}", path)
        if array.ndim == 4:
            from segcli.io.volstream import ArrayVolume

            return self.segment_volume(ArrayVolume(array), spacing=spacing, return_probs=return_probs,
                                       progress=progress, path=path, budget=budget,
                                       kind=kind if kind.startswith("volume") else "volume")
        staged = self.stage_2d(array, kind=kind, spacing=spacing, path=path, budget=budget)
        return self.run_staged(staged, return_probs=return_probs, progress=progress), staged.bundle

    def stage_2d(self, array: np.ndarray, *, kind: str = "2d", spacing: tuple[float, ...] | None = None,
                 path: Any = None, prime: bool = False, budget: int | None = None) -> Staged2D:
        """Everything before the networks for a ``(H, W, C)`` array: channels, normalisation, the plane,
        the engine's arguments and (``prime``) the rough pass's downscaled view.

        A batch calls this in its reader thread, so that work overlaps the previous image's networks.
        ``budget``: this image's share of the memory budget (default: the whole process budget).
        """
        bundle = self.bundle_for(kind)
        p = self.plan_for(bundle)
        plane: Any = ArrayPlane(self.prepare(array, bundle, path))
        scale = plan.physical_factor(bundle, spacing)
        if scale is not None:  # seen at the bundle's training pixel size (segcli.plan.physical_factor)
            plane = ScaledPlane(plane, scale[0])
            spacing = (*spacing[:-2], *(float(bundle.params["training_mpp"]) / 1000.0,) * 2)  # type: ignore[index]
        mplan = self.memory_plan(kind)
        kw = plan.kwargs_2d(p, bundle, self.options, self.budget if budget is None else budget, plane.shape,
                            spacing, batch=mplan.batch,
                            rough_batch=mplan.rough_batch)
        if prime:
            plan.prime_2d(p, plane, kw)
        return Staged2D(bundle=bundle, plan=p, plane=plane, kwargs=kw, full_shape=tuple(array.shape[:2]),
                        scale=scale)

    def run_staged(self, staged: Staged2D, *, return_probs: bool = False,
                   progress: ProgressFn | None = None) -> Result:
        """The networks and fusion for a :meth:`stage_2d` result; the mask is on the array's own grid."""
        bundle, scale = staged.bundle, staged.scale
        res = plan.run_2d(staged.plan, staged.plane, self.predictors(bundle), staged.kwargs,
                          return_probs=return_probs, progress=progress)
        if scale is not None:
            full = staged.full_shape
            res.labels = np.asarray(ScaledLabels(res.labels, scale[0], full))
            if res.probs is not None:
                from segcli.resize import resize

                res.probs = resize(res.probs, full, "bilinear")
            res.info["resampled"] = {"image_mpp": round(scale[1], 4),
                                     "training_mpp": float(bundle.params["training_mpp"]),
                                     "network_shape": list(staged.plane.shape)}
        return res

    def segment_volume(
        self,
        source: Any,
        *,
        spacing: tuple[float, ...] | None = None,
        return_probs: bool = False,
        progress: ProgressFn | None = None,
        path: Any = None,
        labels_out: np.ndarray | None = None,
        probs_out: Any = None,
        kind: str = "volume",
        budget: int | None = None,
    ) -> tuple[Result, Bundle]:
        """Segment a canonical ``(Z, Y, X, C)`` volume served by a VolumeSource, one slab at a time.

        The source is an in-memory array (:class:`~segcli.io.volstream.ArrayVolume`) or a file read
        slab by slab (:class:`~segcli.io.volstream.StreamedVolume`); either way only the uint8 mask
        is full size. One pass over the slabs checks the voxels and collects the normalisation
        statistics, then the engine reads the slices it needs in order. ``labels_out`` (canonical
        ``(Z, Y, X)`` uint8, any strides) receives the mask instead of a new array; ``probs_out``
        (``put(i, (K, H, W))`` per slice ``i`` along the slicing axis) receives the probabilities, which
        are then not returned as an array.
        """
        from segcli.engines.volume import SlicePlane
        from segcli.io.volstream import SlabCache
        from segcli.normalize import convert_channels

        bundle = self.bundle_for(kind)
        p = self.plan_for(bundle)
        axis = slice_axis(spacing)
        mode = self.options.channels
        cache = SlabCache(source, axis, lambda b: convert_channels(b, bundle.in_channels, mode, path))
        fn = volume_normalizer(cache, bundle, path)
        shape = tuple(s for i, s in enumerate(source.shape[:3]) if i != axis)
        planes = [SlicePlane(cache, i, shape, fn, bundle.in_channels) for i in range(source.shape[axis])]  # type: ignore[arg-type]
        out = None if labels_out is None else np.moveaxis(labels_out, axis, 0)
        budget = self.budget if budget is None else budget
        res = plan.run_3d(p, planes, self.predictors(bundle),  # type: ignore[arg-type]
                          lambda pl: plan.kwargs_2d(p, bundle, self.options, budget, pl.shape, None,
                                                    batch=self.memory_plan("volume").batch),
                          return_probs=return_probs, progress=progress, out=out, probs_out=probs_out)
        res.labels = np.moveaxis(res.labels, 0, axis)
        if isinstance(res.probs, np.ndarray):
            res.probs = np.moveaxis(res.probs, 1, axis + 1)
        gate = GateParams.from_param(p["lung_gate"])
        if gate is not None:  # anatomy check after the network (segcli.lunggate): one more pass over the slabs
            t = time.perf_counter()
            cache.release()
            res.info["lung_gate"] = lunggate.apply(res.labels, cache.blocks(0, slab_bytes=16 << 20),
                                                   tuple(spacing or (1.0, 1.0, 1.0)), gate)
            res.timings["lung_gate"] = time.perf_counter() - t
        res.info["slice_axis"] = axis
        res.info["slabs_read"] = cache.slabs_read
        return res, bundle


@dataclass(frozen=True)
class RunContext:
    """One run as the pipeline sees it: the options (with the call's file options), the inferer holding the
    models, and how many files share the process's memory budget (``budget_share`` > 1 while a batch reads
    ahead: each file's images are checked against ``budget``, its share). Made by :meth:`Inferer.context`."""

    options: PredictOptions
    inferer: Inferer
    budget_share: int = 1

    @property
    def budget(self) -> int:
        """One file's share of the memory budget, in bytes."""
        return self.inferer.budget // self.budget_share

    def bundle_for(self, kind: str) -> Bundle:
        return self.inferer.bundle_for(kind)

    def plan_for(self, bundle: Bundle) -> plan.Plan:
        return self.inferer.plan_for(bundle)
