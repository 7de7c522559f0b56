"""One file's way through segcli: read → compute → write, on one of three routes chosen once.

The input's content is sniffed once (:func:`segcli.io.sniff_input`); from that, its header and the
memory budget, :func:`open_route` picks how the file is served:

* :class:`InMemoryRoute`: decode whole, normalise, run the engine, write (photos, small TIFFs, the
  volumes that cannot be streamed);
* :class:`StreamedVolumeRoute`: NIfTI, raw MetaImage and DICOM series decoded slab by slab, the mask
  written straight into the writer's file-order buffer and NIfTI probabilities spilled to disk;
* :class:`TiledTiffRoute`: TIFFs too large to hold (above ``lazy_pixels``, or beyond the budget): a
  TiffPlane reads the rough view from the best pyramid level and crops by region, stts fuses into a
  spilled tile store, and the mask is streamed into a tiled BigTIFF. Methods that need the whole
  image are estimated first and refused with a one-line message instead of meeting the OOM killer.

Each route offers the same three calls — ``compute``, ``write``, ``close`` — and fills its report
through :mod:`segcli.report`. :func:`run_many` overlaps reading the next file and writing the
previous one with computing the current one.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from segcli import header_needs, io, memory, plan
from segcli import input_facts as facts
from segcli.engines.base import ProgressFn, Result, ScaledLabels, ScaledPlane
from segcli.errors import EmptyImageError, InputError, UsageError
from segcli.fusion import FuseStore, LazyLabels, fold_probs
from segcli.geometry import slice_axis
from segcli.inferer import Inferer, RunContext
from segcli.instances_tiled import FusedRows, SlideInstances
from segcli.io import niftistream
from segcli.io.atomic import OutputLock
from segcli.io.bigtiff import tiff_header, write_tiled
from segcli.io.dicomseries import decoded_size
from segcli.io.geojson import write_geojson
from segcli.io.medical import canonical_view, file_order_buffer, to_original_axes
from segcli.io.naming import geojson_path, probabilities_path
from segcli.io.niftistream import SpilledProbs, streamable_probs
from segcli.io.openslide_reader import open_plane, wants_openslide
from segcli.io.volstream import open_streamed
from segcli.job import Job
from segcli.methods import BOUNDED
from segcli.outputs import detection_classes, plan_output, planned_outputs, write_dicom_seg, write_instances
from segcli.plan import Staged2D
from segcli.prepare import implausible_result, mismatch_warnings
from segcli.report import FileReport, count_labels, fill_counts, fill_run
from segcli.slide_mask import SlideMask
from segcli.stats import label_stats

if TYPE_CHECKING:
    from segcli.bundle import Bundle


class Route(Protocol):
    """How one opened input is computed and written (see the module docstring)."""

    spacing: tuple[float, ...] | None
    spatial_shape: tuple[int, ...]
    warnings: list[str]

    def compute(self, ctx: RunContext, job: Job, progress: ProgressFn | None) -> None: ...

    def write(self, ctx: RunContext, job: Job) -> None: ...

    def close(self) -> None: ...


# -- routes ----------------------------------------------------------------------------------------


def _finish_compute(ctx: RunContext, job: Job, res: Result, bundle: Bundle, spacing: Any) -> None:
    """What every route records after its engine ran: run facts, class counts, optional statistics."""
    rep = job.rep
    fill_run(rep, res, model=bundle.name, method=ctx.plan_for(bundle).method, device=ctx.inferer.device,
             providers=ctx.inferer.providers(bundle) if rep.status == "ok" else None)
    classes = bundle.output_classes
    counts = count_labels(res.labels, len(classes))
    fill_counts(rep, counts, classes, spacing, ndim=res.labels.ndim)
    if rep.status == "ok" and (note := implausible_result(counts, int(res.labels.size))):
        rep.warnings.append(note)
    if ctx.options.stats:
        rep.stats = label_stats(res.labels, classes, spacing)


def _slide_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """Pixel size (µm) and objective magnification from a slide's own metadata, when it has them."""
    return {k: meta[k] for k in ("mpp", "magnification", "mpp_source") if meta.get(k) is not None}


class InMemoryRoute:
    """An image decoded whole (:class:`segcli.io.LoadedImage`)."""

    def __init__(self, img: io.LoadedImage, kind: str = "2d") -> None:
        self.img = img
        # "2d", "slide" (an RGB TIFF), "volume" or a content kind of segcli.choose ("he", "grey", ...)
        self.kind = kind if img.ndim != 3 or kind.startswith("volume") else "volume"
        self.spacing = img.spacing
        self.spatial_shape = img.spatial_shape
        self.dtype = img.array.dtype
        self.warnings = list(img.meta.get("warnings", []))
        self.res: Result | None = None
        self.staged: Staged2D | None = None
        self.empty: EmptyImageError | None = None
        self.checked = False  # stage() ran: the memory check is done (and a 2D image prepared)

    def stage(self, ctx: RunContext, job: Job) -> None:
        """In the reader thread: the memory check, then normalisation and the rough pass's downscaled view
        of a 2D image, so they overlap the networks of the image before."""
        img = self.img
        memory.check_in_memory(ctx, self.kind, img.spatial_shape, img.channels, img.array.dtype.itemsize, job.path)
        self.checked = True
        if img.ndim != 2:
            return
        try:
            self.staged = ctx.inferer.stage_2d(img.array, kind=self.kind, spacing=img.spacing, path=job.path,
                                               prime=True, budget=ctx.budget)
        except EmptyImageError as exc:  # reported as "empty" by compute
            self.empty = exc

    def compute(self, ctx: RunContext, job: Job, progress: ProgressFn | None) -> None:
        img = self.img
        kind = self.kind
        if not self.checked:
            self.stage(ctx, job)
        try:
            if self.empty is not None:
                raise self.empty
            if self.staged is not None:
                res, bundle = ctx.inferer.run_staged(self.staged, return_probs=ctx.options.probabilities,
                                             progress=progress), self.staged.bundle
                self.staged = None  # the float copy of the image goes as soon as it is used
            else:
                res, bundle = ctx.inferer.segment_array(img.array, kind=kind, spacing=img.spacing,
                                                        return_probs=ctx.options.probabilities, progress=progress,
                                                        path=job.path, budget=ctx.budget)
        except EmptyImageError as exc:
            bundle, res = ctx.bundle_for(kind), Result(np.zeros(img.spatial_shape, np.uint8))
            job.rep.status = "empty"
            job.rep.warnings.append(exc.message)
        _finish_compute(ctx, job, res, bundle, img.spacing)
        job.rep.info["memory_plan"] = ctx.inferer.memory_plan(kind).to_dict()
        job.rep.info.update(_slide_facts(img.meta))
        self.res = res

    def write(self, ctx: RunContext, job: Job) -> None:
        assert self.res is not None and job.out is not None
        if ctx.options.output_type == "dicom-seg":
            write_dicom_seg(ctx, job, to_original_axes(self.res.labels, self.img.meta), self.img.meta)
        else:
            io.write_mask(self.res.labels, self.img, job.out)
        if ctx.options.instances:  # with --geojson / --stats: one detection / CSV row per instance
            write_instances(ctx, job, self.res.labels, self.img, self.kind, parts=self.res.parts)
        if ctx.options.geojson and not ctx.options.instances:
            if self.img.ndim != 2:
                job.rep.warnings.append("GeoJSON is written for 2D images only; none for this volume")
            else:
                bundle = ctx.bundle_for(self.kind)
                job.rep.info["geojson"] = write_geojson(geojson_path(job.out), self.res.labels, bundle.output_classes,
                                                        spacing=self.img.spacing,
                                                        detection_classes=detection_classes(bundle))
        if ctx.options.probabilities and self.res.probs is not None:
            io.write_probabilities(self.res.probs, self.img, probabilities_path(job.out))
        if ctx.options.preview:
            job.rep.info["preview"] = str(facts.write_preview(ctx, job, self.img, self.res.labels, self.kind))

    def close(self) -> None:
        self.res = None
        self.staged = None


class StreamedVolumeRoute:
    """A volume decoded slab by slab (:class:`segcli.io.volstream.StreamedVolume`)."""

    def __init__(self, vol: Any, choose: bool = False) -> None:
        self.vol = vol
        self.kind = facts.streamed_kind(vol) if choose else "volume"
        self.spacing = vol.spacing
        self.spatial_shape = vol.spatial_shape
        self.dtype = vol.dtype
        self.warnings = list(vol.meta.get("warnings", []))
        self.res: Result | None = None
        self.buf: np.ndarray | None = None  # the mask in the file's own axis order

    def compute(self, ctx: RunContext, job: Job, progress: ProgressFn | None) -> None:
        vol, opts = self.vol, ctx.options
        bundle = ctx.bundle_for(self.kind)
        axis = slice_axis(vol.spacing)
        spilled = bool(opts.probabilities and job.out is not None
                       and streamable_probs(vol.meta, axis, probabilities_path(job.out)))
        est = memory.image_bytes(ctx, self.kind, vol.spatial_shape, vol.channels, vol.dtype.itemsize, streamed=True,
                                 return_probs=opts.probabilities and not spilled)
        memory.check_volume_fits(ctx, est, vol.spatial_shape, job.path, self.kind)
        spill = None
        if spilled:  # probabilities bound for NIfTI go to a temporary file slice by slice
            assert job.out is not None
            hw = tuple(s for i, s in enumerate(vol.spatial_shape) if i != axis)
            spill = SpilledProbs(bundle.n_classes, vol.spatial_shape[axis], hw, directory=job.out.parent)  # type: ignore[arg-type]
        # The mask goes straight into the writer's file-order buffer: no reordering copy.
        self.buf = file_order_buffer(vol.meta)
        try:
            res, bundle = ctx.inferer.segment_volume(vol, spacing=vol.spacing, return_probs=opts.probabilities,
                                                     progress=progress, path=job.path, kind=self.kind,
                                                     labels_out=canonical_view(self.buf, vol.meta), probs_out=spill,
                                                     budget=ctx.budget)
            res.info["probabilities_streamed"] = spill is not None
        except EmptyImageError as exc:
            res = Result(np.zeros(vol.spatial_shape, np.uint8))
            job.rep.status = "empty"
            job.rep.warnings.append(exc.message)
            if spill is not None:
                spill.close()
        _finish_compute(ctx, job, res, bundle, vol.spacing)
        self.res = res

    def write(self, ctx: RunContext, job: Job) -> None:
        res, out = self.res, job.out
        assert res is not None and out is not None
        if ctx.options.output_type == "dicom-seg" and self.buf is not None:
            write_dicom_seg(ctx, job, self.buf, self.vol.meta)
        elif self.buf is not None and out.name.lower().endswith((".nii", ".nii.gz")):
            niftistream.write_mask(self.buf, self.vol.meta, out)  # plane by plane, no copy
        else:
            io.write_mask(res.labels, self.vol, out)
        if not ctx.options.probabilities or res.probs is None:
            return
        if isinstance(res.probs, niftistream.SpilledProbs):
            niftistream.write_planes(probabilities_path(out), self.vol.meta, res.probs.shape[0], np.float32,
                                     niftistream.file_order_planes(res.probs, self.vol.meta,
                                                                   int(res.info["slice_axis"])))
        else:
            io.write_probabilities(res.probs, self.vol, probabilities_path(out))

    def close(self) -> None:
        if self.res is not None and hasattr(self.res.probs, "close"):
            self.res.probs.close()  # type: ignore[union-attr]
        self.res = None
        self.buf = None
        self.vol.close()  # a streamed volume's temporary decompressed copy


class TiledTiffRoute:
    """A TIFF read by region (:class:`segcli.io.bigtiff.TiffPlane`), segmented by stts into a spilled
    store and written as a tiled BigTIFF, tile by tile."""

    def __init__(self, plane: Any, kind: str = "slide") -> None:
        self.plane = plane
        self.kind = kind
        self.spacing = plane.spacing
        self.spatial_shape = plane.shape
        self.dtype = getattr(plane, "dtype", None)
        self.warnings = [f"{plane.meta.get('format', 'tifffile')}: {n}" for n in plane.notes]
        self.res: Result | None = None
        self.inst: SlideInstances | None = None
        self.mask: SlideMask | None = None
        self._rows: FusedRows | None = None

    def _write_beside(self, ctx: RunContext, job: Job, bundle: Bundle, net_height: int, factor: float | None
                      ) -> Callable[[Any, int], None]:
        """The fine pass's ``on_fused``: with the first call the mask (and the instance split) start in threads
        of their own, reading each row of tiles once the fine pass has finished it, so the write stage runs
        beside the network instead of after it. On a resampled slide (``factor``) they read the network's rows
        on the slide's own grid (``ScaledLabels``)."""

        def on_fused(labels: Any, y: int) -> None:
            if self._rows is None:
                assert job.out is not None
                self._rows = FusedRows(labels, net_height)
                view: Any = self._rows if factor is None else ScaledLabels(self._rows, factor, self.plane.shape)
                if ctx.options.instances:
                    self.inst = SlideInstances(job.out, job.rep, view, self.plane, bundle, self.kind,
                                               ctx.options, self._ome(), background=True)
                self.mask = self._slide_mask(ctx, job, bundle, view.read)
                self.mask.start()
            self._rows.advance(y)

        return on_fused

    def _slide_mask(self, ctx: RunContext, job: Job, bundle: Bundle, read: Callable[[Any], np.ndarray]) -> SlideMask:
        assert job.out is not None
        # with instances, the mask reads the class ids through their cache: each tile's are computed once
        return SlideMask(job.out, self.inst.read_mask if self.inst is not None else read, self.plane, bundle,
                         ctx.options, self._ome(), stats=ctx.options.stats and job.rep.status == "ok")

    def _stop_beside(self) -> None:
        """The file failed or stopped: release the threads started beside the fine pass and remove the mask
        they may have written."""
        if self._rows is not None:
            self._rows.fail()
        if self.inst is not None:
            self.inst.cancel()
            self.inst = None
        if self.mask is not None:
            self.mask.discard()
            self.mask = None

    def _ome(self) -> dict[str, Any] | None:
        return self.plane.ome if self.plane.meta.get("is_ome") else None

    def compute(self, ctx: RunContext, job: Job, progress: ProgressFn | None) -> None:
        rep, plane = job.rep, self.plane
        bundle = ctx.bundle_for(self.kind)
        p = ctx.plan_for(bundle)
        spill = job.out.parent if job.out is not None else None
        if spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
        try:
            net_plane, spacing, scale = plane, plane.spacing, plan.physical_factor(bundle, plane.spacing)
            if scale is not None:  # the slide seen at the bundle's training pixel size (segcli.plan)

                net_plane = ScaledPlane(plane, scale[0])
                spacing = (float(bundle.params["training_mpp"]) / 1000.0,) * 2
            run, extra = plan.bounded_variant(p)  # the method table says what runs here (segcli.methods)
            mplan = ctx.inferer.memory_plan(self.kind, bounded=True)
            kw = plan.kwargs_2d(run, bundle, ctx.options, ctx.budget, net_plane.shape, spacing, batch=mplan.batch,
                                rough_batch=mplan.rough_batch)
            kw["fuse_cache"] = mplan.fuse_cache
            kw.update(plan.rough_fold(run, bundle, self.kind))
            rep.info["memory_plan"] = mplan.to_dict()
            kw.update(extra)
            if job.out is not None:
                kw["on_fused"] = self._write_beside(ctx, job, bundle, net_plane.shape[0],
                                                    None if scale is None else scale[0])
            if kw.get("crop_mode") == "grid":
                # The rough pass only has to find tissue here: cap its grid at GRID_ROUGH_PIXELS so its dense
                # accumulators stay small on a 40k² slide (4096² at 0.98 µm/px would hold 1.3 GB of floats).
                kw["max_downscale"] = max(kw.get("max_downscale") or 1.0, header_needs.rough_floor(net_plane.shape))
            try:
                res = plan.run_2d(run, net_plane, ctx.inferer.predictors(bundle), kw, return_probs=False,
                                  progress=progress, spill_dir=spill, lazy=True, prefetch=True)
            except BaseException:
                self._stop_beside()
                raise
            if scale is not None:
                res.labels = ScaledLabels(res.labels, scale[0], plane.shape)  # type: ignore[assignment]
                res.info["resampled"] = {"image_mpp": round(scale[1], 4),
                                         "training_mpp": float(bundle.params["training_mpp"]),
                                         "network_shape": list(net_plane.shape)}
        except EmptyImageError as exc:
            res = Result(LazyLabels(FuseStore(plane.shape, bundle.n_classes, 0.5), None))  # type: ignore[arg-type]
            rep.status = "empty"
            rep.warnings.append(exc.message)
        fill_run(rep, res, model=bundle.name, method=p.method, device=ctx.inferer.device,
                 providers=ctx.inferer.providers(bundle) if rep.status == "ok" else None)
        rep.info.update(_slide_facts(plane.meta))
        rep.info.update({"bounded_memory": True, "pyramid_levels_in": len(plane.levels),
                         "levels_read": sorted(set(plane.level_reads)),
                         "segments_decoded": plane.segments_decoded,
                         "decoded_mb": round(plane.bytes_decoded / 1e6, 1)})
        self.res = res  # counts and statistics are gathered tile by tile while the mask is written

    def write(self, ctx: RunContext, job: Job) -> None:
        res, rep, plane, opts = self.res, job.rep, self.plane, ctx.options
        assert res is not None and job.out is not None
        bundle = ctx.bundle_for(self.kind)
        labels: Any = res.labels  # the network's labels; the mask's are folded (a boundary class, if any)
        mask, inst = self.mask, self.inst
        try:
            if mask is not None:  # written beside the fine pass: wait for its last rows
                mask.join()
                rep.info["mask_written_beside_fine_pass"] = True
            else:
                # one id per object across tiles (segcli.instances_tiled), split in a thread of its own beside
                # the mask (a run whose fine pass reported no rows: an empty slide)
                if inst is None and opts.instances:
                    inst = self.inst = SlideInstances(job.out, rep, labels, plane, bundle, self.kind, opts,
                                                      self._ome())
                mask = self._slide_mask(ctx, job, bundle, labels.read)
                mask.run()
        except BaseException:
            if inst is not None:
                inst.cancel()
            raise
        finally:
            self.inst = None
        self.mask = None  # written: close() keeps it
        try:
            self._after_mask(ctx, job, bundle, mask, inst)
        except BaseException:  # the file fails: its mask, written first, goes too
            for p in mask.fresh:
                with contextlib.suppress(OSError):
                    p.unlink()
            raise

    def _after_mask(self, ctx: RunContext, job: Job, bundle: Bundle, mask: SlideMask, inst: SlideInstances | None
                    ) -> None:
        """The instances, probabilities, counts and statistics of a written mask."""
        res, rep, plane, opts = self.res, job.rep, self.plane, ctx.options
        assert res is not None and job.out is not None
        labels: Any = res.labels
        if mask.geojson is not None:
            rep.info["geojson"] = mask.geojson
        if inst is not None:
            inst.join()
        if opts.probabilities and rep.status == "ok":
            read_probs = labels.read_probs if bundle.fold() is None else (
                lambda box: fold_probs(labels.read_probs(box), bundle.boundary))
            write_tiled(probabilities_path(job.out), (len(mask.classes), *plane.shape), read_probs,
                        dtype=np.float32, tile=opts.tile_size, resolution=plane.resolution, spacing=plane.spacing,
                        ome=mask.ome, pyramid=False)
            rep.warnings.append("probabilities of a bounded-memory run are stored with ~1/127 precision "
                                "(labels are exact)")
        fill_counts(rep, mask.counts, mask.classes, plane.spacing, ndim=2)
        if mask.tile_stats is not None:
            rep.stats = mask.tile_stats.rows()

    def close(self) -> None:
        self._stop_beside()  # a mask or split started beside the fine pass whose file was never written
        if self.res is not None and hasattr(self.res.labels, "store"):
            self.res.labels.store.close()  # type: ignore[union-attr]
        self.res = None
        self.plane.close()


# -- choosing a route and checking memory ------------------------------------------------------------


#: Methods the bounded (tiled TIFF) route runs (the method table's ``bounded`` column).
BOUNDED_METHODS = BOUNDED


def open_route(ctx: RunContext, path: Path, out: Path, content: str | None) -> Route:
    """Open ``path`` on the route its content, header and the memory budget call for (see the module).

    An RGB TIFF is a "slide": with no ``--model`` it gets the shipped default for slides (models/index.json),
    while photos (PNG, JPEG) get the default for 2D images.
    """
    kind = "2d"
    vendor = wants_openslide(path)  # MIRAX, Leica, Ventana...: only OpenSlide reads them, always by region
    if content == "tiff" or vendor:
        head = None if vendor else tiff_header(path)
        if head is not None and min(head[0]) < 2:  # the same refusal whichever route would read it
            raise InputError(f"image is too small ({head[0][0]}x{head[0][1]}); need at least 2 pixels per side", path)
        kind = "slide" if vendor or (head is not None and head[1] in (3, 4)) else "2d"
        if vendor and not out.name.lower().endswith((".tif", ".tiff")):
            raise UsageError(f"a {path.suffix} slide is read by region, so its mask is written as a tiled .tif, "
                             f"not {out.suffix}", path)
        if vendor or (head is not None and header_needs.wants_tiles(ctx, path, out, kind, head)):
            bundle = ctx.bundle_for(kind)
            mplan = ctx.inferer.memory_plan(kind, bounded=True)
            plane = open_plane(path, spec=bundle.normalization, channels_want=bundle.in_channels,
                               channel_mode=ctx.options.channels, cache_bytes=mplan.region_cache)
            try:  # the rough map of a huge slide, from its header: refused before its rough pass
                header_needs.check_bounded(ctx, kind, plane.shape, plane.spacing, path)
            except BaseException:
                plane.close()
                raise
            return TiledTiffRoute(plane, kind)
    if ctx.options.stream_volumes and content not in ("tiff", "png", "jpeg", "bmp"):
        vol = open_streamed(path, content=content, series_id=ctx.options.series)
        if vol is not None:
            if ctx.options.volume not in (None, 1):
                raise InputError(f"--volume {ctx.options.volume}: this input holds one volume", path)
            return StreamedVolumeRoute(vol, choose=ctx.options.model is None)
    if content in ("nrrd", "metaimage", "nifti", "nifti-gz") and (head := io.header_size(path, content)):
        shape, channels, itemsize = head  # read whole: refuse from the header, before decoding, if it won't fit
        if len(shape) in (2, 3):
            memory.check_in_memory(ctx, "volume" if len(shape) == 3 else kind, shape, channels, itemsize, path)
    if (content == "dicom" and ctx.options.max_memory is not None and path.is_dir()
            and (size := decoded_size(path, ctx.options.volume, ctx.options.series)) is not None):  # refuse first
        shape, channels, itemsize = size
        flat = shape[0] == 1
        memory.check_in_memory(ctx, kind if flat else "volume", shape[1:] if flat else shape, channels,
                               itemsize, path)
    img = io.open_image(path, ctx.options.series if path.is_dir() else None, content=content,
                        volume=ctx.options.volume)
    return InMemoryRoute(img, facts.chosen_kind(ctx.options, img, kind))


# -- one file, many files ----------------------------------------------------------------------------------


def read(ctx: RunContext, path: Path, output: str | Path | None, *, input_root: Path | None) -> Job:
    """:func:`_read`, its time counted as the file's own work (model loading for the memory plan apart)."""
    loading = ctx.inferer.load_seconds.get("total", 0.0)
    job = _read(ctx, path, output, input_root=input_root)
    job.busy += time.perf_counter() - job.t0
    _count_load(ctx, job, loading)
    return job


def _count_load(ctx: RunContext, job: Job, before: float) -> None:
    """First use loads the networks (the ONNX export or the weights): its own stage, not the one it fell in."""
    if (load := ctx.inferer.load_seconds.get("total", 0.0) - before) > 0.001:
        job.rep.seconds["model_load"] = job.rep.seconds.get("model_load", 0.0) + load
        if "prepare" in job.rep.seconds:
            job.rep.seconds["prepare"] = max(0.0, job.rep.seconds["prepare"] - load)


def _read(ctx: RunContext, path: Path, output: str | Path | None, *, input_root: Path | None) -> Job:
    """Plan the output, take the lock, honour --skip-existing, and open the input on its route."""
    job = Job(path=path, rep=FileReport(input=str(path)), t0=time.perf_counter())
    opts = ctx.options
    try:
        facts.refuse_special(path)
        content = io.sniff_input(path)
        out = plan_output(opts, path, output, input_root, content)
        job.out = out
        job.rep.output = str(out)
        if opts.lock:
            lock = OutputLock(out)
            if not lock.acquire():
                job.rep.status = "skipped"
                job.rep.warnings.append("another segcli process holds this output's lock")
                return job
            job.lock = lock
        if opts.skip_existing and all(p.exists() for _, p in planned_outputs(opts, out)):
            job.rep.status = "skipped"
            return job
        t = time.perf_counter()
        job.route = open_route(ctx, path, out, content)
        job.rep.seconds["read"] = time.perf_counter() - t
        job.rep.warnings.extend(job.route.warnings)
        ndim = len(job.route.spatial_shape)
        dtype = getattr(job.route, "dtype", None)
        facts.model_choice_note(ctx, job)
        if dtype is not None:
            bundle = ctx.bundle_for(job.route.kind)
            job.rep.warnings.extend(mismatch_warnings(bundle, dtype, job.route.spacing, ndim, opts.window))
            facts.intensity_notes(ctx, job, bundle, dtype, isinstance(job.route, InMemoryRoute) and job.route.img.ndim == 2)
        if ctx.options.instances and len(job.route.spatial_shape) != 2:
            raise InputError("--instances is written for 2D images (photos, tiles, slides); this input is a "
                             "volume", path)
        job.rep.shape = list(job.route.spatial_shape)
        job.rep.spacing = list(job.route.spacing) if job.route.spacing else None
        if isinstance(job.route, InMemoryRoute):
            t = time.perf_counter()
            job.route.stage(ctx, job)
            job.rep.seconds["prepare"] = time.perf_counter() - t
    except Exception as exc:  # one bad file must not stop the batch
        job.fail_from(exc)
    return job


def compute(ctx: RunContext, job: Job, progress: ProgressFn | None) -> None:
    """Run the route's engine; a failure is recorded on the job, never raised."""
    if job.route is None or job.rep.status != "ok":
        return
    t, loading = time.perf_counter(), ctx.inferer.load_seconds.get("total", 0.0)
    try:
        job.route.compute(ctx, job, progress)
    except Exception as exc:  # one bad file must not stop the batch
        job.fail_from(exc)
    finally:
        job.busy += time.perf_counter() - t
        _count_load(ctx, job, loading)


def write(ctx: RunContext, job: Job) -> FileReport:
    """Write the mask (and what else was asked for), then release everything the job held."""
    new: list[Path] = []
    t = time.perf_counter()
    try:
        if job.route is not None and job.out is not None and job.rep.status in ("ok", "empty"):
            new = [p for _, p in planned_outputs(ctx.options, job.out) if not p.exists()]
            t = time.perf_counter()
            job.route.write(ctx, job)
            job.rep.seconds["write"] = time.perf_counter() - t
    except Exception as exc:  # one bad file must not stop the batch
        job.fail_from(exc, writing=True)
        for p in new:  # a failed input leaves none of its new outputs (a mask without its probabilities)
            with contextlib.suppress(OSError):
                p.unlink()
    job.busy += time.perf_counter() - t
    return job.finish()


def run_one(ctx: RunContext, path: Path, output: str | Path | None, *, input_root: Path | None = None,
            progress: ProgressFn | None = None) -> FileReport:
    """Read, segment and write one input."""
    job = read(ctx, path, output, input_root=input_root)
    try:
        compute(ctx, job, progress)
    except BaseException:  # interrupted: release the lock and temporary files before leaving
        job.finish()
        raise
    return write(ctx, job)


def run_many(inferer: Inferer, items: list[tuple[Path, Path | None]], output: str | Path | None, *,
             prefetch: int = 2, progress_for: Callable[[Path], ProgressFn | None] | None = None,
             file_options: dict[str, Any] | None = None) -> Iterator[FileReport]:
    """Reports in input order, with reading of the next files and writing of the previous one
    overlapped with computing the current one (one reader and one writer thread).

    Decoding a compressed volume and writing a mask release the GIL for most of their time, so on
    a 2-core machine they overlap with the network instead of adding to it. Files read ahead are held
    while one computes, so each gets its share of the budget (``file_options``: see Inferer.context).
    """
    ctx = inferer.context(file_options, read_ahead=prefetch if prefetch > 0 and len(items) > 1 else 0)

    def progress(path: Path) -> ProgressFn | None:
        return progress_for(path) if progress_for else None

    if prefetch <= 0:
        for path, root in items:
            yield run_one(ctx, path, output, input_root=root, progress=progress(path))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="segcli-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="segcli-write") as writer:
        pending: deque[Future[Job]] = deque()
        opened: list[Job] = []  # every job a read returned, appended by the reader thread (never interrupted)
        it = iter(items)

        def read_one(path: Path, root: Path | None) -> Job:
            job = read(ctx, path, output, input_root=root)
            opened.append(job)
            return job

        def submit_next() -> None:
            nxt = next(it, None)
            if nxt is not None:
                pending.append(reader.submit(read_one, nxt[0], nxt[1]))

        for _ in range(prefetch):
            submit_next()
        last_write: Future[FileReport] | None = None
        try:
            while pending:
                current = pending.popleft().result()
                submit_next()
                compute(ctx, current, progress(current.path))
                if last_write is not None:
                    yield last_write.result()
                last_write = writer.submit(write, ctx, current)
            if last_write is not None:
                yield last_write.result()
        finally:
            # Interrupted (SIGINT/SIGTERM) or abandoned: a signal can land between any two statements above,
            # so rather than tracking which future was where, stop both threads and release what every
            # opened job still holds (locks, temporary files). Written jobs released theirs already.
            reader.shutdown(wait=True, cancel_futures=True)
            writer.shutdown(wait=True)
            for job in opened:
                job.finish()
