"""Running a whole batch: one model load for all files, I/O overlapped with compute, optional workers.

``run_batch`` is what ``segcli predict`` calls for any number of inputs. With one worker it streams
through :meth:`Segmenter.predict_many` (reader and writer threads around the compute). With W
workers it starts W processes, each building its Segmenter once from the same (pickled)
:class:`~segcli.options.PredictOptions` with ``cores // W`` threads, so W × threads never exceeds
the cores actually available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from segcli.api import Segmenter
from segcli.errors import bug_message
from segcli.options import PredictOptions
from segcli.report import FileReport

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


def _init_worker(options: PredictOptions) -> None:
    _WORKER["seg"] = Segmenter(options=options)


def _run_one(args: tuple[Path, Path | None, Path | None]) -> FileReport:
    path, root, output = args
    try:
        return _WORKER["seg"].predict_file(path, output, input_root=root)
    except Exception as exc:  # never let one file kill a worker
        return FileReport(input=str(path), status="failed", error=bug_message(exc, path))


def run_batch(
    items: list[tuple[Path, Path | None]],
    options: PredictOptions,
    *,
    output: Path | None = None,
    workers: int = 1,
    prefetch: int = 2,
    segmenter: Segmenter | None = None,
    progress_for: Callable[[Path], Any] | None = None,
) -> Iterator[FileReport]:
    """Yield one report per input, in input order (``segmenter``: one already built from ``options``)."""
    if workers <= 1:
        seg = segmenter or Segmenter(options=options)
        yield from seg.predict_many(items, output, prefetch=prefetch, progress_for=progress_for)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from segcli.runtimes.device import available_cores

    per_worker = options.replace(threads=max(1, (options.threads or available_cores()) // workers))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(per_worker,)) as pool:
        yield from pool.map(_run_one, [(p, r, output) for p, r in items], chunksize=1)


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
