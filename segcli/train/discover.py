"""Training dataset discovery in two layouts; a missing mask or image stops the run with the case's name.

* ``shared``: ``images/<stem>.<ext>``, ``masks/<stem>.<ext>`` (uint8 class ids), optional
  ``fov/<stem>.png`` and ``dataset.json`` with ``{"labels": {"background": 0, "polyp": 1}, ...}``.
* ``nnunet`` (nnU-Net v2 raw): ``imagesTr/<case>_0000.<ext>`` (one file per channel, stacked in
  channel order), ``labelsTr/<case>.<ext>``, ``dataset.json`` with ``labels`` and ``channel_names``.

:mod:`segcli.train.data` reads, checks and caches what this finds (and re-exports these names).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segcli.bundle import boundary_of
from segcli.errors import DatasetError
from segcli.io.atomic import split_extension

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")


@dataclass
class Case:
    """One training case: its channel files (one unless nnU-Net splits channels), mask and FOV."""

    stem: str
    images: list[Path]
    mask: Path
    fov: Path | None = None
    instances: Path | None = None  # instances/STEM: object ids (for --boundary)


@dataclass
class DatasetSpec:
    root: Path
    name: str
    layout: str  # "shared" | "nnunet"
    classes: list[str] | None  # None: infer from the masks
    cases: list[Case]
    modality: str | None = None
    licence: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem, ext = split_extension(p.name)
        if ext.lower() in IMAGE_EXTS:
            out.setdefault(stem, p)
    return out


def parse_labels(labels: Any, where: Path) -> list[str]:
    """Class names ordered by id from a ``{"name": id}`` map; ids must be 0..K-1 without gaps."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError('"labels" must map class names to integer ids, e.g. {"background": 0, "polyp": 1}', where)
    by_id: dict[int, str] = {}
    for name, v in labels.items():
        if isinstance(v, list | tuple):
            raise DatasetError(f'label {name!r} is region-based ({v}); only one integer id per class is supported', where)
        if isinstance(v, bool) or not isinstance(v, int):
            raise DatasetError(f'label {name!r} has id {v!r}; ids must be integers', where)
        if v in by_id:
            raise DatasetError(f'labels {by_id[v]!r} and {name!r} share id {v}', where)
        by_id[v] = str(name)
    ids = sorted(by_id)
    if ids != list(range(len(ids))):
        raise DatasetError(f"label ids must be 0..{len(ids) - 1} without gaps, got {ids}", where)
    if len(ids) < 2:
        raise DatasetError("need at least two classes (background and one more)", where)
    return [by_id[i] for i in ids]


def discover(root: str | os.PathLike[str]) -> DatasetSpec:
    """Find the cases of a dataset folder in either layout; a missing mask or image is an error."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("dataset folder not found", root)
    meta: dict[str, Any] = {}
    js = root / "dataset.json"
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot parse dataset.json: {exc}", js) from None
        if not isinstance(meta, dict):
            raise DatasetError("dataset.json must hold a JSON object", js)
    classes = parse_labels(meta["labels"], js) if "labels" in meta else None
    if "instances" in meta:  # a boundary class (segcli.bundle): checked now, not when the trained bundle is saved
        try:
            boundary_of(meta["instances"], classes or [])
        except ValueError as exc:
            raise DatasetError(str(exc), js) from None
    if (root / "imagesTr").is_dir():
        layout = "nnunet"
        cases = _discover_nnunet(root, meta)
    elif (root / "images").is_dir():
        layout = "shared"
        cases = _discover_shared(root)
    else:
        raise DatasetError("not a dataset: expected images/ + masks/ or imagesTr/ + labelsTr/", root)
    if not cases:
        raise DatasetError("no images found", root)
    modality = meta.get("modality")
    if modality is None and isinstance(meta.get("channel_names"), dict):
        modality = next(iter(meta["channel_names"].values()), None)
    return DatasetSpec(
        root=root,
        name=str(meta.get("name") or root.resolve().name),
        layout=layout,
        classes=classes,
        cases=cases,
        modality=str(modality) if modality is not None else None,
        licence=meta.get("licence") or meta.get("license") or meta.get("licence_name"),
        meta=meta,
    )


def _discover_shared(root: Path) -> list[Case]:
    images = _files(root / "images")
    masks_dir = root / "masks"
    if not masks_dir.is_dir():
        raise DatasetError("has images/ but no masks/ folder", root)
    masks = _files(masks_dir)
    fovs = _files(root / "fov") if (root / "fov").is_dir() else {}
    inst = _files(root / "instances") if (root / "instances").is_dir() else {}
    for stem in images:
        if stem not in masks:
            raise DatasetError(f"case {stem!r}: no mask in masks/ for image {images[stem].name}", root)
    for stem in masks:
        if stem not in images:
            raise DatasetError(f"case {stem!r}: mask {masks[stem].name} has no image in images/", root)
    return [Case(s, [images[s]], masks[s], fovs.get(s), inst.get(s)) for s in sorted(images)]


def _rgb_channels(names: Any) -> bool:
    """dataset.json's ``channel_names`` are R, G, B (nnU-Net v2 stores such images as one RGB file)."""
    if not isinstance(names, dict) or len(names) != 3:
        return False
    words = [str(names.get(k, names.get(int(k) if str(k).isdigit() else k, ""))).strip().lower()
             for k in sorted(names, key=lambda k: int(k) if str(k).isdigit() else 99)]
    return [w[:1] for w in words] == ["r", "g", "b"] and all(w in ("r", "g", "b", "red", "green", "blue")
                                                             for w in words)


def _discover_nnunet(root: Path, meta: dict[str, Any]) -> list[Case]:
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise DatasetError("has imagesTr/ but no labelsTr/ folder", root)
    n_ch = len(meta["channel_names"]) if isinstance(meta.get("channel_names"), dict) else None
    chans: dict[str, dict[int, Path]] = {}
    for stem, p in _files(root / "imagesTr").items():
        case, sep, idx = stem.rpartition("_")
        if not sep or len(idx) != 4 or not idx.isdigit():
            raise DatasetError(f"image {p.name} lacks the nnU-Net channel suffix _0000", root / "imagesTr")
        chans.setdefault(case, {})[int(idx)] = p
    labels = _files(labels_dir)
    cases = []
    rgb = _rgb_channels(meta.get("channel_names"))
    for case in sorted(chans):
        got = sorted(chans[case])
        want = list(range(n_ch if n_ch is not None else len(got)))
        if rgb and got == [0]:
            want = [0]  # nnU-Net's natural-image convention: one case_0000.png holds R, G and B
        if got != want:
            raise DatasetError(f"case {case!r}: channel files {got} but expected {want} (_0000.._{len(want) - 1:04d})", root / "imagesTr")
        if case not in labels:
            raise DatasetError(f"case {case!r}: no label file in labelsTr/", root)
        cases.append(Case(case, [chans[case][i] for i in want], labels[case]))
    for stem in labels:
        if stem not in chans:
            raise DatasetError(f"case {stem!r}: label {labels[stem].name} has no image in imagesTr/", root)
    return cases
