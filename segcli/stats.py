"""Per-class statistics of a label map: the ``--stats`` CSV (TotalSegmentator's ``--statistics``).

Volume in ml needs the spacing; component counts and bounding boxes are what a reviewer checks first
when a mask looks wrong (one blob or fifty?), so they are reported per class.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

FIELDS = ["input", "class", "voxels", "volume_ml", "area_mm2", "components", "bbox"]


def label_stats(labels: np.ndarray, classes: list[str], spacing: tuple[float, ...] | None) -> list[dict[str, Any]]:
    """One row per foreground class: voxel count, volume (3D) or area (2D), components, bounding box.

    The bounding box is ``[start..., stop...]`` in array index order, half-open.
    """
    unit = float(np.prod(spacing)) if spacing else None
    rows = []
    structure = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for cid, name in enumerate(classes):
        if cid == 0:
            continue
        m = labels == cid
        n = int(m.sum())
        row: dict[str, Any] = {"class": name, "voxels": n, "volume_ml": None, "area_mm2": None, "components": 0,
                               "bbox": None}
        if unit is not None:
            if labels.ndim == 3:
                row["volume_ml"] = n * unit / 1000.0
            else:
                row["area_mm2"] = n * unit
        if n:
            _, row["components"] = ndimage.label(m, structure=structure)
            idx = np.nonzero(m)
            row["bbox"] = [int(i.min()) for i in idx] + [int(i.max()) + 1 for i in idx]
        rows.append(row)
    return rows


def write_stats_csv(path: Path, reports: list[Any]) -> None:
    """Write every report's stats rows to one CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    for rep in reports:
        for row in rep.stats or []:
            r = dict(row, input=rep.input)
            r["bbox"] = " ".join(map(str, r["bbox"])) if r["bbox"] else ""
            w.writerow(r)
    tmp = path.with_name(f".{path.name}.partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(buf.getvalue())
    tmp.replace(path)
