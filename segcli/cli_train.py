"""``segcli train`` and ``segcli evaluate``: parse flags, call :mod:`segcli.train` / :mod:`segcli.evaluate`, report.

No training or scoring logic lives here. Errors are one line on stderr with the error's exit code
(1 dataset/input problem, 2 usage), 130 after Ctrl-C once the resumable checkpoint is saved.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from segcli.errors import SegcliError, UsageError
from segcli.methods import TRAINABLE
from segcli.params import DEFAULT_PARAMS

# Lazy on purpose: segcli.cli loads this module at startup, so segcli's modules beyond errors, methods and
# params are imported inside the commands that need them: `segcli --help` and usage errors (exit 2)
# answer without numpy and the engines. Each such import says what it brings.


def _fail(message: str, code: int) -> typer.Exit:
    print(f"segcli: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _parse_value(text: str) -> Any:
    """``--arch-config`` values: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def parse_arch_config(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        # Split "a=1,b=[2,3]" on the commas that start a new key, not inside list values.
        for part in re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", item):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--arch-config expects key=value, got {part!r}")
            out[key.strip()] = _parse_value(val.strip())
    return out


def _normalization(text: str | None) -> dict[str, Any] | None:
    """``dtype`` | ``percentile`` | ``zscore`` | ``minmax`` | ``ct:CENTER,WIDTH`` | a JSON object."""
    if text is None:
        return None
    t = text.strip()
    if t.startswith("{"):
        try:
            return json.loads(t)
        except ValueError as exc:
            raise UsageError(f"--normalization: bad JSON ({exc})") from None
    if t.lower().startswith("ct:"):
        try:
            c, w = (float(v) for v in t[3:].split(","))
        except ValueError:
            raise UsageError("--normalization ct:CENTER,WIDTH, e.g. ct:40,400") from None
        return {"kind": "ct_window", "center": c, "width": w}
    if t in ("dtype", "zscore", "minmax"):
        return {"kind": t}
    if t == "percentile":
        return {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    raise UsageError(f"--normalization {text!r}: use dtype, percentile, zscore, minmax, ct:CENTER,WIDTH or a JSON spec")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``evaluate`` to the segcli app."""

    @app.command("train", epilog=("Examples:\n\n" + "\n\n".join(['  segcli train --method stts --arch unet --data mydataset/ -o models/mine --size 64', '  segcli train --data nnUNet_raw/Dataset001_X -o models/x --time-limit 2h', '  segcli train --resume models/mine --time-limit 30m   # continue the run in models/mine for 30 more minutes', '  segcli train --method direct --arch deconvnet --data mydataset/ -o models/dc --size 128', '  segcli train --stage coarse --pair models/imported --data slide_tiles/ -o models/imported-paired   # distilled, no labels needed'])))
    def train_cmd(
        data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset folder: images/ + masks/ (+ dataset.json) or nnU-Net raw imagesTr/ + labelsTr/. Required unless --resume; no default.")] = None,
        out: Annotated[Path | None, typer.Option("-o", "--out", help="Output folder; becomes a complete model bundle. Required unless --resume; no default.")] = None,
        method: Annotated[str, typer.Option(help=" | ".join(TRAINABLE))] = "stts",
        arch: Annotated[str, typer.Option(help="Network architecture (see `segcli models --archs`).")] = "unet",
        fine_arch: Annotated[str | None, typer.Option(help="Architecture of the second stage (default: --arch).")] = None,
        size: Annotated[int, typer.Option(help="Network input size S (both stages).")] = 256,
        epochs: Annotated[int | None, typer.Option(help="Epochs per stage [default: 50].")] = None,
        fine_epochs: Annotated[int | None, typer.Option(help="Epochs of the second stage (default: --epochs).")] = None,
        batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
        lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
        weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
        optimizer: Annotated[str, typer.Option(help="adamw | adam | sgd")] = "adamw",
        schedule: Annotated[str, typer.Option(help="Per-step LR schedule: cosine | poly | constant")] = "cosine",
        features: Annotated[int | None, typer.Option(help="U-Net width (first-level features). Default: the architecture's (32 for unet).")] = None,
        arch_config: Annotated[list[str] | None, typer.Option("--arch-config", help="key=value for the architecture (repeatable). Default: none.")] = None,
        loss: Annotated[str | None, typer.Option(help="dice | bce | ce | focal | dice+bce | dice+ce | focal+dice (default: dice+bce/ce; refine focal+dice).")] = None,
        class_weights: Annotated[str | None, typer.Option(help="Comma-separated weight per class for the (B)CE/focal term, e.g. 1,3. Default: all 1.")] = None,
        val_fraction: Annotated[float, typer.Option(help="Fraction of cases held out for validation.")] = 0.2,
        splits: Annotated[Path | None, typer.Option(help='JSON {"train": [...], "val": [...]} (default: DATA/splits.json if present, else seeded).')] = None,
        seed: Annotated[int, typer.Option(help="Seed for the split, initial weights, sampling and augmentation.")] = 0,
        channels: Annotated[str, typer.Option(help="keep | grey | rgb: channel conversion applied to every image.")] = "keep",
        normalization: Annotated[str | None, typer.Option(help="dtype | percentile | zscore | minmax | ct:C,W | JSON (default: from the data).")] = None,
        jitter: Annotated[int, typer.Option(help="stts: uniform crop-box jitter in px (training only).")] = 16,
        pad: Annotated[int | None, typer.Option(help="stts: crop padding in full-res px (default S//8).")] = None,
        fine_init: Annotated[str, typer.Option(help="random | coarse: initialise the second stage from the first.")] = "random",
        fine_crops: Annotated[str, typer.Option(help="stts: where fine crops come from: rough (half from the trained coarse network's rough-mask components, as inference cuts them, half from the ground truth) | rough-only | gt.")] = "rough",
        crops_per_image: Annotated[int, typer.Option(help="stts: fine crops per image per fine epoch (fine epochs default to epochs / this, so both stages take as many steps).")] = 8,
        patches: Annotated[int, typer.Option(help="refine: patches refined per image (inference) and sampled per image per epoch.")] = DEFAULT_PARAMS["patches"],
        patch_size: Annotated[int | None, typer.Option(help="refine: patch side in full-res px (default S).")] = None,
        sampling: Annotated[str, typer.Option(help="refine: uncertain | uniform patch sampling for S2.")] = "uncertain",
        criterion: Annotated[str, typer.Option(help="refine: pixel | mean uncertainty ranking.")] = DEFAULT_PARAMS["criterion"],
        patience: Annotated[int | None, typer.Option(help="Early stopping: epochs without a better val Dice. Default: off.")] = None,
        time_limit: Annotated[str | None, typer.Option(help="Training time budget: seconds or 90s / 10m / 1h30m; split 50/50 between two stages. Default: no limit.")] = None,
        resume: Annotated[Path | None, typer.Option(help="Continue the run whose bundle is this folder, from the resume state kept beside it (FOLDER.resume/). Default: a new run.")] = None,
        pair: Annotated[str | None, typer.Option("--pair", help="Train only the rough network for this one-network bundle (an imported model), at its window and normalisation (--method and --size come from it); without masks in --data its own predictions are the labels (distillation). Default: none.")] = None,
        stage: Annotated[str | None, typer.Option("--stage", help="coarse: train only the rough network (the stage --pair trains; needs --pair). Default: every stage the method has.")] = None,
        init: Annotated[str | None, typer.Option("--init", help="Fine-tune this bundle (folder or shipped name): its method, networks, size and normalisation are kept, its weights are the start. Default: none (random weights).")] = None,
        device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N [default: auto]")] = None,
        amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision: fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16/AMX); validation stays fp32.")] = True,
        augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Flips, 90° rotations, small affine, intensity jitter.")] = True,
        stain_jitter: Annotated[float, typer.Option(help="HED stain jitter amplitude for RGB H&E (e.g. 0.1; 0 = off): stain amounts × U(1±s) + U(±s).")] = 0.0,
        boundary: Annotated[int, typer.Option(help="Learn to separate touching objects: targets background / object / boundary (this width in px) made from instances/ (one id per object), for --instances at predict time; 0 = off.")] = 0,
        endoscopy_jitter: Annotated[float, typer.Option(help="Endoscopy jitter strength in [0, 1] for RGB frames (e.g. 0.5; 0 = off): colour, blur, zoom and specular highlights (segcli.train.endoscopy).")] = 0.0,
        cache_gb: Annotated[float | None, typer.Option(help="Memory for full-resolution images (fine crops) [default: 4].")] = None,
        threads: Annotated[int | None, typer.Option(help="Torch intra-op threads (default: the cores available).")] = None,
        name: Annotated[str | None, typer.Option(help="Bundle name (default: the output folder's name).")] = None,
        val_full_res: Annotated[bool, typer.Option("--val-full-res/--no-val-full-res", help="Score the finished bundle at full resolution on val.")] = True,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors on stderr.")] = False,
    ) -> None:
        """Train a coarse-to-fine model; the output folder is a bundle `segcli predict --model` loads."""
        try:
            check_stage(stage, pair)
        except UsageError as exc:
            raise _fail(str(exc), 2) from None
        # lazy: brings torch; `segcli --help` runs without it
        from segcli.train import TrainingInterrupted, train

        try:
            options: dict[str, Any] = {
                "method": method, "arch": arch, "fine_arch": fine_arch, "size": size, "epochs": epochs,
                "fine_epochs": fine_epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "optimizer": optimizer, "schedule": schedule, "features": features,
                "arch_config": parse_arch_config(arch_config), "loss": loss,
                "class_weights": [float(w) for w in class_weights.split(",")] if class_weights else None,
                "val_fraction": val_fraction, "splits": str(splits) if splits else None, "seed": seed,
                "channels": channels, "normalization": _normalization(normalization), "jitter": jitter, "pad": pad,
                "fine_init": fine_init, "fine_crops": fine_crops, "crops_per_image": crops_per_image, "patches": patches, "patch_size": patch_size, "sampling": sampling,
                "criterion": criterion, "patience": patience, "time_limit": time_limit, "device": device,
                "amp": amp, "augment": augment, "stain_jitter": stain_jitter, "boundary": boundary,
                "endoscopy_jitter": endoscopy_jitter, "cache_gb": cache_gb, "threads": threads, "name": name,
                "val_full_res": val_full_res, "quiet": quiet, "init": init,
                "command": shlex.join(["segcli", *sys.argv[1:]])}
            if resume is not None:  # only the resumable options count; the rest come from the checkpoint
                options = {k: options[k] for k in ("epochs", "fine_epochs", "time_limit", "patience", "quiet", "device",
                                                   "cache_gb", "threads", "val_full_res")}
            result = (_train_pair(data, out, pair, options) if pair else train(data, out, resume=resume, **options))
        except ValueError as exc:
            raise _fail(f"--class-weights: {exc}", 2) from None
        except TrainingInterrupted as exc:
            print(f"segcli: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except SegcliError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        _report(result, quiet)

    @app.command("evaluate", epilog=("Examples:\n\n" + "\n\n".join(['  segcli evaluate masks/ ground_truth/', '  segcli evaluate masks/ ground_truth/ --json > scores.json', '  segcli evaluate masks/ ground_truth/ --fov fov/ --csv scores.csv', '  segcli evaluate masks/ ground_truth/ --preview errors/'])))
    def evaluate_cmd(
        predictions: Annotated[Path, typer.Argument(help="Folder of predicted masks (x.png or x_seg.png).")],
        ground_truth: Annotated[Path, typer.Argument(help="Folder of ground-truth masks (x.png), class ids.")],
        fov: Annotated[Path | None, typer.Option("--fov", help="Folder of field-of-view masks; score inside them only (DRIVE). Default: the whole image.")] = None,
        csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-case and mean rows as CSV. Default: none.")] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the full result as JSON on stdout (as every segcli command's --json does); the table is not printed.", metavar=" ")] = False,
        json_file: Annotated[Path | None, typer.Option("--json-file", help="Also write the full result as JSON to this file. Default: none.")] = None,
        spacing: Annotated[str | None, typer.Option(help="Pixel spacing in mm, comma-separated in array order (default: from the files; px when unknown).")] = None,
        hd95: Annotated[bool, typer.Option("--hd95/--no-hd95", help="Compute HD95 (the slowest metric).")] = True,
        summary: Annotated[bool, typer.Option("--summary", help="Print only the mean rows.")] = False,
        preview: Annotated[Path | None, typer.Option("--preview", help="Write CASE_errors.png per case into this folder: false positives magenta, false negatives cyan. Default: none.")] = None,
        images: Annotated[Path | None, typer.Option("--images", help="Source images for --preview (default: beside the ground-truth folder, then the predictions folder).")] = None,
        instances: Annotated[bool, typer.Option("--instances", help="Ground truth holds instance labels (each non-zero id one object; predictions: instance labels or binary masks, whose connected components are the objects). Adds AJI (Kumar et al., IEEE TMI 2017), PQ = SQ x DQ (Kirillov et al., CVPR 2019) and F1 at IoU 0.5, per case and pooled; a merged blob counts as one match, not many.", metavar=" ")] = False,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing but errors.")] = False,
    ) -> None:
        """Dice, IoU, precision, recall, HD95 and object-level recall per case and class, and their means.

        A class absent from both the prediction and the ground truth of a case is not scored there (NaN,
        shown as '-') and is left out of the means, as nnU-Net's evaluation and MONAI's ignore_empty do;
        `cases_scored` in the JSON says how many cases each class mean covers.
        """
        # lazy: brings numpy and scipy; `segcli --help` runs without them
        from segcli.evaluate import CSV_COLUMNS, evaluate, table_rows, to_json

        def warn(msg: str) -> None:
            if not quiet:
                print(f"segcli: {msg}", file=sys.stderr)

        try:
            sp = [float(v) for v in spacing.split(",")] if spacing else None
        except ValueError:
            raise _fail(f"--spacing {spacing!r}: comma-separated numbers in mm", 2) from None
        if preview is not None:
            for what, folder in (("predictions", predictions), ("ground-truth", ground_truth)):
                if folder.is_dir() and (preview.resolve() == folder.resolve() or folder.resolve() in preview.resolve().parents):
                    raise _fail(f"--preview {preview} is inside the {what} folder {folder}: the error maps would "
                                "be read as masks by every later evaluate; give another folder", 2)
        try:
            result = evaluate(predictions, ground_truth, fov_dir=fov, spacing=sp, hd95=hd95, csv_path=csv_out,
                              json_path=json_file, log=warn, instances=instances)
        except SegcliError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        if preview is not None:
            # lazy: brings numpy; `segcli --help` runs without it
            from segcli import viz

            viz.write_error_previews(result, preview, images=images, log=warn)
        if json_out:
            sys.stdout.write(to_json(result) + "\n")
            return
        if quiet:
            return
        # lazy: rich costs ~40 ms to import; only the output that uses it loads it
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{result['n_cases']} case(s); HD95 in {result['units']}", show_lines=False)
        heads = ("case", "class", "Dice", "IoU", "prec.", "recall", "HD95", "objects", "hit", "obj. recall")
        for h in heads:
            table.add_column(h, justify="left" if h in ("case", "class") else "right")
        rows = table_rows(result)
        if summary:
            rows = [r for r in rows if r[0] == "mean"]
        first_mean = True
        for r in rows:
            if r[0] == "mean" and first_mean:
                first_mean = False
                if table.rows:
                    table.add_section()
            table.add_row(*[_fmt(v) for v in r[: len(heads)]], style="bold" if r[0] == "mean" else None)
        Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
        mean_rows = [r for r in rows if r[0] == "mean"]
        for r in mean_rows:
            sizes = ", ".join(f"{b} {_fmt(v)}" for b, v in zip(("small", "medium", "large"), r[len(CSV_COLUMNS) - 3:], strict=True))
            print(f"object recall by size ({r[1]}): {sizes}  (bins: <0.1 %, 0.1-1 %, >=1 % of the image)")
        if "instances" in result:
            print(_instance_line(result["instances"]))
        if result["failed"]:
            raise typer.Exit(1)


def _report(result: Any, quiet: bool) -> None:
    # lazy: brings torch; `segcli --help` runs without it
    from segcli.train.loop import undertrained_note

    note = undertrained_note(result.stages, result.out)
    if note:  # shown with -q too: an undertrained model is never written in silence
        print(f"segcli: {note}", file=sys.stderr)
    if not quiet:
        t = result.training
        score = t.get("val_score")
        print(f"model written to {result.out} (val score {score:.4f}: {t.get('val_score_kind')})" if isinstance(score, float)
              else f"model written to {result.out}", file=sys.stderr)


STAGES = ("coarse",)


def check_stage(stage: str | None, pair: str | None) -> None:
    """``--stage``, before any work: only ``coarse`` exists, and only with ``--pair`` (the issue's spelling
    of "train just the rough network for this bundle"); ``--pair`` alone means the same."""
    if stage is None:
        return
    if stage not in STAGES:
        raise UsageError(f"--stage {stage!r}: only 'coarse' can be trained alone (with --pair BUNDLE)")
    if pair is None:
        raise UsageError("--stage coarse trains the rough network for a bundle you have: add --pair BUNDLE")


def _train_pair(data: Path | None, out: Path | None, pair: str, options: dict[str, Any]) -> Any:
    """``--pair``: the rough network for a one-network bundle (segcli.train.pair)."""
    # lazy: brings torch; `segcli --help` runs without it
    from segcli.train.pair import train_pair

    if data is None or out is None:
        raise UsageError("--pair needs --data (images, masks optional) and -o OUTPUT")
    return train_pair(data, out, pair, **{k: v for k, v in options.items() if k not in ("method", "size", "command")})


def _instance_line(inst: dict[str, Any]) -> str:
    m, p = inst["mean_over_cases"], inst["pooled"]
    return (f"instances: AJI {_fmt(m['aji'])}, PQ {_fmt(m['pq'])} (SQ {_fmt(m['sq'])}, DQ {_fmt(m['dq'])}), "
            f"F1@0.5 {_fmt(m['f1_iou50'])} (mean over cases); pooled AJI {_fmt(p['aji'] or float('nan'))}, "
            f"{p['matched']} of {p['objects_true']} objects matched, {p['objects_pred']} predicted")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4f}"
    return str(v)
