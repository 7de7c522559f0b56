"""The predictor interface engines call, and the logits → probabilities rule every backend shares.

Kept out of the package face so the backends (:mod:`~segcli.runtimes.onnx_backend`) and
:mod:`segcli.export` can import it without importing the package that imports them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Predictor(Protocol):
    """What engines call: batch in, probabilities out."""

    n_classes: int
    in_channels: int
    backend: str
    device: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def logits_to_probs(logits: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Numpy counterpart of the torch conversion, used by ONNX Runtime and tests.

    One float32 array besides the result, whatever K (the softmax made four: 0.9 s of a 16000² slide's fine pass
    on its thread); ``inplace``: a float32 ``logits`` the caller owns becomes the softmax itself."""
    if logits.shape[1] == 1:
        p = np.empty((logits.shape[0], 2, *logits.shape[2:]), np.float32)
        np.negative(logits, out=p[:, 1:], dtype=np.float32)
        np.exp(p[:, 1:], out=p[:, 1:])
        p[:, 1:] += 1.0
        np.reciprocal(p[:, 1:], out=p[:, 1:])
        np.subtract(1.0, p[:, 1:], out=p[:, :1])
        return p
    z = logits if inplace and logits.dtype == np.float32 else logits.astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


#: The smallest positive float32: a probability that underflowed to 0 reads as it (a logit gap of ~103).
_TINY = float(np.finfo(np.float32).smallest_subnormal)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities of ``(K, ...)`` probabilities: a window's logits less one number per pixel (their
    log-sum-exp), the same for every class. So a weighted sum of log-probabilities is the weighted sum of logits
    less a per-pixel constant that softmax and argmax ignore: nnU-Net's logit blend from the probabilities every
    predictor returns, to float32 rounding (~1e-7 in a logit)."""
    return np.log(np.maximum(probs, _TINY, dtype=np.float32))


def logit(t: float) -> float:
    """The logit gap whose sigmoid is ``t`` (±inf at 0 and 1)."""
    with np.errstate(divide="ignore"):
        return float(np.log(np.float64(t)) - np.log1p(-np.float64(t)))


class FunctionPredictor:
    """Wrap any ``f(batch) -> probabilities`` as a Predictor (tests, custom pipelines)."""

    backend = "python"
    device = "cpu"

    def __init__(self, fn, n_classes: int = 2, in_channels: int = 1) -> None:
        self.fn = fn
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.calls = 0
        self.items = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.items += len(batch)
        out = np.asarray(self.fn(batch), dtype=np.float32)
        if out.shape[0] != batch.shape[0] or out.shape[2:] != batch.shape[2:]:
            raise ValueError(f"predictor returned {out.shape} for a batch of {batch.shape}")
        return out


def int8_ok(bundle, role: str) -> bool:
    """The bundle carries an int8 export of ``role`` whose recorded check against fp32 passed."""
    check = (bundle.raw.get("precision_checks") or {}).get("int8") or {}
    return bool(bundle.network(role).int8) and bool(check.get("passed"))
