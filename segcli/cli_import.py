"""``segcli import``: the CLI face of :mod:`segcli.importers` (parse, call, report; no logic here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.errors import SegcliError, UsageError

# Lazy on purpose: segcli.cli loads this module at startup, so segcli's modules beyond errors, methods and
# params are imported inside the commands that need them: `segcli --help` and usage errors (exit 2)
# answer without numpy and the engines. Each such import says what it brings.

FORMATS = ("onnx", "monai", "nnunet")
EXAMPLES = [
    "  segcli import onnx model.onnx --spec spec.json -o models/mine",
    "  segcli import monai my_bundle/ -o models/spleen",
    "  segcli import nnunet nnUNet_results/Dataset001_X/nnUNetTrainer__nnUNetPlans__2d -o models/x --fold 0",
]


def register(app: typer.Typer) -> None:
    """Add ``import`` to the segcli app."""

    @app.command("import", epilog="Examples:\n\n" + "\n\n".join(EXAMPLES))
    def import_cmd(
        fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="onnx (also a TorchScript .ts/.pt) | monai | nnunet")],
        source: Annotated[Path, typer.Argument(help="The model: an .onnx/.ts file, a MONAI bundle folder, or an nnU-Net v2 results folder (the one holding plans.json).")],
        out: Annotated[Path, typer.Option("-o", "--out", help="Bundle folder to write (new or empty). Required; no default.")],
        spec: Annotated[Path | None, typer.Option(help="onnx: JSON stating classes, channels, normalization, input_size, output (logits|probabilities) and pixel_size_um. Default: none (required for onnx).")] = None,
        fold: Annotated[list[str] | None, typer.Option(help="nnunet: fold to use (repeatable; 'all' for fold_all). Default: every fold_* found, averaged.")] = None,
        mirror: Annotated[bool, typer.Option("--mirror/--no-mirror", help="nnunet: average over the mirrorings the trainer allowed (nnU-Net's test-time augmentation; 4x the work in 2D).")] = False,
        pixel_size_um: Annotated[float | None, typer.Option(help="monai/nnunet: µm per pixel the network was trained at, for slides. Default: none (images used at their own pixel size).")] = None,
        force: Annotated[bool, typer.Option("--force", help="Replace a segcli bundle already in --out.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the new bundle's summary as JSON on stdout.")] = False,
    ) -> None:
        """Turn a foreign model (ONNX, MONAI bundle, nnU-Net v2) into a segcli bundle with hashed weights."""
        # lazy: brings numpy; `segcli --help` runs without it
        from segcli.bundle import load_bundle

        try:
            if fmt not in FORMATS:
                raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
            if fmt == "onnx":
                if spec is None:
                    raise UsageError("import onnx needs --spec JSON (classes, channels, normalization, input_size, "
                                     "output, pixel_size_um)")
                # lazy: brings numpy; `segcli --help` runs without it
                from segcli.importers.onnx import import_onnx

                path = import_onnx(source, spec, out, force=force)
            elif fmt == "monai":
                # lazy: brings numpy; `segcli --help` runs without it
                from segcli.importers.monai import import_monai

                path = import_monai(source, out, pixel_size_um=pixel_size_um, force=force)
            else:
                # lazy: brings numpy; `segcli --help` runs without it
                from segcli.importers.nnunet import import_nnunet

                path = import_nnunet(source, out, folds=fold, mirror=mirror, pixel_size_um=pixel_size_um, force=force)
        except UsageError as exc:
            print(f"segcli: error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except SegcliError as exc:
            print(f"segcli: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        b = load_bundle(path)
        if json_out:
            sys.stdout.write(json.dumps(b.summary(), indent=2) + "\n")
        notes = b.info.get("notes") or []
        print(f"imported {fmt} -> {path}: {b.n_classes} classes, {b.in_channels} channel(s), window {b.input_size}, "
              f"method {b.method}" + "".join(f"\n  note: {n}" for n in notes), file=sys.stderr)
