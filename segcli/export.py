"""Export a bundle's networks to ONNX so they run under ONNX Runtime (faster on CPU, no torch needed).

One ``ROLE.onnx`` per network, written into the bundle with dynamic N/H/W, the bundle metadata in
``metadata_props`` (so a lone .onnx file still says what it is) and its path and SHA-256 recorded
in ``segcli.json``. Every export is checked twice before it is recorded: ``onnx.checker`` for a
well-formed graph, and torch vs ONNX Runtime on two input sizes for a *faithful* one. The second
check matters because the legacy exporter traces: a Python branch on the input size (the U-Net's
"pad only when H is not a multiple of 16") is frozen at the traced size. We therefore trace at an
odd size, where such padding branches are taken, and verify on a different shape.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcli import __version__
from segcli.bundle import (
    BUNDLE_FILE,
    Bundle,
    _inside,
    load_bundle,
    resolve_model,
    sha256_file,
    write_json_atomic,
)
from segcli.errors import BundleError, SegcliError, UsageError
from segcli.runtimes.device import available_cores
from segcli.runtimes.predictor import logits_to_probs

log = logging.getLogger("segcli")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Largest max-abs logit difference accepted between torch and ORT, relative to max(1, max|logit|).
PARITY_TOL = 1e-3
#: Largest probability difference accepted between the fp16 and the fp32 model.
FP16_TOL = 0.05


@dataclass
class ExportResult:
    """What one network's export produced (the CLI reports it; ``export_bundle`` keeps the path)."""

    role: str
    path: Path
    sha256: str
    size_bytes: int
    precision: str
    max_diff: float | None  # fp32: torch vs ORT logits / max(1, max|logit|); fp16: fp32 vs fp16 probabilities


def trace_shape(input_size: int) -> tuple[int, int]:
    """An odd (H, W) near S/2: odd so that every 'pad to a multiple' branch is traced, H != W so
    height and width cannot be confused, small so tracing stays cheap."""
    h = max(17, input_size // 2) | 1
    return h, h + 2


def onnx_metadata(bundle: Bundle, role: str, precision: str = "fp32") -> dict[str, str]:
    """The bundle facts a consumer of a lone .onnx needs (metadata_props values must be strings)."""
    spec = bundle.network(role)
    return {
        "segcli_version": __version__,
        "bundle_name": bundle.name,
        "role": role,
        "arch": spec.arch,
        "config": json.dumps(spec.config, sort_keys=True),
        "method": bundle.method,
        "classes": json.dumps(bundle.classes),
        "n_classes": str(bundle.n_classes),
        "in_channels": str(bundle.in_channels),
        "input_size": str(bundle.input_size),
        "normalization": json.dumps(bundle.normalization, sort_keys=True),
        "output": "sigmoid logit (binary)" if bundle.n_classes == 2 else "softmax logits",
        "weights_sha256": spec.sha256 or "",
        "precision": precision,
    }


def _torch_export(module: Any, f: Path, in_channels: int, shape: tuple[int, int], opset: int) -> None:
    # lazy: torch costs ~1.3 s to import
    import torch

    sample = torch.rand(1, in_channels, *shape)
    with warnings.catch_warnings():
        # The legacy exporter's deprecation and TracerWarnings: parity is verified afterwards instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (sample,), str(f), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N", 2: "H", 3: "W"}},
        )


def export_module(module: Any, *, in_channels: int, input_size: int, opset: int = 17,
                  metadata: dict[str, str] | None = None) -> Any:
    """Trace ``module`` to an ``onnx.ModelProto`` with dynamic N/H/W, metadata set and checked."""
    # lazy: onnx and torch cost ~2.3 s to import
    import onnx
    import torch

    module = module.eval()
    with tempfile.TemporaryDirectory(prefix="segcli-export-") as tmp:
        f = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                _torch_export(module, f, in_channels, trace_shape(input_size), opset)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SegcliError(f"the ONNX exporter failed on {type(module).__name__}: {first}") from exc
        model = onnx.load(str(f))
    onnx.helper.set_model_props(model, dict(metadata or {}))  # replaces any props the exporter set
    model.doc_string = "segcli network; NCHW float32 in, logits out at the same H, W"
    check(model)
    return model


def check(model: Any) -> None:
    """``onnx.checker`` with shape inference; a failure is an export bug, reported in one line."""
    # lazy: onnx costs ~1 s to import
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SegcliError(f"exported ONNX model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def to_fp16(model: Any) -> Any:
    """fp16 weights and compute with float32 inputs/outputs kept, so callers never change dtype."""
    try:
        # lazy: ONNX Runtime's tools bring onnx (~1 s to import)
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError:
        try:
            from onnxconverter_common.float16 import convert_float_to_float16  # type: ignore[no-redef]

            OnnxModel = None  # type: ignore[assignment,misc]  # noqa: N806
        except ImportError:
            raise UsageError("--fp16 needs onnxruntime's transformers tools or onnxconverter-common; "
                             "neither is installed") from None
    m16 = convert_float_to_float16(model, keep_io_types=True)
    if OnnxModel is not None:
        om = OnnxModel(m16)
        om.topological_sort()  # keep_io_types appends input Casts at the end; the checker wants order
        m16 = om.model
    else:  # pragma: no cover - only without onnxruntime.transformers
        _toposort(m16.graph)
    for p in m16.metadata_props:
        if p.key == "precision":
            p.value = "fp16"
    check(m16)
    return m16


def _toposort(graph: Any) -> None:
    """Kahn's sort of a graph's nodes (fallback for converters that append nodes out of order)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes, ordered = list(graph.node), []
    while nodes:
        ready = [n for n in nodes if all(i in known for i in n.input)]
        if not ready:
            raise SegcliError("fp16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            known.update(n.output)
        nodes = [n for n in nodes if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _session(model_bytes: bytes) -> Any:
    # lazy: onnxruntime costs ~0.2 s to import
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = available_cores()
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def validation_inputs(in_channels: int, input_size: int, seed: int = 0) -> list[np.ndarray]:
    """Two shapes unlike the traced one: a batch of 2 at S x S and one odd, non-square crop."""
    rng = np.random.default_rng(seed)
    h = max(9, input_size // 3) | 1
    shapes = [(2, in_channels, input_size, input_size), (1, in_channels, h + 4, h)]
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def parity(module: Any, model_bytes: bytes, inputs: list[np.ndarray]) -> float:
    """Max abs logit difference torch vs ORT CPU over ``inputs``, relative to max(1, max|logit|)."""
    # lazy: torch costs ~1.3 s to import
    import torch

    sess = _session(model_bytes)
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).float().numpy()
        got = sess.run(None, {INPUT_NAME: x})[0]
        if got.shape != ref.shape:
            raise SegcliError(f"ONNX output shape {got.shape} differs from torch {ref.shape} for input {x.shape}")
        worst = max(worst, float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max())))
    return worst


def _fp16_gap(fp32: bytes, fp16: bytes, inputs: list[np.ndarray]) -> float:
    a, b = _session(fp32), _session(fp16)
    return max(float(np.abs(logits_to_probs(a.run(None, {INPUT_NAME: x})[0])
                             - logits_to_probs(b.run(None, {INPUT_NAME: x})[0])).max()) for x in inputs)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_bundle_detailed(bundle_dir: str | os.PathLike[str], *, fp16: bool = False, opset: int = 17,
                           validate: bool = True) -> dict[str, ExportResult]:
    """Export every network of a bundle, record ``onnx``/``onnx_sha256`` in segcli.json, report each.

    Files are written atomically and the JSON last (everything else in it kept), so a bundle never
    points at a half-written or unchecked .onnx. ``fp16`` writes ``ROLE.fp16.onnx`` (for CUDA) and
    records it instead of the fp32 file.
    """
    root = resolve_model(bundle_dir)
    bundle = load_bundle(root)
    if not 7 <= opset <= 21:
        raise UsageError(f"--opset {opset} is out of the supported range 7..21")
    results: dict[str, ExportResult] = {}
    inputs = validation_inputs(bundle.in_channels, bundle.input_size)
    for role in bundle.networks:
        module = bundle.load_module(role)  # verifies the weights' SHA-256
        model = export_module(module, in_channels=bundle.in_channels, input_size=bundle.input_size, opset=opset,
                              metadata=onnx_metadata(bundle, role))
        data = model.SerializeToString()
        diff = parity(module, data, inputs) if validate else None
        if diff is not None and diff > PARITY_TOL:
            raise SegcliError(f"{role}: ONNX Runtime disagrees with torch (max relative logit difference {diff:.2e}); "
                              "this network does not export faithfully")
        name = f"{role}.onnx"
        if fp16:
            data16 = to_fp16(model).SerializeToString()
            diff = _fp16_gap(data, data16, inputs) if validate else None
            if diff is not None and diff > FP16_TOL:
                raise SegcliError(f"{role}: the fp16 model's probabilities differ by {diff:.3f} from fp32; "
                                  "this network is not fp16-safe")
            data, name = data16, f"{role}.fp16.onnx"
        path = _inside(root, name, "onnx")
        _write_atomic(path, data)
        results[role] = ExportResult(role, path, sha256_file(path), len(data), "fp16" if fp16 else "fp32", diff)
        log.debug("exported %s -> %s (%d bytes, diff %s)", role, path, len(data), diff)
    _record(root, results)
    return results


def _record(root: Path, results: dict[str, ExportResult]) -> None:
    """Rewrite segcli.json atomically with the new paths and hashes; every other field kept as is."""
    cfg = root / BUNDLE_FILE
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot re-read: {exc}", cfg) from None
    for role, res in results.items():
        net = doc["networks"][role]
        net["onnx"] = res.path.name
        net["onnx_sha256"] = res.sha256
    write_json_atomic(cfg, doc)


def export_bundle(bundle_dir: str | os.PathLike[str], *, fp16: bool = False, opset: int = 17) -> dict[str, Path]:
    """Export a bundle's networks to ONNX; returns the written file per role (see the detailed form)."""
    return {role: r.path for role, r in export_bundle_detailed(bundle_dir, fp16=fp16, opset=opset).items()}
