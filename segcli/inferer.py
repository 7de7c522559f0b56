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

from segcli import lunggate, memory, memplan, plan
from segcli.bundle import Bundle, load_bundle, resolve_model
from segcli.engines.base import ArrayPlane, ProgressFn, Result, ScaledLabels, ScaledPlane
from segcli.engines.volume import SlicePlane
from segcli.errors import InputError
from segcli.fusion import fold_boundary, fold_probs
from segcli.geometry import slice_axis
from segcli.io.volstream import ArrayVolume, SlabCache
from segcli.lunggate import GateParams
from segcli.methods import BOUNDED
from segcli.normalize import convert_channels
from segcli.options import PredictOptions
from segcli.plan import Staged2D
from segcli.prepare import prepare, volume_normalizer
from segcli.resize import resize
from segcli.runtimes import make_predictor, onnx_cache
from segcli.runtimes.device import resolve_device, set_threads
from segcli.runtimes.tta import TTA_MODES, TransformAveraged


class Inferer:
    """A model (or the shipped default per input kind), a method, a runtime and a device, built once."""

    def __init__(self, options: PredictOptions) -> None:
        self.options = options
        self.device = resolve_device(options.device)
        self.threads = set_threads(options.threads)
        self.budget = options.budget  # this process's budget: options.budget // workers (segcli.batch)
        self.workers = 1  # > 1: one of W workers, whose budget is already its share (segcli.batch.check_budget)
        self.parent_bytes = 0  # with workers: the RSS of the parent that started them (segcli.batch)
        self.run_budget = self.budget  # the whole run's budget (all workers and their parent), for refusals
        self._plan_facts: dict[tuple[str, bool], dict[str, Any]] = {}  # what memory plans are made from
        self._minimums: dict[tuple[str, bool], int] = {}  # plan_minimum per (kind, bounded route)
        self._bundles: dict[Path, Bundle] = {}
        self._folded: dict[Path, Bundle] = {}  # the same bundles as runs without an instance split see them
        self._predictors: dict[tuple[Path, str], Any] = {}
        self._roots: dict[Path, Path] = {}
        self._model_roots: dict[tuple[str, str], Path] = {}  # (--model, kind) -> its bundle folder, resolved once
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
        key = (str(self.options.model), kind)
        root = self._model_roots.get(key)
        if root is None:  # once per run: resolving it (stat calls, models/index.json) was 3 % of a photo batch
            root = self._model_roots[key] = resolve_model(self.options.model, kind).resolve()
        # A boundary class is folded into its object after fusion on photos (2D, held whole): their masks are
        # then the same with or without --instances, and stts scored better so (nuclei, 10 DSB test images: Dice
        # 0.894 against 0.873 folded first). Slides and volumes fold it before fusion (segcli.bundle.Bundle.folded)
        # and cost what a binary network does; a slide's instance split keeps it.
        split = kind == "2d" or (bool(self.options.instances) and not kind.startswith("volume"))
        if root not in self._bundles:
            bundle = load_bundle(root)
            bundle.allow_unhashed = self.options.allow_unhashed
            self._bundles[root] = bundle
        bundle = self._bundles[root]
        return bundle if split else self._folded.setdefault(root, bundle.folded())

    def plan_for(self, bundle: Bundle) -> plan.Plan:
        """The resolved method and parameters for ``bundle`` (see segcli.plan)."""
        return plan.resolve(bundle, self.options)

    def predictor(self, bundle: Bundle, role: str) -> Any:
        """The runtime serving ``role`` of ``bundle`` (built once: torch or ONNX Runtime)."""
        key = _key(bundle, role, self._roots)
        if key not in self._predictors:
            t = time.perf_counter()
            nets = bundle.networks_of or bundle
            pred = make_predictor(
                nets, role, backend=self.options.backend, device=self.device,
                max_batch=int(self.param(bundle, "batch_size")), half=self.options.half,
                onnx_cache=self.options.onnx_cache, precision=self.options.precision,
                export_budget=self.run_budget if self.options.max_memory is not None else None,
            )
            pred = pred if nets is bundle else FoldedPredictor(pred, nets.boundary)
            self._predictors[key] = pred if self.options.tta == "none" else TransformAveraged(pred, self.options.tta)
            # model loading, and the ONNX export on first use: a stage of the file that needed it (pipeline)
            self.load_seconds["total"] = self.load_seconds.get("total", 0.0) + time.perf_counter() - t
        return self._predictors[key]

    def set_predictor(self, bundle: Bundle, role: str, predictor: Any) -> None:
        """Serve ``role`` of ``bundle`` with ``predictor`` (a wrapper, a quantised model: segcli.quantize)."""
        self._predictors[_key(bundle, role, self._roots)] = predictor

    def predictors(self, bundle: Bundle) -> Callable[[str], Any]:
        """``role → predictor`` for ``bundle``, as the planner's engines ask for them."""
        return lambda role: self.predictor(bundle, role)

    def roles(self, bundle: Bundle) -> tuple[str, ...]:
        return self.plan_for(bundle).roles

    def warm_up(self, kind: str = "2d") -> Bundle:
        """Load the bundle and build its predictors now, so a bad model fails once, up front."""
        bundle = self.bundle_for(kind)
        self._export_first(bundle)
        for role in self.roles(bundle):
            self.predictor(bundle, role)
        return bundle

    def _export_first(self, bundle: Bundle) -> None:
        """The bundle's first-use ONNX exports, one after the other before any runtime loads here: each runs in
        a child beside this process, whose RSS a loaded runtime and session would raise (polyp: +62 MB
        between its two exports), and under --max-memory each is checked against the budget before it starts
        (segcli.runtimes.onnx_cache.check_export_budget)."""
        if self.options.backend not in ("auto", "onnx") or self.device.startswith("cuda"):
            return
        view, bundle = bundle, bundle.networks_of or bundle  # the networks' own bundle: their classes are the export's
        budget = self.run_budget if self.options.max_memory is not None else None
        todo = [r for r in self.roles(bundle) if _key(view, r, self._roots) not in self._predictors and
                onnx_cache.first_use(bundle, r, self.options.onnx_cache)]
        if todo and budget is not None:  # one refusal naming what the whole first use needs
            onnx_cache.check_export_budget(bundle, todo, budget)
        for role in todo:
            onnx_cache.cached_export(bundle, role, self.options.onnx_cache, budget)

    #: The inferer checks a file alone; a read-ahead run's files share the budget through :class:`RunContext`.
    budget_share = 1

    def memory_plan(self, kind: str, bounded: bool | None = None, reserve: int = 0) -> Any:
        """The run's :class:`segcli.memplan.MemoryPlan` for inputs of ``kind``, made once before work.

        Raises :class:`segcli.memplan.BudgetError` (a usage error) when even batch 1 does not fit. The
        networks and the interpreter are held once per process, so a read-ahead sibling plans with the
        whole process budget; ``reserve`` (bytes) is kept for the images themselves (their buffers for all
        files held at once, segcli.memory.check_in_memory), so a big image gets smaller batches.
        """
        bounded = kind == "slide" if bounded is None else bounded
        budget = self.budget
        if reserve > 0:  # in 4 MiB steps (few distinct plans); never a refusal the budget alone would not give
            reserve = -(-int(reserve) // (4 * 2**20)) * 4 * 2**20
            budget = max(budget - reserve, min(budget, self.plan_minimum(kind, bounded)))
        key = (kind, budget, bounded)
        if key not in self._plans:
            self._plans[key] = memplan.make_plan(budget=budget, **self._plan_inputs(kind, bounded),
                                                 workers=self.workers, parent=self.parent_bytes,
                                                 run_budget=self.run_budget,
                                                 user_budget=self.options.max_memory is not None)
        return self._plans[key]

    def plan_minimum(self, kind: str, bounded: bool | None = None) -> int:
        """Bytes this process needs at batch 1 for inputs of ``kind``, images apart (segcli.memplan)."""
        bounded = kind == "slide" if bounded is None else bounded
        if (kind, bounded) not in self._minimums:  # asked twice a file: a photo batch made 2 plans a frame for it
            self._minimums[(kind, bounded)] = memplan.make_plan(budget=2**62, **self._plan_inputs(kind, bounded)).minimum
        return self._minimums[(kind, bounded)]

    def _plan_inputs(self, kind: str, bounded: bool) -> dict[str, Any]:
        """What a memory plan is made from, measured once per (kind, route) and kept when the networks are
        released (:meth:`release_networks`): a parent plans its workers without them. The RSS with the
        networks loaded and each network's cost per batch (segcli.memplan.network_cost), as
        :func:`segcli.memplan.make_plan` takes them."""
        if (kind, bounded) not in self._plan_facts:
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
            zoom = float(self.options.max_zoom or bundle.params.get("max_zoom") or 1.0)
            self._plan_facts[(kind, bounded)] = {
                "kind": "slide" if bounded else kind, "name": bundle.name, "base": base, "costs": costs,
                "how": "estimated" if "estimated" in hows else "measured", "size": p.size,
                "channels": bundle.in_channels, "n_classes": bundle.n_classes, "zoom": zoom, "wanted": wanted,
                # the instance split of a slide read by region, window by window (segcli.instances_tiled)
                "extra": memplan.instance_windows(self.options.tile_size) if bounded and self.options.instances else 0,
                "tta": len(TTA_MODES[self.options.tta])}
        return self._plan_facts[(kind, bounded)]

    def release_networks(self) -> int:
        """Drop every loaded runtime (their arenas go with them) and return this process's RSS after.

        A parent does this before starting workers: each worker loads its own, and the budget left to
        them is the run's minus what the parent still holds. What the plans were made from is kept.
        """
        self._predictors.clear()
        memplan.give_back()
        return memplan.rss_now()

    def providers(self, bundle: Bundle) -> dict[str, str]:
        """The runtime actually serving each role (e.g. CPUExecutionProvider, torch-cpu)."""
        out = {}
        for role in self.roles(bundle):
            pred = self.predictor(bundle, role)
            prec = getattr(pred, "metadata", {}).get("precision", "fp32")
            out[role] = (f"{pred.backend}:{getattr(pred, 'provider', pred.device)}" + (f":{prec}" if prec != "fp32" else "")
                         + (f":tta-{self.options.tta}" if self.options.tta != "none" else ""))
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
        own = memory.image_bytes(self, kind, array.shape[:2], array.shape[2], array.dtype.itemsize)
        held = max(1, self.budget // budget) if budget else 1  # files a read-ahead batch holds at once
        mplan = self.memory_plan(kind, reserve=own * held)  # batches shrink for a big image
        kw = plan.kwargs_2d(p, bundle, self.options, self.budget if budget is None else budget, plane.shape,
                            spacing, batch=mplan.batch,
                            rough_batch=mplan.rough_batch)
        kw.update(plan.rough_fold(p, bundle, kind))
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
                res.probs = resize(res.probs, full, "bilinear")
            res.info["resampled"] = {"image_mpp": round(scale[1], 4),
                                     "training_mpp": float(bundle.params["training_mpp"]),
                                     "network_shape": list(staged.plane.shape)}
        fold_boundary(res, bundle.fold(), bundle.boundary)  # a boundary class is part of its object in the mask
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
        bundle = self.bundle_for(kind)
        p = self.plan_for(bundle)
        axis = slice_axis(spacing)
        mode = self.options.channels
        cache = SlabCache(source, axis, lambda b: convert_channels(b, bundle.in_channels, mode, path))
        fn = volume_normalizer(cache, bundle, path)
        shape = tuple(s for i, s in enumerate(source.shape[:3]) if i != axis)
        planes = [SlicePlane(cache, i, shape, fn, bundle.in_channels) for i in range(source.shape[axis])]  # type: ignore[arg-type]
        out = None if labels_out is None else np.moveaxis(labels_out, axis, 0)
        held = max(1, self.budget // budget) if budget else 1  # files a read-ahead batch holds at once
        budget = self.budget if budget is None else budget
        own = memory.image_bytes(self, kind, tuple(source.shape[:3]), int(source.shape[3]), source.dtype.itemsize,
                                 streamed=not isinstance(source, ArrayVolume),
                                 return_probs=return_probs and probs_out is None)
        mplan = self.memory_plan(kind, reserve=own * held)
        batch = mplan.batch
        res = plan.run_3d(p, planes, self.predictors(bundle),  # type: ignore[arg-type]
                          lambda pl: plan.kwargs_2d(p, bundle, self.options, budget, pl.shape, None,
                                                    batch=batch),
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
        res.info["memory_plan"] = mplan.to_dict()
        return res, bundle


def _key(bundle: Bundle, role: str, roots: dict[Path, Path]) -> tuple[Any, ...]:
    """A predictor's cache key: a bundle's folded view (``Bundle.folded``) is served by its own wrapper.
    ``roots`` keeps each bundle path resolved once per inferer (like its bundles): resolving it several times
    a photo was 8 % of a batch's main thread."""
    root = roots.get(bundle.path)
    if root is None:
        root = roots[bundle.path] = bundle.path.resolve()
    return (root, role) if bundle.networks_of is None else (root, role, "folded")


class FoldedPredictor:
    """A network with a boundary class seen as one without: the boundary's probability is added to its object's
    (``segcli.fusion.fold_probs``), for runs that need no instances (:meth:`segcli.bundle.Bundle.folded`)."""

    def __init__(self, inner: Any, boundary: tuple[int, int] | None) -> None:
        self.inner, self.boundary = inner, boundary
        self.n_classes = int(inner.n_classes) - 1
        self.in_channels, self.backend, self.device = inner.in_channels, inner.backend, inner.device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return fold_probs(self.inner(batch), self.boundary, axis=1)

    def __getattr__(self, name: str) -> Any:  # batch sizes, sessions, precision: the network's own
        return getattr(self.inner, name)


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

    # What segcli.memory reads of a run (the whole run's budget, workers, the plan's minimum).
    @property
    def workers(self) -> int:
        return self.inferer.workers

    @property
    def parent_bytes(self) -> int:
        return self.inferer.parent_bytes

    @property
    def run_budget(self) -> int:
        return self.inferer.run_budget

    def plan_minimum(self, kind: str, bounded: bool | None = None) -> int:
        return self.inferer.plan_minimum(kind, bounded)

    def bundle_for(self, kind: str) -> Bundle:
        return self.inferer.bundle_for(kind)

    def plan_for(self, bundle: Bundle) -> plan.Plan:
        return self.inferer.plan_for(bundle)
