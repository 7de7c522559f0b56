"""Score a folder of predicted masks against a folder of ground-truth masks.

Pairing is by file-name stem, so ``segcli predict`` outputs (``x_seg.png``) pair with ``x.png``;
the suffixes in :data:`PRED_SUFFIXES` are stripped when the exact stem has no match, and the
extension may differ (``x_seg.nii.gz`` against ``x.nii.gz`` or ``x.png`` against ``x.tif``).
Masks hold class ids; a binary mask stored as 0/255 is read as 0/1 (a common export habit) when
the other side is binary. Metrics (see :mod:`segcli.metrics` for the exact definitions and the
empty-mask rules) are computed per case and per foreground class, then averaged over cases;
object-level recall is pooled over all objects of all cases (a mean of per-case fractions would
let a case with one object weigh as much as a case with fifty).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from segcli import metrics, metrics_stream
from segcli.bundle import load_bundle, resolve_model
from segcli.errors import BundleError, InputError, SegcliError, UsageError
from segcli.instance_metrics import InstanceCounts, instance_counts
from segcli.io import open_image
from segcli.io.atomic import split_extension
from segcli.io.dicomseg import algorithm_name, dicom_seg_on_grid, is_dicom_seg
from segcli.report import tidy
from segcli.runtimes.device import available_cores

PRED_SUFFIXES = ("_seg", "_mask", "_pred", "_prediction", "_segmentation", "_label", "_labels", "-seg", "-mask")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".jpg", ".jpeg", ".dcm")
#: Unpaired files named one per line before the rest are counted.
MAX_LOGGED = 10


def _mask_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError("folder not found", folder)
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        stem, ext = split_extension(p.name)
        if ext.lower() in MASK_EXTS:
            out.setdefault(stem, p)
    return out


def pair_files(pred_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str]) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """(case, prediction, ground truth) pairs, unpaired predictions, unpaired ground truths.

    An exact stem match wins over a suffix-stripped one; probability maps (``*_probs``) that
    ``segcli predict --probabilities`` writes next to masks, and ``--preview`` pictures, are skipped.
    """
    preds = _mask_files(Path(pred_dir))
    gts = _mask_files(Path(gt_dir))
    pairs: dict[str, tuple[Path, Path]] = {}
    unpaired: list[Path] = []
    # Exact matches first so that x.png is not taken by x_seg.png's stripping.
    rest = []
    for stem, p in preds.items():
        if stem.endswith(("_probs", "_preview")):
            continue
        if stem in gts and stem not in pairs:
            pairs[stem] = (p, gts[stem])
        else:
            rest.append((stem, p))
    for stem, p in rest:
        target = next((stem[: -len(s)] for s in PRED_SUFFIXES if stem.endswith(s) and stem[: -len(s)] in gts), None)
        if target is not None and target not in pairs:
            pairs[target] = (p, gts[target])
        else:
            unpaired.append(p)
    missing = [gts[s] for s in gts if s not in pairs]
    return [(s, *pairs[s]) for s in sorted(pairs)], unpaired, missing


def _read_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    img = open_image(path)
    a = img.array
    if a.shape[-1] > 1 and not all(np.array_equal(a[..., 0], a[..., i]) for i in range(1, a.shape[-1])):
        raise InputError(f"mask has {a.shape[-1]} different channels; expected one channel of class ids", path)
    a = a[..., 0]
    if a.dtype.kind == "f":
        a = np.rint(a)
    return a.astype(np.int64), (tuple(img.spacing) if img.spacing else None)


def _fix_255(a: np.ndarray, other: np.ndarray) -> np.ndarray:
    if a.max(initial=0) == 255 and np.all((a == 0) | (a == 255)) and other.max(initial=0) <= 1:
        return (a > 0).astype(np.int64)
    return a


#: More unnamed label values than this in a ground truth are more likely object ids than classes.
MANY_LABELS = 32


def _class_names(gt_dir: Path, n: int, classes: Sequence[str] | None) -> list[str]:
    if classes is not None:
        names = list(classes)
    else:
        names = []
        for js in (gt_dir / "dataset.json", gt_dir.parent / "dataset.json"):
            try:
                labels = json.loads(js.read_text()).get("labels")
                by_id = {int(v): str(k) for k, v in labels.items()}
                names = [by_id.get(i, f"class_{i}") for i in range(max(by_id) + 1)]
                break
            except (OSError, ValueError, AttributeError, TypeError):
                continue
    while len(names) < n:
        names.append("background" if not names else f"class_{len(names)}")
    return names


def _read_seg_pair(pred_path: Path, gt_path: Path, classes: Sequence[str] | None
                   ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A DICOM SEG prediction on the ground truth's own voxel grid (both in the file's array order).

    Segments are matched to classes by name. The names come from the caller (``classes``, or the
    dataset.json beside the ground truth), else from the bundle the SEG names as its algorithm (segcli
    writes it there), else the SEG's segment order numbers them.
    """
    # lazy: SimpleITK costs ~0.2 s to import
    import SimpleITK as sitk

    if classes is None and (name := algorithm_name(pred_path)):
        try:
            classes = load_bundle(resolve_model(name, "volume")).output_classes
        except BundleError:
            classes = None

    try:
        ref = sitk.ReadImage(str(gt_path))
    except RuntimeError:
        raise InputError("cannot read this ground truth as a volume to score a DICOM SEG against", gt_path) from None
    gt = sitk.GetArrayFromImage(ref)
    if gt.ndim != 3:
        raise InputError("a DICOM SEG is scored against a 3D ground truth (NIfTI, MHA, NRRD)", gt_path)
    pred = dicom_seg_on_grid(pred_path, ref, classes)
    return pred.astype(np.int64), np.rint(gt).astype(np.int64), tuple(float(v) for v in reversed(ref.GetSpacing()))


def _score_case(item: tuple[str, Path, Path], fov_dir: Path | None, spacing: Sequence[float] | None,
                classes: Sequence[str] | None = None) -> dict[str, Any]:
    case, pred_path, gt_path = item
    try:
        if is_dicom_seg(pred_path):
            pred, gt, gt_spacing = _read_seg_pair(pred_path, gt_path, classes)
        else:
            gt, gt_spacing = _read_labels(gt_path)
            pred, _ = _read_labels(pred_path)
        gt = _fix_255(gt, pred)
        pred = _fix_255(pred, gt)
        if pred.shape != gt.shape:
            raise InputError(f"prediction is {'x'.join(map(str, pred.shape[::-1]))} but ground truth is "
                             f"{'x'.join(map(str, gt.shape[::-1]))}", pred_path)
        fov = None
        if fov_dir is not None:
            fovs = _mask_files(fov_dir)
            if case not in fovs:
                raise InputError(f"no field-of-view mask for case {case!r} in {fov_dir}", fov_dir)
            f, _ = _read_labels(fovs[case])
            if f.shape != gt.shape:
                raise InputError("field-of-view mask differs in size from the ground truth", fovs[case])
            fov = f > 0
        sp = tuple(spacing) if spacing is not None else gt_spacing
        return {"case": case, "prediction": str(pred_path), "ground_truth": str(gt_path), "pred": pred, "gt": gt,
                "fov": fov, "spacing": sp}
    except SegcliError as exc:
        return {"case": case, "prediction": str(pred_path), "ground_truth": str(gt_path), "error": str(exc)}


def evaluate(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    *,
    fov_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    hd95: bool = True,
    csv_path: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    instances: bool = False,
) -> dict[str, Any]:
    """Per-case and mean metrics for every foreground class; optionally written as CSV and JSON.

    HD95 is in mm when the ground truth carries a spacing (NIfTI, DICOM...) or ``spacing`` is
    given, else in pixels (``units`` says which). Files with no counterpart are listed under
    ``unpaired``; raises InputError only if nothing pairs at all.

    ``instances``: the ground truth holds instance labels (every non-zero id one object); predictions are
    instance labels too, or binary masks whose connected components are taken as the objects. Dice and
    the rest score foreground against foreground, and AJI, PQ and F1 (:mod:`segcli.instance_metrics`) are
    added per case and pooled over the cases.
    """
    gt_dir = Path(gt_dir)
    pairs, unpaired_pred, unpaired_gt = _paired(pred_dir, gt_dir, log)

    n_workers = workers or min(4, available_cores())
    fov = Path(fov_dir) if fov_dir is not None else None

    seg_classes = classes or (_class_names(gt_dir, 0, None) or None)
    if classes is None and seg_classes is None:  # no dataset.json: the bundle a DICOM SEG prediction names
        classes = seg_classes = _classes_from_predictions(pairs)

    def work(item: tuple[str, Path, Path]) -> dict[str, Any]:
        return _measure_case(item, fov, spacing, seg_classes, hd95, instances)

    with ThreadPoolExecutor(max_workers=n_workers) as ex:
        recs = list(ex.map(work, pairs))
    failed = [r for r in recs if "error" in r]
    good = [r for r in recs if "error" not in r]
    for r in failed:
        if log:
            log(f"case {r['case']}: {r['error']}")
    if not good:
        raise InputError(f"no case could be scored (first problem: {failed[0]['error']})", pred_dir)
    n_classes = max(2, max(r["n_labels"] for r in good), len(classes) if classes else 0)
    names = _class_names(gt_dir, n_classes, classes)
    if not instances and log and n_classes > MANY_LABELS and all(n.startswith("class_") for n in names[1:]):
        log(f"warning: the ground truth holds {n_classes - 1} unnamed label values, scored as classes; if they "
            "are object ids, pass --instances (or name the classes in a dataset.json)")
    fg = list(range(1, n_classes))
    cases = [_case_entry(r, fg, names) for r in good]
    units = {("mm" if r["spacing"] else "px") for r in good}
    result = {
        "pred_dir": str(pred_dir), "gt_dir": str(gt_dir), "fov_dir": str(fov_dir) if fov_dir else None,
        "units": units.pop() if len(units) == 1 else "mixed (mm where spacing is known, else px)",
        "classes": {str(c): names[c] for c in range(n_classes)},
        "n_cases": len(cases),
        "size_bins": {b: [lo, None if math.isinf(hi) else hi] for b, (lo, hi) in metrics.SIZE_BINS.items()},
        "cases": cases,
        "mean": _means(cases, fg, names),
        "unpaired": {"predictions": [str(p) for p in unpaired_pred], "ground_truth": [str(p) for p in unpaired_gt]},
        "failed": [{"case": r["case"], "error": r["error"]} for r in failed],
    }
    if instances:
        _add_instance_scores(result, good)
    if json_path is not None:
        Path(json_path).write_text(to_json(result) + "\n")
    if csv_path is not None:
        write_csv(result, csv_path)
    return result


def _paired(pred_dir: str | os.PathLike[str], gt_dir: Path,
            log: Callable[[str], None] | None) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """The prediction/truth pairs, each file without a counterpart logged; InputError when nothing pairs."""
    for what, folder in (("predictions", Path(pred_dir)), ("ground truth", gt_dir)):
        if folder.is_file():
            raise UsageError(f"{folder}: {what} must be a folder, and this is a file; evaluate compares a folder of "
                             "predictions with a folder of ground truths (segcli evaluate PREDICTIONS/ GROUND_TRUTH/)")
        if not folder.exists():
            raise UsageError(f"{folder}: {what} folder not found")
    pairs, unpaired_pred, unpaired_gt = pair_files(pred_dir, gt_dir)
    if not pairs and pair_files(gt_dir, pred_dir)[0]:
        raise UsageError(f"nothing pairs as given, but everything would with the folders swapped: predictions come "
                         f"first (segcli evaluate {gt_dir} {pred_dir})")
    if log and pairs:  # with no pair at all, the one error below says it; no line per file before it
        lines = [f"no ground truth for prediction {p.name} (looked for the same stem in {gt_dir})" for p in unpaired_pred]
        lines += [f"no prediction for ground truth {p.name}" for p in unpaired_gt]
        for line in lines[:MAX_LOGGED]:
            log(line)
        if len(lines) > MAX_LOGGED:
            log(f"... and {len(lines) - MAX_LOGGED} more unpaired file(s) (all listed under 'unpaired' in --json)")
    if not pairs:
        raise InputError(f"no prediction pairs with a ground-truth file by name ({len(unpaired_pred)} prediction(s), "
                         f"{len(unpaired_gt)} ground truth(s)); predictions x.png or x_seg.png pair with x.png", pred_dir)
    return pairs, unpaired_pred, unpaired_gt


def _classes_from_predictions(pairs: list[tuple[str, Path, Path]]) -> list[str] | None:
    """Class names from the bundle a DICOM SEG prediction names as its algorithm (segcli writes it), if any."""
    for _, pred, _ in pairs:
        if not pred.name.lower().endswith(".dcm"):
            continue
        try:
            name = algorithm_name(pred)
            return list(load_bundle(resolve_model(name, "volume")).output_classes) if name else None
        except (SegcliError, OSError, ValueError):
            return None
    return None


def _measure_case(item: tuple[str, Path, Path], fov: Path | None, spacing: Sequence[float] | None,
                  seg_classes: Sequence[str] | None, hd95: bool, instances: bool = False) -> dict[str, Any]:
    """One pair read and scored (a worker's job); the masks are dropped once measured."""
    case, pred_path, gt_path = item
    if instances and metrics_stream.wants_streaming(pred_path, gt_path):
        return {"case": case, "prediction": str(pred_path), "ground_truth": str(gt_path),
                "error": f"{pred_path}: --instances scores pairs of up to {metrics_stream.STREAM_PIXELS // 10**6} "
                         "MPixel held in memory; this pair is larger (score its tiles instead)"}
    if metrics_stream.wants_streaming(pred_path, gt_path):  # a big 2D pair: band by band, never held whole
        head = {"case": case, "prediction": str(pred_path), "ground_truth": str(gt_path)}
        try:
            fovs = _mask_files(fov) if fov is not None else {}
            if fov is not None and case not in fovs:
                raise InputError(f"no field-of-view mask for case {case!r} in {fov}", fov)
            return {**head, **metrics_stream.score_streamed(pred_path, gt_path, fovs.get(case), spacing, hd95)}
        except SegcliError as exc:
            return {**head, "error": str(exc)}
    rec = _score_case(item, fov, spacing, seg_classes)
    if "error" in rec:
        return rec
    if instances:
        rec["instance_counts"] = _instance_counts(rec)
    k = int(max(rec["gt"].max(initial=0), rec["pred"].max(initial=0))) + 1
    rec["n_labels"] = k
    rec["metrics"] = metrics.case_metrics(rec["pred"], rec["gt"], range(1, max(k, 2)), spacing=rec["spacing"],
                                          fov=rec["fov"], with_hd95=hd95)
    for key in ("pred", "gt", "fov"):
        rec.pop(key)
    return rec


def _case_entry(r: dict[str, Any], fg: list[int], names: list[str]) -> dict[str, Any]:
    """One case's table entry: metrics per class name, NaN for a class absent from both masks."""
    per = {}
    for c in fg:
        m = r["metrics"].get(c)
        if m is None:  # class absent from both masks of this case: no score, left out of the means (NaN)
            nan = float("nan")
            m = {"dice": nan, "iou": nan, "precision": nan, "recall": nan, "hd95": nan, "objects": 0, "hit": 0,
                 "object_recall": float("nan"), **{f"{b}_{s}": 0 for b in metrics.SIZE_BINS for s in ("objects", "hit")}}
        per[names[c]] = m
    return {"case": r["case"], "prediction": r["prediction"], "ground_truth": r["ground_truth"],
            "spacing": list(r["spacing"]) if r["spacing"] else None, "metrics": per}


def _means(cases: list[dict[str, Any]], fg: list[int], names: list[str]) -> dict[str, Any]:
    """Per-class means over the cases and, with several foreground classes, their mean as "all"."""
    mean: dict[str, Any] = {}
    for c in fg:
        name = names[c]
        rows = [cs["metrics"][name] for cs in cases]
        mean[name] = _aggregate(rows)
    if len(fg) > 1:
        mean["all"] = {k: _nanmean([mean[names[c]][k] for c in fg]) for k in ("dice", "iou", "precision", "recall", "hd95")}
        objs = sum(mean[names[c]]["objects"] for c in fg)
        hits = sum(mean[names[c]]["hit"] for c in fg)
        mean["all"].update(objects=objs, hit=hits, object_recall=hits / objs if objs else float("nan"))
    return mean


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: _nanmean([r[k] for r in rows]) for k in ("dice", "iou", "precision", "recall")}
    out["hd95"] = _nanmean([r["hd95"] for r in rows])
    out["hd95_undefined"] = int(sum(1 for r in rows if not math.isfinite(r["hd95"])))
    out["cases_scored"] = int(sum(1 for r in rows if math.isfinite(r["dice"])))  # the class is in either mask
    out["objects"] = int(sum(r["objects"] for r in rows))
    out["hit"] = int(sum(r["hit"] for r in rows))
    out["object_recall"] = out["hit"] / out["objects"] if out["objects"] else float("nan")
    for b in metrics.SIZE_BINS:
        n = int(sum(r[f"{b}_objects"] for r in rows))
        h = int(sum(r[f"{b}_hit"] for r in rows))
        out[f"{b}_objects"] = n
        out[f"{b}_hit"] = h
        out[f"object_recall_{b}"] = h / n if n else float("nan")
    return out


def to_json(result: dict[str, Any]) -> str:
    """The result as JSON text: NaN (a class not scored) as null, floats to 6 significant digits."""
    return json.dumps(tidy(_clean(result)), indent=2)


def _clean(v: Any) -> Any:
    """JSON has no NaN: undefined values (HD95 with one empty mask) become null."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


CSV_COLUMNS = ("case", "class", "dice", "iou", "precision", "recall", "hd95", "objects", "hit", "object_recall",
               "object_recall_small", "object_recall_medium", "object_recall_large")


def _row_values(case: str, name: str, m: dict[str, Any]) -> list[Any]:
    def obj(b: str) -> float:
        if f"object_recall_{b}" in m:
            return m[f"object_recall_{b}"]
        n = m.get(f"{b}_objects", 0)
        return m.get(f"{b}_hit", 0) / n if n else float("nan")

    vals = [case, name] + [m.get(k, float("nan")) for k in ("dice", "iou", "precision", "recall", "hd95", "objects", "hit",
                                                              "object_recall")]
    return vals + [obj(b) for b in ("small", "medium", "large")]


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Rows (per case and class, then the means) in :data:`CSV_COLUMNS` order."""
    rows = []
    for cs in result["cases"]:
        for name, m in cs["metrics"].items():
            rows.append(_row_values(cs["case"], name, m))
    for name, m in result["mean"].items():
        rows.append(_row_values("mean", name, m))
    return rows


def write_csv(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for row in table_rows(result):
            w.writerow(["" if isinstance(v, float) and not math.isfinite(v) else (round(v, 6) if isinstance(v, float) else v)
                        for v in row])


def _instance_counts(rec: dict[str, Any]) -> Any:
    """AJI/PQ counts of one case; its masks become foreground masks for the semantic scores."""
    gt, pred = rec["gt"], rec["pred"]
    if pred.max(initial=0) <= 1:  # a binary mask: its connected components are the objects
        pred = ndi.label(pred > 0, structure=np.ones((3,) * pred.ndim, bool))[0]
    if rec["fov"] is not None:
        gt, pred = gt * rec["fov"], pred * rec["fov"]
    counts = instance_counts(gt, pred)
    rec["gt"], rec["pred"] = (rec["gt"] > 0).astype(np.int64), (rec["pred"] > 0).astype(np.int64)
    return counts


def _add_instance_scores(result: dict[str, Any], good: list[dict[str, Any]]) -> None:
    """Per-case AJI, PQ, SQ, DQ and F1, their means over cases and the scores pooled over every object."""
    pooled = InstanceCounts()
    by_case = {r["case"]: r["instance_counts"] for r in good}
    for cs in result["cases"]:
        c = by_case[cs["case"]]
        pooled = pooled + c
        cs["instances"] = c.scores()
    per = [cs["instances"] for cs in result["cases"]]
    mean = {k: _nanmean([float("nan") if p[k] is None else p[k] for p in per]) for k in ("aji", "pq", "sq", "dq", "f1_iou50")}
    result["instances"] = {"mean_over_cases": mean, "pooled": pooled.scores(),
                           "definitions": "AJI: Kumar et al., IEEE TMI 2017; PQ = SQ x DQ: Kirillov et al., CVPR 2019; "
                                          "F1 at IoU 0.5 equals DQ"}

