"""int8 variants of a bundle: static QDQ quantisation, calibrated and checked on real images.

Why: on a CPU with AVX512-VNNI, ONNX Runtime's int8 convolutions ran a 256² U-Net batch 2.1× faster
than its fp32 ones (benchmarks/README.md). Why checked: quantisation can move a mask, and a
faster wrong answer is worse than a slow right one. So a variant is kept only when it keeps the
masks:

1. the images (``--images DIR``) are split in two by sorted name: even positions calibrate, odd
   positions check, so no image does both;
2. each network's calibration inputs are exactly what the pipeline feeds it (rough inputs, crops,
   patches), recorded while the fp32 bundle segments the calibration images;
3. each network is quantised with per-channel int8 weights, uint8 activations, QDQ format
   (``onnxruntime.quantization.quantize_static``, MinMax calibration);
4. the whole pipeline then runs fp32 and int8 on the check images and the masks are compared:
   the variant passes when the mean Dice (foreground classes) of int8 against fp32 is ≥ 0.99.

The int8 files (``ROLE.int8.onnx``), their SHA-256 and the check (``precision_checks.int8``: mean and
minimum Dice, image count, calibration inputs per network, passed) are recorded in segcli.json.
A failed check is recorded too, and ``--precision auto`` then keeps fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli.bundle import BUNDLE_FILE, _inside, load_bundle, resolve_model, sha256_file, write_json_atomic
from segcli.errors import SegcliError, UsageError
from segcli.export import _write_atomic
from segcli.io import open_image
from segcli.options import PredictOptions
from segcli.runtimes.onnx_backend import CPU_EP, OnnxPredictor, make_session
from segcli.runtimes.onnx_cache import cached_export

#: Mean Dice of the int8 masks against the fp32 masks a variant must reach.
MIN_DICE = 0.99
#: Calibration inputs kept per network (a random subset of what the pipeline produced).
MAX_CALIBRATION = 64


class _Recorder:
    """A predictor that also keeps a sample of the batches it was given (calibration inputs)."""

    def __init__(self, inner: Any, rng: np.random.Generator) -> None:
        self.inner, self.rng, self.kept, self.seen = inner, rng, [], 0
        self.backend, self.device = inner.backend, getattr(inner, "device", "cpu")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        for x in batch:  # reservoir sampling: a uniform sample of every input seen
            self.seen += 1
            if len(self.kept) < MAX_CALIBRATION:
                self.kept.append(x.copy())
            else:
                j = int(self.rng.integers(self.seen))
                if j < MAX_CALIBRATION:
                    self.kept[j] = x.copy()
        return self.inner(batch)


def split_images(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibration, check): even and odd positions of the sorted list."""
    paths = sorted(paths)
    return paths[0::2], paths[1::2]


def _masks(seg: Any, paths: list[Path]) -> list[np.ndarray]:
    """Each image's mask as ``segcli predict`` computes it (2D images and volumes alike)."""
    out = []
    for p in paths:
        img = open_image(p)
        res, _ = seg.segment_array(img.array, kind="volume" if img.kind == "volume" else "2d", spacing=img.spacing, path=p)
        out.append(np.asarray(res.labels if res.parts is None else res.parts))  # a boundary class: as the network says
    return out


def _quantise(fp32: bytes, inputs: list[np.ndarray]) -> bytes:
    # lazy: ONNX Runtime's tools bring onnx (~1 s to import)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"input": x[None].astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="segcli-int8-") as tmp, _working_dir(tmp):
        # ORT's shape inference saves "sym_shape_infer_temp.onnx" (+ external data) into the working
        # directory when it gives up; two such files once landed at the top of this repository.
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return _with_metadata(dst.read_bytes(), fp32)


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Run ORT's quantiser inside ``path`` so its temporaries never land in the user's folder."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _with_metadata(q: bytes, fp32: bytes) -> bytes:
    """The fp32 export's metadata (bundle, role, weights hash) on the quantised model, precision int8."""
    # lazy: onnx costs ~1 s to import
    import onnx

    src, m = onnx.load_model_from_string(fp32), onnx.load_model_from_string(q)
    props = {p.key: p.value for p in src.metadata_props}
    props["precision"] = "int8"
    onnx.helper.set_model_props(m, props)
    return m.SerializeToString()


def dice_labels(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground classes present in either mask (1.0 when both are empty)."""
    scores = []
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        x, y = a == c, b == c
        scores.append(2 * np.count_nonzero(x & y) / max(1, np.count_nonzero(x) + np.count_nonzero(y)))
    return float(np.mean(scores)) if scores else 1.0


def build_int8(bundle_dir: str | os.PathLike[str], images: list[Path], *, seed: int = 0) -> dict[str, Any]:
    """Quantise every network of a bundle, check the masks against fp32, record files and check in segcli.json."""
    # lazy: brings scipy
    from segcli.inferer import Inferer

    root = resolve_model(bundle_dir)
    calib, check = split_images(images)
    if len(calib) < 2 or len(check) < 2:
        raise UsageError(f"--images needs at least 4 images (half calibrate, half check); got {len(images)}")
    t0 = time.perf_counter()
    bundle = load_bundle(root)
    fp32: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="segcli-int8-cache-") as cache:
        for role in bundle.networks:
            data, why = cached_export(bundle, role, cache)
            if data is None:
                raise SegcliError(f"{role}: no faithful fp32 ONNX export to quantise ({why})")
            fp32[role] = data
    # instances: a boundary class (segcli.bundle.Bundle.folded) stays its own class, so the networks serve
    # the pipeline as they are and the check compares their labels before folding
    opts = PredictOptions.from_kwargs(root, backend="onnx", precision="fp32", instances=True)
    seg = Inferer(opts)
    rng = np.random.default_rng(seed)
    recorders = {}
    for role in seg.roles(bundle):
        recorders[role] = _Recorder(seg.predictor(bundle, role), rng)
        seg.set_predictor(bundle, role, recorders[role])
    _masks(seg, calib)
    seg_fp32 = Inferer(opts)
    ref = _masks(seg_fp32, check)
    files: dict[str, bytes] = {}
    for role, rec in recorders.items():
        if not rec.kept:
            raise SegcliError(f"{role}: the calibration images never reached this network")
        files[role] = _quantise(fp32[role], rec.kept)
    seg_q = Inferer(opts)

    for role, data in files.items():
        seg_q.set_predictor(bundle, role, OnnxPredictor(make_session(data, [CPU_EP], 1), n_classes=bundle.n_classes,
                                                         in_channels=bundle.in_channels, metadata={"precision": "int8"},
                                                         source=f"{role}.int8.onnx"))
    got = _masks(seg_q, check)
    dices = [dice_labels(a, b) for a, b in zip(ref, got, strict=True)]
    record = {"dice_vs_fp32_mean": round(float(np.mean(dices)), 5), "dice_vs_fp32_min": round(float(np.min(dices)), 5),
              "check_images": len(check), "calibration_images": len(calib),
              "check_files": [p.name for p in check], "calibration_files": [p.name for p in calib],
              "calibration_inputs": {r: len(rec.kept) for r, rec in recorders.items()},
              "threshold": MIN_DICE, "passed": bool(np.mean(dices) >= MIN_DICE),
              "method": "QDQ static, per-channel int8 weights, uint8 activations, MinMax calibration",
              "seconds": 0.0}
    cfg = root / BUNDLE_FILE

    doc = json.loads(cfg.read_text())
    for role, data in files.items():
        path = _inside(root, f"{role}.int8.onnx", "onnx")
        if record["passed"]:
            _write_atomic(path, data)
            doc["networks"][role]["int8"] = path.name
            doc["networks"][role]["int8_sha256"] = sha256_file(path)
            assert doc["networks"][role]["int8_sha256"] == hashlib.sha256(data).hexdigest()
        else:
            doc["networks"][role].pop("int8", None)
            doc["networks"][role].pop("int8_sha256", None)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    doc.setdefault("precision_checks", {})["int8"] = record
    write_json_atomic(cfg, doc)
    return record
