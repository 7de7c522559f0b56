"""The command line: parse, call :mod:`segcli.api`, report. No segmentation logic lives here.

stdout carries data (``--json``); stderr carries messages and progress. Exit codes:
0 everything succeeded, 1 some inputs failed (each is named), 2 usage error, 3 internal error
(a segcli bug: a short message plus the path of a log with the traceback), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from segcli import __version__
from segcli.cli_report import (
    PlainConsole,
    interrupt_exit,
    on_signal,
    plain_help_types,
    signalled,
    spacing_text,
    summary_shape_problem,
)
from segcli.errors import BundleError, SegcliError, bug_message
from segcli.methods import METHODS
from segcli.params import check_range

# Lazy on purpose: segcli's modules beyond errors, methods and params are imported inside the commands that
# need them, so that `segcli --help` and usage errors (exit 2) answer without numpy and the engines (50 ms
# against 200). Each such import says what it brings.

# Before torch or ONNX Runtime load: OpenMP threads that spin while waiting get descheduled on a
# machine shared with other jobs (a batch node, CI), which made steps 5-10x slower here; passive
# waiting costs little on a quiet machine. An explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's BLAS only runs the engines' small resize products; a second BLAS thread competing with torch's
# made stts 3x slower overall on a loaded 2-core machine (benchmarks/README.md, bench_speed.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143

app = typer.Typer(
    name="segcli",
    help=(
        "Coarse-to-fine segmentation of large medical images (segment-then-segment, uncertainty-patch "
        "refinement). Exit codes: 0 ok, 1 some inputs failed, 2 usage error, 3 internal error, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("segcli")
plain_help_types()


def _stderr_console(quiet: bool = False):
    if quiet or not sys.stderr.isatty():
        return PlainConsole(quiet)
    # lazy: rich costs 20-40 ms to import; only a terminal gets it (colour, progress bars)
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, no_color=bool(os.environ.get("NO_COLOR")), highlight=False)


def _file_option(flag: str, path: Path | None) -> None:
    """A file an option writes (--stats, --log-file): never a folder; its missing folders are created,
    as they are for -o. Fails with exit 2 before any work."""
    if path is None:
        return
    if path.is_dir():
        raise _fail(f"{flag} {path} is a folder; give a file name", EXIT_USAGE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # lazy: brings numpy; `segcli --help` runs without it
        from segcli.io.atomic import os_error_words

        raise _fail(f"{flag} {path}: cannot create its folder ({os_error_words(exc) or exc})", EXIT_USAGE) from None


def _setup_logging(log_file: Path | None) -> Path | None:
    """segcli's debug log (``--log-file``); library warnings (numpy, torch, highdicom) go there, not to stderr."""
    # debug records only when a log takes them: without one, a batch built each file's record for nobody
    log.setLevel(logging.DEBUG if log_file is not None else logging.WARNING)
    _file_option("--log-file", log_file)
    logging.captureWarnings(True)
    lib = logging.getLogger("py.warnings")
    lib.propagate = False
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        lib.addHandler(handler)
    else:
        lib.addHandler(logging.NullHandler())
    return log_file


def _bug(exc: BaseException) -> None:
    """A segcli bug: one short line on stderr, the traceback in the log file or a temporary file."""
    print(f"segcli: {bug_message(exc)}", file=sys.stderr)


def _fail(message: str, code: int) -> typer.Exit:
    print(f"segcli: error: {message}", file=sys.stderr)
    return typer.Exit(code)


@app.command(epilog=(
    "Examples:\n\n"
    "  segcli predict scan.nii.gz                     # mask beside it: scan_seg.nii.gz, same grid\n\n"
    "  segcli predict slides/ -o masks/ --model nuclei --preview\n\n"
    "  segcli predict series_folder/ -o out/ --output-type dicom-seg\n\n"
    "  find data -name '*.nii.gz' | segcli predict - -o masks/ --skip-existing --json > run.json\n\n"
    "  sbatch --array=0-9 --wrap 'segcli predict data/ -o masks/'   # shard K/10 from SLURM's variables"))
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Images, volumes, DICOM folders or folders of them; '-' reads paths from stdin.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file (one input) or folder. Default: beside each input, as NAME_seg.EXT.", rich_help_panel="Input and output")] = None,
    model: Annotated[str | None, typer.Option("-m", "--model", help="Bundle folder or shipped model name (see `segcli models`). Default: models/index.json.", rich_help_panel="Model and method")] = None,
    method: Annotated[str | None, typer.Option(help=f"{' | '.join(METHODS)} (default: the bundle's).", rich_help_panel="Model and method")] = None,
    backend: Annotated[str, typer.Option(help="auto (ONNX Runtime on the CPU: the bundle's export, else one made on first use and cached; torch on CUDA) | torch | onnx", rich_help_panel="Performance")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (int8 where the bundle carries a checked int8 export, on the CPU; else fp32) | fp32 | fp16 (CUDA) | bf16 (torch, CPUs with native bf16) | int8", rich_help_panel="Performance")] = "auto",
    onnx_cache: Annotated[str | None, typer.Option(help="Folder for first-use ONNX exports, or off [default: $SEGCLI_ONNX_CACHE, else ~/.cache/segcli/onnx]", rich_help_panel="Performance")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N", rich_help_panel="Performance")] = "auto",
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: the cores really available) [1–1024].", rich_help_panel="Performance")] = None,
    channels: Annotated[str, typer.Option(help="keep | grey | rgb: channel conversion when the image and model differ (keep: a grey image given to an RGB model is repeated into 3 channels, with a note).", rich_help_panel="Model and method")] = "keep",
    window: Annotated[str | None, typer.Option(help="C,W: the CT window (centre, width in HU) an 8-bit PNG/JPEG export of CT was made with, e.g. -600,1500; its 0-255 values are mapped back to HU. Implies a CT model when no --model is given. Default: none (the pixels are taken as they are).", rich_help_panel="Model and method")] = None,
    tta: Annotated[str, typer.Option(help="none | flips | dihedral: test-time augmentation, each network input's probabilities averaged over its 4 flips (4x the network work) or flips and transposes (8x). Measured: em-vnc's synapse IoU 0.60 -> 0.63 on its test slices, polyp's Dice unchanged (MODELS.md).", rich_help_panel="Model and method")] = "none",
    size: Annotated[int | None, typer.Option(help="Network input size S (default: the bundle's) [8–8192].", rich_help_panel="Model and method")] = None,
    pad: Annotated[int | None, typer.Option(help="stts: crop padding k in full-resolution px (default S//8) [≥ 0].", rich_help_panel="Method parameters")] = None,
    threshold: Annotated[float | None, typer.Option(help="Foreground probability threshold (binary models) [0–1]. Default: the bundle's, else 0.5.", rich_help_panel="Method parameters")] = None,
    keep_coarse: Annotated[bool | None, typer.Option("--keep-coarse/--no-keep-coarse", help="stts: keep the rough mask where no crop reached. Default: the bundle's, else off.", rich_help_panel="Method parameters")] = None,
    square_resize: Annotated[bool, typer.Option("--square-resize", help="Rough pass squashes the image to S×S (the reference) instead of keeping the aspect ratio.", rich_help_panel="Method parameters", metavar=" ")] = False,
    patches: Annotated[int | None, typer.Option(help="refine: number of patches refined at full resolution [≥ 0]. Default: the bundle's, else 8.", rich_help_panel="Method parameters")] = None,
    criterion: Annotated[str | None, typer.Option(help="refine: patch ranking, 'pixel' (mean per-pixel uncertainty) or 'mean' (|mean - 0.5|). Default: the bundle's, else pixel.", rich_help_panel="Method parameters")] = None,
    refine_threshold: Annotated[float | None, typer.Option(help="refine: refine every patch whose uncertainty exceeds this. Default: the bundle's, else off.", rich_help_panel="Method parameters")] = None,
    min_patch_std: Annotated[float | None, typer.Option(help="refine: never refine patches whose rough input is flatter than this std (normalised intensity; e.g. 0.02 skips slide glass) [≥ 0]. Default: the bundle's, else off.", rich_help_panel="Method parameters")] = None,
    patch_size: Annotated[int | None, typer.Option(help="refine: patch side in full-resolution px (default S) [≥ 8].", rich_help_panel="Method parameters")] = None,
    overlap: Annotated[float | None, typer.Option(help="sliding: tile overlap fraction [0–0.95]. Default: the bundle's, else 0.25.", rich_help_panel="Method parameters")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Fine-pass batch size [1–4096]. Default: the bundle's, else 16.", rich_help_panel="Performance")] = None,
    min_volume: Annotated[int | None, typer.Option(help="Volumes, stts: drop rough 3D components smaller than this (rough voxels) [≥ 1]. Default: the bundle's, else 1.", rich_help_panel="Method parameters")] = None,
    lung_gate: Annotated[bool | None, typer.Option("--lung-gate/--no-lung-gate", help="CT volumes: keep only lesions that lie in aerated lung (default: the bundle's; on for covid-ct).", rich_help_panel="Method parameters")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: process shard K (0-based) of N, balanced by file size. Default: from a SLURM or Grid Engine job array's variables, if any.", rich_help_panel="Batch and cluster")] = None,
    workers: Annotated[int, typer.Option(help="Processes sharing the cores (threads each = cores // workers) [1–256].", rich_help_panel="Performance")] = 1,
    prefetch: Annotated[int, typer.Option(help="Files read ahead while the current one computes (0 = off) [0–64].", rich_help_panel="Performance")] = 2,
    stats: Annotated[Path | None, typer.Option(help="Write per-input, per-class statistics (voxels, ml, components, bbox) to this CSV; with --instances also NAME_seg_objects.csv per input (id, centroid, area, bbox, perimeter, circularity, solidity, H&E optical density). Default: none.", rich_help_panel="Input and output")] = None,
    lock: Annotated[bool, typer.Option("--lock", help="Take a lock per output so concurrent segcli processes never compute the same mask.", rich_help_panel="Batch and cluster", metavar=" ")] = False,
    max_memory: Annotated[str | None, typer.Option(help="Memory budget, e.g. 2GB: bounds fine batches and caches; whole-image runs that would not fit are refused up front (default: $SEGCLI_MAX_MEMORY or 70% of available memory).", rich_help_panel="Memory and big images")] = None,
    pyramid: Annotated[bool, typer.Option("--pyramid", help="Big TIFF masks: add pyramid levels (SubIFDs) so slide viewers open them instantly.", rich_help_panel="Memory and big images", metavar=" ")] = False,
    mpp: Annotated[float | None, typer.Option(help="µm/px the coarse network was trained at (overrides the bundle); sets the rough-pass scale on big TIFFs with a resolution [> 0]. Default: the bundle's mpp, if any.", rich_help_panel="Memory and big images")] = None,
    max_downscale: Annotated[float | None, typer.Option(help="Big images: the largest allowed factor between full resolution and the rough pass (default 16); beyond it the rough pass runs tiled [≥ 1].", rich_help_panel="Memory and big images")] = None,
    max_zoom: Annotated[float | None, typer.Option(help="Big images: a fine box wider than S × this is processed as tiles at this zoom (default 4) [≥ 1].", rich_help_panel="Memory and big images")] = None,
    tile_size: Annotated[int, typer.Option(help="Tile size of big TIFF masks [16–4096, a multiple of 16].", rich_help_panel="Memory and big images")] = 512,
    series: Annotated[str | None, typer.Option(help="A DICOM folder holding several series: segment this one (its SeriesInstanceUID, as the warning and `segcli info` name them). Default: the largest, with a warning.", rich_help_panel="Input and output")] = None,
    volume: Annotated[int | None, typer.Option(help="4D DICOM (echoes, phases, diffusion directions, time points): segment volume N (1-based); refused without it. Default: none.", rich_help_panel="Input and output")] = None,
    output_type: Annotated[str, typer.Option("--output-type", help="auto (the format follows -o's extension, else the input's family) | dicom-seg (a DICOM Segmentation referencing the input series; DICOM series inputs only; implied by -o NAME.dcm).", rich_help_panel="Input and output")] = "auto",
    instances: Annotated[bool, typer.Option("--instances", help="Also write NAME_seg_instances.tif: uint32 object ids, touching objects split by a seeded watershed on the distance map (2D images and slides, tile by tile with one id per object across tiles; score with `segcli evaluate --instances`). With --geojson: one QuPath detection per instance, with measurements.", rich_help_panel="Input and output", metavar=" ")] = False,
    geojson: Annotated[bool, typer.Option("--geojson", help="Also write NAME_seg.geojson: one polygon per object in level-0 pixels, for QuPath (2D images and slides; built tile by tile). -o NAME.geojson implies it.", rich_help_panel="Input and output", metavar=" ")] = False,
    preview: Annotated[bool, typer.Option("--preview", help="Also write NAME_seg_preview.jpg: the mask over the image (a few slices for a volume).", rich_help_panel="Input and output", metavar=" ")] = False,
    arsm_maps: Annotated[Path | None, typer.Option(help="ARSM models: write per-class PNGs of the resolution the gate chose into this folder. Default: none.", rich_help_panel="Input and output")] = None,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write float32 class probabilities (NAME_seg_probs.EXT).", rich_help_panel="Input and output", metavar=" ")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip inputs whose mask already exists (resume a batch).", rich_help_panel="Input and output", metavar=" ")] = False,
    half: Annotated[bool, typer.Option("--half", help="Deprecated: the same as --precision fp16.", rich_help_panel="Performance", metavar=" ")] = False,
    allow_unhashed: Annotated[bool, typer.Option("--allow-unhashed", help="Load weights that have no sha256 in segcli.json (refused otherwise; only for bundles you made yourself).", rich_help_panel="Model and method", metavar=" ")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.", rich_help_panel="Reporting", metavar=" ")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.", rich_help_panel="Reporting", metavar=" ")] = False,
    log_file: Annotated[Path | None, typer.Option(help="Write a full debug log (timings per stage, library warnings) here. Default: none.", rich_help_panel="Reporting")] = None,
) -> None:
    """Segment images and volumes; a batch goes on past bad files and exits 1 if any failed.

    Method parameters left unset take the bundle's values (see segcli models), else segcli's defaults.
    """
    # lazy: brings numpy and scipy; `segcli --help` runs without them
    from segcli.api import Segmenter
    from segcli.cli_predict import check_before_work, open_inputs, run_with_progress, summarize
    from segcli.options import PredictOptions

    _setup_logging(log_file)
    _file_option("--stats", stats)
    console = _stderr_console(quiet)
    if half and not quiet:
        console.print("note: --half is deprecated; it is --precision fp16", highlight=False)
    try:
        options = PredictOptions(
            model=model, method=method, backend=backend, precision=precision, onnx_cache=onnx_cache, device=device, threads=threads, channels=channels,
            window=window, half=half, tta=tta, size=size, max_memory=max_memory, pyramid=pyramid, mpp=mpp, max_downscale=max_downscale,
            max_zoom=max_zoom, tile_size=tile_size, probabilities=probabilities, skip_existing=skip_existing,
            output_type="dicom-seg" if output is not None and output.name.lower().endswith(".dcm") else output_type,
            stats=stats is not None, lock=lock, preview=preview, allow_unhashed=allow_unhashed, volume=volume, series=series,
            geojson=geojson or (output is not None and output.name.lower().endswith(".geojson")), instances=instances,
            params={
                "pad": pad, "threshold": threshold, "keep_coarse": keep_coarse, "keep_aspect": False if square_resize else None,
                "patches": patches, "criterion": criterion, "refine_threshold": refine_threshold, "patch_size": patch_size, "min_patch_std": min_patch_std,
                "overlap": overlap, "batch_size": batch_size, "min_volume": min_volume, "lung_gate": lung_gate,
            },
        )
        check_range("workers", workers, 1, 256)
        check_range("prefetch", prefetch, 0, 64)
        seg = Segmenter(options=options)
        found = open_inputs(seg, inputs, output)
    except BundleError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except SegcliError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    try:
        items, clashes = check_before_work(seg, found, output, workers=workers, prefetch=prefetch, shard=shard,
                                           quiet=quiet, other_outputs=[("--stats", stats), ("--log-file", log_file)])
    except SegcliError as exc:
        raise _fail(str(exc), exc.exit_code) from None
    t_start = time.perf_counter()
    reports = run_with_progress(console, quiet, seg, items, clashes, output, workers=workers, prefetch=prefetch,
                                preview=preview, arsm_maps=arsm_maps)
    if stats is not None:
        # lazy: brings numpy and scipy; `segcli --help` runs without them
        from segcli.stats import write_stats_csv

        write_stats_csv(stats, reports)
    if summarize(reports, seg, found, workers=workers, t_start=t_start, json_out=json_out, quiet=quiet):
        raise typer.Exit(EXIT_FAILED)


@app.command("models", epilog=("Examples:\n\n" + "\n\n".join(['  segcli models', '  segcli models --verify', '  segcli models --archs', "  segcli models --json | jq '.[].name'"])))
def models_cmd(
    verify: Annotated[bool, typer.Option("--verify", help="Check every bundle's weights against its recorded SHA-256.")] = False,
    archs: Annotated[bool, typer.Option("--archs", help="List the registered network architectures instead.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of the table.", metavar=" ")] = False,
) -> None:
    """List the shipped model bundles (or the architectures), one line each."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli.bundle import BUNDLE_FILE, default_model_name, load_bundle, models_dir
    from segcli.nets import available

    if archs:
        rows = [{"name": n, "description": s.description, "defaults": s.defaults} for n, s in sorted(available().items())]
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:<12} {r['description']}")
        return
    rows, bad = [], []
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (d / BUNDLE_FILE).is_file():
            continue
        try:
            b = load_bundle(d)
            row = b.summary()
            if verify:
                problems = b.verify()
                row["verified"] = not problems
                if problems:
                    bad.append(f"{d}: {'; '.join(problems)}")
            rows.append(row)
        except SegcliError as exc:
            bad.append(str(exc))
    if json_out:
        print(json.dumps(rows, indent=2, default=str))
    else:
        defaults = {default_model_name("2d"): "default (photos)", default_model_name("volume"): "default (volumes)"}
        slide = default_model_name("slide")
        defaults[slide] = "default (slides)" if slide != default_model_name("2d") else "default (photos, slides)"
        for r in rows:
            mark = defaults.get(r["name"], "")
            print(f"{r['name']:<16} {r['method']:<7} S={r['input_size']:<4} {r['size_bytes'] / 1e6:5.1f} MB  "
                  f"{'/'.join(r['classes'])}{' (+' + r['boundary_class'] + ', --instances)' if r.get('boundary_class') else ''}"
                  f"  {mark}".rstrip())
            print(f"{'':16} {r['val_score_means']}; {r['task']}")
            if r.get("reproduce"):
                print(f"{'':16} reproduce: {r['reproduce']}")
        if not rows:
            print(f"no bundles in {root}")
    for b in bad:
        print(f"segcli: error: {b}", file=sys.stderr)
    if bad:
        raise typer.Exit(EXIT_FAILED)


@app.command(epilog=("Examples:\n\n" + "\n\n".join(['  segcli info scan.nii.gz', '  segcli info series_folder/ slide.svs', '  segcli info mask.dcm --json'])))
def info(
    paths: Annotated[list[Path], typer.Argument(help="Images, volumes or DICOM folders.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of the table.", metavar=" ")] = False,
    series: Annotated[str | None, typer.Option(help="A DICOM folder holding several series: describe this one. Default: the largest.")] = None,
) -> None:
    """Size, spacing, dtype and intensity range of images."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli import io

    results, failed = [], 0
    for p in paths:
        try:
            d = io.describe(p, series)
            results.append(d)
            if not json_out:
                print(f"{p}")
                for k, v in d.items():
                    if k != "path":
                        print(f"  {k:<14} {spacing_text(v) if k == 'spacing' else v}")
        except SegcliError as exc:
            failed += 1
            print(f"segcli: error: {exc}", file=sys.stderr)
    if json_out:
        print(json.dumps(results, indent=2, default=str))
    if failed:
        raise typer.Exit(EXIT_FAILED)


@app.command("merge-summaries", epilog=("Examples:\n\n" + "\n\n".join(['  segcli merge-summaries shard-*.json -o all.json', '  segcli merge-summaries shard-0.json shard-1.json | jq .summary'])))
def merge_summaries_cmd(
    summaries: Annotated[list[Path], typer.Argument(help="--json summaries written by the shards of one batch.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write the merged JSON here (default: stdout).")] = None,
) -> None:
    """Combine the --json summaries of several shards (exit 1 if any file failed or was processed twice)."""
    # lazy: brings numpy and scipy; `segcli --help` runs without them
    from segcli.batch import merge_summaries

    docs = []
    for p in summaries:
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise _fail(f"{p}: not a segcli --json summary ({exc})", EXIT_FAILED) from None
        if problem := summary_shape_problem(doc):
            raise _fail(f"{p}: not a segcli --json summary ({problem})", EXIT_FAILED)
        docs.append(doc)
    merged = merge_summaries(docs)
    text = json.dumps(merged, indent=2, default=str) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        tmp = output.with_name(f".{output.name}.partial")
        tmp.write_text(text)
        tmp.replace(output)
    s = merged["summary"]
    print(f"{s['shards']} shard(s): {s['total']} files, {s['ok']} ok, {s['empty']} empty, {s['skipped']} skipped, "
          f"{s['failed']} failed", file=sys.stderr)
    if s["failed"] or s["duplicates"]:
        raise typer.Exit(EXIT_FAILED)


@app.command(epilog=("Examples:\n\n" + "\n\n".join(['  segcli doctor', '  segcli doctor --json'])))
def doctor(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of the table.", metavar=" ")] = False) -> None:
    """Versions, devices and runtimes actually usable here, and why not."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli.runtimes.device import available_cores

    report: dict[str, Any] = {"segcli": __version__, "python": sys.version.split()[0], "cores_available": available_cores()}
    try:
        # lazy: torch costs ~1.3 s to import
        import torch

        report["torch"] = torch.__version__
        report["torch_cuda"] = torch.cuda.is_available()
        report["torch_cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # report, never crash
        report["torch"] = f"unusable: {exc}"
    if not report.get("torch_cuda"):
        report["torch_cuda_why_not"] = "no CUDA device visible to torch (CPU-only build or no driver)" \
            if "+cpu" not in str(report.get("torch", "")) else "this torch build is CPU-only"
    try:
        # lazy: onnxruntime costs ~0.2 s to import
        import onnxruntime as ort

        report["onnxruntime"] = ort.__version__
        built = ort.get_available_providers()
        report["ort_providers_built"] = built
        usable = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in built:
            if report.get("torch_cuda"):
                usable.insert(0, "CUDAExecutionProvider")
            else:
                report["ort_cuda_why_not"] = "onnxruntime has the CUDA provider, but no CUDA device is usable here"
        else:
            report["ort_cuda_why_not"] = "this onnxruntime build has no CUDA provider"
        report["ort_providers_usable"] = usable
        report["ort_builds_installed"] = dists = _ort_dists()
        if len(dists) > 1:
            report["ort_warning"] = (f"both {' and '.join(dists)} are installed and share one module; keep one: "
                                     "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu")
        elif "CUDAExecutionProvider" not in built:
            report["ort_cuda_how"] = 'pip install "segcli[gpu]" (onnxruntime-gpu), then remove the CPU build (README)'
    except Exception as exc:
        report["onnxruntime"] = f"unusable: {exc}"
    report["default_device"] = "cuda" if report.get("torch_cuda") else "cpu"
    report["onnx_cache"] = _bundle_runtimes(report)
    report["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    for mod in ("SimpleITK", "tifffile", "numpy", "scipy"):
        try:
            m = __import__(mod)
            report[mod] = getattr(m, "__version__", getattr(m, "Version", lambda: "?")() if mod == "SimpleITK" else "?")
        except Exception as exc:
            report[mod] = f"missing: {exc}"
    if json_out:
        print(json.dumps(report, indent=2, default=str))
    else:
        for k, v in report.items():
            if k != "onnx_cache":
                print(f"{k:<22} {v}")
        oc = report["onnx_cache"]
        print(f"{'onnx_cache':<22} {oc['folder']}" + (f"  ({oc['note']})" if oc.get("note") else ""))
        for name, roles in oc["bundles"].items():
            for role, what in roles.items():
                print(f"{'  ' + name + '/' + role:<22} {what}")


def _ort_dists() -> list[str]:
    """The ONNX Runtime distributions pip installed (two at once is the classic broken-CUDA setup)."""
    # lazy: only `segcli doctor` needs importlib.metadata
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return found


def _bundle_runtimes(report: dict[str, Any]) -> dict[str, Any]:
    """What ``--backend auto`` runs for each shipped bundle here: runtime, precision and why (doctor)."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli.bundle import list_models
    from segcli.runtimes.onnx_cache import ENV, cache_root, status

    root = cache_root()
    out: dict[str, Any] = {"folder": str(root) if root else f"off ({ENV})", "bundles": {}}
    if report.get("default_device") == "cuda":
        out["note"] = "on CUDA, --backend auto runs torch (fp16 with --half) unless a bundle carries an export"
    if not str(report.get("onnxruntime", "")).startswith("unusable"):
        for b in list_models():
            out["bundles"][b.name] = {role: status(b, role) for role in b.networks}
    return out


def _register_optional() -> None:
    for name in ("segcli.cli_train", "segcli.cli_runtime", "segcli.cli_import"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(app)


_register_optional()


def version_callback(value: bool) -> None:
    if value:
        print(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """segcli: coarse-to-fine segmentation of large medical images."""


def _command_names() -> dict[str, Any]:
    """Each registered command by the name the command line gives it (typer's rule: the function's name, lowercased,
    ``_`` as ``-``, unless named)."""
    return {c.name or c.callback.__name__.lower().replace("_", "-"): c for c in app.registered_commands
            if c.callback is not None}


@functools.cache
def _command(only: str | None = None) -> Any:
    """The click command typer builds from ``app`` (what ``app()`` builds on every call): built once, so a
    process that runs the CLI many times (the test suite) reads the signatures once.

    ``only``: build the group with this one command. Typer turns every parameter of every command into a click
    option up front (60 ms for the nine commands, a tenth of a photo batch's start-up); a run names its command
    first, so the others are never needed. Help and errors read the same: the group keeps its name and
    callback."""
    if only is None:
        return typer.main.get_command(app)
    one = copy.copy(app)
    one.registered_commands = [_command_names()[only]]
    return typer.main.get_command(one)


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors exit 2 (click's convention), bugs exit 3 with a log path.

    ``argv``: the arguments after ``segcli`` (default: the command line's); the test suite runs the CLI in
    its own process this way. Always ends with SystemExit."""
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    args = sys.argv[1:] if argv is None else argv
    try:
        _command(args[0] if args and args[0] in _command_names() else None)(args=args, prog_name="segcli")
    except KeyboardInterrupt as exc:
        sys.exit(interrupt_exit(exc).exit_code)
    except SystemExit as exc:
        if signalled() and exc.code not in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            sys.exit(interrupt_exit().exit_code)  # a signal turned into another error on its way up
        raise
    except Exception as exc:
        if signalled():
            sys.exit(interrupt_exit().exit_code)
        _bug(exc)
        sys.exit(EXIT_BUG)
