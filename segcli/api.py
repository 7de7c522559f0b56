"""The Python API behind every CLI command: build a :class:`Segmenter` once, apply it to many files.

Like lungmask's inferer, the bundle and its networks are loaded once and reused for a whole batch;
the orientation of volumes is normalised by ``segcli.io`` (canonical LPS) before slicing and
restored on write.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli import normalize as norm
from segcli.bundle import DEFAULT_PARAMS, Bundle, load_bundle, resolve_model
from segcli.engines.base import ArrayPlane, ProgressFn, Result
from segcli.errors import EmptyImageError, InputError, SegcliError, UsageError

log = logging.getLogger("segcli")

METHODS = ("stts", "refine", "direct", "sliding")


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


def slice_axis(spacing: tuple[float, ...] | None) -> int:
    """The axis with the coarsest spacing (ties and unknown spacing → axis 0, the canonical S/I axis)."""
    if not spacing:
        return 0
    return int(np.argmax(np.asarray(spacing, dtype=np.float64)))


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
        a = norm.convert_channels(array, bundle.in_channels, self.channels, path)
        if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
            raise InputError(f"unsupported pixel type {a.dtype}", path)
        finite = np.isfinite(a) if a.dtype.kind == "f" else None
        if finite is not None and not finite.any():
            raise InputError("image holds no finite values (all NaN or infinite)", path)
        lo, hi = (np.nanmin(a), np.nanmax(a)) if finite is not None else (a.min(), a.max())
        if lo == hi:
            raise EmptyImageError(f"image is constant (every pixel = {lo}); nothing to segment", path)
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
        is_volume = array.ndim == 4
        bundle = self.bundle_for("volume" if is_volume else kind)
        method = self.method or bundle.method
        x = self.prepare(array, bundle, path)
        if not is_volume:
            return self._run2d(ArrayPlane(x), bundle, method, return_probs, progress), bundle
        axis = slice_axis(spacing)
        # (Z, C, Y, X) with the slicing axis first.
        x = np.moveaxis(x, {0: 0, 1: 2, 2: 3}[axis], 0)
        planes = [ArrayPlane(s) for s in x]
        res = self._run3d(planes, bundle, method, return_probs, progress)
        res.labels = np.moveaxis(res.labels, 0, axis)
        if res.probs is not None:
            res.probs = np.moveaxis(res.probs, 1, axis + 1)
        res.info["slice_axis"] = axis
        return res, bundle

    def _common(self, bundle: Bundle) -> dict[str, Any]:
        return {"size": self.size or bundle.input_size, "threshold": float(self.param(bundle, "threshold"))}

    def _run2d(self, plane: ArrayPlane, bundle: Bundle, method: str, return_probs: bool, progress) -> Result:
        from segcli.engines.direct import direct, sliding
        from segcli.engines.refine import refine
        from segcli.engines.stts import stts

        p = lambda k: self.param(bundle, k)  # noqa: E731
        c = self._common(bundle)
        if method == "stts":
            return stts(plane, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"), **c,
                        pad=int(p("pad")), keep_aspect=bool(p("keep_aspect")), min_side=int(p("min_side")),
                        min_component=int(p("min_component")), keep_coarse=bool(p("keep_coarse")),
                        batch_size=int(p("batch_size")), return_probs=return_probs, progress=progress)
        if method == "refine":
            return refine(plane, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"), **c,
                          patch_size=p("patch_size"), patches=p("patches"), refine_threshold=p("refine_threshold"),
                          criterion=str(p("criterion")), keep_aspect=bool(p("keep_aspect")),
                          batch_size=int(p("batch_size")), return_probs=return_probs, progress=progress)
        if method == "direct":
            return direct(plane, self.predictor(bundle, "coarse"), **c, keep_aspect=bool(p("keep_aspect")),
                          return_probs=return_probs, progress=progress)
        if method == "sliding":
            return sliding(plane, self.predictor(bundle, "fine"), **c, overlap=float(p("overlap")),
                           batch_size=int(p("batch_size")), return_probs=return_probs, progress=progress)
        raise UsageError(f"unknown method {method!r}")

    def _run3d(self, planes: list[ArrayPlane], bundle: Bundle, method: str, return_probs: bool, progress) -> Result:
        from segcli.engines.volume import per_slice, stts_volume

        if method == "stts":
            p = lambda k: self.param(bundle, k)  # noqa: E731
            return stts_volume(planes, self.predictor(bundle, "coarse"), self.predictor(bundle, "fine"),
                               **self._common(bundle), pad=int(p("pad")), keep_aspect=bool(p("keep_aspect")),
                               min_side=int(p("min_side")), min_volume=int(p("min_volume")),
                               keep_coarse=bool(p("keep_coarse")), batch_size=int(p("batch_size")),
                               return_probs=return_probs, progress=progress)
        return per_slice(planes, lambda pl: self._run2d(pl, bundle, method, return_probs, None), progress)

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
            job.img = io.open_image(path)
            job.rep.seconds["read"] = time.perf_counter() - t
            job.rep.warnings.extend(job.img.meta.get("warnings", []))
            job.rep.shape = list(job.img.spatial_shape)
            job.rep.spacing = list(job.img.spacing) if job.img.spacing else None
        except SegcliError as exc:
            job.fail(exc)
        except Exception as exc:  # a reader bug must not kill the batch: report it as one failed file
            job.fail(exc, bug=True)
        return job

    def _compute(self, job: _Job, *, probabilities: bool, stats: bool, progress: ProgressFn | None) -> None:
        img = job.img
        if img is None or job.rep.status != "ok":
            return
        rep = job.rep
        kind = "volume" if img.ndim == 3 else "2d"
        try:
            try:
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
            self._measure(rep, res.labels, bundle, img.spacing)
            if stats:
                from segcli.stats import label_stats

                rep.stats = label_stats(res.labels, bundle.classes, img.spacing)
            job.res = res
        except SegcliError as exc:
            job.fail(exc)
        except Exception as exc:  # a segcli bug on one file: report it, keep the batch going
            job.fail(exc, bug=True)

    def _write(self, job: _Job, *, probabilities: bool) -> FileReport:
        from segcli import io

        rep = job.rep
        try:
            if job.res is not None and job.img is not None and job.out is not None:
                t = time.perf_counter()
                io.write_mask(job.res.labels, job.img, job.out)
                if probabilities and job.res.probs is not None:
                    io.write_probabilities(job.res.probs, job.img, _probs_path(job.out))
                rep.seconds["write"] = time.perf_counter() - t
        except SegcliError as exc:
            job.fail(exc)
        except Exception as exc:
            job.fail(exc, bug=True)
        finally:
            _unlock(job.lock)
            job.img = None
            job.res = None
        rep.seconds["total"] = time.perf_counter() - job.t0
        return rep

    @staticmethod
    def _measure(rep: FileReport, labels: np.ndarray, bundle: Bundle, spacing) -> None:
        counts = np.bincount(labels.ravel(), minlength=bundle.n_classes)
        unit = float(np.prod(spacing)) if spacing else None
        for cid, name in enumerate(bundle.classes):
            if cid == 0:
                continue
            n = int(counts[cid]) if cid < len(counts) else 0
            rep.voxel_counts[name] = n
            if n:
                rep.classes_found.append(name)
        if unit is not None:
            if labels.ndim == 3:
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

    def fail(self, exc: BaseException, bug: bool = False) -> None:
        self.rep.status = "failed"
        self.img = None
        self.res = None
        if bug:
            self.rep.error = f"{self.path}: internal error ({type(exc).__name__}: {exc}); {crash_log(exc)}"
        elif isinstance(exc, SegcliError) and exc.path is not None:
            self.rep.error = str(exc)
        else:
            self.rep.error = f"{self.path}: {exc}"


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
