"""What every importer shares: the bundle writer for an imported ONNX network and its checks.

An imported network is stored as ``fine.onnx`` (``arch: "onnx"``): segcli never rebuilds it in torch,
so the file the user trusted is the file that runs, and its SHA-256 is recorded like any weights.
``config.output`` says whether the graph gives logits (segcli applies sigmoid / softmax) or
probabilities (used as they are), because a wrong guess silently changes every mask.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli import __version__, normalize
from segcli.bundle import BUNDLE_FILE, SCHEMA_VERSION, load_bundle, write_json_atomic
from segcli.errors import BundleError, UsageError
from segcli.runtimes.onnx_backend import CPU_EP, make_session

ONNX_ARCH = "onnx"
OUTPUTS = ("logits", "probabilities")
FILE = "fine.onnx"


@dataclass
class ImportFacts:
    """What a bundle needs to know about a foreign network (the user's spec, or read from its format)."""

    classes: list[str]
    in_channels: int
    input_size: int
    normalization: dict[str, Any]
    output: str = "logits"
    pixel_size_um: float | None = None
    name: str = ""
    task: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_facts(facts: ImportFacts, where: Path) -> ImportFacts:
    """One-line refusals for facts that cannot describe a segmentation network segcli can run."""
    if len(facts.classes) < 2 or len(set(facts.classes)) != len(facts.classes):
        raise BundleError("classes must list at least 2 distinct names, background first", where)
    if not all(isinstance(c, str) and c.strip() for c in facts.classes):
        raise BundleError("classes must be non-empty strings", where)
    if facts.in_channels < 1:
        raise BundleError(f"channels must be at least 1, not {facts.in_channels}", where)
    if facts.input_size < 8:
        raise BundleError(f"input_size {facts.input_size} is too small (at least 8)", where)
    if facts.output not in OUTPUTS:
        raise BundleError(f"output must be 'logits' or 'probabilities', not {facts.output!r}", where)
    if facts.pixel_size_um is not None and not (math.isfinite(facts.pixel_size_um) and facts.pixel_size_um > 0):
        raise BundleError(f"pixel_size_um must be a positive number or null, not {facts.pixel_size_um!r}", where)
    try:
        normalize.validate(facts.normalization)
    except ValueError as exc:
        raise BundleError(f"normalization: {exc}", where) from None
    return facts


def ort_session(data: bytes, where: Path) -> Any:
    """A CPU session of ``data``; a graph ORT cannot load is the user's file problem, said in one line."""
    try:
        return make_session(data, [CPU_EP], 1)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BundleError(f"ONNX Runtime cannot load it: {first[:200]}", where) from None


def check_graph(session: Any, facts: ImportFacts, where: Path) -> list[str]:
    """Run one window through the graph and refuse what contradicts the facts; returns notes for the card."""
    notes: list[str] = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise BundleError(f"the graph takes {len(inputs)} inputs; segcli feeds one NCHW image batch", where)
    shape = inputs[0].shape
    if len(shape) != 4:
        raise BundleError(f"the graph's input is {shape}, not NCHW (2D networks only)", where)
    if isinstance(shape[1], int) and shape[1] != facts.in_channels:
        raise BundleError(f"the graph takes {shape[1]} channels, the spec says {facts.in_channels}", where)
    for dim, what in ((shape[2], "height"), (shape[3], "width")):
        if isinstance(dim, int) and dim != facts.input_size:
            raise BundleError(f"the graph's input {what} is fixed at {dim}, the spec's input_size is "
                              f"{facts.input_size}; they must agree", where)
    if isinstance(shape[0], int):
        notes.append(f"fixed batch size {shape[0]}: windows run {shape[0]} at a time")
    if len(outputs) > 1:
        notes.append(f"the graph has {len(outputs)} outputs; segcli uses the first, {outputs[0].name!r}")
    n = shape[0] if isinstance(shape[0], int) else 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, facts.in_channels, facts.input_size, facts.input_size)).astype(
        np.float16 if inputs[0].type == "tensor(float16)" else np.float32)
    try:
        y = np.asarray(session.run(None, {inputs[0].name: x})[0], dtype=np.float32)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BundleError(f"the graph fails on a {facts.input_size}² window: {first[:200]}", where) from None
    k = len(facts.classes)
    if y.ndim != 4 or y.shape[2:] != x.shape[2:]:
        raise BundleError(f"the graph maps a {list(x.shape)} window to {list(y.shape)}; segcli needs "
                          "class maps at the input's height and width", where)
    if y.shape[1] not in ((1, 2) if k == 2 else (k,)):
        raise BundleError(f"the graph gives {y.shape[1]} output channels for {k} classes "
                          f"({'1 or 2' if k == 2 else k} expected)", where)
    _check_output_kind(y, facts.output, where, notes)
    return notes


def _check_output_kind(y: np.ndarray, output: str, where: Path, notes: list[str]) -> None:
    """Catch a wrong ``output`` statement where the numbers prove it (sigmoid of a probability, say)."""
    in01 = bool(np.all(y >= -1e-4) and np.all(y <= 1 + 1e-4))
    sums1 = y.shape[1] > 1 and bool(np.allclose(y.sum(axis=1), 1.0, atol=1e-3))
    if output == "probabilities":
        if not in01:
            raise BundleError(f"the spec says probabilities but the graph gives values in "
                              f"[{y.min():.3g}, {y.max():.3g}]; set \"output\": \"logits\"", where)
        if y.shape[1] > 1 and not sums1:
            raise BundleError("the spec says probabilities but the graph's channels do not sum to 1; "
                              "set \"output\": \"logits\"", where)
    elif sums1 and in01:
        raise BundleError("the spec says logits but the graph's channels sum to 1 at every pixel (a softmax "
                          "output); set \"output\": \"probabilities\"", where)
    elif in01 and y.shape[1] == 1:
        notes.append("the single output channel stayed in [0, 1] on a random window; if it is a sigmoid "
                     "probability, re-import with \"output\": \"probabilities\"")


def prepare_out(out: Path, force: bool) -> None:
    """The output folder: new, empty, or (``--force``) an earlier segcli bundle; never anything else."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} is not empty; pass --force to replace the bundle there")
        if not (out / "segcli.json").is_file():
            raise UsageError(f"{out} is not empty and holds no segcli bundle; refusing to replace it")
    out.mkdir(parents=True, exist_ok=True)


def write_onnx_bundle(out: Path, data: bytes, facts: ImportFacts, source: dict[str, Any], *,
                      force: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``fine.onnx`` (the bytes given), ``segcli.json`` (last, atomically) and ``MODEL_CARD.md``."""
    prepare_out(out, force)
    digest = hashlib.sha256(data).hexdigest()
    tmp = out / f".{FILE}.partial-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, out / FILE)
    for name, blob in (extra_files or {}).items():
        (out / name).write_bytes(blob)
    params = dict(facts.params)
    params.setdefault("overlap", 0.5)  # nnU-Net's and MONAI's usual step: half a window
    if facts.pixel_size_um:
        params["training_mpp"] = float(facts.pixel_size_um)
    source = {**source, "imported": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "segcli_version": __version__}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": facts.name or out.name,
        "method": "sliding",
        "classes": list(facts.classes),
        "in_channels": int(facts.in_channels),
        "input_size": int(facts.input_size),
        "normalization": facts.normalization,
        "networks": {"fine": {"arch": ONNX_ARCH, "config": {"output": facts.output}, "weights": FILE,
                              "sha256": digest, "onnx": FILE, "onnx_sha256": digest}},
        "params": params,
        "info": {"task": facts.task or f"imported {source.get('format', 'model')}",
                 "imported_from": source, "mpp": facts.pixel_size_um, "notes": list(facts.notes)},
        "training": {},
    }
    (out / "MODEL_CARD.md").write_text(card_stub(doc, source, digest))
    write_json_atomic(out / BUNDLE_FILE, doc)
    load_bundle(out)  # what was written must load, or the import failed
    return out


def card_stub(doc: dict[str, Any], source: dict[str, Any], digest: str) -> str:
    """A model card to fill in: the facts segcli knows, and the blanks only the model's author can fill."""
    lines = [
        f"# {doc['name']} — imported model (card stub: complete it before sharing)",
        "",
        "| | |", "|---|---|",
        f"| source | {source.get('format')}: `{source.get('path')}` |",
        f"| source SHA-256 | `{source.get('sha256', '')}` |",
        f"| imported | {source.get('imported')} with segcli {source.get('segcli_version')} |",
        f"| network | `fine.onnx`, SHA-256 `{digest}`, output {doc['networks']['fine']['config']['output']} |",
        f"| classes | {', '.join(doc['classes'])} |",
        f"| input | {doc['in_channels']} channel(s), window {doc['input_size']} px, "
        f"normalisation `{json.dumps(doc['normalization'])}` |",
        f"| pixel size | {doc['info'].get('mpp') or 'not stated (images are used at their own pixel size)'} µm |",
        "",
        "## To fill in",
        "* Task, intended use and what it is not for.",
        "* Training data, licence, split, and the score on held-out data (`segcli evaluate`).",
        "",
    ]
    notes = doc["info"].get("notes") or []
    if notes:
        lines += ["## Import notes", *[f"* {n}" for n in notes], ""]
    return "\n".join(lines)


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or a one-line refusal naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{what} not found", path) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"cannot read {what}: {exc}", path) from None
