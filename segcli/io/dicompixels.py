"""Pixel reads of a checked DICOM series: decoder messages held back, a decoding failure naming its file.

Split from :mod:`segcli.io.dicomseries` (the header checks), which decides the files and their order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segcli.errors import InputError
from segcli.io.medical import itk_message, itk_quiet

if TYPE_CHECKING:
    import SimpleITK as sitk


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[None]:
    """Hold back what C++ code (GDCM, OpenJPEG, CharLS) prints on file descriptor 2 while a decoder runs.

    When the block raises, the text is dropped: the caller turns the failure into one line of its own.
    When it succeeds, the text is written to stderr after all, so nothing another thread printed in the
    meantime is lost. The redirection is process-wide, so it is held only around a decoder call.
    """
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                tmp.seek(0)
                while chunk := tmp.read(1 << 16):
                    os.write(2, chunk)


def _syntax_name(uid: str) -> str:
    try:
        # lazy: pydicom costs ~0.25 s to import; only DICOM needs it
        from pydicom.uid import UID

        return UID(uid).name if uid else "unknown transfer syntax"
    except Exception:
        return uid


def read_pixels(folder: Path, files: list[str], syntax: dict[str, str] | None = None) -> sitk.Image:
    """The slices ``files`` (in that order) as one image; a decoding failure names the file at fault."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with itk_quiet(), captured_native_stderr():
            image = reader.Execute()
    except RuntimeError as exc:
        reason = itk_message(exc)
    else:
        if image.GetDimension() == 2:  # a lone file may read as 2D: restore the slice axis
            image = sitk.JoinSeries(image)
        return image
    for f in files:  # find the file that does not decode, one by one
        try:
            with itk_quiet(), captured_native_stderr():
                sitk.ReadImage(f)
        except RuntimeError as exc:
            ts = (syntax or {}).get(f, "")
            raise InputError(f"cannot decode the pixel data of {Path(f).name} ({_syntax_name(ts)}): corrupt or "
                             f"unsupported compressed data ({itk_message(exc)[:120]})", folder) from None
    raise InputError(f"cannot read DICOM series: {reason}", folder)


def rescaled(image: sitk.Image, factors: list[float]) -> sitk.Image:
    """``image`` (one plane per file) with plane k multiplied by ``factors[k]``, as float32."""
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    arr *= np.asarray(factors, np.float32).reshape((-1,) + (1,) * (arr.ndim - 1))
    out = sitk.GetImageFromArray(arr, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.CopyInformation(image)
    return out
