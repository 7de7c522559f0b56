"""Test-time augmentation: a predictor averaging its network's probabilities over flipped copies of each input.

Engines see one more :class:`~segcli.runtimes.predictor.Predictor`, so every method and route gets it the same
way and the memory plan counts its buffers (:func:`segcli.memplan.crop_bytes`). It pays where the network's
errors are not flip-equivariant: em-vnc's synapse IoU on its 4 test slices rose 0.596 → 0.631 with ``flips`` and
0.633 with ``dihedral``; polyp's Dice on 180 Kvasir frames did not move (``benchmarks/tta_probe.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

#: Each mode's transforms: ``h`` mirrors the columns, ``v`` the rows, ``t`` swaps them (applied first).
TTA_MODES: dict[str, tuple[str, ...]] = {
    "none": ("",),
    "flips": ("", "h", "v", "hv"),
    "dihedral": ("", "h", "v", "hv", "t", "th", "tv", "thv"),
}


def apply(x: np.ndarray, mode: str) -> np.ndarray:
    """``x`` (…, H, W) under one transform (a view)."""
    if "t" in mode:
        x = np.swapaxes(x, -1, -2)
    if "h" in mode:
        x = x[..., ::-1]
    if "v" in mode:
        x = x[..., ::-1, :]
    return x


def undo(p: np.ndarray, mode: str) -> np.ndarray:
    """The inverse of :func:`apply` (a view)."""
    if "v" in mode:
        p = p[..., ::-1, :]
    if "h" in mode:
        p = p[..., ::-1]
    if "t" in mode:
        p = np.swapaxes(p, -1, -2)
    return p


class TransformAveraged:
    """``inner``'s probabilities averaged over the transforms of ``tta`` (one of :data:`TTA_MODES`).

    Holds one transformed copy of the batch and one float32 sum beside the network's output. A transpose
    needs square inputs when the network has a fixed input shape, so non-square batches get the four flips
    (said once in the log)."""

    def __init__(self, inner: Any, tta: str) -> None:
        if tta not in TTA_MODES:
            raise ValueError(f"unknown tta {tta!r}")
        self.inner, self.tta, self.modes = inner, tta, TTA_MODES[tta]
        self.n_classes, self.in_channels = inner.n_classes, inner.in_channels
        self.backend, self.device = inner.backend, inner.device
        self._said_square = False

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        modes = self.modes
        if batch.shape[-1] != batch.shape[-2] and any("t" in m for m in modes):
            modes = tuple(m for m in modes if "t" not in m)
            if not self._said_square:
                self._said_square = True
                logging.getLogger("segcli").info("--tta %s: non-square network inputs %s get the 4 flips only",
                                                 self.tta, batch.shape[-2:])
        acc: np.ndarray | None = None
        for m in modes:
            x = batch if not m else np.ascontiguousarray(apply(batch, m))
            p = undo(self.inner(x), m)
            del x
            if acc is None:
                acc = np.array(p, dtype=np.float32, copy=True) if m else np.asarray(p, dtype=np.float32)
            else:
                acc += p
        assert acc is not None
        if len(modes) > 1:
            acc *= np.float32(1.0 / len(modes))
        return acc

    def __getattr__(self, name: str) -> Any:  # batch sizes, sessions, precision: the network's own
        return getattr(self.inner, name)
