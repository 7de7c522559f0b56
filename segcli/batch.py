"""Running a whole batch: one model load for all files, I/O overlapped with compute, optional workers.

``run_batch`` is what ``segcli predict`` calls for any number of inputs. With one worker it streams
through :func:`segcli.pipeline.run_many` (reader and writer threads around the compute). With W
workers it starts W processes, each building its Inferer once from the same (pickled)
:class:`~segcli.options.PredictOptions` with ``cores // W`` threads, so W × threads never exceeds
the cores actually available.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcli import io, memory, pipeline
from segcli.errors import UsageError, bug_message
from segcli.header_needs import header_need
from segcli.inferer import Inferer
from segcli.io.bigtiff import tiff_header
from segcli.io.dicomseries import may_hold_dicom
from segcli.memplan import give_back, rss_now
from segcli.options import PredictOptions
from segcli.outputs import plan_output, planned_outputs
from segcli.report import FileReport
from segcli.runtimes.device import available_cores

_WORKER: dict[str, Any] = {}


#: Name endings of segcli's own outputs: a folder walk leaves such files out (they are earlier results).
OUTPUT_SUFFIXES = ("_seg", "_probs", "_preview", "_instances")


@dataclass
class Inputs:
    """What a command line's inputs expand to: (input, walked root) pairs, and the files a walk left out."""

    items: list[tuple[Path, Path | None]] = field(default_factory=list)
    earlier_outputs: list[Path] = field(default_factory=list)  # *_seg.* etc. found in walked folders
    repeated: list[Path] = field(default_factory=list)  # a file named a second time (a, ./a, /abs/a, or a and its folder)


def expand_inputs(inputs: list[Path], output: Path | None, stdin: Iterable[str] = ()) -> Inputs:
    """Files as given, folders walked recursively (the root kept to mirror the layout), '-' from ``stdin``."""
    found = Inputs()
    given: list[Path] = []
    for p in inputs:  # a path read from stdin is taken exactly as one given on the command line (a folder is walked)
        if str(p) == "-":
            # a list written on Windows ends its lines in \r\n: the \r is no part of a file name
            given.extend(Path(line.rstrip("\r\n")) for line in stdin if line.strip())
        else:
            given.append(p)
    for p in given:
        if p.is_dir() and not io.is_image_path(p):
            # files under -o are earlier outputs, unless -o is this folder or holds it (outputs then go beside
            # the inputs, told apart by their *_seg/*_probs/*_preview names)
            skip_out = output is not None and not _is_within(p, output)
            images = io.list_images(p)
            if not images and may_hold_dicom(p):  # DICOM but no image series (SR, PR...): the reader says why
                found.items.append((p, None))
            for q in images:
                if skip_out and _is_within(q, output):  # type: ignore[arg-type]
                    continue
                if q.name.split(".")[0].endswith(OUTPUT_SUFFIXES):
                    found.earlier_outputs.append(q)  # our own outputs from an earlier run beside the inputs
                    continue
                found.items.append((q, p))
        else:
            found.items.append((p, None))
    seen: set[str] = set()
    kept: list[tuple[Path, Path | None]] = []
    for q, root in found.items:  # the same file twice would be segmented twice into one mask (or refused as a clash)
        key = os.path.normcase(os.path.abspath(q))
        if key in seen:
            found.repeated.append(q)
            continue
        seen.add(key)
        kept.append((q, root))
    found.items = kept
    return found


def _is_within(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def _identity(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


#: The longest file name (bytes) of ext4, XFS, APFS and NTFS: an output named longer cannot be written.
NAME_MAX = 255


def check_no_overwrite(items: list[tuple[Path, Path | None]], options: PredictOptions, output: Path | None, *,
                       other_outputs: Iterable[tuple[str, Path | None]] = ()) -> None:
    """Refuse (UsageError, exit 2) before any work when a planned output is one of the inputs.

    Every mask, probabilities and preview file, and the ``other_outputs`` (--stats, --log-file, ...), is
    compared with every input by resolved path (symlinks followed) and by file identity (hard links),
    including the files of DICOM series folders.
    """
    by_path: dict[Path, Path] = {}
    by_id: dict[tuple[int, int], Path] = {}

    def add(f: Path, owner: Path) -> None:
        by_path.setdefault(f.resolve(), owner)
        ident = _identity(f)
        if ident is not None:
            by_id.setdefault(ident, owner)

    for path, _ in items:
        add(path, path)
        if path.is_dir():
            for f in path.iterdir():
                if f.is_file():
                    add(f, path)

    def clash(target: Path) -> Path | None:
        return by_path.get(target.resolve()) or by_id.get(_identity(target) or (-1, -1))

    for path, root in items:
        try:
            out = plan_output(options, path, output, root)
        except (OSError, ValueError):
            continue  # the per-file run reports bad names
        for what, target in planned_outputs(options, out):
            if len(os.fsencode(target.name)) > NAME_MAX:
                raise UsageError(f"{path}: its {what} name {target.name[:40]}... is {len(os.fsencode(target.name))} "
                                 f"bytes, over the {NAME_MAX}-byte limit of file names; rename the input or give -o")
            owner = clash(target)
            if owner is not None:
                same = "itself" if owner == path else f"the input {owner}"
                raise UsageError(f"{path}: its {what} {target} would overwrite {same}; refusing (choose another "
                                 "-o)")
    for what, target in other_outputs:
        if target is not None and (owner := clash(target)) is not None:
            raise UsageError(f"{what} {target} would overwrite the input {owner}; refusing")


#: Input content kinds that are (or may be) 3D, and mask formats that cannot hold a 3D mask.
_VOLUME_CONTENT = ("nifti", "nifti-gz", "nrrd", "metaimage", "dicom")
_FLAT_OUTPUTS = (".png", ".bmp", ".jpg", ".jpeg")


#: File extensions of pictures no mask is written as: -o NAME.webp had made a folder named NAME.webp.
_PICTURE_ONLY = (".jpg", ".jpeg", ".webp", ".gif", ".jp2", ".j2k", ".heic", ".avif", ".svs", ".ndpi", ".mrxs",
                 ".scn", ".czi", ".bif", ".vsi")


def _check_picture_output(output: Path | None) -> None:
    """``-o`` naming a picture file that cannot hold a mask: refused before work, not taken for a folder."""
    if output is None or str(output).endswith(("/", os.sep)) or output.is_dir():
        return
    ext = output.suffix.lower()
    if ext in (".jpg", ".jpeg"):
        raise UsageError(f"-o {output}: masks are never written as JPEG (lossy compression corrupts labels); "
                         "use .png, .tif, .nii.gz, .mha, .nrrd or a folder")
    if ext in _PICTURE_ONLY:
        raise UsageError(f"-o {output}: a mask cannot be written as {ext}; use .png, .tif, .nii.gz, .mha, .nrrd "
                         "or a folder (a folder of that name must exist already)")


def check_output_formats(items: list[tuple[Path, Path | None]], options: PredictOptions, output: Path | None) -> None:
    """Refuse (exit 2, before any work) an output format that cannot hold the result: a volume's mask as PNG."""
    _check_picture_output(output)
    if output is None or output.suffix.lower() not in _FLAT_OUTPUTS:
        return
    for path, root in items:
        content = "dicom" if io.is_dicom_series(path) else io.sniff_input(path)
        if content in _VOLUME_CONTENT and content != "dicom":
            head = io.header_size(path, content)
            if head is None or len(head[0]) < 3 or min(head[0]) < 2:
                continue  # a 2D (or one-slice) image fits a PNG; an unreadable one gets its own error later
        if content in _VOLUME_CONTENT:
            out = plan_output(options, path, output, root, content)
            raise UsageError(f"{path}: a volume's mask cannot be written as {out.suffix}; use .nii.gz, .mha or .nrrd")


def check_budget(seg: Inferer, items: list[tuple[Path, Path | None]], workers: int,
                 output: Path | None = None) -> None:
    """Make the memory plan of every kind of input in ``items`` now, so a budget below the smallest plan is
    refused before any file is read (segcli.memplan), and refuse the run (exit 2) when no file fits.

    With ``workers`` > 1 the parent measures, then releases its networks (each worker loads its own), and
    every worker gets (budget − the parent's RSS) / ``workers``.
    """
    kinds = sorted(kinds_needed(items))
    seg.workers = max(1, workers)
    seg.run_budget = seg.options.budget
    if seg.workers > 1:
        for kind in kinds:
            seg.plan_minimum(kind)  # measured now, with the networks loaded, and kept when they go
        seg.parent_bytes = seg.release_networks()
        seg.budget = max(0, seg.run_budget - seg.parent_bytes) // seg.workers
        seg._plans.clear()
    for kind in kinds:
        seg.memory_plan(kind)
    check_some_file_fits(seg, items, output)


def check_some_file_fits(seg: Inferer, items: list[tuple[Path, Path | None]], output: Path | None = None) -> None:
    """UsageError (exit 2, before any work) when no input's header leaves it room in the budget.

    Only what a header tells is counted (segcli.header_needs: photos, volumes, TIFF and OpenSlide slides, DICOM
    series); a run with any other input, or one file that fits, goes on, and each file that does not fit is
    refused alone when it is read (segcli.memory). ``output``: the -o of the run (a TIFF's route depends on it).
    """
    worst = None
    for path, root in items:
        try:
            out = plan_output(seg.options, path, output, root)
        except (OSError, ValueError):
            out = None
        need = header_need(seg, path, out)
        if need is None or memory.fits(seg, need[0], need[1]):
            return
        total = memory.file_need(seg, need[0], need[1])
        if worst is None or total < worst[0]:
            worst = (total, path, need[2])
    if worst is None:
        return
    more = f" (and so does every other of the {len(items)} inputs)" if len(items) > 1 else ""
    with_w = f" with --workers {seg.workers}" if seg.workers > 1 else ""
    raise UsageError(f"{worst[1]}: {worst[2]} needs at least {memory.human(worst[0])}{with_w}{more}; "
                     f"{memory.budget_words(seg.run_budget, seg.options.max_memory is not None)}")


def kinds_needed(items: list[tuple[Path, Path | None]]) -> set[str]:
    """Which default bundles a batch will load ("2d", "slide", "volume"), from each input's header."""
    kinds: set[str] = set()
    for path, _ in items:
        content = "dicom" if io.is_dicom_series(path) else io.sniff_input(path)
        if content == "tiff":
            head = tiff_header(path)
            kinds.add("slide" if head is not None and head[1] in (3, 4) else "2d")
        elif content in _VOLUME_CONTENT:
            head = None if content == "dicom" else io.header_size(path, content)
            kinds.add("2d" if head is not None and (len(head[0]) < 3 or min(head[0]) < 2) else "volume")
        elif content is not None:
            kinds.add("2d")
    return kinds


def check_unique_outputs(items: list[tuple[Path, Path | None]], output: Path | None,
                         options: PredictOptions) -> list[FileReport]:
    """Inputs whose mask would overwrite another input's mask (``a.png`` and ``a.jpg`` → ``a_seg.png``).

    Such a pair is refused up front; otherwise two workers, or one worker twice, would write the
    same file.
    """
    seen: dict[Path, Path] = {}
    clashes = []
    for path, root in items:
        try:
            out = plan_output(options, path, output, root).resolve()
        except Exception:  # the per-file run reports bad names properly
            continue
        if out in seen and seen[out] != path:
            clashes.append(FileReport(input=str(path), output=str(out), status="failed",
                                      error=f"{path}: its mask {out} would overwrite the mask of {seen[out]}; "
                                            "rename one or use separate -o folders"))
        else:
            seen[out] = path
    return clashes


def _init_worker(options: PredictOptions, workers: int = 1, parent_bytes: int = 0, run_budget: int = 0) -> None:
    seg = Inferer(options)
    seg.workers, seg.parent_bytes, seg.run_budget = workers, parent_bytes, run_budget or seg.budget
    _WORKER["seg"] = seg


def _run_one(args: tuple[Path, Path | None, Path | None]) -> FileReport:
    path, root, output = args
    try:
        return pipeline.run_one(_WORKER["seg"].context(), path, output, input_root=root)
    except Exception as exc:  # never let one file kill a worker
        return FileReport(input=str(path), status="failed", error=bug_message(exc, path))


def run_batch(
    items: list[tuple[Path, Path | None]],
    options: PredictOptions,
    *,
    output: Path | None = None,
    workers: int = 1,
    prefetch: int = 2,
    inferer: Inferer | None = None,
    progress_for: Callable[[Path], Any] | None = None,
    parent_bytes: int | None = None,
) -> Iterator[FileReport]:
    """Yield one report per input, in input order (``inferer``: one already built from ``options``).

    With ``workers`` > 1, each worker gets (budget − ``parent_bytes``) / ``workers``: ``parent_bytes`` is
    this process's RSS once it released its networks (:func:`check_budget`), measured here if not given.
    """
    if workers <= 1:
        yield from pipeline.run_many(inferer or Inferer(options), items, output, prefetch=prefetch,
                                     progress_for=progress_for)
        return

    # Each worker is a process with its own interpreter, networks and caches: it plans for its share of
    # what the parent leaves (the parent's networks are released before the workers start).
    if parent_bytes is None:
        if inferer is not None:
            inferer.release_networks()
        give_back()
        parent_bytes = rss_now()
    share = max(1, (options.budget - parent_bytes) // workers)
    per_worker = options.replace(threads=max(1, (options.threads or available_cores()) // workers),
                                 max_memory=share)
    # lazy: multiprocessing and the process pool (5 ms at start-up) only where --workers asks for processes
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(per_worker, workers, parent_bytes, options.budget)) as pool:
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
