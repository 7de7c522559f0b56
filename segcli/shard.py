"""Deterministic, size-balanced sharding of a batch for job arrays (SLURM, GNU parallel).

``--shard K/N`` gives shard K (0-based) of N. Files are assigned largest first to the shard with the
fewest bytes so far (ties: the lowest shard index), so one shard does not get all the big scans and
every process computes the same assignment from the same listing, with no coordinator.
"""

from __future__ import annotations

import heapq
import os
from pathlib import Path
from typing import TypeVar

from segcli.errors import UsageError

T = TypeVar("T")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → (K, N) with 0 ≤ K < N."""
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise UsageError(f"--shard expects K/N (e.g. 0/8), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: K must be in 0..N-1 (0-based, e.g. SLURM --array=0-{max(n - 1, 0)})")
    return k, n


def input_size(path: Path) -> int:
    """Bytes on disk; a folder (DICOM series) counts the files directly inside it."""
    try:
        if path.is_dir():
            return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def assign_shards(items: list[T], n: int, key=lambda item: item) -> list[int]:
    """Shard index of each item, balancing bytes greedily (largest first, LPT scheduling)."""
    sizes = [input_size(Path(key(it))) for it in items]
    order = sorted(range(len(items)), key=lambda i: (-sizes[i], str(key(items[i]))))
    heap = [(0, s) for s in range(n)]
    out = [0] * len(items)
    for i in order:
        load, s = heapq.heappop(heap)
        out[i] = s
        heapq.heappush(heap, (load + sizes[i], s))
    return out


def select_shard(items: list[T], k: int, n: int, key=lambda item: item) -> list[T]:
    """The items of shard K of N, in their original order."""
    if n == 1:
        return list(items)
    shards = assign_shards(items, n, key)
    return [it for it, s in zip(items, shards, strict=True) if s == k]


def shard_from_env(env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``("K/N", where)`` from a job array's environment when ``--shard`` is not given, else None.

    SLURM: ``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT`` (so
    ``--array=1-10`` works as well as ``0-9``); Grid Engine: ``SGE_TASK_ID`` with ``SGE_TASK_FIRST``,
    ``SGE_TASK_LAST`` and ``SGE_TASK_STEPSIZE``. A step other than 1 in SLURM (``--array=0-9:2``) is not
    a contiguous shard set and is refused rather than guessed.
    """
    e = os.environ if env is None else env
    try:
        if "SLURM_ARRAY_TASK_ID" in e:
            if "SLURM_ARRAY_TASK_COUNT" not in e:  # every task would process every file: refuse, never duplicate
                raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not, so the number of "
                                 "shards is unknown; give --shard K/N (or run under sbatch --array)")
            task, count = int(e["SLURM_ARRAY_TASK_ID"]), int(e["SLURM_ARRAY_TASK_COUNT"])
            first = int(e.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(e.get("SLURM_ARRAY_TASK_STEP", "1"))
            if step != 1:
                raise UsageError(f"SLURM array step {step}: use --array=A-B without a step, or give --shard K/N")
            return f"{task - first}/{count}", "SLURM_ARRAY_TASK_ID"
        if e.get("SGE_TASK_ID", "undefined") != "undefined" and "SGE_TASK_LAST" in e:
            return _sge_shard(e), "SGE_TASK_ID"
    except ValueError:
        raise UsageError("the job array's task variables are not numbers; give --shard K/N") from None
    return None


def _sge_shard(e) -> str:
    """Grid Engine's ``-t FIRST-LAST:STEP``: task ids FIRST, FIRST+STEP, ... (a task off that grid is refused)."""
    task, first = int(e["SGE_TASK_ID"]), int(e.get("SGE_TASK_FIRST", "1"))
    last, step = int(e["SGE_TASK_LAST"]), int(e.get("SGE_TASK_STEPSIZE", "1"))
    if step < 1:
        raise UsageError(f"SGE_TASK_STEPSIZE={step}: a Grid Engine step is at least 1; give --shard K/N")
    if not first <= task <= last or (task - first) % step:
        raise UsageError(f"SGE_TASK_ID={task} is not on the array's grid {first}-{last}:{step}, so its shard "
                         "would be another task's; give --shard K/N")
    return f"{(task - first) // step}/{(last - first) // step + 1}"
