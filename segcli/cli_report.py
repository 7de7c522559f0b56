"""The CLI's reporting and process plumbing: per-file lines, progress display, signals, help rendering and
up-front option checks. Split from :mod:`segcli.cli` to keep both short; nothing here segments."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import typer
from typer import core

from segcli.errors import UsageError

# Lazy on purpose: segcli.cli loads this module at startup, so segcli's modules beyond errors, methods and
# params are imported inside the commands that need them: `segcli --help` and usage errors (exit 2)
# answer without numpy and the engines. Each such import says what it brings.

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM, Kubernetes, ``timeout``), handled like Ctrl-C but exiting 143 (128 + 15)."""


#: The first SIGINT/SIGTERM received. Later ones are ignored, so a second Ctrl-C cannot break the clean-up
#: (locks, temporary files) into a KeyboardInterrupt traceback; the exit code follows the first signal,
#: even when a library (the ONNX export) turned the exception into another on its way up.
_SIGNALLED: list[int] = []


def on_signal(signum: int, frame: Any) -> None:
    if _SIGNALLED:
        return
    _SIGNALLED.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def signalled() -> bool:
    """True once SIGINT or SIGTERM has been received."""
    return bool(_SIGNALLED)


def interrupt_exit(exc: BaseException | None = None, resume_hint: bool = False) -> typer.Exit:
    """The one line and exit code for an interrupted run: 143 for SIGTERM, 130 for Ctrl-C."""
    terminated = isinstance(exc, Terminated) or (bool(_SIGNALLED) and _SIGNALLED[0] == signal.SIGTERM)
    what = "terminated" if terminated else "interrupted"
    print(f"segcli: {what}" + ("; rerun with --skip-existing to resume" if resume_hint else ""), file=sys.stderr)
    return typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)

def plain_help_types() -> None:
    """Typer >= 0.26 prints a type column (``<bool>`` on flags and on --help, ``<list[Path]>`` on
    variadic arguments) that says nothing a user needs; flags show no type and arguments show their metavar.
    Older typer (the dependency range starts at 0.12) has no such column and is left as it is."""
    opt, arg = getattr(core, "TyperOption", None), getattr(core, "TyperArgument", None)
    if opt is not None and hasattr(opt, "display_type_rich") and not getattr(opt, "_segcli_plain", False):
        shown = opt.display_type_rich

        def option_type(self, ctx):
            if getattr(self, "is_flag", False):
                return None
            text = shown(self, ctx)  # a repeatable option: its element type ("repeatable" is in its help)
            return f"<{text[6:-2]}>" if isinstance(text, str) and text.startswith("<list[") and text.endswith("]>") \
                else text

        opt.display_type_rich, opt._segcli_plain = option_type, True
    if arg is not None and hasattr(arg, "display_type_rich") and not getattr(arg, "_segcli_plain", False):
        arg_shown = arg.display_type_rich

        def argument_type(self, ctx):
            return None if self.metavar or self.nargs != 1 else arg_shown(self, ctx)

        arg.display_type_rich, arg._segcli_plain = argument_type, True


def check_output_kinds(items, options, output: Path | None) -> None:
    """Options that cannot apply to these inputs are refused before work (exit 2), never ignored in silence."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli import io

    if options.output_type == "dicom-seg" and output is not None and output.suffix \
            and not output.name.lower().endswith(".dcm") and not output.is_dir():
        raise UsageError(f"-o {output} with --output-type dicom-seg: a DICOM SEG is written as NAME.dcm; "
                         "give -o NAME.dcm or a folder")
    if not options.geojson:
        return
    for path, _ in items:
        if io.is_dicom_series(path):
            volume = True
        else:
            content = io.sniff_input(path)
            head = io.header_size(path, content) if content in ("nifti", "nifti-gz", "nrrd", "metaimage") else None
            volume = head is not None and len(head[0]) == 3 and min(head[0]) > 1
        if volume:
            raise UsageError(f"{path}: --geojson writes polygons for 2D images and slides, and this input is a "
                             "volume; drop --geojson for volumes")


def summary_line(s: dict[str, Any]) -> None:
    """One closing line for a human or a SLURM log: counts, time and throughput."""
    done = s["ok"] + s["empty"]
    rate = f", {done / s['seconds']:.2f} files/s" if s["seconds"] > 0 and done else ""
    left = f", {s['earlier_outputs_left_out']} earlier outputs left out" if s.get("earlier_outputs_left_out") else ""
    print(f"segcli: {s['total']} input(s): {s['ok']} ok, {s['empty']} empty, {s['skipped']} skipped, "
          f"{s['failed']} failed in {s['seconds']:.1f} s{rate}{left}", file=sys.stderr)


class PlainConsole:
    """stderr without rich, for ``--quiet`` and for a stderr that is not a terminal (a batch job's log, a pipe).

    rich prints no colour there, yet importing it is 20-40 ms of every run's start-up."""

    is_terminal = False

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def print(self, text: str, **_: Any) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _tagged(console, colour: str, word: str, rest: str) -> None:
    """``word`` in ``colour`` on a terminal, then ``rest`` as it is: a file name's brackets are never markup."""
    if isinstance(console, PlainConsole):
        console.print(word + rest)
        return
    from rich.markup import escape  # lazy: only a terminal's console is rich's

    console.print(f"[{colour}]{word}[/{colour}]{escape(rest)}", markup=True, soft_wrap=True)


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def progress_display(console, quiet: bool):
    """A rich progress display on a TTY; nothing at all when stderr is piped or --quiet."""
    if quiet or not console.is_terminal:
        return _NoProgress()
    # lazy: rich costs ~40 ms to import; only the output that uses it loads it
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """done/total where the total is known; nothing (not "0/?") while a stage cannot count."""

        def render(self, task):  # type: ignore[no-untyped-def]
            return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")

    class Eta(ProgressColumn):
        """The time left, once rich can estimate it from the steps done so far."""

        def render(self, task):  # type: ignore[no-untyped-def]
            left = task.time_remaining if task.total is not None and not task.finished else None
            return Text("" if left is None else f"ETA {int(left) // 60}:{int(left) % 60:02d}")

    return Progress(TextColumn("{task.description}"), BarColumn(), Count(), TimeElapsedColumn(), Eta(),
                    console=console, transient=True)


_NOTES_SHOWN: set[str] = set()


def new_batch() -> None:
    """Forget the notes shown: each batch says its notes once."""
    _NOTES_SHOWN.clear()


def report_line(console, rep) -> None:
    """One line per input. A failure reaches stderr even under --quiet (exit 1 must never come silent);
    a note (the model chosen for the user, a conversion) is printed once per batch, the JSON keeps it per file."""
    if rep.status == "failed":
        if console.quiet:
            print(f"failed  {rep.error}", file=sys.stderr)
        else:
            _tagged(console, "red", "failed", f"  {rep.error}")
        return
    for n in rep.notes:
        if n not in _NOTES_SHOWN:
            _NOTES_SHOWN.add(n)
            console.print(f"note    {n}", markup=False, soft_wrap=True)
    for w in rep.warnings:
        _tagged(console, "yellow", "warning", f" {rep.input}: {w}")
    if rep.status == "skipped":
        console.print(f"skipped {rep.input} (exists: {rep.output})", soft_wrap=True, markup=False)
        return
    found = ", ".join(f"{k} {v}" for k, v in rep.voxel_counts.items() if v) or "nothing found"
    target = rep.output if rep.output is not None else "no mask written"
    console.print(f"ok      {rep.input} -> {target}  ({rep.model or 'no model'}; {rep.seconds.get('total', 0):.2f} s; "
                  f"{found})", soft_wrap=True, markup=False)


def summary_shape_problem(doc: Any) -> str | None:
    """What makes ``doc`` not a ``predict --json`` summary (an object with a "files" list of objects and a
    "summary" object of numbers), or None."""
    if not isinstance(doc, dict):
        return f"the top level is a JSON {type(doc).__name__}, not an object"
    files, summary = doc.get("files"), doc.get("summary")
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        return '"files" is not a list of objects'
    if not isinstance(summary, dict):
        return '"summary" is not an object'
    for k in ("total", "ok", "empty", "skipped", "failed", "seconds"):
        v = summary.get(k, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f'"summary.{k}" is not a number'
    return None


def spacing_text(spacing: Any) -> str:
    """A spacing (mm, array order) with its unit: micrometres for microscopy-scale pixels (under 0.01 mm),
    so a slide's 0.00025 is read as 0.25 µm, never as a bare number taken for mm."""
    if not spacing:
        return "unknown (pixels)"
    values = [float(v) for v in spacing]
    if max(values) < 0.01:
        return " x ".join(f"{v * 1000:.4g}" for v in values) + " µm"
    return " x ".join(f"{v:.4g}" for v in values) + " mm"
