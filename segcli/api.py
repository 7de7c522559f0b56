"""The Python API behind every CLI command: build a :class:`Segmenter` once, apply it to many inputs.

Like lungmask's inferer (and MONAI's predictor objects), a Segmenter is built once from one
:class:`~segcli.options.PredictOptions`, holds the loaded bundles and their runtimes, and is applied
to arrays (:meth:`Segmenter.segment_array`, :meth:`Segmenter.segment_volume`) or to files
(:meth:`Segmenter.predict_file`, :meth:`Segmenter.predict_many`). What happens to one file — read,
route (in memory, streamed volume, tiled TIFF), compute, write — lives in :mod:`segcli.pipeline`;
the parameters of each method are resolved once in :mod:`segcli.plan`.

Volumes arrive in canonical LPS orientation from :mod:`segcli.io` and are sliced along
:func:`segcli.geometry.slice_axis`; the mask goes back in the file's own orientation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli import lunggate, memory, plan
from segcli.bundle import Bundle, load_bundle, resolve_model
from segcli.engines.base import ArrayPlane, ProgressFn, Result, ScaledLabels, ScaledPlane
from segcli.errors import InputError
from segcli.geometry import slice_axis
from segcli.lunggate import GateParams
from segcli.options import PredictOptions
from segcli.plan import Staged2D
from segcli.prepare import prepare, volume_normalizer
from segcli.report import FileReport

__all__ = ["FileReport", "PredictOptions", "Segmenter", "segment", "slice_axis"]


class Segmenter:
    """A model (or the shipped default per input kind), a method, a runtime and a device, built once.

    Pass a :class:`PredictOptions`, or its fields as keyword arguments (``overrides`` is the mapping
    of method parameters — threshold, pad, patches, ... — that replace the bundle's).
    """

    def __init__(self, model: str | Path | None = None, *, options: PredictOptions | None = None,
                 **kwargs: Any) -> None:
        from segcli.runtimes.device import resolve_device, set_threads

        if options is None:
            options = PredictOptions.from_kwargs(model, **kwargs)
        elif model is not None or kwargs:
            raise TypeError("give either options= or the model and keyword options, not both")
        self.options = options
        self.device = resolve_device(options.device)
        self.threads = set_threads(options.threads)
        self.budget = options.budget
        self.budget_share = 1  # > 1 in a read-ahead batch: ``budget`` is one file's share (see predict_many)
        self._bundles: dict[Path, Bundle] = {}
        self._predictors: dict[tuple[Path, str], Any] = {}
        self._plans: dict[tuple[str, int, bool], Any] = {}  # segcli.memplan.MemoryPlan per (kind, budget)
        self.workers = 1  # > 1: one of W workers, whose budget is already its share (segcli.batch.check_budget)
        self.parent_bytes = 0  # with workers: the RSS of the parent that started them (segcli.batch)
        self.run_budget = self.budget  # the whole run's budget (all workers and their parent), for refusals
        self._plan_facts: dict[tuple[str, bool], dict[str, Any]] = {}  # what memory plans are made from
        self.load_seconds: dict[str, float] = {}  # shared with siblings (_with): time spent building predictors

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

    def memory_plan(self, kind: str, bounded: bool | None = None, reserve: int = 0) -> Any:
        """The run's :class:`segcli.memplan.MemoryPlan` for inputs of ``kind``, made once before work.

        Raises :class:`segcli.memplan.BudgetError` (a usage error) when even batch 1 does not fit. The
        networks and the interpreter are held once per process, so a read-ahead sibling plans with the
        whole budget; ``reserve`` (bytes) is kept for the images themselves (their buffers for all files
        held at once, segcli.memory.check_in_memory), so a big image gets smaller batches.
        """
        from segcli import memplan

        bounded = kind == "slide" if bounded is None else bounded
        budget = self.budget * self.budget_share
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
        from segcli import memplan

        bounded = kind == "slide" if bounded is None else bounded
        return memplan.make_plan(budget=2**62, **self._plan_inputs(kind, bounded)).minimum

    def _plan_inputs(self, kind: str, bounded: bool) -> dict[str, Any]:
        """What a memory plan is made from (segcli.memplan.plan_facts), measured once per (kind, route) and
        kept when the networks are released (:meth:`release_networks`): a parent plans its workers without them."""
        from segcli import memplan

        if (kind, bounded) not in self._plan_facts:
            self._plan_facts[(kind, bounded)] = memplan.plan_facts(self, kind, bounded)
        return self._plan_facts[(kind, bounded)]

    def release_networks(self) -> int:
        """Drop every loaded runtime (their arenas go with them) and return this process's RSS after.

        A parent does this before starting workers: each worker loads its own, and the budget left to
        them is the run's minus what the parent still holds. What the plans were made from is kept.
        """
        from segcli import memplan

        self._predictors.clear()
        memplan.give_back()
        return memplan.rss_now()

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
    ) -> tuple[Result, Bundle]:
        """Segment a channel-last array: ``(H, W, C)`` for 2D or ``(Z, Y, X, C)`` for a volume."""
        if array.ndim not in (3, 4):
            raise InputError(f"expected (H, W, C) or (Z, Y, X, C), got shape {array.shape}", path)
        if array.ndim == 4:
            from segcli.io.volstream import ArrayVolume

            return self.segment_volume(ArrayVolume(array), spacing=spacing, return_probs=return_probs,
                                       progress=progress, path=path,
                                       kind=kind if kind.startswith("volume") else "volume")
        staged = self.stage_2d(array, kind=kind, spacing=spacing, path=path)
        return self.run_staged(staged, return_probs=return_probs, progress=progress), staged.bundle

    def stage_2d(self, array: np.ndarray, *, kind: str = "2d", spacing: tuple[float, ...] | None = None,
                 path: Any = None, prime: bool = False) -> Staged2D:
        """Everything before the networks for a ``(H, W, C)`` array: channels, normalisation, the plane,
        the engine's arguments and (``prime``) the rough pass's downscaled view.

        A batch calls this in its reader thread, so that work overlaps the previous image's networks.
        """
        bundle = self.bundle_for(kind)
        p = self.plan_for(bundle)
        plane: Any = ArrayPlane(self.prepare(array, bundle, path))
        scale = plan.physical_factor(bundle, spacing)
        if scale is not None:  # seen at the bundle's training pixel size (segcli.plan.physical_factor)
            plane = ScaledPlane(plane, scale[0])
            spacing = (*spacing[:-2], *(float(bundle.params["training_mpp"]) / 1000.0,) * 2)  # type: ignore[index]
        own = memory.image_bytes(self, kind, array.shape[:2], array.shape[2], array.dtype.itemsize)
        mplan = self.memory_plan(kind, reserve=own * self.budget_share)  # batches shrink for a big image
        kw = plan.kwargs_2d(p, bundle, self.options, self.budget, plane.shape, spacing, batch=mplan.batch,
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
        from segcli.io.volstream import ArrayVolume, SlabCache
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
        own = memory.image_bytes(self, kind, tuple(source.shape[:3]), int(source.shape[3]), source.dtype.itemsize,
                                 streamed=not isinstance(source, ArrayVolume),
                                 return_probs=return_probs and probs_out is None)
        mplan = self.memory_plan(kind, reserve=own * self.budget_share)
        batch = mplan.batch
        res = plan.run_3d(p, planes, self.predictors(bundle),  # type: ignore[arg-type]
                          lambda pl: plan.kwargs_2d(p, bundle, self.options, self.budget, pl.shape, None,
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

    # -- files ----------------------------------------------------------------------------------
    def predict_file(
        self,
        path: str | Path,
        output: str | Path | None = None,
        *,
        input_root: Path | None = None,
        progress: ProgressFn | None = None,
        **file_options: Any,
    ) -> FileReport:
        """Read, segment and write one input; every user-caused failure becomes a failed report.

        ``file_options`` (probabilities, skip_existing, stats, lock) override this Segmenter's options
        for this call.
        """
        from segcli import pipeline

        seg = self._with(file_options)
        return pipeline.run_one(seg, Path(path), output, input_root=input_root, progress=progress)

    def predict_many(
        self,
        items: list[tuple[Path, Path | None]],
        output: str | Path | None = None,
        *,
        prefetch: int = 2,
        progress_for: Callable[[Path], ProgressFn | None] | None = None,
        **file_options: Any,
    ) -> Iterator[FileReport]:
        """Reports in input order, with reading of the next files and writing of the previous one
        overlapped with computing the current one (see segcli.pipeline.run_many)."""
        from segcli import pipeline

        seg = self._with(file_options)
        if prefetch > 0 and len(items) > 1:  # files read ahead are held while one computes: each gets a share
            seg = seg._with({}, budget=seg.budget // (1 + prefetch))
            seg.budget_share = 1 + prefetch
        yield from pipeline.run_many(seg, items, output, prefetch=prefetch, progress_for=progress_for)

    def _with(self, file_options: dict[str, Any], budget: int | None = None) -> Segmenter:
        """This Segmenter, or a sibling sharing its models whose options carry per-call file options (and,
        for a read-ahead batch, its share of the memory budget)."""
        changes = {k: v for k, v in file_options.items() if getattr(self.options, k, None) != v}
        if not changes and budget is None:
            return self
        sib = object.__new__(Segmenter)
        sib.__dict__.update(self.__dict__)
        sib.options = self.options.replace(**changes) if changes else self.options
        if budget is not None:
            sib.budget = budget
        return sib


def segment(
    image: str | Path | np.ndarray,
    model: str | Path | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """One-call convenience: a path or channel-last array in, uint8 labels out."""
    seg = Segmenter(model, method=method, **kwargs)
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        return seg.segment_array(arr)[0].labels
    from segcli import io

    img = io.open_image(image)
    return seg.segment_array(img.array, kind="volume" if img.ndim == 3 else "2d", spacing=img.spacing,
                             path=image)[0].labels
