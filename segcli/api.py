"""The Python API behind every CLI command: build a :class:`Segmenter` once, apply it to many files.

Like lungmask's inferer, the bundle and its networks are loaded once and reused for a whole batch;
the orientation of volumes is normalised by ``segcli.io`` (canonical LPS) before slicing and
restored on write.

Two paths, chosen per file before any pixel is decoded (``_read``):

* in memory (everything by default): decode, normalise, run the engine, write;
* bounded (TIFF above ``lazy_pixels``, or whenever ``max_memory`` says the in-memory peak would not
  fit): a :class:`~segcli.io.bigtiff.TiffPlane` reads the rough view from the best pyramid level
  and crops by region, stts fuses into a spilled tile store, and the mask is streamed into a tiled
  BigTIFF. Methods that need the whole image (direct, sliding, refine) are estimated first and
  refused with a one-line message when they would not fit, instead of meeting the OOM killer.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli import lunggate, memory
from segcli import normalize as norm
from segcli.bundle import DEFAULT_PARAMS, Bundle, load_bundle, resolve_model
from segcli.engines.base import ArrayPlane, ProgressFn, Result
from segcli.errors import EmptyImageError, InputError, SegcliError, UsageError
from segcli.lunggate import GateParams

log = logging.getLogger("segcli")

METHODS = ("stts", "refine", "direct", "sliding")
# Rough pass factor cap and fine-pass zoom used on images above ``lazy_pixels`` when neither the user
# nor the bundle sets one (see segcli.engines.stts for the rule).
HUGE_MAX_DOWNSCALE = 16.0
HUGE_MAX_ZOOM = 4.0


@dataclass
class FileReport:
    """What happened to one input: the ``--json`` record and the CLI's line."""

    input: str
    output: str | None = None
    status: str = "ok"  # ok | failed | skipped | empty
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    model: str | None = None
    method: str | None = None
    backend: str | None = None
    providers: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    classes_found: list[str] = field(default_factory=list)
    voxel_counts: dict[str, int] = field(default_factory=dict)
    volume_ml: dict[str, float] | None = None
    area_mm2: dict[str, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    stats: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Another axis must be this much coarser than the S/I axis before volumes are sliced along it
#: (nnU-Net's anisotropy threshold).
ANISOTROPY = 3.0


def slice_axis(spacing: tuple[float, ...] | None) -> int:
    """Axis 0 (canonical S/I: axial slices) unless another axis is clearly coarser (a sagittal or coronal
    acquisition), then that one.

    Thin-slice CT (0.98 mm pixels, 0.625 mm slices) stays axial, as 2D models are trained, instead of
    being cut sagittally because its pixels are larger than its slices; a thick-slice sagittal MRI
    (0.5 mm in plane, 3 mm between slices) is cut along its own slices.
    """
    if not spacing:
        return 0
    sp = np.asarray(spacing, dtype=np.float64)
    k = int(np.argmax(sp))
    return k if sp[k] >= ANISOTROPY * sp[0] else 0


class Segmenter:
    """A model (or the defaults per input kind), a method, a backend and a device, built once.

    ``overrides`` replace the bundle's method parameters (threshold, pad, patches, ...), which in
    turn replace the built-in defaults.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        method: str | None = None,
        backend: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        channels: str = "keep",
        half: bool = False,
        size: int | None = None,
        overrides: dict[str, Any] | None = None,
        max_memory: str | int | None = None,
        pyramid: bool = False,
        mpp: float | None = None,
        max_downscale: float | None = None,
        max_zoom: float | None = None,
        lazy_pixels: int = memory.LAZY_PIXELS,
        tile_size: int = 512,
        stream_volumes: bool = True,
    ) -> None:
        from segcli.runtimes.device import resolve_device, set_threads

        if method is not None and method not in METHODS:
            raise UsageError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if channels not in ("keep", "grey", "rgb"):
            raise UsageError(f"--channels must be keep, grey or rgb, not {channels!r}")
        self.model = model
        self.method = method
        self.backend = backend
        self.device = resolve_device(device)
        self.threads = set_threads(threads)
        self.channels = channels
        self.half = half
        self.size = size
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(self.overrides) - set(DEFAULT_PARAMS)
        if unknown:
            raise UsageError(f"unknown method parameter(s): {', '.join(sorted(unknown))}")
        self._bundles: dict[Path, Bundle] = {}
        self._predictors: dict[tuple[Path, str], Any] = {}
        # Bounded-memory options (see the module docstring and segcli.memory).
        self.max_memory = max_memory if max_memory is not None else memory.env_budget()
        self.budget = memory.budget(self.max_memory)
        self.pyramid = pyramid
        self.mpp = mpp
        self.max_downscale = max_downscale
        self.max_zoom = max_zoom
        self.lazy_pixels = int(lazy_pixels)
        self.stream_volumes = stream_volumes  # NIfTI, raw MetaImage and DICOM series decoded slab by slab
        if tile_size % 16 or not 16 <= tile_size <= 4096:
            raise UsageError(f"tile size must be a multiple of 16 between 16 and 4096, not {tile_size}")
        self.tile_size = int(tile_size)

    # -- models ---------------------------------------------------------------------------------
    def bundle_for(self, kind: str) -> Bundle:
        """The bundle serving inputs of ``kind`` ("volume" or "2d"), loaded once."""
        root = resolve_model(self.model, "volume" if kind == "volume" else "2d").resolve()
        if root not in self._bundles:
            self._bundles[root] = load_bundle(root)
        return self._bundles[root]

    def predictor(self, bundle: Bundle, role: str):
        from segcli.runtimes import make_predictor

        key = (bundle.path.resolve(), role)
        if key not in self._predictors:
            self._predictors[key] = make_predictor(
                bundle, role, backend=self.backend, device=self.device,
                max_batch=int(self.param(bundle, "batch_size")), half=self.half,
            )
        return self._predictors[key]

    def roles(self, bundle: Bundle) -> tuple[str, ...]:
        method = self.method or bundle.method
        return {"stts": ("coarse", "fine"), "refine": ("coarse", "fine"), "direct": ("coarse",),
                "sliding": ("fine",)}[method]

    def warm_up(self, kind: str = "2d") -> Bundle:
        """Load the bundle and build its predictors now, so a bad model fails once, up front."""
        bundle = self.bundle_for(kind)
        for role in self.roles(bundle):
            self.predictor(bundle, role)
        return bundle

    def providers(self, bundle: Bundle) -> dict[str, str]:
        """The runtime actually serving each role (e.g. CPUExecutionProvider, torch-cpu)."""
        out = {}
        for role in self.roles(bundle):
            pred = self.predictor(bundle, role)
            out[role] = f"{pred.backend}:{getattr(pred, 'provider', pred.device)}"
        return out

    def param(self, bundle: Bundle, key: str) -> Any:
        if key in self.overrides:
            return self.overrides[key]
        if key == "pad":
            v = bundle.params.get("pad")
            return (self.size or bundle.input_size) // 8 if v is None else v
        return bundle.param(key)

    # -- arrays ---------------------------------------------------------------------------------
    def prepare(self, array: np.ndarray, bundle: Bundle, path: Any = None) -> np.ndarray:
        """Channel conversion and normalisation: channel-last input → channel-first float32."""
        a = self._checked(array, bundle, path)
        x = norm.normalize(a, bundle.normalization)
        return np.moveaxis(x, -1, -3 if x.ndim == 3 else 1)  # (C,H,W) or (Z,C,Y,X)

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
                                       progress=progress, path=path)
        bundle = self.bundle_for(kind)
        x = self.prepare(array, bundle, path)
        method = self.method or bundle.method
        return self._run2d(ArrayPlane(x), bundle, method, return_probs, progress, spacing=spacing), bundle

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

        bundle = self.bundle_for("volume")
        method = self.method or bundle.method
        axis = slice_axis(spacing)
        cache = SlabCache(source, axis, lambda b: norm.convert_channels(b, bundle.in_channels, self.channels, path))
        fn = self.volume_normalizer(cache, bundle, path)
        shape = tuple(s for i, s in enumerate(source.shape[:3]) if i != axis)
        planes = [SlicePlane(cache, i, shape, fn, bundle.in_channels) for i in range(source.shape[axis])]  # type: ignore[arg-type]
        out = None if labels_out is None else np.moveaxis(labels_out, axis, 0)
        res = self._run3d(planes, bundle, method, return_probs, progress, out=out,  # type: ignore[arg-type]
                          probs_out=probs_out)
        res.labels = np.moveaxis(res.labels, 0, axis)
        if isinstance(res.probs, np.ndarray):
            res.probs = np.moveaxis(res.probs, 1, axis + 1)
        gate = GateParams.from_param(self.param(bundle, "lung_gate"))
        if gate is not None:  # anatomy check after the network (segcli.lunggate): one more pass over the slabs
            t = time.perf_counter()
            cache.release()
            res.info["lung_gate"] = lunggate.apply(res.labels, cache.blocks(0, slab_bytes=16 << 20),
                                                   tuple(spacing or (1.0, 1.0, 1.0)), gate)
            res.timings["lung_gate"] = time.perf_counter() - t
        res.info["slice_axis"] = axis
        res.info["slabs_read"] = cache.slabs_read
        return res, bundle

    def volume_normalizer(self, cache: Any, bundle: Bundle, path: Any = None) -> Callable[[np.ndarray], np.ndarray]:
        """One pass over a volume's slabs: the input checks of :meth:`_checked` and a normaliser for any slice.

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

    def _checked(self, array: np.ndarray, bundle: Bundle, path: Any = None) -> np.ndarray:
        """Channel conversion and the sanity checks of :meth:`prepare`, without normalising."""
        a = norm.convert_channels(array, bundle.in_channels, self.channels, path)
        if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
            raise InputError(f"unsupported pixel type {a.dtype}", path)
        finite = np.isfinite(a) if a.dtype.kind == "f" else None
        if finite is not None and not finite.any():
            raise InputError("image holds no finite values (all NaN or infinite)", path)
        # Constant per channel (a uniform colour, not only a uniform grey): nothing to segment.
        flat = a.reshape(-1, a.shape[-1])
        lo = np.nanmin(flat, axis=0) if finite is not None else flat.min(axis=0)
        hi = np.nanmax(flat, axis=0) if finite is not None else flat.max(axis=0)
        if np.array_equal(lo, hi):
            value = lo[0] if lo.size == 1 else tuple(lo.tolist())
            raise EmptyImageError(f"image is constant (every pixel = {value}); nothing to segment", path)
        return a

    def slice_normalizer(self, a: np.ndarray, bundle: Bundle) -> Callable[[np.ndarray], np.ndarray]:
        """A function normalising any part of the in-memory volume ``a`` as ``normalize(a)`` would."""
        from segcli.io.volstream import ArrayVolume, SlabCache

        return self.volume_normalizer(SlabCache(ArrayVolume(a), 0), bundle)

    def _common(self, bundle: Bundle) -> dict[str, Any]:
        return {"size": self.size or bundle.input_size, "threshold": float(self.param(bundle, "threshold"))}

    def scale_rule(self, bundle: Bundle, shape: tuple[int, int], spacing: tuple[float, ...] | None
                   ) -> dict[str, float | None]:
        """``max_downscale`` and ``max_zoom`` for one image (the rule is in segcli.engines.stts).

        Explicit arguments win, then the bundle's ``max_downscale``/``max_zoom``/``mpp`` (the µm per
        pixel the coarse network was trained at, used with the image's pixel size); images above
        ``lazy_pixels`` get HUGE_MAX_DOWNSCALE/HUGE_MAX_ZOOM when nothing else says, so a gigapixel
        slide is never squeezed into one S×S pass. Smaller images keep the paper's behaviour.
        """
        params = bundle.params
        caps = [float(v) for v in (self.max_downscale, params.get("max_downscale")) if v]
        coarse_mpp = self.mpp or params.get("mpp")
        if coarse_mpp and spacing:
            image_mpp = float(spacing[-1]) * 1000.0  # mm → µm
            if image_mpp > 0:
                caps.append(max(1.0, float(coarse_mpp) / image_mpp))
        huge = shape[0] * shape[1] > self.lazy_pixels
        max_downscale = min(caps) if caps else (HUGE_MAX_DOWNSCALE if huge else None)
        zoom = self.max_zoom or params.get("max_zoom") or (HUGE_MAX_ZOOM if huge else None)
        return {"max_downscale": max_downscale, "max_zoom": float(zoom) if zoom else None}

    def _stts_kwargs(self, bundle: Bundle, plane: Any, spacing: tuple[float, ...] | None) -> dict[str, Any]:
        p = lambda k: self.param(bundle, k)  # noqa: E731
        c = self._common(bundle)
        rule = self.scale_rule(bundle, plane.shape, spacing)
        batch = memory.fine_batch(self.budget, bundle.in_channels, c["size"], bundle.n_classes,
                                  rule["max_zoom"] or 1.0, int(p("batch_size")))
        return {**c, "pad": int(p("pad")), "keep_aspect": bool(p("keep_aspect")), "min_side": int(p("min_side")),
                "min_component": int(p("min_component")), "keep_coarse": bool(p("keep_coarse")),
                "batch_size": batch, **rule}

    def _run2d(self, plane: Any, bundle: Bundle, method: str, return_probs: bool, progress,
               spacing: tuple[float, ...] | None = None, **extra: Any) -> Result:
        from segcli.engines.direct import direct, sliding
        from segcli.engines.refine import refine
        from segcli.engines.stts import stts

        p = lambda k: self.param(bundle, k)  # noqa: E731
        c = self._common(bundle)
        if method == "stts":
            return stts(plane, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"),
                        **self._stts_kwargs(bundle, plane, spacing), return_probs=return_probs, progress=progress,
                        **extra)
        if method == "refine":
            return refine(plane, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"), **c,
                          patch_size=p("patch_size"), patches=p("patches"), refine_threshold=p("refine_threshold"),
                          criterion=str(p("criterion")), min_patch_std=p("min_patch_std"),
                          keep_aspect=bool(p("keep_aspect")),
                          batch_size=int(p("batch_size")), return_probs=return_probs, progress=progress)
        if method == "direct":
            return direct(plane, self.predictor(bundle, "coarse"), **c, keep_aspect=bool(p("keep_aspect")),
                          return_probs=return_probs, progress=progress)
        if method == "sliding":
            return sliding(plane, self.predictor(bundle, "fine"), **c, overlap=float(p("overlap")),
                           batch_size=int(p("batch_size")), return_probs=return_probs, progress=progress)
        raise UsageError(f"unknown method {method!r}")

    def _run3d(self, planes: list[ArrayPlane], bundle: Bundle, method: str, return_probs: bool, progress,
               out: np.ndarray | None = None, probs_out: Any = None) -> Result:
        from segcli.engines.volume import per_slice, stts_volume

        if method == "stts":
            p = lambda k: self.param(bundle, k)  # noqa: E731
            return stts_volume(planes, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"),
                               **self._common(bundle), pad=int(p("pad")), keep_aspect=bool(p("keep_aspect")),
                               min_side=int(p("min_side")), min_volume=int(p("min_volume")),
                               keep_coarse=bool(p("keep_coarse")), batch_size=int(p("batch_size")),
                               return_probs=return_probs, progress=progress, out=out, probs_out=probs_out)
        return per_slice(planes, lambda pl: self._run2d(pl, bundle, method, return_probs, None), progress, out=out,
                         probs_out=probs_out)

    # -- files ----------------------------------------------------------------------------------
    def predict_file(
        self,
        path: str | Path,
        output: str | Path | None = None,
        *,
        probabilities: bool = False,
        skip_existing: bool = False,
        input_root: Path | None = None,
        progress: ProgressFn | None = None,
        stats: bool = False,
        lock: bool = False,
    ) -> FileReport:
        """Read, segment and write one input; every user-caused failure becomes a failed report."""
        job = self._read(Path(path), output, skip_existing=skip_existing, input_root=input_root, lock=lock)
        self._compute(job, probabilities=probabilities, progress=progress, stats=stats)
        return self._write(job, probabilities=probabilities)

    def predict_many(
        self,
        items: list[tuple[Path, Path | None]],
        output: str | Path | None = None,
        *,
        probabilities: bool = False,
        skip_existing: bool = False,
        stats: bool = False,
        lock: bool = False,
        prefetch: int = 2,
        progress_for: Callable[[Path], ProgressFn | None] | None = None,
    ) -> Iterator[FileReport]:
        """Reports in input order, with reading of the next files and writing of the previous one
        overlapped with computing the current one (one reader and one writer thread).

        Decoding a compressed volume and writing a mask release the GIL for most of their time, so on
        a 2-core machine they overlap with the network instead of adding to it.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        if prefetch <= 0:
            for path, root in items:
                yield self.predict_file(path, output, probabilities=probabilities, skip_existing=skip_existing,
                                        input_root=root, stats=stats, lock=lock,
                                        progress=progress_for(path) if progress_for else None)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="segcli-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="segcli-write") as writer:
            pending: deque[Future[_Job]] = deque()
            it = iter(items)

            def submit_next() -> None:
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(reader.submit(self._read, nxt[0], output, skip_existing=skip_existing,
                                                 input_root=nxt[1], lock=lock))

            for _ in range(prefetch):
                submit_next()
            last_write: Future[FileReport] | None = None
            while pending:
                job = pending.popleft().result()
                submit_next()
                self._compute(job, probabilities=probabilities, stats=stats,
                              progress=progress_for(job.path) if progress_for else None)
                if last_write is not None:
                    yield last_write.result()
                last_write = writer.submit(self._write, job, probabilities=probabilities)
            if last_write is not None:
                yield last_write.result()

    def _read(self, path: Path, output: str | Path | None, *, skip_existing: bool, input_root: Path | None,
              lock: bool) -> _Job:
        from segcli import io

        job = _Job(path=path, rep=FileReport(input=str(path)), t0=time.perf_counter())
        try:
            out = io.default_output_path(path, Path(output) if output is not None else None,
                                         is_dir_input_root=input_root)
            job.out = out
            job.rep.output = str(out)
            if lock:
                job.lock = _try_lock(out)
                if job.lock is None:
                    job.rep.status = "skipped"
                    job.rep.warnings.append("another segcli process holds this output's lock")
                    return job
            if skip_existing and out.exists():
                job.rep.status = "skipped"
                return job
            t = time.perf_counter()
            if self._route_lazy(path, out, job.rep):
                from segcli.io.bigtiff import TiffPlane

                bundle = self.bundle_for("2d")
                plane = TiffPlane(path, spec=bundle.normalization, channels_want=bundle.in_channels,
                                  channel_mode=self.channels, cache_bytes=min(256 * 2**20, self.budget // 8))
                job.img = _LazyImage(path, plane)
                job.rep.seconds["read"] = time.perf_counter() - t
                job.rep.shape = list(plane.shape)
                job.rep.spacing = list(plane.spacing) if plane.spacing else None
                job.rep.warnings.extend(f"tifffile: {n}" for n in plane.notes)
                return job
            if self.stream_volumes:
                from segcli.io.volstream import open_streamed

                job.img = open_streamed(path)
            if job.img is None:
                job.img = io.open_image(path)
            job.rep.seconds["read"] = time.perf_counter() - t
            job.rep.warnings.extend(job.img.meta.get("warnings", []))
            job.rep.shape = list(job.img.spatial_shape)
            job.rep.spacing = list(job.img.spacing) if job.img.spacing else None
        except Exception as exc:  # one bad file must not stop the batch
            job.fail_from(exc)
        return job

    def _compute(self, job: _Job, *, probabilities: bool, stats: bool, progress: ProgressFn | None) -> None:
        img = job.img
        if img is None or job.rep.status != "ok":
            return
        rep = job.rep
        kind = "volume" if img.ndim == 3 else "2d"
        if isinstance(img, _LazyImage):
            self._compute_lazy(job, progress=progress, stats=stats)
            return
        try:
            self._check_memory(img, kind, probabilities, job.path, job.out)
            try:
                if getattr(img, "meta", {}).get("streamed"):
                    from segcli.io.medical import canonical_view, file_order_buffer

                    # The mask is written straight into the writer's file-order buffer: no reordering copy;
                    # probabilities bound for NIfTI are spilled to a temporary file slice by slice.
                    job.buf = file_order_buffer(img.meta)
                    spill = self._spill_for(img, job.out) if probabilities else None
                    res, bundle = self.segment_volume(img, spacing=img.spacing, return_probs=probabilities,
                                                      progress=progress, path=job.path,
                                                      labels_out=canonical_view(job.buf, img.meta),
                                                      probs_out=spill)
                    res.info["probabilities_streamed"] = spill is not None
                else:
                    res, bundle = self.segment_array(img.array, kind=kind, spacing=img.spacing,
                                                     return_probs=probabilities, progress=progress, path=job.path)
            except EmptyImageError as exc:
                bundle = self.bundle_for(kind)
                res = Result(np.zeros(img.spatial_shape, np.uint8))
                rep.status = "empty"
                rep.warnings.append(exc.message)
            rep.model, rep.method = bundle.name, (self.method or bundle.method)
            rep.device = self.device
            if rep.status == "ok":
                rep.providers = self.providers(bundle)
                rep.backend = "+".join(sorted({p.split(":")[0] for p in rep.providers.values()}))
            rep.seconds.update(res.timings)
            rep.info = {k: v for k, v in res.info.items() if k not in ("boxes", "refined_boxes")}
            gate = res.info.get("lung_gate") or {}
            if gate.get("removed_voxels") and not gate.get("lung_ml"):
                rep.warnings.append(f"lung gate: no aerated lung found, so all {gate['removed_voxels']} lesion voxels "
                                    "were removed; if the scan shows lungs, rerun with --no-lung-gate")
            self._measure(rep, res.labels, bundle, img.spacing)
            if stats:
                from segcli.stats import label_stats

                rep.stats = label_stats(res.labels, bundle.classes, img.spacing)
            job.res = res
        except Exception as exc:  # one bad file must not stop the batch
            job.fail_from(exc)

    def _write(self, job: _Job, *, probabilities: bool) -> FileReport:
        from segcli import io

        rep = job.rep
        try:
            if job.res is not None and isinstance(job.img, _LazyImage) and job.out is not None:
                t = time.perf_counter()
                self._write_lazy(job, probabilities=probabilities)
                rep.seconds["write"] = time.perf_counter() - t
            elif job.res is not None and job.img is not None and job.out is not None:
                from segcli.io import niftistream

                t = time.perf_counter()
                if job.buf is not None and job.out.name.lower().endswith((".nii", ".nii.gz")):
                    niftistream.write_mask(job.buf, job.img.meta, job.out)  # plane by plane, no copy
                else:
                    io.write_mask(job.res.labels, job.img, job.out)
                probs = job.res.probs
                if probabilities and isinstance(probs, niftistream.SpilledProbs):
                    niftistream.write_planes(_probs_path(job.out), job.img.meta, probs.shape[0], np.float32,
                                             niftistream.file_order_planes(probs, job.img.meta,
                                                                           int(job.res.info["slice_axis"])))
                elif probabilities and probs is not None:
                    io.write_probabilities(probs, job.img, _probs_path(job.out))
                rep.seconds["write"] = time.perf_counter() - t
        except Exception as exc:  # one bad file must not stop the batch
            job.fail_from(exc)
        finally:
            _unlock(job.lock)
            if isinstance(job.img, _LazyImage):
                job.img.close(job.res)
            elif hasattr(job.img, "close"):  # a streamed volume's temporary decompressed copy
                job.img.close()
            if job.res is not None and hasattr(job.res.probs, "close"):
                job.res.probs.close()
            job.img = None
            job.res = None
            job.buf = None
        rep.seconds["total"] = time.perf_counter() - job.t0
        return rep

    # -- bounded-memory path --------------------------------------------------------------------------
    def _route_lazy(self, path: Path, out: Path, rep: FileReport) -> bool:
        """True when ``path`` is a TIFF that must not be decoded whole (size or budget), from its header.

        Also refuses, before decoding, a whole-image method whose in-memory peak would not fit.
        """
        from segcli.io.bigtiff import is_tiff

        if not is_tiff(path):
            return False
        head = _tiff_header(path)
        if head is None:
            return False  # let the regular reader produce its precise error
        (H, W), channels, itemsize = head
        bundle = self.bundle_for("2d")
        method = self.method or bundle.method
        c = self.size or bundle.input_size
        est = memory.estimate_2d((H, W), channels, itemsize, model_channels=bundle.in_channels,
                                 n_classes=bundle.n_classes, method=method, size=c, return_probs=False)
        pixels = H * W
        if pixels <= self.lazy_pixels and est <= self.budget:
            return False
        if method != "stts":
            memory.check_fits(est, self.budget, path, f"--method {method} on this {H}x{W} image",
                              "use --method stts, which reads only a rough view and the crops")
            return False
        if out.name.lower().endswith((".tif", ".tiff")):
            return True
        memory.check_fits(est, self.budget, path, f"writing this {H}x{W} mask as {out.suffix}",
                          "write it as .tif (streamed, tiled) instead")
        return False

    def _spill_for(self, img: Any, out: Path | None) -> Any:
        """A file-backed probability store when the probabilities of this streamed volume go to NIfTI."""
        from segcli.io.niftistream import SpilledProbs, streamable_probs

        axis = slice_axis(img.spacing)
        if out is None or not streamable_probs(img.meta, axis, _probs_path(out)):
            return None
        bundle = self.bundle_for("volume")
        n = img.spatial_shape[axis]
        hw = tuple(s for i, s in enumerate(img.spatial_shape) if i != axis)
        return SpilledProbs(bundle.n_classes, n, hw, directory=out.parent)  # type: ignore[arg-type]

    def _check_memory(self, img: Any, kind: str, probabilities: bool, path: Path, out: Path | None = None) -> None:
        """Refuse, with the estimate, an in-memory run that would exceed the budget."""
        bundle = self.bundle_for(kind)
        if kind == "volume":
            from segcli.io.niftistream import streamable_probs

            streamed = bool(img.meta.get("streamed"))
            spilled = streamed and out is not None and streamable_probs(img.meta, slice_axis(img.spacing), _probs_path(out))
            est = memory.estimate_volume(img.spatial_shape, img.channels, (img.dtype if streamed else img.array.dtype)
                                         .itemsize, model_channels=bundle.in_channels, n_classes=bundle.n_classes,
                                         return_probs=probabilities and not spilled, streamed=streamed)
            hint = ("drop --probabilities or write a .nii.gz (probabilities are then streamed to disk)"
                    if probabilities else "raise --max-memory or crop the volume")
            memory.check_fits(est, self.budget, path, f"this {'x'.join(map(str, img.spatial_shape))} volume", hint)
            return
        method = self.method or bundle.method
        est = memory.estimate_2d(img.spatial_shape, img.channels, img.array.dtype.itemsize,
                                 model_channels=bundle.in_channels, n_classes=bundle.n_classes, method=method,
                                 size=self.size or bundle.input_size, return_probs=probabilities)
        hint = "use --method stts on a .tif input, which is read by region" if method != "stts" \
            else "save the image as a tiled TIFF so it can be read by region"
        memory.check_fits(est, self.budget, path, f"--method {method} on this "
                          f"{img.spatial_shape[0]}x{img.spatial_shape[1]} image", hint)

    def _compute_lazy(self, job: _Job, *, progress: ProgressFn | None, stats: bool) -> None:
        from segcli.engines.stts import stts

        img, rep = job.img, job.rep
        try:
            bundle = self.bundle_for("2d")
            try:
                spill = job.out.parent if job.out is not None else None
                if spill is not None:
                    spill.mkdir(parents=True, exist_ok=True)
                res = stts(img.plane, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"),
                           **self._stts_kwargs(bundle, img.plane, img.spacing), progress=progress,
                           spill_dir=spill, lazy=True, prefetch=True)
            except EmptyImageError as exc:
                res = None
                rep.status = "empty"
                rep.warnings.append(exc.message)
            rep.model, rep.method = bundle.name, "stts"
            rep.device = self.device
            if res is None:
                from segcli.engines.base import FuseStore, LazyLabels

                res = Result(LazyLabels(FuseStore(img.spatial_shape, bundle.n_classes, 0.5), None))  # type: ignore[arg-type]
            else:
                rep.providers = self.providers(bundle)
                rep.backend = "+".join(sorted({p.split(":")[0] for p in rep.providers.values()}))
                rep.seconds.update(res.timings)
                rep.info = {k: v for k, v in res.info.items() if k not in ("boxes", "refined_boxes")}
            plane = img.plane
            rep.info.update({"bounded_memory": True, "pyramid_levels_in": len(plane.levels),
                             "levels_read": sorted(set(plane.level_reads)),
                             "segments_decoded": plane.segments_decoded,
                             "decoded_mb": round(plane.bytes_decoded / 1e6, 1)})
            job.want_stats = stats  # gathered tile by tile while the mask is written
            job.res = res
        except Exception as exc:  # one bad file must not stop the batch
            job.fail_from(exc)

    def _write_lazy(self, job: _Job, *, probabilities: bool) -> None:
        from segcli.io.bigtiff import write_tiled

        img, res, rep = job.img, job.res, job.rep
        bundle = self.bundle_for("2d")
        labels = res.labels
        counts = np.zeros(256, np.int64)
        plane = img.plane
        tile_stats = None
        if job.want_stats and rep.status == "ok":
            from segcli.stats import TileStats

            tile_stats = TileStats(bundle.classes, plane.spacing, plane.shape[1])

        def count(tile: np.ndarray, box: tuple[int, int, int, int]) -> None:
            counts[:] += np.bincount(tile.ravel(), minlength=256)[:256]
            if tile_stats is not None:
                tile_stats.add(tile, box)

        ome = plane.ome if plane.meta.get("is_ome") else None
        write_tiled(job.out, plane.shape, labels.read, tile=self.tile_size, resolution=plane.resolution,
                    spacing=plane.spacing, ome=ome, pyramid=self.pyramid, on_tile=count)
        if probabilities and rep.status == "ok":
            write_tiled(_probs_path(job.out), (bundle.n_classes, *plane.shape), labels.read_probs,
                        dtype=np.float32, tile=self.tile_size, resolution=plane.resolution, spacing=plane.spacing,
                        ome=ome, pyramid=False)
            rep.warnings.append("probabilities of a bounded-memory run are stored with ~1/127 precision "
                                "(labels are exact)")
        self._measure_counts(rep, counts, bundle, plane.spacing, ndim=2)
        if tile_stats is not None:
            rep.stats = tile_stats.rows()

    @staticmethod
    def _measure(rep: FileReport, labels: np.ndarray, bundle: Bundle, spacing) -> None:
        # Slice by slice: bincount casts to int64, 8 bytes per voxel of a whole volume at once.
        counts = np.zeros(max(bundle.n_classes, 256), np.int64)
        for part in labels.reshape(labels.shape[0], -1) if labels.ndim > 1 else [labels]:
            counts[: 256] += np.bincount(part, minlength=256)[:256]
        Segmenter._measure_counts(rep, counts, bundle, spacing, ndim=labels.ndim)

    @staticmethod
    def _measure_counts(rep: FileReport, counts: np.ndarray, bundle: Bundle, spacing, ndim: int) -> None:
        rep.voxel_counts, rep.classes_found = {}, []
        unit = float(np.prod(spacing)) if spacing else None
        for cid, name in enumerate(bundle.classes):
            if cid == 0:
                continue
            n = int(counts[cid]) if cid < len(counts) else 0
            rep.voxel_counts[name] = n
            if n:
                rep.classes_found.append(name)
        if unit is not None:
            if ndim == 3:
                rep.volume_ml = {k: v * unit / 1000.0 for k, v in rep.voxel_counts.items()}
            else:
                rep.area_mm2 = {k: v * unit for k, v in rep.voxel_counts.items()}


@dataclass
class _Job:
    """One file moving through read → compute → write."""

    path: Path
    rep: FileReport
    t0: float
    out: Path | None = None
    img: Any = None
    res: Result | None = None
    lock: Any = None
    buf: Any = None  # a streamed volume's mask in file order
    want_stats: bool = False

    def fail_from(self, exc: BaseException) -> None:
        """Record ``exc`` as this file's failure: a SegcliError as itself, anything else as a bug."""
        self.fail(exc, bug=not isinstance(exc, SegcliError))

    def fail(self, exc: BaseException, bug: bool = False) -> None:
        self.rep.status = "failed"
        if isinstance(self.img, _LazyImage):
            self.img.close(self.res)
        self.img = None
        self.res = None
        if bug:
            self.rep.error = f"{self.path}: internal error ({type(exc).__name__}: {exc}); {crash_log(exc)}"
        elif isinstance(exc, SegcliError) and exc.path is not None:
            self.rep.error = str(exc)
        else:
            self.rep.error = f"{self.path}: {exc}"


class _LazyImage:
    """What ``_read`` hands on for a TIFF read by region: the plane, and LoadedImage's geometry fields."""

    kind = "tiff"
    ndim = 2

    def __init__(self, path: Path, plane: Any) -> None:
        self.path = path
        self.plane = plane
        self.spacing = plane.spacing
        self.meta = plane.meta
        self.spatial_shape = plane.shape
        self.channels = plane.raw_channels

    def close(self, res: Result | None) -> None:
        if res is not None and hasattr(res.labels, "store"):
            res.labels.store.close()  # type: ignore[union-attr]
        self.plane.close()


def _tiff_header(path: Path) -> tuple[tuple[int, int], int, int] | None:
    """``((H, W), channels, itemsize)`` of series 0 level 0 from the IFDs alone, or None if not 2D."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            level = tif.series[0].levels[0]
            axes, shape = level.axes, level.shape
            if axes == "YX":
                return (int(shape[0]), int(shape[1])), 1, level.dtype.itemsize
            if axes == "YXS":
                return (int(shape[0]), int(shape[1])), int(shape[2]), level.dtype.itemsize
            if len(axes) == 3 and axes[0] in "SC" and axes[1:] == "YX":
                return (int(shape[1]), int(shape[2])), int(shape[0]), level.dtype.itemsize
    except Exception:
        return None
    return None


def crash_log(exc: BaseException) -> str:
    """Record a bug's traceback in the debug log, or in a temp file when there is none; say where."""
    import tempfile
    import traceback

    tb = "".join(traceback.format_exception(exc))
    files = [h.baseFilename for h in log.handlers if isinstance(h, logging.FileHandler)]
    if files:
        log.error("internal error\n%s", tb)
        return f"this is a bug, traceback in {files[0]}"
    fd, name = tempfile.mkstemp(prefix="segcli-crash-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(tb)
    return f"this is a bug, traceback in {name}"


def _try_lock(out: Path):
    """An advisory lock beside the output, so two processes never compute the same mask at once."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.with_name(f".{out.name}.lock")
    f = open(lock_path, "a+")  # noqa: SIM115 - held until the mask is written
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _unlock(f) -> None:
    if f is None:
        return
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()


def _probs_path(mask_path: Path) -> Path:
    name = mask_path.name
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd", ".tif", ".tiff", ".png"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            new_ext = ".tif" if ext in (".png", ".tif", ".tiff") else (".nii.gz" if ext == ".nii" else ext)
            return mask_path.with_name(f"{stem}_probs{new_ext}")
    return mask_path.with_name(name + "_probs.tif")


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
    return seg.segment_array(img.array, kind="volume" if img.ndim == 3 else "2d", spacing=img.spacing, path=image)[0].labels


ProgressCallback = Callable[[str, int, int], None]
