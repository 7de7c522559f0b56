"""Runtimes: torch and ONNX Runtime behind one small interface.

A :class:`Predictor` is built once per network and reused for a whole batch of files. It takes a
float32 ``(N, C, H, W)`` numpy batch and returns float32 class probabilities ``(N, K, H, W)``
with ``K >= 2`` (a one-logit binary network is expanded to ``[1 - p, p]``), so the engines see the
same thing whatever the backend and never import torch or onnxruntime themselves (MONAI's
``predictor`` idea).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from segcli.errors import UsageError
from segcli.runtimes.onnx_backend import OnnxPredictor
from segcli.runtimes.onnx_cache import VERIFIED, cached_export
from segcli.runtimes.predictor import FunctionPredictor, Predictor, int8_ok, logits_to_probs
from segcli.runtimes.torch_backend import TorchPredictor

__all__ = ["BACKENDS", "PRECISIONS", "FunctionPredictor", "Predictor", "cpu_has_bf16", "int8_ok", "logits_to_probs",
           "make_predictor"]

BACKENDS = ("auto", "torch", "onnx")
#: ``fp32``; ``bf16`` (torch autocast, CPUs with native bf16); ``int8`` (the bundle's checked QDQ export on
#: ONNX Runtime); ``auto``: int8 where the bundle records a passing check and the device is the CPU, else fp32.
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_predictor(bundle, role: str, *, backend: str = "torch", device: str = "cpu", max_batch: int = 16,
                   half: bool = False, onnx_cache: str | None = None, precision: str = "fp32",
                   export_budget: int | None = None):
    """Build the predictor for one network of a bundle on the chosen backend, device and precision.

    ``auto`` backend: the bundle's own ONNX export when it has one; on the CPU otherwise a first-use
    export from the per-user cache (:mod:`segcli.runtimes.onnx_cache`; ``onnx_cache`` is
    ``--onnx-cache``); torch when neither is possible (the reason is logged). ``export_budget``
    (``--max-memory``): a first-use export that would not fit it is refused before it starts.
    """
    cpu = not device.startswith("cuda")
    if precision == "fp16":  # CUDA only (checked when the options were made): torch autocast / an fp16 export
        half, precision = True, "fp32"
    if precision == "auto":
        precision = "int8" if cpu and backend != "torch" and int8_ok(bundle, role) else "fp32"
    if precision == "int8" and not bundle.network(role).int8 and any(n.int8 for n in bundle.networks.values()):
        # --precision int8 asks for the bundle's int8 variants; a network without one (nuclei-he's coarse
        # network, used only by stts) runs fp32, and the report's providers say which ran how.
        logging.getLogger("segcli").warning("%s/%s has no int8 variant; it runs fp32", bundle.name, role)
        precision = "fp32"
    if precision == "int8":
        if not cpu or backend == "torch":
            raise UsageError("--precision int8 runs on ONNX Runtime on the CPU (not with --backend torch or --device cuda)")
        return OnnxPredictor.from_bundle(bundle, role, device="cpu", max_batch=max_batch, variant="int8")
    if precision == "bf16":
        if backend == "onnx":
            raise UsageError("--precision bf16 runs on torch (ONNX Runtime has no bf16 convolutions on the CPU)")
        if cpu and not cpu_has_bf16():
            raise UsageError("--precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); use fp32 or int8")
        backend = "torch"
    if backend == "auto":
        # ONNX Runtime beat torch on this CPU at every size measured (benchmarks/README.md).
        if bundle.network(role).onnx:
            backend = "onnx"
        elif cpu and importlib.util.find_spec("onnxruntime") is not None:
            data, where = cached_export(bundle, role, onnx_cache, export_budget)
            if data is not None:
                return OnnxPredictor.from_cache(bundle, role, data, where, max_batch=max_batch,
                                                sha256=VERIFIED.get(where))
            logging.getLogger("segcli").info("%s/%s runs on torch: %s", bundle.name, role, where)
            backend = "torch"
        else:
            backend = "torch"
    if backend == "torch":
        module = bundle.load_module(role)
        # channels_last was faster than contiguous at every size on CPU (benchmarks/bench_runtimes.py).
        return TorchPredictor(module, n_classes=bundle.n_classes, in_channels=bundle.in_channels, device=device,
                              max_batch=max_batch, half=half, channels_last=device == "cpu", bf16=precision == "bf16")
    if backend == "onnx":
        if not bundle.network(role).onnx:
            data, where = cached_export(bundle, role, onnx_cache, export_budget)
            if data is None:
                raise UsageError(f"bundle {bundle.path} has no ONNX export and none could be made ({where}); "
                                 f"run `segcli export {bundle.path}` or use --backend torch")
            return OnnxPredictor.from_cache(bundle, role, data, where, device=device, max_batch=max_batch,
                                            sha256=VERIFIED.get(where))
        return OnnxPredictor.from_bundle(bundle, role, device=device, max_batch=max_batch, half=half)
    raise UsageError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
