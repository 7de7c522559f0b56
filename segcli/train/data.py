"""Training datasets: reading and checks, splits, and in-memory caches. Discovery of the two layouts
(``shared``: images/ + masks/; ``nnunet``: imagesTr/ + labelsTr/) is in :mod:`segcli.train.discover`.

Volumes become 2D slices along the axis inference slices along: axial, unless another axis of the
canonical orientation ``segcli.io`` gives is clearly coarser (:func:`segcli.geometry.slice_axis`). Every case is read and
checked (mask present, same size, labels in range) before training starts, so a bad case stops the
run in seconds with its name instead of crashing an epoch hours later.

Caches: the coarse-stage inputs (whole images letterboxed to S, the exact rough-pass input of
inference) are built once, uint8 where the source is 8-bit; full-resolution images for fine crops
stay in memory up to ``cache_gb`` and are re-read from disk beyond it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcli import normalize as norm
from segcli.errors import DatasetError, InputError, SegcliError, UsageError
from segcli.geometry import (
    component_boxes,
    fit_aspect,
    jitter_boxes,
    slice_axis,
    square_pad_shift,
    valid_boxes,
)
from segcli.instances import boundary_targets
from segcli.io import open_image
from segcli.normalize import convert_channels
from segcli.resize import letterbox, resize
from segcli.train.discover import (  # noqa: F401  (IMAGE_EXTS, parse_labels: importable here as before)
    IMAGE_EXTS,
    Case,
    DatasetSpec,
    discover,
    parse_labels,
)


# --------------------------------------------------------------------------------------------- splits
@dataclass
class Split:
    train: list[str]
    val: list[str]
    source: str  # "seed" or the splits file path
    seed: int
    val_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seed": self.seed, "val_fraction": self.val_fraction,
                "train": list(self.train), "val": list(self.val)}


def make_split(
    stems: Sequence[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    splits_file: str | os.PathLike[str] | None = None,
    fold: int = 0,
) -> Split:
    """Train/val split by CASE (never by slice): from a splits file, or a seeded permutation.

    The file holds ``{"train": [...], "val": [...]}`` or nnU-Net's list of such folds (``fold``
    picks one). Without a file, ``round(val_fraction * n)`` cases (at least one when n > 1) go to val.
    """
    stems = sorted(stems)
    if splits_file is not None:
        path = Path(splits_file)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read splits file: {exc}", path) from None
        if isinstance(doc, list):
            if not 0 <= fold < len(doc):
                raise DatasetError(f"splits file has {len(doc)} folds; fold {fold} does not exist", path)
            doc = doc[fold]
        if not isinstance(doc, dict) or "train" not in doc:
            raise DatasetError('splits file must hold {"train": [...], "val": [...]}', path)
        train = [str(s) for s in doc["train"]]
        val = [str(s) for s in doc.get("val", [])]
        known = set(stems)
        unknown = [s for s in train + val if s not in known]
        if unknown:
            raise DatasetError(f"splits file names {len(unknown)} case(s) not in the dataset, e.g. {unknown[0]!r}", path)
        both = set(train) & set(val)
        if both:
            raise DatasetError(f"case {sorted(both)[0]!r} is in both train and val", path)
        return Split(train, val, str(path), seed, val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n = len(stems)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(stems[i] for i in order[:n_val])
    train = sorted(stems[i] for i in order[n_val:])
    return Split(train, val, "seed", seed, val_fraction)


# --------------------------------------------------------------------------------------------- reading
def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, bool]:
    """Channel-last pixels, spacing and whether it is a volume, through ``segcli.io``."""
    img = open_image(path)
    return img.array, (tuple(img.spacing) if img.spacing else None), img.kind == "volume"


def choose_normalization(dtype: np.dtype, modality: str | None, samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The rule recorded in the bundle (inference applies exactly it).

    8-bit sources: ``dtype`` (÷255, the photo convention). CT in HU (non-8-bit): a fixed window from
    the 0.5–99.5 percentiles of the foreground voxels of up to 8 training cases (nnU-Net's CT
    scheme, expressed as a fixed HU window so that every image is scaled the same way). Anything
    else (16-bit microscopy, MRI): per-image 0.5–99.5 percentiles.
    """
    if dtype == np.uint8 or dtype == np.bool_:
        return {"kind": "dtype"}
    if (modality or "").strip().upper() == "CT":
        vals = []
        for img, mask in samples[:8]:
            a = np.asarray(img, dtype=np.float32)[..., 0]
            fg = a[np.asarray(mask) > 0] if np.any(mask) else a.ravel()
            vals.append(fg[:: max(1, fg.size // 200_000)])
        v = np.concatenate(vals) if vals else np.zeros(1, np.float32)
        lo, hi = (float(x) for x in np.percentile(v, [0.5, 99.5]))
        if hi <= lo:
            hi = lo + 1.0
        return {"kind": "ct_window", "center": round((lo + hi) / 2, 1), "width": round(hi - lo, 1), "source": "foreground p0.5-p99.5"}
    return {"kind": "percentile", "lower": 0.5, "upper": 99.5}


# --------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One 2D training image (a case, or one slice of a volume case) with its mask.

    ``image`` is channel-first: uint8 when normalisation is ``dtype`` on an 8-bit source (divided
    by 255 when used), else float32 already normalised. ``None`` when beyond the memory budget;
    :meth:`get_image` then re-reads it.
    """

    stem: str
    case: str
    shape: tuple[int, int]
    image: np.ndarray | None
    mask: np.ndarray  # (H, W) uint8 class ids
    spacing: tuple[float, ...] | None
    boxes: np.ndarray  # unjittered GT component boxes (full res), cached: labelling is the slow part
    loader: Callable[[], np.ndarray] | None = None

    def get_image(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        assert self.loader is not None
        return self.loader()


def to_float(a: np.ndarray) -> np.ndarray:
    """Cached pixels → normalised float32 (uint8 caches hold the ``dtype`` rule's ×255 values)."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) * (1.0 / 255.0)
    return np.asarray(a, dtype=np.float32)


def soft_onehot(mask: np.ndarray, n_out: int, out_hw: tuple[int, int], square: int | None = None) -> np.ndarray:
    """Area-resized one-hot targets ``(n_out, h, w)`` float32; ``square`` letterboxes (edge) first.

    Binary tasks (``n_out == 1``) give the foreground fraction; K-class tasks K fractions.
    """
    classes = [1] if n_out == 1 else list(range(n_out))
    onehot = np.stack([(mask == c) for c in classes]).astype(np.float32)
    if square is not None:
        onehot, _ = letterbox(onehot, square)
    return resize(onehot, out_hw, "area")


def coarse_input(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The rough-pass input exactly as inference builds it: long side S, aspect kept, edge-padded to S×S."""
    hw = fit_aspect(image.shape[-2:], size)
    x = resize(to_float(image), hw, "area")
    x, _ = letterbox(x, size)
    return x, hw


def coarse_target(mask: np.ndarray, size: int, n_out: int) -> np.ndarray:
    hw = fit_aspect(mask.shape, size)
    y = soft_onehot(mask, n_out, hw)
    y, _ = letterbox(y, size)
    return y


@dataclass
class CoarseCache:
    """Whole images at S×S (and soft targets), built once: the coarse stage never decodes a JPEG again."""

    x: np.ndarray  # (N, C, S, S) uint8 or float32
    y: np.ndarray  # (N, n_out, S, S) float16
    valid: np.ndarray  # (N, 2) valid (h, w) inside the letterbox

    @classmethod
    def build(cls, samples: Sequence[Sample], size: int, n_out: int, as_uint8: bool) -> CoarseCache:
        n = len(samples)
        c = samples[0].get_image().shape[0] if n else 1
        x = np.zeros((n, c, size, size), dtype=np.uint8 if as_uint8 else np.float32)
        y = np.zeros((n, n_out, size, size), dtype=np.float16)
        valid = np.zeros((n, 2), dtype=np.int64)
        for i, s in enumerate(samples):
            xi, hw = coarse_input(s.get_image(), size)
            x[i] = np.clip(np.rint(xi * 255.0), 0, 255).astype(np.uint8) if as_uint8 else xi
            y[i] = coarse_target(s.mask, size, n_out)
            valid[i] = hw
        return cls(x, y, valid)


@dataclass
class LoadedDataset:
    spec: DatasetSpec
    classes: list[str]
    in_channels: int
    normalization: dict[str, Any]
    split: Split
    train: list[Sample]
    val: list[Sample]
    slice_axis: int | None = None
    load_seconds: float = 0.0
    cached_bytes: int = 0

    @property
    def n_out(self) -> int:
        return 1 if len(self.classes) == 2 else len(self.classes)

    @property
    def uint8(self) -> bool:
        return bool(self.train) and self.train[0].image is not None and self.train[0].image.dtype == np.uint8


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None, bool]:
    """Raw stacked image (channel-last), mask (spatial), spacing, is-volume; DatasetError on problems."""
    try:
        parts = [read_array(p) for p in case.images]
        arrays = [p[0] for p in parts]
        spacing, is_vol = parts[0][1], parts[0][2]
        if len({a.shape[:-1] for a in arrays}) > 1:
            raise DatasetError(f"case {case.stem!r}: channel files differ in size {[a.shape[:-1] for a in arrays]}", case.images[0])
        if len({a.dtype for a in arrays}) > 1:
            arrays = [a.astype(np.float32) for a in arrays]
        image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
        mask, _, _ = read_array(case.mask)
    except DatasetError:
        raise
    except SegcliError as exc:
        raise DatasetError(f"case {case.stem!r}: {exc}") from None
    if mask.shape[-1] > 1:
        if all(np.array_equal(mask[..., 0], mask[..., i]) for i in range(1, mask.shape[-1])):
            mask = mask[..., :1]
        else:
            raise DatasetError(f"case {case.stem!r}: mask has {mask.shape[-1]} different channels; masks must be single-channel class ids", case.mask)
    mask = mask[..., 0]
    if mask.shape != image.shape[:-1]:
        sz = lambda s: "x".join(str(v) for v in s[::-1])  # noqa: E731  (W x H like image viewers)
        raise DatasetError(f"case {case.stem!r}: mask is {sz(mask.shape)} but image is {sz(image.shape[:-1])}", case.mask)
    if mask.dtype.kind == "f" and not np.all(np.mod(mask, 1) == 0):
        raise DatasetError(f"case {case.stem!r}: mask holds non-integer values; masks must be class ids", case.mask)
    if mask.size and mask.min() < 0:
        raise DatasetError(f"case {case.stem!r}: mask holds negative label {int(mask.min())}", case.mask)
    return image, mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int64), spacing, is_vol


def load_dataset(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    splits_file: str | os.PathLike[str] | None = None,
    channels: str = "keep",
    normalization: dict[str, Any] | None = None,
    cache_gb: float = 4.0,
    workers: int = 2,
    log: Callable[[str], None] | None = None,
    boundary: int = 0,
) -> LoadedDataset:
    """Discover, check, split, read and normalise a dataset; raises DatasetError naming the case.

    Reading is done by ``workers`` threads (image decoders release the GIL); results keep the
    case order, so the dataset is the same whatever the thread count. ``boundary`` > 0: the targets are
    made from each case's object ids in ``instances/`` (:func:`boundary_case`).
    """
    t0 = time.perf_counter()
    spec = discover(root)
    if splits_file is None and (spec.root / "splits.json").is_file():
        splits_file = spec.root / "splits.json"
    split = make_split([c.stem for c in spec.cases], seed=seed, val_fraction=val_fraction, splits_file=splits_file)
    if not split.train:
        raise DatasetError("the split leaves no training case", spec.root)
    if channels not in ("keep", "grey", "rgb"):
        raise UsageError(f"--channels must be keep, grey or rgb, not {channels!r}")
    by_stem = {c.stem: c for c in spec.cases}
    order = [by_stem[s] for s in split.train] + [by_stem[s] for s in split.val]
    n_train = len(split.train)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        raw = list(ex.map(read_case, order))

    want = {"grey": 1, "rgb": 3}.get(channels, raw[0][0].shape[-1])
    classes = _checked_classes(spec, order, raw)
    if boundary:
        raw, classes = _boundary_targets(spec, order, raw, classes, boundary)
    raw = _converted(order, raw, want, channels)
    normalization, keep_uint8 = _normalization(normalization, spec, raw, n_train)
    cache = _SampleCache(int(cache_gb * (1 << 30)), want, channels, normalization, keep_uint8)
    n_train_samples = 0
    for ci, (case, item) in enumerate(zip(order, raw, strict=True)):
        cache.add_case(case, *item)
        if ci == n_train - 1:
            n_train_samples = len(cache.samples)
    del raw
    samples, used, axis_used = cache.samples, cache.used, cache.axis_used
    train, val = samples[:n_train_samples], samples[n_train_samples:]
    in_channels = train[0].get_image().shape[0]
    ds = LoadedDataset(spec, classes, in_channels, normalization, split, train, val, axis_used,
                       time.perf_counter() - t0, used)
    if log:
        msg = f"dataset {spec.name}: {len(split.train)} train / {len(split.val)} val cases"
        if axis_used is not None:
            msg += f" ({len(train)} / {len(val)} slices along axis {axis_used})"
        msg += f", {len(classes)} classes, {in_channels} channel(s), read in {ds.load_seconds:.1f} s, {used / 2**20:.0f} MiB cached"
        if any(s.image is None for s in samples):
            msg += f" ({sum(s.image is None for s in samples)} images beyond --cache-gb, re-read from disk)"
        log(msg)
    return ds


Raw = tuple[np.ndarray, np.ndarray, tuple[float, ...] | None, bool]


def _boundary_targets(spec: DatasetSpec, order: list[Case], raw: list[Raw], classes: list[str],
                      width: int) -> tuple[list[Raw], list[str]]:
    """``--boundary W``: each case's target becomes background / object / boundary made from its object ids
    (``instances/STEM``, segcli.instances.boundary_targets), so the network learns to mark where touching
    objects meet; the bundle then records the boundary class (``"instances"`` in segcli.json)."""
    if len(classes) != 2:
        raise DatasetError(f"--boundary needs one foreground class; the dataset has {len(classes) - 1} "
                           f"({', '.join(classes[1:])})", spec.root)
    out = []
    for case, (img, _, sp, vol) in zip(order, raw, strict=True):
        if case.instances is None:
            raise DatasetError(f"case {case.stem!r}: --boundary needs its object ids in instances/ (one id per "
                               "object, 0 = background)", spec.root)
        try:
            inst = read_array(case.instances)[0][..., 0]
        except SegcliError as exc:
            raise DatasetError(f"case {case.stem!r}: {exc}", case.instances) from None
        if inst.shape != img.shape[:-1] or inst.dtype.kind not in "ui":
            raise DatasetError(f"case {case.stem!r}: instances must be integer ids of the image's size "
                               f"({inst.dtype}, {inst.shape[::-1]} against {img.shape[:-1][::-1]})", case.instances)
        out.append((img, boundary_targets(inst, width), sp, vol))
    name = "boundary" if classes[1] != "boundary" else "object boundary"
    spec.meta["instances"] = {"boundary": name, "object": classes[1]}
    return out, [*classes, name]


def _checked_classes(spec: DatasetSpec, order: list[Case], raw: list[Raw]) -> list[str]:
    """The class names (the dataset's, or class_1.. from the largest label); a label beyond them stops the run."""
    classes = spec.classes
    max_label = max(int(m.max(initial=0)) for _, m, _, _ in raw)
    if classes is None:
        n = max(2, max_label + 1)
        classes = ["background"] + [f"class_{i}" for i in range(1, n)]
    for case, (_, m, _, _) in zip(order, raw, strict=True):
        top = int(m.max(initial=0))
        if top >= len(classes):
            raise DatasetError(
                f"case {case.stem!r}: mask holds label {top} but the dataset has {len(classes)} classes "
                f"(0..{len(classes) - 1}: {', '.join(classes)})", case.mask)
    return classes


def _converted(order: list[Case], raw: list[Raw], want: int, channels: str) -> list[Raw]:
    """Every image converted to ``want`` channels, a failure named by its case."""
    converted = []
    for case, (img, m, sp, vol) in zip(order, raw, strict=True):
        try:
            img = convert(img, want, channels, case.images[0])
        except SegcliError as exc:
            raise DatasetError(f"case {case.stem!r}: {exc.message}", case.images[0]) from None
        converted.append((img, m, sp, vol))
    return converted


def _normalization(normalization: dict[str, Any] | None, spec: DatasetSpec, raw: list[Raw],
                   n_train: int) -> tuple[dict[str, Any], bool]:
    """The normalisation (given, or chosen from the training cases), checked; and whether uint8 stays uint8."""
    dtypes = {img.dtype for img, _, _, _ in raw}
    if normalization is None:
        all8 = dtypes <= {np.dtype(np.uint8)}
        normalization = choose_normalization(np.dtype(np.uint8) if all8 else np.dtype(np.float32), spec.modality,
                                             [(img, m) for img, m, _, _ in raw[:n_train]])
    try:
        norm.validate(normalization)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return normalization, normalization["kind"] == "dtype" and dtypes <= {np.dtype(np.uint8)}


class _SampleCache:
    """Cuts cases into samples (volumes into slices), keeping images in memory up to the byte budget and
    giving the rest a loader that re-reads them from disk."""

    def __init__(self, budget: int, want: int, channels: str, normalization: dict[str, Any], keep_uint8: bool) -> None:
        """An empty cache with ``budget`` bytes for in-memory images."""
        self.budget, self.want, self.channels = budget, want, channels
        self.normalization, self.keep_uint8 = normalization, keep_uint8
        self.used = 0
        self.samples: list[Sample] = []
        self.axis_used: int | None = None

    def add_case(self, case: Case, img: np.ndarray, m: np.ndarray, sp: tuple[float, ...] | None, vol: bool) -> None:
        """Normalise one case and append its samples."""
        if not self.keep_uint8:
            # Whole image (whole volume) at once: per-image statistics as inference computes them.
            img = norm.normalize(img, self.normalization)
        if vol:
            axis = slice_axis(sp)
            self.axis_used = axis
            imgs = np.moveaxis(img, axis, 0)
            masks = np.moveaxis(m, axis, 0)
            sp2 = tuple(v for i, v in enumerate(sp) if i != axis) if sp else None
            items = [(f"{case.stem}_s{z:04d}", imgs[z], masks[z], sp2, z) for z in range(imgs.shape[0])]
        else:
            items = [(case.stem, img, m, sp, None)]
        for stem, a, mk, sp_, z in items:
            x = np.ascontiguousarray(np.moveaxis(a, -1, 0))
            nbytes = x.nbytes
            keep = self.used + nbytes <= self.budget
            self.used += nbytes if keep else 0
            loader = None
            if not keep:
                loader = _make_loader(case, z, self.axis_used if vol else None, self.want, self.channels,
                                      self.normalization, self.keep_uint8)
            boxes = component_boxes(mk > 0)
            self.samples.append(Sample(stem, case.stem, tuple(mk.shape), x if keep else None, np.ascontiguousarray(mk),
                                       sp_, boxes, loader))


def convert(img: np.ndarray, want: int, mode: str, path: Path) -> np.ndarray:
    """Channel conversion as inference does it (``normalize.convert_channels``), keeping uint8 as uint8."""
    if img.shape[-1] == want:
        return img
    try:
        out = convert_channels(img, want, mode, path)
    except InputError as exc:
        if mode == "keep":
            raise InputError(f"has {img.shape[-1]} channel(s) where the first image has {want}; "
                             "pass --channels grey or --channels rgb to convert", path) from None
        raise exc
    if img.dtype == np.uint8 and out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def _make_loader(case: Case, z: int | None, axis: int | None, want: int, channels: str,
                 normalization: dict[str, Any], keep_uint8: bool) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        img, _, _, _ = read_case(case)
        img = convert(img, want, channels, case.images[0])
        if not keep_uint8:
            img = norm.normalize(img, normalization)
        if z is not None and axis is not None:
            img = np.moveaxis(img, axis, 0)[z]
        return np.ascontiguousarray(np.moveaxis(img, -1, 0))

    return load


# --------------------------------------------------------------------------------------------- crops
def crop_candidates(
    boxes: np.ndarray, image_shape: tuple[int, int], pad: int, jitter: int, rng: np.random.Generator,
    min_side: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """(jittered component boxes before squaring, final crop boxes) for the kept crops.

    Exactly :func:`segcli.geometry.crop_boxes` (same calls, same order, same random draws) on the
    GROUND TRUTH's component boxes, split open so tests can check the jitter before squaring.
    """
    jittered = jitter_boxes(boxes, jitter, rng) if jitter else np.asarray(boxes, dtype=np.int64).reshape(-1, 4).copy()
    final = square_pad_shift(jittered, image_shape, pad, clamp=True)
    keep = valid_boxes(final, image_shape, min_side)
    return jittered[keep], final[keep]


def crop_to_input(image: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """A full-res crop → the fine network's input, as inference does it: letterbox (edge), area-resize to S×S."""
    y0, x0, y1, x1 = (int(v) for v in box)
    crop, _ = letterbox(to_float(image[:, y0:y1, x0:x1]))
    return resize(crop, (size, size), "area")


def crop_to_target(mask: np.ndarray, box: Sequence[int], size: int, n_out: int) -> np.ndarray:
    y0, x0, y1, x1 = (int(v) for v in box)
    m = mask[y0:y1, x0:x1]
    return soft_onehot(m, n_out, (size, size), square=max(m.shape))


def fine_box(sample: Sample, pad: int, jitter: int, rng: np.random.Generator, min_side: int = 5) -> np.ndarray:
    """One random training crop: a jittered GT component crop, or the whole image when there is none."""
    _, final = crop_candidates(sample.boxes, sample.shape, pad, jitter, rng, min_side)
    if len(final) == 0:
        return np.array([0, 0, sample.shape[0], sample.shape[1]], dtype=np.int64)
    return final[int(rng.integers(len(final)))]


def patch_region(image_shape: tuple[int, int], box: Sequence[int], shift: int, rng: np.random.Generator) -> np.ndarray:
    """A grid patch moved by up to ±``shift`` px (kept inside the image): more positions than the grid."""
    H, W = image_shape
    y0, x0, y1, x1 = (int(v) for v in box)
    h, w = y1 - y0, x1 - x0
    dy, dx = (rng.integers(-shift, shift + 1, size=2) if shift > 0 else (0, 0))
    y0 = int(np.clip(y0 + dy, 0, H - h))
    x0 = int(np.clip(x0 + dx, 0, W - w))
    return np.array([y0, x0, y0 + h, x0 + w], dtype=np.int64)


def patch_to_input(image: np.ndarray, box: Sequence[int], size: int) -> np.ndarray:
    """A refine patch → S2 input as the refine engine builds it: area-resize (no letterbox) to S×S."""
    y0, x0, y1, x1 = (int(v) for v in box)
    return resize(to_float(image[:, y0:y1, x0:x1]), (size, size), "area")


def patch_to_target(mask: np.ndarray, box: Sequence[int], size: int, n_out: int) -> np.ndarray:
    y0, x0, y1, x1 = (int(v) for v in box)
    return soft_onehot(mask[y0:y1, x0:x1], n_out, (size, size))
