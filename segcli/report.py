"""What happened to one input: the ``--json`` record, the CLI's line, and the code that fills them.

Every route of :mod:`segcli.pipeline` (in memory, streamed volume, tiled TIFF) fills its report
through the same functions here, so the fields mean the same whatever path a file took.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Result.info keys too large for a report (the crop boxes themselves).
_BULKY_INFO = ("boxes", "refined_boxes")


@dataclass
class FileReport:
    """What happened to one input: the ``--json`` record and the CLI's line."""

    input: str
    output: str | None = None
    status: str = "ok"  # ok | failed | skipped | empty
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what segcli decided for the user (model choice, conversions)
    model: str | None = None
    method: str | None = None
    backend: str | None = None
    providers: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    classes_found: list[str] = field(default_factory=list)
    voxel_counts: dict[str, int] = field(default_factory=dict)
    volume_ml: dict[str, float] | None = None
    area_mm2: dict[str, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    stats: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` record, floats rounded to 6 significant digits (no 0.00044331249999999997)."""
        return tidy(asdict(self))


def tidy(value: Any) -> Any:
    """Floats rounded to 6 significant digits, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if np.isfinite(value) else value
    if isinstance(value, dict):
        return {k: tidy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v) for v in value]
    if isinstance(value, np.generic):
        return tidy(value.item())
    return value


#: refine warns when it re-segments under this share of an image's patches (and the image has at least
#: REFINE_WARN_MIN_PATCHES): the mask is then mostly the rough pass. 16 of 3,969 patches on a 16k² slide gave Dice 0.38.
REFINE_WARN_SHARE = 0.05
REFINE_WARN_MIN_PATCHES = 100


def fill_run(rep: FileReport, res: Any, *, model: str, method: str, device: str,
             providers: dict[str, str] | None) -> None:
    """Model, method, runtime and the engine's timings and info (``providers`` None: nothing ran)."""
    rep.model, rep.method, rep.device = model, method, device
    if providers is not None:
        rep.providers = providers
        rep.backend = "+".join(sorted({p.split(":")[0] for p in providers.values()}))
    rep.seconds.update(res.timings)
    rep.info.update({k: v for k, v in res.info.items() if k not in _BULKY_INFO})
    n, full = res.info.get("fine_inputs"), res.info.get("fine_inputs_filled")
    if isinstance(n, int) and isinstance(full, int) and n >= 3 and full == n:
        rep.warnings.append(f"every one of the {n} fine-pass crops came out foreground from edge to edge: "
                            "implausible; check the model and the image type")
    total, refined = res.info.get("patches_total"), res.info.get("patches_refined")
    if isinstance(total, int) and isinstance(refined, int) and total >= REFINE_WARN_MIN_PATCHES \
            and refined < REFINE_WARN_SHARE * total:
        rep.warnings.append(f"refine re-segmented {refined} of {total} patches ({100 * refined / total:.1f} %); the "
                            "rest of the mask is the rough pass at low resolution. Raise --patches, or use "
                            "--method sliding on images this large")
    gate = res.info.get("lung_gate") or {}
    if gate.get("removed_voxels") and not gate.get("lung_ml"):
        rep.warnings.append(f"lung gate: no aerated lung found, so all {gate['removed_voxels']} lesion voxels "
                            "were removed; if the scan shows lungs, rerun with --no-lung-gate")


def count_labels(labels: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Voxels per label value (256 bins), slice by slice: bincount casts to int64, 8 bytes a voxel at once.

    ``n_classes`` (a 2D mask of at most 8 classes): one comparison per class instead, 10× faster on a
    photo; bin 0 gets the rest, so a value outside the classes sends it back to bincount.
    """
    counts = np.zeros(256, np.int64)
    if n_classes is not None and labels.ndim <= 2 and n_classes <= 8 and labels.size and labels.max() < n_classes:
        for c in range(1, n_classes):
            counts[c] = np.count_nonzero(labels == c)
        counts[0] = labels.size - counts[1:].sum()
        return counts
    # A 2D mask in one call (per row, a 500-row photo took 530 bincounts: 15 ms); a volume per slice.
    parts = [labels.reshape(-1)] if labels.ndim <= 2 else (labels[i].reshape(-1) for i in range(labels.shape[0]))
    for part in parts:
        counts += np.bincount(part, minlength=256)[:256]
    return counts


def fill_counts(rep: FileReport, counts: np.ndarray, classes: list[str], spacing: Any, ndim: int) -> None:
    """Per-class voxel counts, the classes found, and mL (volumes) or mm² (2D) when the spacing is known."""
    rep.voxel_counts, rep.classes_found = {}, []
    unit = float(np.prod(spacing)) if spacing else None
    for cid, name in enumerate(classes):
        if cid == 0:
            continue
        n = int(counts[cid]) if cid < len(counts) else 0
        rep.voxel_counts[name] = n
        if n:
            rep.classes_found.append(name)
    if unit is not None:
        if ndim == 3:
            rep.volume_ml = {k: v * unit / 1000.0 for k, v in rep.voxel_counts.items()}
        else:
            rep.area_mm2 = {k: v * unit for k, v in rep.voxel_counts.items()}
