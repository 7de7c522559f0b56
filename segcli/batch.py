"""Running a whole batch: one model load for all files, I/O overlapped with compute, optional workers.

``run_batch`` is what ``segcli predict`` calls for any number of inputs. With one worker it streams
through :meth:`Segmenter.predict_many` (reader and writer threads around the compute). With W
workers it starts W processes, each building its Segmenter once with ``cores // W`` threads, so
W × threads never exceeds the cores actually available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from segcli.api import FileReport, Segmenter

_WORKER: dict[str, Any] = {}


def check_unique_outputs(items: list[tuple[Path, Path | None]], output: Path | None) -> list[FileReport]:
    """Inputs whose mask would overwrite another input's mask (``a.png`` and ``a.jpg`` → ``a_seg.png``).

    Such a pair is refused up front; otherwise two workers, or one worker twice, would write the
    same file.
    """
    from segcli import io

    seen: dict[Path, Path] = {}
    clashes = []
    for path, root in items:
        try:
            out = io.default_output_path(path, output, is_dir_input_root=root).resolve()
        except Exception:  # the per-file run reports bad names properly
            continue
        if out in seen and seen[out] != path:
            clashes.append(FileReport(input=str(path), output=str(out), status="failed",
                                      error=f"{path}: its mask {out} would overwrite the mask of {seen[out]}; "
                                            "rename one or use separate -o folders"))
        else:
            seen[out] = path
    return clashes


def _init_worker(seg_kwargs: dict[str, Any]) -> None:
    _WORKER["seg"] = Segmenter(**seg_kwargs)


def _run_one(args: tuple[Path, Path | None, dict[str, Any]]) -> FileReport:
    path, root, kw = args
    try:
        return _WORKER["seg"].predict_file(path, input_root=root, **kw)
    except Exception as exc:  # never let one file kill a worker
        return FileReport(input=str(path), status="failed", error=f"{path}: internal error ({type(exc).__name__}: {exc})")


def run_batch(
    items: list[tuple[Path, Path | None]],
    seg_kwargs: dict[str, Any],
    *,
    output: Path | None = None,
    workers: int = 1,
    prefetch: int = 2,
    segmenter: Segmenter | None = None,
    progress_for: Callable[[Path], Any] | None = None,
    **file_kwargs: Any,
) -> Iterator[FileReport]:
    """Yield one report per input, in input order."""
    if workers <= 1:
        seg = segmenter or Segmenter(**seg_kwargs)
        yield from seg.predict_many(items, output, prefetch=prefetch, progress_for=progress_for, **file_kwargs)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from segcli.runtimes.device import available_cores

    threads = max(1, (seg_kwargs.get("threads") or available_cores()) // workers)
    kw = {**seg_kwargs, "threads": threads}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(kw,)) as pool:
        file_kw = {"output": output, **file_kwargs}
        yield from pool.map(_run_one, [(p, r, file_kw) for p, r in items], chunksize=1)


def merge_summaries(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the ``--json`` summaries of several shards into one (files concatenated, counts summed)."""
    files = [f for d in docs for f in d.get("files", [])]
    keys = ("total", "ok", "empty", "skipped", "failed")
    summary = {k: sum(int(d.get("summary", {}).get(k, 0)) for d in docs) for k in keys}
    summary["seconds"] = round(sum(float(d.get("summary", {}).get("seconds", 0.0)) for d in docs), 3)
    summary["shards"] = len(docs)
    inputs = [f.get("input") for f in files]
    summary["duplicates"] = sorted({i for i in inputs if inputs.count(i) > 1})
    return {"segcli": docs[0].get("segcli") if docs else None, "files": files, "summary": summary}
