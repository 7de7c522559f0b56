"""DICOM that cannot be stacked file by file, converted by dcm2niix and read back as NIfTI.

A Siemens mosaic holds a whole volume as tiles of one plane, an enhanced multi-frame file holds the
geometry of each frame in its functional groups, and a 4D series repeats every slice position once
per echo, phase, diffusion direction or time point. dcm2niix (the field's reference converter,
shipped as the ``dcm2niix`` PyPI package) places all of these; segcli runs it as a subprocess on the
chosen series' files only, in a private temporary folder, and reads the NIfTI it writes.

Why wrap rather than own the code (measured, benchmarks/README.md "DICOM conformance"): on dcm2niix's
own validation sets the wrapped converter reproduces the reference grid and intensities of every mosaic
and enhanced file present, where segcli's file-by-file reader had written 38 mosaics on a wrong grid in
silence, and highdicom's volume API placed all 26 mosaics of dcm_qa as flat tile sheets and raised on
every 4D series. A conversion costs 0.05-0.19 s per series of these sizes (64x64x35 to 82x82x48x21) on
the 2-core development machine.

A converted image with more than one volume (a 4D series, or echoes that dcm2niix writes as separate
files) is refused with one line naming the fourth dimension, unless ``volume`` picks one (1-based).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli.errors import InputError
from segcli.io import medical

if TYPE_CHECKING:
    from segcli.io.types import LoadedImage

CONVERT_TIMEOUT_S = 900


def dcm2niix_binary(source: Path) -> str:
    """The dcm2niix executable of the ``dcm2niix`` package (a base dependency)."""
    try:
        # lazy: only mosaic, multi-frame and 4D DICOM need dcm2niix
        import dcm2niix
    except ImportError:
        raise InputError("this DICOM needs dcm2niix to be placed (mosaic, multi-frame or 4D); "
                         "install it with: pip install dcm2niix", source) from None
    path = Path(dcm2niix.bin)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise InputError(f"the dcm2niix package has no usable binary ({path}); reinstall it", source)
    return str(path)


def _run(source: Path, files: list[str], workdir: Path) -> list[Path]:
    """Convert ``files`` (links in a private folder, so no other series is touched); the NIfTI written."""
    src, out = workdir / "in", workdir / "out"
    src.mkdir()
    out.mkdir()
    for i, f in enumerate(files):
        os.symlink(os.path.abspath(f), src / f"{i:06d}.dcm")
    cmd = [dcm2niix_binary(source), "-b", "y", "-z", "n", "-f", "vol", "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S, errors="replace")
    except subprocess.TimeoutExpired:
        raise InputError(f"dcm2niix did not finish converting the series in {CONVERT_TIMEOUT_S} s", source) from None
    written = sorted(out.glob("*.nii"))
    if not written:
        said = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                if ln.strip().lower().startswith(("error", "warning", "unable", "unsupported"))]
        raise InputError("dcm2niix could not convert this DICOM" + (f" ({said[-1][:160]})" if said else ""), source)
    return written


def _sidecar(nii: Path) -> dict[str, Any]:
    try:
        return json.loads(nii.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def fourth_dimension(written: list[Path]) -> str:
    """What the volumes of a converted series differ by, in words, from dcm2niix's sidecars."""
    if any(p.with_suffix(".bval").exists() for p in written):
        return "diffusion directions"
    cars = [_sidecar(p) for p in written]
    if any("PHASE" in "\\".join(c.get("ImageType", [])) or p.stem.endswith("_ph") for c, p in zip(cars, written, strict=True)):
        return "magnitude and phase images"
    if len({c.get("EchoNumber") for c in cars}) > 1:
        return "echoes"
    return "time points, phases or repeats"


def _volumes(written: list[Path]) -> list[tuple[Path, int | None]]:
    """(file, index along its 4th axis or None for a 3D file) of every 3D volume, in file-name order."""
    # lazy: nibabel costs ~0.3 s to import; only dcm2niix's conversions need it
    import nibabel as nib

    out: list[tuple[Path, int | None]] = []
    for nii in written:
        shape = nib.load(str(nii)).shape
        if len(shape) <= 3 or int(shape[3]) == 1:
            out.append((nii, None))
        else:
            out.extend((nii, k) for k in range(int(shape[3])))
    return out


def _extract(nii: Path, k: int, dest: Path) -> Path:
    """Volume ``k`` of a 4D NIfTI as a 3D float32 NIfTI with the same grid and the scaled values.

    The scaling (scl_slope/scl_inter, e.g. Philips precise-float values) is applied here: nibabel
    would write unscaled values with a reset scaling, which lost it (measured on dcm_qa_philips)."""
    # lazy: nibabel costs ~0.3 s to import; only dcm2niix's conversions need it
    import nibabel as nib

    img = nib.load(str(nii))
    data = np.asarray(img.dataobj[..., k], dtype=np.float32)
    header = img.header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, img.affine, header), str(dest))
    return dest


def read_converted(source: Path, files: list[str], reason: str, volume: int | None,
                   warnings: list[str], extra: dict[str, Any] | None = None) -> LoadedImage:
    """The series ``files`` converted by dcm2niix, as a LoadedImage named after ``source``."""
    with tempfile.TemporaryDirectory(prefix="segcli-dcm2niix-") as tmp:
        written = _run(source, files, Path(tmp))
        volumes = _volumes(written)
        n = len(volumes)
        if volume is None and n > 1:
            raise InputError(f"4D DICOM ({reason}): {n} volumes along {fourth_dimension(written)}; "
                             f"segment one with --volume N (1 to {n})", source)
        if volume is not None and not 1 <= volume <= n:
            raise InputError(f"--volume {volume}: this DICOM holds {n} volume{'s' if n > 1 else ''}", source)
        nii, k = volumes[(volume or 1) - 1]
        if k is not None:
            nii = _extract(nii, k, Path(tmp) / "picked.nii")
        loaded = medical.read_file(nii, nii, warnings)
    loaded.path = source
    loaded.meta.update({"source": "dicom-converted", "files": list(files), "converter": "dcm2niix",
                        "convert_reason": reason, "volumes": n, "volume": volume or 1, **(extra or {})})
    loaded.meta.setdefault("notes", []).append(f"{reason} placed by dcm2niix"
                                               + (f"; volume {volume} of {n}" if n > 1 else ""))
    return loaded
