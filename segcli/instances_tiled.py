"""Instance labels of a slide read by region, tile by tile, with one id per object and no seams.

The mask is never held whole. Each output tile (its *core*) is answered from a *window*: the core grown by
``margin`` px on every side. The window's mask is split by :func:`segcli.instances.split_touching`; then each
8-connected component of the mask that touches the core is handled once, by one tile:

- A component whose extent is at most ``reach`` px in both axes is *whole*: it lies inside the window of
  every tile it touches (if the first window cuts one, the tile reads again with ``reach`` as margin). It
  belongs to the first tile it touches in raster order (the minimum tile index over its pixels, the same
  answer from any window), which splits it, gives its instances the next global ids, measures them, and keeps
  the pixels that fall in later tiles until those tiles are written. Its instances therefore get one id
  each, whatever tile edges cross them, and the other tiles skip it.
- A component larger than ``reach`` (a confluent sheet of cells) is split by each tile within its own window,
  and only its core pixels are kept, with fresh ids: such a component may be cut at a tile edge. The number
  of these tiles is reported (``summary["cut_components"]``); none is expected for nuclei.

Within a window the split equals the whole-image split of :func:`~segcli.instances.split_touching` except
where its smoothing (about 4 px) reaches a neighbouring component that the window cuts, or the flood breaks a
tie in another order: on a 4000² mosaic of nuclei-he masks of MoNuSeg, 7,322 objects both ways and 32 of 2.9 M
foreground pixels on another object. Ids are numbered in raster order of the owning tiles.

Memory: one window of class ids, distances and labels (≈ 20 bytes per window pixel), plus the pending pixels
of whole objects that reach into later tiles (one row of tiles deep), and the crops whose objects are being
measured in a thread of their own (:data:`DESCRIBE_AHEAD`); ``segcli.memplan.instance_windows`` plans it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import suppress
from typing import Any

import numpy as np

from segcli.instances import regions_8, split_labels
from segcli.io.bigtiff import write_tiled
from segcli.io.naming import geojson_path, instances_path, objects_path
from segcli.objects import ObjectSink, describe, is_he

#: Default margin around each tile (level-0 px). On a 4000² mosaic of nuclei-he masks of MoNuSeg (18 % nuclei),
#: 64 px re-read 33 of 64 tiles at the reach, 128 px 11 tiles, at about half the CPU time.
MARGIN = 128
#: Default reach: components up to this extent (px) get one id per object across tiles.
REACH = 512

#: Smallest tile of a slide's instance image. 1024 px (window 1.56× the tile instead of 2.25×) was cheaper on a
#: dense 4000² mosaic of MoNuSeg masks (10-11 vs 14-17 s CPU) but dearer on bench_slide's sparse 16k² H&E slide
#: (62.5 vs 53 s CPU for the whole run, peak RSS 785 vs 668 MB: its re-reads at the reach cover 2048² windows).
INSTANCE_TILE = 512

#: Background px kept around a tile's components when they are split (the smoothing of the distance map
#: reaches 4 px; more would only let other tiles' objects in, which are cleared anyway).
SPLIT_PAD = 8

#: Bytes of class-id tiles :class:`TileLabels` keeps (one byte a pixel; all-background tiles cost nothing):
#: three rows of 512² tiles of a 21000-px-wide slide whose every tile holds tissue.
LABEL_CACHE_BYTES = 32 * 2**20

#: Crops waiting to be measured while the next tile is split (each holds its ids and classes: 5 bytes a pixel).
DESCRIBE_AHEAD = 1
#: Bytes a crop pixel costs while its objects are measured and outlined (segcli.objects.describe, with its RGB):
#: 28 by tracemalloc on a 1536² crop of nuclei-he instances (1,459 objects), plus the crop's RGB.
DESCRIBE_PER_PIXEL = 32

Box = tuple[int, int, int, int]


class TileLabels:
    """Class ids of any box, computed once per grid tile and kept (least recently used first out, at most
    ``limit`` bytes) while windows of later tiles may still reach them.

    A window is its core grown by the margin, so without this each pixel's labels were computed about 2.25
    times (fusing the probabilities and taking their argmax each time) and 9 times at the reach. The mask
    writer of a slide reads through the same cache from another thread (segcli.pipeline), so a tile's labels
    are computed once for the mask and the instances: whichever thread asks first computes, the other waits.
    """

    def __init__(self, read: Callable[[Box], np.ndarray], shape: tuple[int, int], tile: int,
                 limit: int = LABEL_CACHE_BYTES) -> None:
        self._read, self.tile, self.limit = read, int(tile), int(limit)
        self.H, self.W = (int(v) for v in shape)
        self._tiles: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._busy: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.dtype: np.dtype = np.dtype(np.uint8)
        self.computed = 0

    def _tile(self, ty: int, tx: int) -> np.ndarray | None:
        key = (ty, tx)
        while True:
            with self._lock:
                if key in self._tiles:
                    self._tiles.move_to_end(key)
                    return self._tiles[key]
                event = self._busy.get(key)
                mine = event is None
                if mine:
                    event = self._busy[key] = threading.Event()
            assert event is not None
            if mine:
                break
            event.wait()  # another thread computes it; if that failed, this one tries
        T = self.tile
        try:
            got = np.asarray(self._read((ty * T, tx * T, min(self.H, (ty + 1) * T), min(self.W, (tx + 1) * T))))
        except BaseException:
            with self._lock:
                del self._busy[key]
            event.set()
            raise
        kept = got if got.any() else None  # background costs nothing to keep
        with self._lock:
            self.dtype = got.dtype
            self.computed += 1
            self._tiles[key] = kept
            self._bytes += 0 if kept is None else kept.nbytes
            while self._bytes > self.limit and len(self._tiles) > 1:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= 0 if old is None else old.nbytes
            del self._busy[key]
        event.set()
        return kept

    def read(self, box: Box) -> np.ndarray:
        y0, x0, y1, x1 = box
        T = self.tile
        parts = [(ty, tx) for ty in range(y0 // T, (y1 - 1) // T + 1) for tx in range(x0 // T, (x1 - 1) // T + 1)]
        tiles = [self._tile(ty, tx) for ty, tx in parts]
        out = np.zeros((y1 - y0, x1 - x0), self.dtype)
        for (ty, tx), t in zip(parts, tiles, strict=True):
            if t is None:
                continue
            ay, ax = max(y0, ty * T), max(x0, tx * T)
            by, bx = min(y1, ty * T + t.shape[0]), min(x1, tx * T + t.shape[1])
            out[ay - y0 : by - y0, ax - x0 : bx - x0] = t[ay - ty * T : by - ty * T, ax - tx * T : bx - tx * T]
        return out


class TiledInstances:
    """``read(box)`` returns the uint32 instance ids of one output tile; tiles must come in raster order on a
    grid of ``tile`` px (as :func:`segcli.io.bigtiff.write_tiled` asks for them).

    ``read_labels(box)`` gives class ids of any box of the image ``shape`` (H, W). ``on_objects(objs)``, if
    given, receives each finished object's measurements and outline (:func:`segcli.objects.describe`) with
    ``read_rgb(box)`` for the H&E optical densities and ``spacing`` for µm.
    """

    def __init__(self, read_labels: Callable[[Box], np.ndarray], shape: tuple[int, int], tile: int, *,
                 margin: int = MARGIN, reach: int = REACH, min_distance: float = 3.0,
                 on_objects: Callable[[list[Any]], None] | None = None,
                 read_rgb: Callable[[Box], np.ndarray] | None = None, spacing: tuple[float, ...] | None = None,
                 want_outlines: bool = True, boundary: tuple[int, int] | None = None,
                 fold: np.ndarray | None = None, pool: Executor | None = None,
                 cache: TileLabels | None = None) -> None:
        self.tile = int(tile)
        self.pool = pool
        self._queued: deque[Future[None]] = deque()
        self.labels = cache if cache is not None else TileLabels(read_labels, shape, self.tile)
        self.read_labels = self.labels.read
        # a network with a boundary class: its labels split at the boundary, its mask's classes for measuring
        self.boundary, self.fold = boundary, fold
        self.H, self.W = (int(v) for v in shape)
        self.margin, self.reach = int(margin), max(int(reach), int(margin))
        self.min_distance = float(min_distance)
        self.on_objects, self.read_rgb, self.spacing = on_objects, read_rgb, spacing
        self.want_outlines = want_outlines
        self.cols = -(-self.W // self.tile)
        self.next_id = 0
        self.pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.cut_components = 0
        self.rereads = 0

    def _window(self, box: Box, m: int) -> Box:
        y0, x0, y1, x1 = box
        return (max(0, y0 - m), max(0, x0 - m), min(self.H, y1 + m), min(self.W, x1 + m))

    def _components(self, box: Box, win: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray, Any, np.ndarray]:
        """The window's class ids, its 8-connected components, the ids of those that touch the core, their
        slices, and whether each is cut by a window edge that is not the image's edge."""
        # lazy: scipy.ndimage costs 0.3-0.4 s at start-up; runs that never get here skip it
        from scipy import ndimage as ndi

        cls = np.asarray(self.read_labels(win))
        n, comp = regions_8(cls > 0)  # ids as names only: the output does not depend on their order
        n -= 1
        wy0, wx0, wy1, wx1 = win
        core = comp[box[0] - wy0 : box[2] - wy0, box[1] - wx0 : box[3] - wx0]
        touching = np.unique(core[core > 0])
        cut = np.zeros(n + 1, bool)
        for edge, inner in ((comp[0], wy0 > 0), (comp[-1], wy1 < self.H), (comp[:, 0], wx0 > 0),
                            (comp[:, -1], wx1 < self.W)):
            if inner:
                cut[edge] = True
        cut[0] = False
        return cls, comp, touching, ndi.find_objects(comp), cut[touching]

    def read(self, box: Box) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in box)
        box = (y0, x0, y1, x1)
        me = (y0 // self.tile) * self.cols + x0 // self.tile
        out = np.zeros((y1 - y0, x1 - x0), np.uint32)
        if not (np.asarray(self.read_labels(box)) > 0).any():  # glass: no object touches this core
            return self._paint_pending(out, me, y0, x0)
        win = self._window(box, self.margin)
        cls, comp, touching, slices, cut = self._components(box, win)
        if cut.any() and self.reach > self.margin:  # a component reaches past the margin: look further
            self.rereads += 1
            win = self._window(box, self.reach)
            cls, comp, touching, slices, cut = self._components(box, win)
        if not len(touching):  # glass, or only objects of earlier tiles: their pixels are pending
            return self._paint_pending(out, me, y0, x0)
        ext = np.array([[s.stop - s.start for s in slices[k - 1]] for k in touching.tolist()], np.int64).reshape(-1, 2)
        whole = (ext <= self.reach).all(axis=1) & ~cut
        # the owner of a whole component: the first tile (raster order) that holds one of its pixels
        owner = self._owners(comp, win, touching, slices)
        if (owner[whole] > me).any():  # pragma: no cover - the owner is the first tile touched
            raise AssertionError("an object's first tile comes after a tile that holds it")
        mine = touching[whole & (owner == me)]
        large = touching[~whole]
        self.cut_components += int(len(large))
        if len(mine) or len(large):
            self._split(box, win, cls, comp, slices, mine, large, out)
        return self._paint_pending(out, me, y0, x0)

    def _split(self, box: Box, win: Box, cls: np.ndarray, comp: np.ndarray, slices: list[Any], mine: np.ndarray,
               large: np.ndarray, out: np.ndarray) -> None:
        """Split this tile's components (``mine`` whole, ``large`` cut), give their instances global ids, write
        the core's into ``out``, keep the rest for later tiles and measure the new objects.

        The split sees only those components, cropped to their box with :data:`SPLIT_PAD` px around: the other
        components of the window belong to other tiles, which split them in their own windows."""
        y0, x0, y1, x1 = box
        keep_ids = np.concatenate([mine, large])
        starts = np.array([[s.start for s in slices[k - 1]] for k in keep_ids.tolist()])
        stops = np.array([[s.stop for s in slices[k - 1]] for k in keep_ids.tolist()])
        cy0, cx0 = np.maximum(starts.min(axis=0) - SPLIT_PAD, 0).tolist()
        cy1, cx1 = np.minimum(stops.max(axis=0) + SPLIT_PAD, comp.shape).tolist()
        comp = comp[cy0:cy1, cx0:cx1]
        lut = np.zeros(len(slices) + 1, np.int8)
        lut[mine], lut[large] = 1, 2
        which = lut[comp]
        cls = np.where(which > 0, cls[cy0:cy1, cx0:cx1], 0).astype(cls.dtype, copy=False)
        inst = split_labels(cls, self.boundary, self.min_distance)
        wy0, wx0 = win[0] + cy0, win[1] + cx0  # the crop's place in the image
        in_core = np.zeros(comp.shape, bool)
        in_core[max(0, y0 - wy0) : max(0, y1 - wy0), max(0, x0 - wx0) : max(0, x1 - wx0)] = True
        keep = (which == 1) | ((which == 2) & in_core)
        glob = np.zeros(comp.shape, np.uint32)
        old = np.unique(inst[keep])
        new = np.arange(self.next_id + 1, self.next_id + 1 + len(old), dtype=np.uint32)
        self.next_id += len(old)
        glob[keep] = new[np.searchsorted(old, inst[keep])]
        # the core's part of the crop (the crop may not cover the whole core)
        oy0, ox0 = max(y0, wy0), max(x0, wx0)
        oy1, ox1 = min(y1, wy0 + comp.shape[0]), min(x1, wx0 + comp.shape[1])
        if oy1 > oy0 and ox1 > ox0:
            out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = glob[oy0 - wy0 : oy1 - wy0, ox0 - wx0 : ox1 - wx0]
        self._defer(glob, (which == 1) & ~in_core, wy0, wx0)
        if self.on_objects is not None and len(new):
            crop = (wy0, wx0, wy0 + comp.shape[0], wx0 + comp.shape[1])
            self._describe(glob, cls if self.fold is None else self.fold[cls], new, crop)

    def _paint_pending(self, out: np.ndarray, me: int, y0: int, x0: int) -> np.ndarray:
        for py, px, pid in self.pending.pop(me, []):
            out[py - y0, px - x0] = pid
        return out

    def _owners(self, comp: np.ndarray, win: Box, ids: np.ndarray, slices: list[Any]) -> np.ndarray:
        """For each component id in ``ids``: the first tile (raster order) holding one of its pixels in the window.

        That tile is in the tile row of the component's top edge, and in the column of its leftmost pixel
        within that row of tiles; only components whose box crosses a tile column need their pixels looked at.
        (Counting every component in every tile of the window was a tenth of the split's time.)"""
        T = self.tile
        wy0, wx0 = win[0], win[1]
        box = np.array([[s.start for s in slices[k - 1]] + [slices[k - 1][1].stop] for k in ids.tolist()],
                       np.int64).reshape(-1, 3)
        ty, tx0, tx1 = (box[:, 0] + wy0) // T, (box[:, 1] + wx0) // T, (box[:, 2] - 1 + wx0) // T
        first = ty * self.cols + tx0
        for i in np.flatnonzero(tx1 > tx0).tolist():
            k, (sy, sx) = int(ids[i]), slices[int(ids[i]) - 1]
            rows = comp[sy.start : min(sy.stop, (int(ty[i]) + 1) * T - wy0), sx] == k  # its part in that tile row
            left = int(np.argmax(rows.any(axis=0)))
            first[i] = ty[i] * self.cols + (wx0 + sx.start + left) // T
        return first

    def _defer(self, glob: np.ndarray, outside: np.ndarray, wy0: int, wx0: int) -> None:
        """Keep the pixels of this tile's objects that lie in later tiles, for those tiles."""
        ys, xs = np.nonzero(outside)
        if not len(ys):
            return
        k = ((ys + wy0) // self.tile) * self.cols + (xs + wx0) // self.tile
        order = np.argsort(k, kind="stable")
        ys, xs, k = ys[order], xs[order], k[order]
        ids = glob[ys, xs]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            self.pending.setdefault(int(k[a]), []).append((ys[a:b] + wy0, xs[a:b] + wx0, ids[a:b]))

    def _describe(self, glob: np.ndarray, cls: np.ndarray, ids: np.ndarray, win: Box) -> None:
        if self.pool is None:
            self._describe_now(glob, cls, ids, win)
            return
        self._queued.append(self.pool.submit(self._describe_now, glob, cls, ids, win))
        while len(self._queued) > DESCRIBE_AHEAD or (self._queued and self._queued[0].done()):
            self._queued.popleft().result()

    def finish(self) -> None:
        """Wait for the objects still being measured (raising what their worker raised)."""
        while self._queued:
            self._queued.popleft().result()

    def _describe_now(self, glob: np.ndarray, cls: np.ndarray, ids: np.ndarray, win: Box) -> None:
        rgb = self.read_rgb(win) if self.read_rgb is not None else None
        assert self.on_objects is not None
        self.on_objects(describe(glob, cls, ids=ids, rgb=rgb, spacing=self.spacing, offset=(win[0], win[1]),
                                 want_outlines=self.want_outlines))

    @property
    def summary(self) -> dict[str, Any]:
        return {"objects": self.next_id, "split": "watershed" if self.boundary is None else "boundary", "tiled": True, "margin": self.margin,
                "reach": self.reach, "cut_components": self.cut_components, "rereads": self.rereads,
                "label_tiles_computed": self.labels.computed}


class FusedRows:
    """The rows of a slide's labels that the fine pass has finished (no window left to run writes there), for
    readers that work beside it: :meth:`read` waits until every row of its box is final. The fine pass calls
    :meth:`advance` (segcli.engines.stts ``on_fused``); :meth:`fail` releases the readers with an error."""

    def __init__(self, labels: Any, height: int) -> None:
        self.labels, self.height = labels, int(height)
        self.shape = tuple(getattr(labels, "shape", (height,)))  # read through ScaledLabels on a resampled slide
        self._y = 0
        self._failed = False
        self._cond = threading.Condition()

    def advance(self, y: int) -> None:
        with self._cond:
            self._y = max(self._y, int(y))
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def read(self, box: Box) -> np.ndarray:
        need = min(int(box[2]), self.height)
        with self._cond:
            self._cond.wait_for(lambda: self._y >= need or self._failed)
            if self._failed:
                raise InterruptedError("the fine pass stopped before these rows were fused")
        return self.labels.read(box)


def background_priority() -> None:
    """Lower the calling thread's priority (Linux: per-thread nice 10): the instance split and the measuring run
    beside the fine pass on the CPU time its network leaves idle, without stalling the network's threads."""
    with suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class SlideInstances:
    """``NAME_instances.tif`` of a slide read by region (a tiled uint32 BigTIFF, like the mask), and with
    ``--geojson`` / ``--stats`` one QuPath detection / CSV row per instance; the summary goes in the report.

    It is written by a thread of its own, started here, while the caller writes the mask: both read the class
    ids through :attr:`labels`, and the instance split, the larger of the two, no longer waits for the mask. The
    objects of each tile are measured and outlined in a third thread while the next tile is split. With
    ``background`` (the pipeline starts it beside the fine pass, ``labels`` a :class:`FusedRows`) both threads
    run at a lower priority on the CPU the network leaves idle: on the 40000² slide of bench_slide.py an
    ``--instances --geojson`` run went from 1.30-1.33× the plain run's time to 1.03-1.18×
    (benchmarks/bench_instance_cost.py). :meth:`join` waits, raises what the threads raised and adds the
    summary to the report; :meth:`cancel` stops the split at its next tile.
    """

    def __init__(self, out: Any, rep: Any, labels: Any, plane: Any, bundle: Any, kind: str, options: Any,
                 ome: dict[str, Any] | None = None, background: bool = False) -> None:
        self.rep = rep
        self.background = background  # started beside the fine pass: its threads yield the CPU to the network
        self.info: dict[str, Any] = {}  # what goes in the report, added by join() in the caller's thread
        self.warnings: list[str] = []
        #: the class ids of the slide, tile by tile: read the mask through it, and each tile is computed once
        self.labels = TileLabels(labels.read, plane.shape, self.tile_of(options), LABEL_CACHE_BYTES)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._tile = self.tile_of(options)
        self._row = -1  # the tile row the split is at (the mask waits for it: see read_mask)
        self._progress = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="segcli-instances", daemon=True,
                                        args=(out, labels, plane, bundle, kind, options, ome))
        self._thread.start()

    def _run(self, out: Any, labels: Any, plane: Any, bundle: Any, kind: str, options: Any,
             ome: dict[str, Any] | None) -> None:
        if self.background:
            background_priority()
        try:
            self._write(out, labels, plane, bundle, kind, options, ome)
        except BaseException as exc:  # handed to join(), in the thread that waits
            self._error = exc
        finally:
            self._advance(np.iinfo(np.int64).max)  # done or failed: the mask waits no more

    def _advance(self, row: int) -> None:
        with self._progress:
            self._row = row
            self._progress.notify_all()

    def read_mask(self, box: Box) -> np.ndarray:
        """The class ids of a box of the mask, once the split has reached the box's last tile row.

        The mask writer has little to do per tile, so unheld it raced rows ahead of the split and the shared
        cache dropped tiles the split still needed: on a 40000² slide 11,689 tiles were computed for 6,241
        (each about twice). Kept level with a split that starts with it, the two read each tile's class ids
        from one computation while they are cached (three tile rows: the split's windows reach one row up and
        down). A split started beside the fine pass is rows ahead when the writer starts, and the writer then
        computes again the rows the cache has dropped (11,997 computations on that slide), after the fine pass."""
        last = (int(box[2]) - 1) // self._tile
        with self._progress:
            self._progress.wait_for(lambda: self._row >= last)
        return self.labels.read(box)

    def _write(self, out: Any, labels: Any, plane: Any, bundle: Any, kind: str, options: Any,
               ome: dict[str, Any] | None) -> None:
        rep = self.rep
        sink = ObjectSink(bundle.output_classes, geojson_path(out) if options.geojson else None,
                          objects_path(out) if options.stats else None, input_name=str(rep.input))
        he = is_he(bundle, kind, int(getattr(plane, "raw_channels", getattr(plane, "channels", 0))))
        tile = self.tile_of(options)
        # the objects of a tile are measured in a thread of their own while the next tile is split
        pool = ThreadPoolExecutor(1, thread_name_prefix="segcli-objects", initializer=background_priority if self.background
                                  else None) if sink.wanted else None
        tiled = TiledInstances(labels.read, plane.shape, tile,
                               on_objects=sink.add if sink.wanted else None,
                               read_rgb=(lambda b: plane.read_raw(b, 0)) if he else None, spacing=plane.spacing,
                               want_outlines=sink.geo is not None, boundary=bundle.boundary, fold=bundle.fold(),
                               pool=pool, cache=self.labels)
        path = instances_path(out)

        def read(box: Box) -> np.ndarray:
            if self._stop.is_set():
                raise InterruptedError("instance split cancelled")
            self._advance(int(box[0]) // tile)
            return tiled.read(box)

        try:
            write_tiled(path, plane.shape, read, dtype=np.uint32, tile=tile,
                        resolution=plane.resolution, spacing=plane.spacing, ome=ome, pyramid=False)
            tiled.finish()
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            sink.abort()
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        self.info["instances"] = {"path": str(path), **tiled.summary}
        self.info.update(sink.close())
        if tiled.cut_components:
            self.warnings.append(f"instances: {tiled.cut_components} tile(s) held a connected region wider than "
                                f"{tiled.reach} px, split at tile edges")

    @staticmethod
    def tile_of(options: Any) -> int:
        """The side of the instance image's tiles (and of the shared label cache's)."""
        return max(int(options.tile_size), INSTANCE_TILE)

    def cancel(self) -> None:
        """Stop at the next tile and wait; nothing of the instance outputs is left (their writes are atomic)."""
        self._stop.set()
        self._thread.join()

    def join(self) -> None:
        """Wait for the split; its summary and warnings go in the report here, in the caller's thread."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.rep.info.update(self.info)
        self.rep.warnings.extend(self.warnings)
