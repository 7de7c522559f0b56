"""The Python API behind every CLI command: build a :class:`Segmenter` once, apply it to many inputs.

A Segmenter is an :class:`~segcli.inferer.Inferer` (the model holder: bundles, runtimes, predictors,
applied to arrays with ``segment_array`` and ``segment_volume``) that also reads and writes files
(:meth:`Segmenter.predict_file`, :meth:`Segmenter.predict_many`). What happens to one file — read,
route (in memory, streamed volume, tiled TIFF), compute, write — lives in :mod:`segcli.pipeline`, which
receives a :class:`~segcli.inferer.RunContext` and never calls back up here; the parameters of each
method are resolved once in :mod:`segcli.plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segcli import io, pipeline
from segcli.engines.base import ProgressFn
from segcli.geometry import slice_axis
from segcli.inferer import Inferer
from segcli.options import PredictOptions
from segcli.report import FileReport

__all__ = ["FileReport", "PredictOptions", "Segmenter", "segment", "slice_axis"]


class Segmenter(Inferer):
    """A model (or the shipped default per input kind), a method, a runtime and a device, built once.

    Pass a :class:`PredictOptions`, or its fields as keyword arguments (``overrides`` is the mapping
    of method parameters — threshold, pad, patches, ... — that replace the bundle's).
    """

    def __init__(self, model: str | Path | None = None, *, options: PredictOptions | None = None,
                 **kwargs: Any) -> None:
        if options is None:
            options = PredictOptions.from_kwargs(model, **kwargs)
        elif model is not None or kwargs:
            raise TypeError("give either options= or the model and keyword options, not both")
        super().__init__(options)

    def predict_file(
        self,
        path: str | Path,
        output: str | Path | None = None,
        *,
        input_root: Path | None = None,
        progress: ProgressFn | None = None,
        **file_options: Any,
    ) -> FileReport:
        """Read, segment and write one input; every user-caused failure becomes a failed report.

        ``file_options`` (probabilities, skip_existing, stats, lock) override this Segmenter's options
        for this call.
        """
        return pipeline.run_one(self.context(file_options), Path(path), output, input_root=input_root,
                                progress=progress)

    def predict_many(
        self,
        items: list[tuple[Path, Path | None]],
        output: str | Path | None = None,
        *,
        prefetch: int = 2,
        progress_for: Callable[[Path], ProgressFn | None] | None = None,
        **file_options: Any,
    ) -> Iterator[FileReport]:
        """Reports in input order, with reading of the next files and writing of the previous one
        overlapped with computing the current one (see segcli.pipeline.run_many)."""
        yield from pipeline.run_many(self, items, output, prefetch=prefetch, progress_for=progress_for,
                                     file_options=file_options)


def segment(
    image: str | Path | np.ndarray,
    model: str | Path | None = None,
    method: str | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """One-call convenience: a path or channel-last array in, uint8 labels out."""
    seg = Segmenter(model, method=method, **kwargs)
    if isinstance(image, np.ndarray):
        arr = image[..., None] if image.ndim == 2 else image
        return seg.segment_array(arr)[0].labels

    img = io.open_image(image)
    return seg.segment_array(img.array, kind="volume" if img.ndim == 3 else "2d", spacing=img.spacing,
                             path=image)[0].labels
