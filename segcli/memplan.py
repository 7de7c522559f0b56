"""One memory plan per run: the budget split, before any work, between everything that holds memory.

``--max-memory`` is a contract with a cluster's job limit (SLURM ``--mem``, Kubernetes limits), which
kills a job the moment it goes over. What holds memory in a run, and who gets how much:

* the interpreter, libraries and loaded networks: measured (the process's RSS once the networks are up);
* each network's working memory at a batch size: measured once per export (a fresh ONNX Runtime session
  runs a batch of zeros; its RSS growth is the cost) and recorded beside the cached export
  (:func:`segcli.runtimes.onnx_cache.memory_record`), so later runs only read it;
* the crops of one batch and the one prefetched after it (known sizes);
* a bounded route's working set (rough grid, writer buffers, allocator slack): :data:`ROUTE_WORKSET`,
  measured by ``benchmarks/bench_memory.py --sweep``;
* the region cache of a slide reader and the fusion store's tile cache: what is left, up to a cap
  past which they stopped paying (the sweep).

The fine batch is the largest that fits, up to :data:`FAST_BATCH`: on this CPU per-item time stopped
falling past 8 while ONNX Runtime's arena doubled (``benchmarks/README.md``). When even batch 1 with the
smallest caches does not fit, the run is refused before any work with one line naming the minimum.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from segcli.errors import UsageError
from segcli.memory import INSTANCE_PER_PIXEL, budget_words, human, peak_rss_bytes, run_need
from segcli.runtimes import onnx_cache
from segcli.runtimes.onnx_backend import CPU_EP, make_session

MB = 10**6
MIB = 2**20
#: What the rough pass of a slide without a usable pyramid level holds while it reads one coarse window from
#: level 0 (:class:`segcli.io.lazyplane.LevelView`): a band of whole tile rows (512 rows x 2000 columns, raw
#: and float32) and the window's row sums. Read whole, the window took 12 MB raw + 2 x 48 MB float32 + per
#: channel copies: what a 16000² TIFF without a pyramid peaked above the plan by (issue 28).
ROUGH_BAND = 24 * MB
#: RSS a route holds beyond the networks, batches and planned caches (bytes; measured, see the docstring).
ROUTE_WORKSET = {"slide": 140 * MB + ROUGH_BAND, "2d": 16 * MB, "volume": 16 * MB}
#: (smallest, largest useful) region cache of a slide reader, and of the fusion store's tile cache. Past
#: 16 MiB the slide reader's cache saved 31 of 1379 tile decodes on a 16000² slide and cost 90 MB of RSS.
REGION_CACHE = (8 * MIB, 16 * MIB)
#: The fusion store's cache is at most two rows of its tiles (segcli.tiles.TileStore): 68 MiB for an 8000²
#: slide's Gaussian blend (2 MiB tiles), 132 MiB at 16000²; a budget's share decides below that.
FUSE_CACHE = (4 * MIB, 256 * MIB)
#: Default fine-batch cap on the CPU: the fastest measured (per-item time flat past 8, memory doubling).
FAST_BATCH = 8
#: The coarse network's rough batch in an ``--instances`` slide run without ``--max-memory`` (the budget is then
#: 70 % of what is available): the coarse arena is held for the whole run, the instance split's window on top.
#: nuclei-he's fp32 coarse network grew 126 MB at batch 4 against 55 MB at batch 2, and at batch 4 a default
#: ``--instances`` run on a 16000² SVS-like slide peaked at 582-616 MB (plan 702), at batch 2 512-581 MB (plan
#: 631). Plain default runs keep batch 4 (at batch 2, 1.08-1.14x the time on two of three slides in interleaved
#: runs, the rough pass itself no slower), and a user's budget plans the rough batch from its measured cost.
DEFAULT_ROUGH_BATCH = 2
#: Batch sizes whose network cost is measured (others are interpolated).
MEASURED_BATCHES = (1, 2, 4, 8)


class BudgetError(UsageError):
    """The budget is below the smallest plan: refused before any work (exit 2)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Who gets which share of the budget in this run (recorded in the ``--json`` report)."""

    budget: int
    kind: str
    base: int  # RSS with the interpreter, libraries and networks loaded (measured)
    workset: int  # the route's own working set (ROUTE_WORKSET)
    batch: int  # the fine (or only) network's batch
    rough_batch: int  # the coarse network's batch (stts rough pass)
    batch_bytes: int  # networks at their batches (measured) + one batch of crops and the prefetched next one
    region_cache: int
    fuse_cache: int
    prefetch: int  # batches of crops decoded ahead of the network
    workers: int
    minimum: int  # the smallest plan: batch 1, smallest caches
    network_cost: str  # "measured" (recorded per export) or "estimated" (torch, custom predictors)
    ort: dict[str, bool]

    @property
    def total(self) -> int:
        return self.base + self.workset + self.batch_bytes + self.region_cache + self.fuse_cache

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("budget", "base", "workset", "batch_bytes", "region_cache", "fuse_cache", "minimum"):
            d[f"{k}_mb"] = round(d.pop(k) / MB, 1)
        d["planned_peak_mb"] = round(self.total / MB, 1)
        return d


def rss_now() -> int:
    """This process's resident set size now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        # lazy: psutil is optional (segcli[bench])
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss() -> dict[str, float]:
    """Peak RSS of this process (its own high-water mark, :func:`segcli.memory.peak_rss_bytes`) and of its
    largest finished child (worker), in MB. The children's figure is ``ru_maxrss``, which on Linux includes
    this process's peak when the child started: an overstatement, never an understatement."""
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    own = peak_rss_bytes()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"peak_rss_mb": round(own / MB, 1), "peak_rss_children_mb": round(kids / MB, 1)}


def measure_onnx(model: bytes | Any, threads: int, size: int, in_channels: int,
                 batches: tuple[int, ...] = MEASURED_BATCHES) -> dict[int, int]:
    """RSS growth of a fresh CPU session running one batch of each size (bytes), arena as segcli runs it.

    A fresh session per size: an arena reused across sizes keeps the larger size's blocks and fragments.
    The record is kept with :data:`segcli.runtimes.onnx_cache.MEMORY_RECORD_VERSION`: records of an older
    measurement are measured again.
    """
    out: dict[int, int] = {}
    probe = make_session(model, [CPU_EP], threads)
    dim0 = probe.get_inputs()[0].shape[0]
    del probe
    if isinstance(dim0, int) and dim0 > 0:  # an imported graph with a fixed batch runs only that batch
        batches = (dim0,)
    for b in batches:
        x = np.zeros((b, in_channels, size, size), np.float32)
        sess = make_session(model, [CPU_EP], threads)
        # Freed heap from the sessions before would be reused unseen (a batch-1 cost of 0.2 MB against 14):
        # hand it back to the OS first, so the growth is what this session really takes.
        give_back()
        before = rss_now()
        res = sess.run(None, {sess.get_inputs()[0].name: x})
        out[b] = max(0, rss_now() - before)
        del res, sess, x
    gc.collect()
    return out


def network_cost(pred: Any, size: int, in_channels: int, n_classes: int) -> tuple[dict[int, int], str]:
    """``{batch: bytes}`` of one predictor at input size ``size``: measured (and recorded) for ONNX Runtime
    on the CPU, else an estimate from the activations of a U-Net-sized network (torch, wrappers)."""
    model = getattr(pred, "model_source", None)
    if getattr(pred, "backend", "") == "onnx" and model is not None and \
            getattr(pred, "provider", "") == "CPUExecutionProvider":
        digest = pred.model_sha256()
        rec = onnx_cache.memory_record(digest, size)
        if rec is None:
            rec = measure_onnx(model, pred.threads, size, in_channels)
            onnx_cache.save_memory_record(digest, size, rec)
        return rec, "measured"
    per_item = 4 * size * size * (in_channels + 2 * n_classes) * 12  # ~12 full-size activation maps
    return {b: b * per_item for b in MEASURED_BATCHES}, "estimated"


def cost_at(table: dict[int, int], b: int) -> int:
    """The recorded cost at batch ``b``: linear between measured sizes, extrapolated past the largest."""
    keys = sorted(table)
    if b in table:
        return table[b]
    lo = max([k for k in keys if k < b], default=keys[0])
    hi = min([k for k in keys if k > b], default=None)
    if hi is None:  # past the largest measured: per-item slope of the last two sizes
        k0 = keys[-2] if len(keys) > 1 else 0
        slope = (table[keys[-1]] - table.get(k0, 0)) / max(1, keys[-1] - k0)
        return int(table[keys[-1]] + slope * (b - keys[-1]))
    return int(table[lo] + (table[hi] - table[lo]) * (b - lo) / (hi - lo))


def crop_bytes(b: int, size: int, channels: int, n_classes: int, zoom: float, prefetch: int,
               tta: int = 1) -> int:
    """Engine-side buffers of ``b`` crops: float inputs (plus the prefetched batch), probabilities, zoomed reads;
    with ``tta`` > 1 transforms, one transformed copy of the inputs and one sum of probabilities more
    (:class:`segcli.runtimes.tta.TransformAveraged`)."""
    per = 4 * size * size * (channels * (1 + prefetch) + 2 * n_classes) + 4 * channels * int(size * zoom) ** 2
    if tta > 1:
        per += 4 * size * size * (channels + n_classes)
    return b * per


def _share(free: int, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, lo + free)))


def efficient_batch(table: dict[int, int], wanted: int, slack: float = 1.25) -> int:
    """Largest batch ≤ ``wanted`` whose measured cost per item stays within ``slack`` of the cheapest one.

    ONNX Runtime's arena grows by doubling: nuclei-he's fp32 coarse network cost 21 MB per item at batch 2
    and 30 at batch 8 (238 MB), for no speed gain; its int8 fine network 7 MB per item at 4 and 8.
    """
    per = {b: table[b] / b for b in table if b <= max(1, wanted)}
    if not per:
        return 1
    best = min(per.values())
    ok = [b for b, c in per.items() if c <= slack * best]
    return max(1, min(wanted, max(ok)) if ok else 1)


def refusal(name: str, minimum: int, budget: int, *, workers: int = 1, parent: int = 0,
            run_budget: int | None = None, user_budget: bool = True) -> str:
    """The one line refusing a run whose smallest plan (``minimum`` per process) exceeds ``budget``.

    With workers, the minimum and the budget named are the whole run's: W workers and the parent.
    """
    if workers <= 1:
        return f"{name} needs at least {human(minimum)} at batch 1; {budget_words(budget, user_budget)}"
    total = run_budget if run_budget is not None else run_need(budget, workers, parent)
    return (f"{name} needs at least {human(run_need(minimum, workers, parent))} at batch 1 ({human(minimum)} "
            f"per worker (--workers {workers}) and {human(parent)} for the parent); "
            f"{budget_words(total, user_budget)}")


def instance_windows(tile: int) -> int:
    """What the tiled instance split (``--instances`` on a slide read by region) holds at once: one window
    at the reach (segcli.instances_tiled) at :data:`segcli.memory.INSTANCE_PER_PIXEL` bytes a pixel, the crops
    of that size whose objects are measured beside it (the one being measured and those queued), and the class
    ids of the tiles its windows read (a bounded cache)."""
    # lazy: brings scipy
    from segcli.instances_tiled import (
        DESCRIBE_AHEAD,
        DESCRIBE_PER_PIXEL,
        INSTANCE_TILE,
        LABEL_CACHE_BYTES,
        REACH,
    )

    side = max(int(tile), INSTANCE_TILE) + 2 * REACH
    measured = DESCRIBE_PER_PIXEL + (DESCRIBE_AHEAD + 1) * 5  # uint32 ids and uint8 classes of each crop
    return side * side * (INSTANCE_PER_PIXEL + measured) + LABEL_CACHE_BYTES


def make_plan(*, budget: int, kind: str, name: str, base: int, costs: dict[str, dict[int, int]], how: str,
              size: int, channels: int, n_classes: int, zoom: float, wanted: int, workers: int = 1,
              user_budget: bool = True, parent: int = 0, run_budget: int | None = None,
              extra: int = 0, tta: int = 1) -> MemoryPlan:
    """Split ``budget`` (see the module docstring); :class:`BudgetError` when batch 1 does not fit.

    ``extra``: what the route holds beyond its measured working set (the instance split's windows);
    ``tta``: the transforms each network input is run under (``--tta``).

    ``costs``: each network role's measured ``{batch: bytes}``; every role keeps its arena, so they add up.
    The coarse network (stts rough pass) gets its own batch, at most :data:`DEFAULT_ROUGH_BATCH` when
    ``user_budget`` is False (no ``--max-memory``) and ``extra`` is held on top (``--instances``). With
    ``workers`` > 1, ``budget`` is one worker's share, ``parent`` the RSS of the process that started them
    and ``run_budget`` the whole run's (for the refusal's words).
    """
    slide = kind == "slide"
    prefetch = 1 if slide else 0
    workset = ROUTE_WORKSET.get(kind, ROUTE_WORKSET["2d"]) + int(extra)
    caches = (REGION_CACHE[0] + FUSE_CACHE[0]) if slide else 0
    coarse = costs.get("coarse") if len(costs) > 1 else None
    others = [t for r, t in costs.items() if not (coarse is not None and r == "coarse")]

    def batch_bytes(b: int, rb: int) -> int:
        nets = sum(cost_at(t, b) for t in others) + (cost_at(coarse, rb) if coarse is not None else 0)
        return nets + crop_bytes(b, size, channels, n_classes, zoom, prefetch, tta)

    minimum = base + workset + caches + batch_bytes(1, 1)
    if budget < minimum:
        raise BudgetError(refusal(name, minimum, budget, workers=workers, parent=parent, run_budget=run_budget,
                                  user_budget=user_budget))
    room = budget - (budget - minimum) // 4  # a quarter of what is above the minimum stays slack
    cap = min([efficient_batch(t, wanted) for t in others] or [wanted]) if how == "measured" else wanted
    rcap = efficient_batch(coarse, wanted) if coarse is not None and how == "measured" else cap
    if not user_budget:  # default budget: the coarse arena is held for the whole run (see DEFAULT_ROUGH_BATCH)
        rcap = min(rcap, DEFAULT_ROUGH_BATCH)
    batch = max([b for b in range(1, cap + 1) if base + workset + caches + batch_bytes(b, 1) <= room], default=1)
    rough = max([r for r in range(1, rcap + 1) if base + workset + caches + batch_bytes(batch, r) <= room],
                default=1)
    free = budget - (base + workset + caches + batch_bytes(batch, rough))
    region = _share(free // 2, *REGION_CACHE) if slide else 0
    fuse = _share(free // 4, *FUSE_CACHE) if slide else 0
    return MemoryPlan(budget=budget, kind=kind, base=base, workset=workset, batch=batch, rough_batch=rough,
                      batch_bytes=batch_bytes(batch, rough), region_cache=region, fuse_cache=fuse, prefetch=prefetch,
                      workers=workers, minimum=minimum, network_cost=how,
                      ort={"cpu_mem_arena": True, "mem_pattern": False})


def give_back() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's ``malloc_trim``), so the RSS that
    follows measures what is still held (a parent before it starts its workers)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl and others: RSS then stays as it is
            ctypes.CDLL("libc.so.6").malloc_trim(0)
