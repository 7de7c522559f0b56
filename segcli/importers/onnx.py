"""``segcli import onnx``: a plain ONNX (or TorchScript) network plus a short JSON of facts → a bundle.

The JSON states what a graph cannot: the classes, the channels, the normalisation, the window the
network was trained on, the pixel size and whether the output is logits or probabilities. Example::

    {"classes": ["background", "polyp"], "channels": 3, "input_size": 256,
     "normalization": {"kind": "scale", "factor": 0.00392156862745098},
     "output": "logits", "pixel_size_um": null}

TorchScript (``.ts``/``.pt`` archives) is loaded with ``torch.jit.load`` — TorchScript code, never
arbitrary pickled Python — and converted to ONNX once, with its outputs checked against torch.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import BundleError
from segcli.export import check
from segcli.importers.common import (
    ImportFacts,
    check_facts,
    check_graph,
    ort_session,
    read_json,
    write_onnx_bundle,
)
from segcli.runtimes.onnx_backend import CPU_EP, external_locations, make_session

#: Spec keys: required ones, then optional ones.
REQUIRED = ("classes", "channels", "normalization", "input_size", "output", "pixel_size_um")
OPTIONAL = ("name", "task", "threshold", "overlap")


def read_spec(path: Path) -> ImportFacts:
    """The user's facts about the network; a missing or unknown key is refused (no silent defaults)."""
    raw = read_json(path, "spec")
    if not isinstance(raw, dict):
        raise BundleError("the spec must be a JSON object", path)
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise BundleError(f"the spec lacks {', '.join(missing)} (needed: {', '.join(REQUIRED)}; "
                          "pixel_size_um may be null)", path)
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BundleError(f"unknown spec key {unknown[0]!r} (known: {', '.join(REQUIRED + OPTIONAL)})", path)
    classes, channels, size, norm = raw["classes"], raw["channels"], raw["input_size"], raw["normalization"]
    if not isinstance(classes, list):
        raise BundleError("classes must be a list of names, background first", path)
    for key, val in (("channels", channels), ("input_size", size)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise BundleError(f"{key} must be an integer, not {val!r}", path)
    if not isinstance(norm, dict):
        raise BundleError("normalization must be an object such as {\"kind\": \"zscore\"}", path)
    px = raw["pixel_size_um"]
    if px is not None and (not isinstance(px, (int, float)) or isinstance(px, bool)):
        raise BundleError(f"pixel_size_um must be a number (µm per pixel) or null, not {px!r}", path)
    params = {k: raw[k] for k in ("threshold", "overlap") if k in raw}
    facts = ImportFacts(classes=classes, in_channels=channels, input_size=size, normalization=norm,
                        output=raw["output"], pixel_size_um=None if px is None else float(px),
                        name=str(raw.get("name", "")), task=str(raw.get("task", "")), params=params)
    return check_facts(facts, path)


def load_onnx_bytes(path: Path) -> bytes:
    """The file's bytes, after checking it is a self-contained ONNX model (no external data files)."""
    # lazy: onnx costs ~1 s to import
    import onnx

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read: {exc.strerror or exc}", path) from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise BundleError("not an ONNX model (protobuf parse failed)", path) from None
    if external_locations(model):
        raise BundleError("the model keeps its weights in external data files; save it as one file "
                          "(onnx.save(model, f, save_as_external_data=False)) and import that", path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise BundleError(f"fails onnx.checker: {str(exc).splitlines()[0][:200]}", path) from None
    return data


def torchscript_to_onnx(path: Path, facts: ImportFacts) -> bytes:
    """A TorchScript archive converted to ONNX (dynamic N/H/W) and checked against torch on one window."""
    # lazy: torch costs ~1.3 s to import
    import torch

    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise BundleError(f"not a TorchScript archive torch.jit.load can read ({type(exc).__name__})", path) from None
    return module_to_onnx(module, facts, path)


def module_to_onnx(module: Any, facts: ImportFacts, where: Path) -> bytes:
    """Trace a torch module to ONNX at its window (fixed H, W; any batch) and refuse the result unless
    ONNX Runtime reproduces torch's output. The window is fixed because tracing freezes size-dependent
    branches, and segcli only ever feeds an imported network full windows."""
    # lazy: onnx and torch cost ~2.3 s to import
    import onnx
    import torch

    module = module.eval()
    s, c = facts.input_size, facts.in_channels
    with tempfile.TemporaryDirectory(prefix="segcli-import-") as tmp:
        f = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (torch.rand(1, c, s, s),), str(f), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["logits"], do_constant_folding=True,
                                  dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"the ONNX exporter failed on {type(module).__name__}: {first[:200]}", where) from None
        model = onnx.load(str(f))
    check(model)
    data = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((2, c, s, s)).astype(np.float32)
    with torch.inference_mode():
        want = module(torch.from_numpy(x))
    want = (want[0] if isinstance(want, (list, tuple)) else want).float().numpy()
    got = make_session(data, [CPU_EP], 1).run(None, {"input": x})[0]
    diff = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())) if got.shape == want.shape else 1.0
    if diff > 1e-3:
        raise BundleError(f"the ONNX conversion does not reproduce torch (relative max diff {diff:.1e}); "
                          "export it to ONNX yourself and import that", where)
    facts.notes.append(f"converted to ONNX by segcli at {s}² windows; ONNX Runtime vs torch relative max diff "
                       f"{diff:.1e}")
    return data


def import_onnx(model: Path, spec: Path, out: Path, *, force: bool = False) -> Path:
    """Import ``model`` (.onnx, or a TorchScript .ts/.pt) described by ``spec`` into the bundle ``out``."""
    facts = read_spec(spec)
    if not model.is_file():
        raise BundleError("model file not found", model)
    raw = model.read_bytes()
    fmt = "onnx"
    if model.suffix.lower() in (".ts", ".pt", ".pth", ".jit"):
        data, fmt = torchscript_to_onnx(model, facts), "torchscript"
    else:
        data = load_onnx_bytes(model)
    facts.notes += check_graph(ort_session(data, model), facts, model)
    source = {"format": fmt, "path": str(model.resolve()), "sha256": hashlib.sha256(raw).hexdigest(),
              "spec": str(spec.resolve())}
    facts.name = facts.name or out.name
    return write_onnx_bundle(out, data, facts, source, force=force)
