"""``segcli export``: the CLI face of :mod:`segcli.export` (parse, call, report; no logic here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from segcli.errors import BundleError, SegcliError

# Lazy on purpose: segcli.cli loads this module at startup, so segcli's modules beyond errors, methods and
# params are imported inside the commands that need them: `segcli --help` and usage errors (exit 2)
# answer without numpy and the engines. Each such import says what it brings.

EXIT_FAILED, EXIT_USAGE = 1, 2


def _export_int8(model: str, images: Path | None, json_out: bool) -> None:
    """``segcli export --precision int8``: build, check and record the int8 variant (segcli.quantize)."""
    # lazy: brings numpy and scipy; `segcli --help` runs without them
    from segcli.batch import expand_inputs
    from segcli.quantize import build_int8

    try:
        if images is None or not images.is_dir():
            raise BundleError("--precision int8 needs --images DIR: a folder of images to calibrate and check on", images or Path("."))
        paths = [p for p, _ in expand_inputs([images], None, ()).items]
        rec = build_int8(model, paths)
    except BundleError as exc:
        print(f"segcli: error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    except SegcliError as exc:
        print(f"segcli: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    if json_out:
        sys.stdout.write(json.dumps(rec, indent=2) + "\n")
    verdict = "kept" if rec["passed"] else "NOT kept (auto stays fp32)"
    print(f"int8: Dice vs fp32 mean {rec['dice_vs_fp32_mean']:.4f}, min {rec['dice_vs_fp32_min']:.4f} on "
          f"{rec['check_images']} check images ({rec['calibration_images']} calibrated); {verdict}", file=sys.stderr)
    if not rec["passed"]:
        raise typer.Exit(1)


def _shipped(model: str, custom: bool) -> bool:
    """A shipped bundle is never written into; ``--fp16``/``--opset``/``--no-validate`` would have to."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli.bundle import is_shipped

    try:
        shipped = is_shipped(model)
    except BundleError:
        return False  # export_bundle_detailed names the problem
    if shipped and custom:
        print(f"segcli: error: {model} is a shipped bundle, which segcli does not modify; --fp16, --opset, --no-validate "
              "and --precision int8 write into the bundle: copy its folder and export the copy", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    return shipped


def _export_shipped(model: str, json_out: bool) -> None:
    """``segcli export NAME`` of a shipped bundle: fill the ONNX cache its first use would fill."""
    # lazy: brings numpy; `segcli --help` runs without it
    from segcli.runtimes.onnx_cache import export_to_cache

    try:
        where = export_to_cache(model)
    except SegcliError as exc:
        print(f"segcli: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    if json_out:
        sys.stdout.write(json.dumps([{"role": r, "path": p, "cache": True} for r, p in where.items()], indent=2) + "\n")
        return
    for role, path in where.items():
        print(f"{role:<7} -> {path}  (ONNX cache; the shipped bundle is left as installed)", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add the runtime commands to the main app (called from segcli.cli)."""

    @app.command("export", epilog=("Examples:\n\n" + "\n\n".join(['  segcli export models/mine', '  segcli export polyp --json', '  segcli export models/mine --fp16'])))
    def export_cmd(
        model: Annotated[str, typer.Argument(help="Bundle folder or shipped model name.")],
        fp16: Annotated[bool, typer.Option("--fp16", help="Write fp16 models (ROLE.fp16.onnx) for CUDA ONNX Runtime; inputs and outputs stay float32.")] = False,
        opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
        precision: Annotated[str, typer.Option(help="fp32 (ROLE.onnx) | int8: quantised ROLE.int8.onnx, calibrated on half of --images and kept only if its masks match fp32 (Dice >= 0.99) on the other half.")] = "fp32",
        images: Annotated[Path | None, typer.Option(help="int8: a folder of images like the ones the model will see (the bundle's training or validation images). Default: none (needed for int8).")] = None,
        no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the torch vs ONNX Runtime parity check (faster, for huge networks).")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON on stdout.")] = False,
    ) -> None:
        """Export a bundle's networks to ONNX (one ROLE.onnx each) and record them in segcli.json."""
        # lazy: brings numpy; `segcli --help` runs without it
        from segcli.export import export_bundle_detailed

        if precision not in ("fp32", "int8"):
            print(f"segcli: error: --precision must be fp32 or int8, not {precision!r}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE)
        if _shipped(model, fp16 or opset != 17 or no_validate or precision == "int8"):
            _export_shipped(model, json_out)
            return
        if precision == "int8":
            _export_int8(model, images, json_out)
            return
        try:
            results = export_bundle_detailed(model, fp16=fp16, opset=opset, validate=not no_validate)
        except BundleError as exc:  # no such bundle, bad JSON, weights tampered: the user's input
            print(f"segcli: error: {exc}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None
        except SegcliError as exc:
            print(f"segcli: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        rows = [
            {"role": r.role, "path": str(r.path), "sha256": r.sha256, "size_bytes": r.size_bytes,
             "precision": r.precision, "max_diff": r.max_diff}
            for r in results.values()
        ]
        if json_out:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        for r in rows:
            check = "not validated" if r["max_diff"] is None else f"max diff vs {'fp32' if fp16 else 'torch'} {r['max_diff']:.1e}"
            size = f"{r['size_bytes'] / 1e6:.1f} MB" if r["size_bytes"] >= 100_000 else f"{r['size_bytes'] / 1e3:.0f} kB"
            print(f"{r['role']:<7} -> {r['path']}  ({size}, {r['precision']}, {check})", file=sys.stderr)
