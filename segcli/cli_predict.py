"""The steps of ``segcli predict`` after its flags are parsed: the checks before any work, the batch with its
progress display and per-file extras, and the summary. Split from :mod:`segcli.cli`, which keeps the flags.

Every check here raises a :class:`~segcli.errors.SegcliError` (a usage error exits 2) before any file is
read; ``cli.predict`` turns it into the one-line message and the exit code.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from segcli import __version__, io, viz
from segcli.batch import (
    Inputs,
    check_budget,
    check_no_overwrite,
    check_output_formats,
    check_unique_outputs,
    expand_inputs,
    kinds_needed,
    run_batch,
)
from segcli.cli_report import (
    check_output_kinds,
    interrupt_exit,
    new_batch,
    progress_display,
    report_line,
    summary_line,
)
from segcli.errors import BundleError, SegcliError, UsageError
from segcli.inferer import Inferer
from segcli.io.dicomseries import seg_refusal
from segcli.memplan import peak_rss
from segcli.report import FileReport
from segcli.runtimes.onnx_cache import EXPORTS
from segcli.shard import parse_shard, select_shard, shard_from_env

log = logging.getLogger("segcli")


def open_inputs(seg: Inferer, inputs: list[Path], output: Path | None) -> Inputs:
    """A given --model loaded once (a bad one is a usage error, reported once, not per file), then the inputs
    expanded (folders walked, '-' read from stdin)."""
    options = seg.options
    if options.model is not None:
        try:  # a first-use ONNX export that would not fit --max-memory is refused here (exit 2)
            bundle = seg.warm_up("2d")
        except BundleError as exc:
            raise UsageError(str(exc)) from None
        if options.window is not None and bundle.normalization.get("kind") != "ct_window":
            raise UsageError(f"--window maps an 8-bit CT export to HU, but model {bundle.name} does not take CT in HU")
    return expand_inputs(inputs, output, sys.stdin if any(str(p) == "-" for p in inputs) else ())


def _check_runtime_and_budget(seg: Inferer, items: list[tuple[Path, Path | None]], workers: int,
                              output: Path | None) -> None:
    options = seg.options
    if options.model is None and (options.backend != "auto" or options.device != "auto"):
        try:  # a runtime the default bundles cannot serve fails once, here, not once per file
            for kind in sorted(kinds_needed(items)):
                seg.warm_up(kind)
        except SegcliError as exc:
            raise UsageError(str(exc)) from None
    if options.max_memory is not None or workers > 1:
        # the memory plan of each kind of input, made before any work: too small a budget is refused here
        check_budget(seg, items, workers, output)


def _check_output_place(items: list[tuple[Path, Path | None]], options: Any, output: Path | None) -> None:
    if options.output_type == "dicom-seg":
        for path, _ in items:
            if not io.is_dicom_series(path) and not io.is_multiframe_dicom(path):
                raise UsageError(f"{path}: --output-type dicom-seg needs a DICOM series folder (or one enhanced "
                                 "multi-frame file) as input; write NIfTI (the default) for other inputs")
            if (why := seg_refusal(path)) is not None:
                raise UsageError(f"{path}: --output-type dicom-seg: {why}")
    if len(items) > 1 and output is not None and output.suffix and not output.is_dir():
        raise UsageError(f"-o {output} looks like a file but there are {len(items)} inputs; give a folder")
    if output is not None and output.exists() and not output.is_dir() and any(root for _, root in items):
        raise UsageError(f"-o {output} is an existing file but the input is a folder; give a folder for -o")
    check_output_kinds(items, options, output)


def check_before_work(seg: Inferer, found: Inputs, output: Path | None, *, workers: int, prefetch: int,
                      shard: str | None, quiet: bool, other_outputs: list[tuple[str, Path | None]]
                      ) -> tuple[list[tuple[Path, Path | None]], list[FileReport]]:
    """Everything checked before the first file is read; returns this shard's items and the inputs left out
    because their masks would clash (as failed reports)."""
    options, items = seg.options, found.items
    if not items:
        raise UsageError("no input images found" + (f" ({len(found.earlier_outputs)} file(s) named *_seg/*_probs/"
                                                    "*_preview were left out as earlier outputs)"
                                                    if found.earlier_outputs else ""))
    _check_runtime_and_budget(seg, items, workers, output)
    _check_output_place(items, options, output)
    if shard is None and (from_env := shard_from_env()) is not None:
        shard = from_env[0]
        if not quiet:
            print(f"segcli: shard {shard} (from {from_env[1]})", file=sys.stderr)
    if shard is not None:
        k, n = parse_shard(shard)
        items = select_shard(items, k, n, key=lambda it: it[0])
    check_output_formats(items, options, output)
    check_no_overwrite(items, options, output, other_outputs=other_outputs)
    if output is not None and (len(items) > 1 or any(root for _, root in items)):
        output.mkdir(parents=True, exist_ok=True)
    if found.earlier_outputs and not quiet:
        print(f"segcli: note: left out {len(found.earlier_outputs)} file(s) named *_seg/*_probs/*_preview in the "
              "input folders (earlier outputs)", file=sys.stderr)
    if found.repeated and not quiet:
        print(f"segcli: note: {len(found.repeated)} input(s) named more than once are segmented once "
              f"(e.g. {found.repeated[0]})", file=sys.stderr)
    clashes = check_unique_outputs(items, output, options)
    clash_inputs = {c.input for c in clashes}
    items = [it for it in items if str(it[0]) not in clash_inputs]
    log.debug("segcli %s: %d input(s), shard %s, workers %d, prefetch %d", __version__, len(items), shard, workers,
              prefetch)
    return items, clashes


def run_with_progress(console: Any, quiet: bool, seg: Inferer, items: list[tuple[Path, Path | None]],
                      clashes: list[FileReport], output: Path | None, *, workers: int, prefetch: int,
                      preview: bool, arsm_maps: Path | None) -> list[FileReport]:
    """The batch, one report line per file as it finishes, under a progress display on stderr."""
    new_batch()  # each note once per batch, not once per process (a library caller runs several batches)
    reports = list(clashes)
    for rep in clashes:
        report_line(console, rep)
    with progress_display(console, quiet) as prog:
        overall = prog.add_task("files", total=len(items)) if prog else None
        stage = {"task": None}

        def progress_for(path: Path):
            if prog is None:
                return None
            if stage["task"] is not None:
                prog.remove_task(stage["task"])
            # lazy: a progress display is rich's already; a file name's brackets are shown, never read as markup
            from rich.markup import escape

            shown = escape(path.name)
            stage["task"] = prog.add_task(f"  {shown}: reading, rough pass", total=None)

            def on_progress(name: str, done: int, total: int, _t=stage["task"], _n=shown) -> None:
                prog.update(_t, description=f"  {_n}: {name}", completed=done, total=total)

            return on_progress

        try:
            for rep in run_batch(items, seg.options, output=output, workers=workers, prefetch=prefetch,
                                 inferer=seg if workers == 1 else None, progress_for=progress_for,
                                 parent_bytes=seg.parent_bytes if workers > 1 else None):
                reports.append(rep)
                _extras(seg, rep, preview, arsm_maps)
                if log.isEnabledFor(logging.DEBUG):  # the record is built only for --log-file (0.5 ms a photo)
                    log.debug("file %s: %s", rep.input, json.dumps(rep.to_dict(), default=str))
                if prog is not None:
                    prog.advance(overall)
                report_line(console, rep)
        except KeyboardInterrupt as exc:
            raise interrupt_exit(exc, resume_hint=True) from None
    return reports


def _extras(seg: Inferer, rep: FileReport, preview: bool, arsm_dir: Path | None) -> None:
    """--preview and --arsm-maps: pictures after a file is done; a failure here is a warning, not a failed file."""
    if rep.status not in ("ok", "empty"):
        return
    if preview and "preview" not in rep.info and rep.output:  # images read whole got theirs in the writer thread
        try:
            p = viz.write_preview_for(rep, segmenter=seg)
            rep.info["preview"] = str(p)
        except (SegcliError, ValueError, OSError, MemoryError) as exc:  # a missing preview fails the file: exit 1
            rep.status = "failed"
            rep.error = f"{rep.input}: preview not written: {exc}"
    if arsm_dir is not None:
        try:
            rep.info["arsm_maps"] = [str(p) for p in viz.write_arsm_maps_for(seg, Path(rep.input), arsm_dir)]
        except (SegcliError, ValueError, OSError) as exc:
            rep.warnings.append(f"no ARSM maps: {exc}")


def summarize(reports: list[FileReport], seg: Inferer, found: Inputs, *, workers: int, t_start: float,
              json_out: bool, quiet: bool) -> int:
    """The ``--json`` summary on stdout, the summary line and the recap of failures on stderr; returns the
    number of failed inputs."""
    failed = [r for r in reports if r.status == "failed"]
    summary = {
        "segcli": __version__,
        "memory": {"budget_mb": round(seg.options.budget / 1e6, 1), "workers": workers, **peak_rss(),
                   **({"parent_mb": round(seg.parent_bytes / 1e6, 1), "worker_budget_mb": round(seg.budget / 1e6, 1)}
                      if workers > 1 else {}),
                   # first-use ONNX exports: the parent's RSS then, the child's peak, the need predicted (MB)
                   **({"onnx_exports": list(EXPORTS)} if EXPORTS else {})},
        "files": [r.to_dict() for r in reports] if json_out else [],  # only --json prints them
        "summary": {
            "total": len(reports),
            "ok": sum(r.status == "ok" for r in reports),
            "empty": sum(r.status == "empty" for r in reports),
            "skipped": sum(r.status == "skipped" for r in reports),
            "failed": len(failed),
            "earlier_outputs_left_out": len(found.earlier_outputs),
            "seconds": round(time.perf_counter() - t_start, 3),
            # loading the models, with their ONNX export on first use (before the batch when --model is given)
            "model_load_seconds": round(seg.load_seconds.get("total", 0.0), 3),
        },
    }
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    if not quiet and len(reports) > 1:
        summary_line(summary["summary"])
    if failed and len(reports) > 1:  # a recap at the end of a long batch log; one input's error was printed once
        print(f"segcli: {len(failed)} of {len(reports)} input(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r.error}", file=sys.stderr)
    return len(failed)
