"""ONNX Runtime backend: a bundle's exported ``ROLE.onnx`` behind the Predictor interface.

The .onnx is treated like the weights: its path must stay inside the bundle, its SHA-256 must match
``segcli.json`` before a byte of it is parsed by ONNX Runtime, and any external-data file it names
must stay inside the bundle too. The session is built from the very bytes that were hashed, so the
file cannot change between the check and the load. CUDA is only requested when it can really work
(ORT built with it *and* torch sees a GPU): asking ORT for CUDA without the libraries prints a page
of loader errors and silently falls back anyway.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from segcli.bundle import _inside
from segcli.errors import BundleError, DeviceError, SegcliError, UsageError
from segcli.runtimes.device import chosen_threads, torch_cuda_available
from segcli.runtimes.predictor import logits_to_probs

log = logging.getLogger("segcli")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
#: Substrings of ORT / CUDA / allocator errors that mean "the batch did not fit".
OOM_MARKERS = ("out of memory", "failed to allocate memory", "bad_alloc", "bad allocation",
               "cudaerrormemoryallocation", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception from ``session.run`` is an allocation failure (worth a smaller batch)."""
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return any(m in msg for m in OOM_MARKERS)


def _torch_cuda() -> bool:
    try:
        return torch_cuda_available()
    except Exception:  # torch missing or broken: then CUDA is not usable either
        return False


def choose_providers(device: str) -> list[Any]:
    """ORT providers for ``device``: CUDA (then CPU for unsupported nodes) only when really usable."""
    # lazy: onnxruntime costs ~0.2 s to import
    import onnxruntime as ort

    if device.startswith("cuda"):
        built = CUDA_EP in ort.get_available_providers()
        if built and _torch_cuda():
            idx = device.split(":", 1)[1] if ":" in device else "0"
            if not idx.isdigit():
                raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
            # HEURISTIC: engines send varying batch sizes; EXHAUSTIVE would re-search for each one.
            return [(CUDA_EP, {"device_id": int(idx), "cudnn_conv_algo_search": "HEURISTIC"}), CPU_EP]
        why = "onnxruntime was built without CUDA" if not built else "no CUDA device is usable (torch sees none)"
        log.warning("--device %s with --backend onnx: %s; running ONNX Runtime on the CPU", device, why)
    return [CPU_EP]


def default_threads() -> int:
    """``--threads`` as the Segmenter chose it (segcli.runtimes.device.set_threads), else the cores available."""
    return max(1, chosen_threads())


def make_session(model: bytes | Path, providers: list[Any], threads: int) -> Any:
    """An inference session with intra-op threads fixed (ORT's own default ignores cgroup quotas).

    The CPU arena stays on, the memory pattern goes off: on nuclei-he's 256² U-Net the pattern doubled
    the per-item memory (batch 8: 129 MB against 58 MB) with no measurable speed gain, while dropping the
    arena cost both memory (146 MB) and time (benchmarks/README.md, memory plan).
    """
    # lazy: onnxruntime costs ~0.2 s to import
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = False
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    if os.environ.get("SEGCLI_ORT_SPIN") != "1":
        # ORT's pool threads busy-wait after each run by default; between small calls (a 64² network per
        # photo) that burnt half the CPU of a batch and starved the reader and writer threads.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, so, providers=providers)


def _tensors(graph: Any):
    """Every tensor a graph holds, subgraphs (If/Loop bodies) and sparse initializers included."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def external_locations(model: Any) -> list[str]:
    """The ``location`` of every external-data tensor of an ``onnx.ModelProto`` (loaded without them)."""
    # lazy: onnx costs ~1 s to import
    import onnx

    locs = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in t.external_data}
            locs.append(entry.get("location", ""))
    return locs


def _meta_and_external(data: bytes, rel: str, where: Any) -> tuple[dict[str, str], list[str]]:
    """Metadata and external-data locations of a serialised ONNX model, read with the onnx package."""
    # lazy: onnx costs ~1 s to import
    import onnx

    try:
        model = onnx.load_model_from_string(data)  # external data, if any, is not read here
    except Exception as exc:
        raise BundleError(f"{rel} is not a readable ONNX model: {exc}", where) from None
    return {p.key: p.value for p in model.metadata_props}, external_locations(model)


class OnnxPredictor:
    """Runs an ONNX model under ORT on batches, halving the batch on out-of-memory errors."""

    backend = "onnx"

    def __init__(self, session: Any, *, n_classes: int, in_channels: int, device: str = "cpu",
                 max_batch: int = 16, metadata: dict[str, str] | None = None, source: str = "",
                 output: str = "logits", model: bytes | Path | None = None, threads: int = 1) -> None:
        self.session = session
        self.output = output  # "probabilities": an imported graph that ends in its own softmax / sigmoid
        self.model_source = model  # the verified bytes (or trusted path): segcli.memplan measures a copy
        self.threads = int(threads)
        self.n_classes = int(n_classes)
        self.in_channels = int(in_channels)
        self.max_batch = max(1, int(max_batch))
        self.metadata = dict(metadata or {})
        self.source = source
        self.providers: list[str] = list(session.get_providers())
        self.provider: str = self.providers[0]
        if device.startswith("cuda") and self.provider != CUDA_EP:
            log.warning("ONNX Runtime could not start CUDA for %s; running on the CPU", source or "the model")
            device = "cpu"
        self.device = device
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        #: an imported graph with a fixed batch size: runs that many windows at a time, the last call padded
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        if self.fixed_batch:
            self.max_batch = self.fixed_batch
        self._check_io(inp.shape, session.get_outputs()[0].shape)

    def _check_io(self, in_shape: list[Any], out_shape: list[Any]) -> None:
        """Refuse a model whose fixed channel counts contradict the bundle (wrong file, wrong bundle)."""
        want_out = 1 if self.n_classes == 2 else self.n_classes
        if len(in_shape) != 4 or len(out_shape) != 4:
            raise BundleError(f"{self.source}: ONNX model is not NCHW -> NCHW (input {in_shape}, output {out_shape})")
        if isinstance(in_shape[1], int) and in_shape[1] != self.in_channels:
            raise BundleError(f"{self.source}: ONNX model takes {in_shape[1]} channels, the bundle says {self.in_channels}")
        if isinstance(out_shape[1], int) and out_shape[1] not in (want_out, self.n_classes):
            raise BundleError(f"{self.source}: ONNX model gives {out_shape[1]} output channels for {self.n_classes} classes")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle: Any, role: str, *, device: str = "cpu", max_batch: int = 16, half: bool = False,
                    threads: int | None = None, variant: str = "fp32") -> OnnxPredictor:
        """The bundle's verified ONNX export of ``role`` (``variant="int8"``: its quantised one); none is a usage error."""
        spec = bundle.network(role)
        rel, digest = (spec.int8, spec.int8_sha256) if variant == "int8" else (spec.onnx, spec.onnx_sha256)
        how = f"segcli export {bundle.path}" + (" --precision int8 --images DIR" if variant == "int8" else "")
        if not rel:
            raise UsageError(f"bundle {bundle.path} has no {'int8' if variant == 'int8' else 'ONNX'} export; run `{how}`")
        path = _inside(bundle.path, rel, "onnx")
        if not path.is_file():
            raise BundleError(f"ONNX file {rel} is missing; run `{how}`", bundle.path)
        if not digest:
            raise BundleError(f"{rel} has no recorded SHA-256; run `{how}`", bundle.path)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{rel} does not match its recorded SHA-256 (corrupted or tampered); refused", bundle.path)
        threads = threads or default_threads()
        providers = choose_providers(device)
        session = None
        if b"location" not in data:  # no external data can be named: ORT reads the bytes and the metadata
            try:  # (importing the onnx package costs 0.6 s a process, mostly ml_dtypes; issue 30)
                session = make_session(data, providers, threads)
            except Exception as exc:
                raise BundleError(f"{rel} is not a readable ONNX model: {exc}", bundle.path) from None
            meta = dict(session.get_modelmeta().custom_metadata_map)
            locs: list[str] = []
        else:
            meta, locs = _meta_and_external(data, rel, bundle.path)
        if meta.get("weights_sha256") and spec.sha256 and meta["weights_sha256"] != spec.sha256:
            raise BundleError(f"{rel} was exported from other weights than {spec.weights} (stale export); "
                              f"run `{how}`", bundle.path)
        rel_dir = Path(rel).parent
        for loc in locs:
            target = _inside(bundle.path, (rel_dir / loc).as_posix() if loc else "", "ONNX external data")
            if not target.is_file():
                raise BundleError(f"{rel} names external data {loc!r}, which is missing", bundle.path)
        if providers[0] == CPU_EP:
            device, half = "cpu", False  # like torch: --half only means something on CUDA
        if meta.get("precision") == "fp16" and providers[0] == CPU_EP:
            log.warning("%s is an fp16 export (for CUDA); on the CPU it is slower than fp32: "
                        "re-export without --fp16", rel)
        elif half and meta.get("precision") != "fp16":
            log.warning("--half with --backend onnx needs an fp16 export (`segcli export --fp16`); running fp32")
        # With external data ORT must read from the folder, so it gets the path (already checked).
        source = path if locs else data
        if session is None:
            session = make_session(source, providers, threads)
        pred = cls(session, n_classes=bundle.n_classes, in_channels=bundle.in_channels, device=device,
                   max_batch=max_batch, metadata=meta, source=str(path), output=spec.config.get("output", "logits"),
                   model=source, threads=threads)
        if source is data:  # hashed and checked above: the memory plan's key needs no second pass over it
            pred._sha = digest
        return pred

    @classmethod
    def from_cache(cls, bundle: Any, role: str, data: bytes, source: str, *, device: str = "cpu", max_batch: int = 16,
                   threads: int | None = None, sha256: str | None = None) -> OnnxPredictor:
        """A verified fp32 export from :mod:`segcli.runtimes.onnx_cache` (``sha256``: the digest it checked)."""
        providers = choose_providers(device)
        threads = threads or default_threads()
        session = make_session(data, providers, threads)
        pred = cls(session, n_classes=bundle.n_classes, in_channels=bundle.in_channels,
                   device=device if providers[0] != CPU_EP else "cpu", max_batch=max_batch,
                   metadata={"precision": "fp32"}, source=source, model=data, threads=threads)
        if sha256:
            pred._sha = sha256
        return pred

    @classmethod
    def from_file(cls, path: str | Path, *, n_classes: int, in_channels: int, device: str = "cpu", max_batch: int = 16,
                  threads: int | None = None) -> OnnxPredictor:
        """A trusted .onnx outside any bundle (benchmarks, experiments): no hash or path checks."""
        providers = choose_providers(device)
        if providers[0] == CPU_EP:
            device = "cpu"
        threads = threads or default_threads()
        session = make_session(Path(path), providers, threads)
        return cls(session, n_classes=n_classes, in_channels=in_channels, device=device, max_batch=max_batch,
                   source=str(path), model=Path(path), threads=threads)

    def model_sha256(self) -> str:
        """SHA-256 of the model this session was built from (keys its recorded memory cost)."""
        if not hasattr(self, "_sha"):
            src = self.model_source
            data = src if isinstance(src, bytes) else Path(str(src)).read_bytes()
            self._sha = hashlib.sha256(data).hexdigest()
        return self._sha

    # -- inference ----------------------------------------------------------------------------------
    def _run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.fixed_batch and n < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - n, *x.shape[1:]), x.dtype)])
        feed = {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)}
        return np.asarray(self.session.run(None, feed)[0][:n], dtype=np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        if batch.shape[1] != self.in_channels:
            raise ValueError(f"batch has {batch.shape[1]} channels, the network takes {self.in_channels}")
        outs: list[np.ndarray] = []
        i = 0
        while i < len(batch):
            chunk = batch[i : i + self.max_batch]
            try:
                logits = self._run(chunk)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                if len(chunk) == 1:
                    raise SegcliError(f"out of memory on {self.provider} even with a batch of 1 at "
                                      f"{chunk.shape[2]}x{chunk.shape[3]}; use --device cpu or a smaller --size") from None
                # Remember the smaller batch: the next call would run out of memory the same way.
                self.max_batch = max(1, len(chunk) // 2)
                log.warning("out of memory on %s with a batch of %d; retrying with %d", self.provider, len(chunk),
                            self.max_batch)
                continue
            outs.append(logits_to_probs(logits, inplace=True) if self.output == "logits" else _as_probs(logits))
            i += len(chunk)
        if not outs:
            return np.zeros((0, self.n_classes) + batch.shape[2:], np.float32)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)  # one batch: no copy


def _as_probs(p: np.ndarray) -> np.ndarray:
    """An imported graph's own probabilities; one sigmoid channel becomes ``[1 - p, p]`` like a logit would."""
    p = np.clip(p, 0.0, 1.0)
    return np.concatenate([1.0 - p, p], axis=1).astype(np.float32) if p.shape[1] == 1 else p
