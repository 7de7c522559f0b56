"""Every series of dcm2niix's validation repositories through ``segcli predict``, checked against dcm2niix's Ref.

``--root`` holds the repositories (dcm_qa, dcm_qa_enh, ...), each with ``In/`` (vendor DICOM) and ``Ref/``
(dcm2niix's NIfTI and JSON sidecars). A *unit* is a folder holding DICOM files, and also each multi-frame
file on its own (users give those directly). All units of a repository go through one ``segcli predict``
call (``--json``), each under a unique link name so masks never collide.

Each unit ends as one of:

- ``OK``: the mask's grid matches a Ref NIfTI of the same SeriesNumber and SeriesDescription (same shape after reorientation,
  every voxel-centre corner within 0.01 mm, read with nibabel) and the intensities segcli decodes
  (read by segcli's own reader, put in the mask's voxel order) equal that Ref's to 1e-3 of its range;
- ``refused-4D``: refused with "4D DICOM ..." and the Ref of that series is 4D (or split in several files);
- ``refused``: any other one-line refusal (counted against "every 3D series OK" when a 3D Ref exists);
  A grid more than 0.01 mm from the Ref's is still ``OK`` when it lies on every source file's own
  ImagePositionPatient (read with pydicom) within 0.01 mm while the Ref's grid does not: dcm2niix
  extrapolates the slice spacing from two slices, segcli spans the first to the last position, and
  over 96 slices IPPs rounded to 1e-4 mm put dcm2niix's far corner 0.010 mm off the files (the row says so);
- ``near``: a far corner is 0.01-0.05 mm from the Ref's and the files' positions do not settle it;
- ``wrong``: a mask was written but matches no Ref, or a 4D refusal where the Ref is one 3D volume;
- ``crash``: an internal error ("this is a bug"), or no report for the unit;
- ``no-ref``: a mask or refusal where neither the repository's Ref nor the packaged dcm2niix gives a NIfTI
  for that series (not scored).

Where the repository's Ref NIfTI is unavailable here (a few large files), the packaged dcm2niix's own
conversion of the unit is the reference, and the row says so.

    python benchmarks/dicom_conformance.py --root /work/dcmqa --out benchmarks/results/dicom_conformance.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REPOS = ("dcm_qa", "dcm_qa_enh", "dcm_qa_philips_enh", "dcm_qa_sag", "dcm_qa_xa30i", "dcm_qa_ge", "dcm_qa_philips")
CORNER_MM = 0.01
# A far corner off by more than 0.01 mm but under 0.05 mm, intensities equal, and the files' own positions
# not on segcli's side: "near".
NEAR_MM = 0.05


def series_key(number: object, description: object) -> str:
    """SeriesNumber and SeriesDescription together: series numbers repeat across sessions (dcm_qa_ge)."""
    return f"{number or ''}|{str(description or '').strip()}"


def _header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                               specific_tags=["SeriesNumber", "SeriesDescription", "NumberOfFrames", "SOPClassUID"])
    except Exception:
        return None


def units(root: Path, work: Path) -> list[tuple[Path, str, str]]:
    """(path, SeriesNumber, label) for every series under ``root/In`` and every multi-frame file in it.

    A folder holding one series is a unit as it is; a folder holding several (Philips exports put
    every series in one folder) gives one unit per series, a folder of links to that series' files."""
    from segcli.io.dicomscan import scan_folder

    out = []
    for folder, _dirs, _files in sorted(os.walk(root / "In")):
        series = scan_folder(Path(folder)).series
        for _uid, files in sorted(series.items()):
            first = _header(Path(files[0]))
            number = series_key(getattr(first, "SeriesNumber", ""), getattr(first, "SeriesDescription", ""))
            unit, label = Path(folder), str(Path(folder).relative_to(root))
            if len(series) > 1:
                label += f" (series {number.split('|')[0]})"
                unit = Path(tempfile.mkdtemp(dir=work, prefix="series-"))
                for f in files:
                    os.symlink(f, unit / Path(f).name)
            out.append((unit, number, label))
            for f in files:
                ds = _header(Path(f))
                if ds is not None and int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 and len(files) > 1:
                    key = series_key(getattr(ds, "SeriesNumber", ""), getattr(ds, "SeriesDescription", ""))
                    out.append((Path(f), key, str(Path(f).relative_to(root))))
    return out


def refs(root: Path) -> dict[str, list[Path]]:
    """Series key (number and description) -> NIfTI files (from their JSON sidecars) under ``root``."""
    found: dict[str, list[Path]] = {}
    for nii in sorted(root.glob("*.nii*")):
        side = Path(str(nii).removesuffix(".gz").removesuffix(".nii") + ".json")
        try:
            if side.exists():
                text = side.read_text()
            else:
                with gzip.open(f"{side}.gz", "rt") as fh:
                    text = fh.read()
            side_fields = json.loads(text)
            number = series_key(side_fields.get("SeriesNumber", ""), side_fields.get("SeriesDescription", ""))
        except (OSError, ValueError):
            continue
        found.setdefault(number, []).append(nii)
    return found


def corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World positions (mm, RAS) of the 8 corner voxel centres."""
    idx = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return idx @ affine[:3, :3].T + affine[:3, 3]


def grid_error(mask_shape, mask_aff, ref_shape, ref_aff) -> float:
    """Largest distance from a mask corner to the nearest Ref corner (inf when the shapes differ)."""
    if sorted(mask_shape[:3]) != sorted(ref_shape[:3]):
        return float("inf")
    a, b = corners(mask_shape[:3], mask_aff), corners(ref_shape[:3], ref_aff)
    return float(np.max(np.min(np.linalg.norm(a[:, None] - b[None], axis=2), axis=1)))


def edge_voxels(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World positions (mm, RAS) of the voxel centres on the 12 edges of the grid's box: every slice's
    first transmitted pixel (its ImagePositionPatient) is one of them, whichever axis the slices run along."""
    idx = set()
    n = [int(v) for v in shape[:3]]
    for axis in range(3):
        a, b = [x for x in range(3) if x != axis]
        for ea in (0, n[a] - 1):
            for eb in (0, n[b] - 1):
                for t in range(n[axis]):
                    v = [0, 0, 0]
                    v[axis], v[a], v[b] = t, ea, eb
                    idx.add(tuple(v))
    arr = np.array(sorted(idx), dtype=np.float64)
    return arr @ affine[:3, :3].T + affine[:3, 3]


def ipp_error(unit: Path, affine: np.ndarray, shape: tuple[int, ...]) -> float | None:
    """Largest distance from a source file's ImagePositionPatient (read with pydicom) to the nearest
    edge voxel centre of the grid: how far the grid is from the slices the scanner says it wrote.
    None when the unit is not a folder of single-frame files with positions."""
    import pydicom

    if not unit.is_dir():
        return None
    edges = edge_voxels(shape, affine)
    worst = 0.0
    for f in sorted(unit.iterdir()):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
            lps = np.array([float(v) for v in ds.ImagePositionPatient])
        except Exception:
            return None
        ras = lps * np.array([-1.0, -1.0, 1.0])
        worst = max(worst, float(np.min(np.linalg.norm(edges - ras, axis=1))))
    return worst


def _one_voxel_axes(affine: np.ndarray, shape) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    for axis in range(3):
        if int(shape[axis]) == 1:
            a, b = [out[:3, k] for k in range(3) if k != axis]
            normal = np.cross(a, b) if axis != 1 else np.cross(b, a)
            out[:3, axis] = normal / np.linalg.norm(normal)
    return out


def ref_in_mask_order(ref_data: np.ndarray, ref_aff: np.ndarray, mask_shape, mask_aff) -> np.ndarray | None:
    """The Ref's voxels re-indexed onto the mask's voxel grid (a signed axis permutation), or None.

    Along an axis of one voxel (a single-slice plane) the spacing and the sign say nothing, and the two
    writers choose them differently: that axis is taken as the unit normal of the other two on both sides."""
    mask_aff, ref_aff = _one_voxel_axes(mask_aff, mask_shape), _one_voxel_axes(ref_aff, ref_data.shape)
    m = np.linalg.inv(mask_aff) @ ref_aff  # ref voxel index -> mask voxel index
    rot = np.rint(m[:3, :3])
    if not np.allclose(m[:3, :3], rot, atol=1e-3) or not np.array_equal(np.abs(rot).sum(0), [1, 1, 1]):
        return None
    out = ref_data
    order = [int(np.flatnonzero(rot[:, j])[0]) for j in range(3)]  # ref axis j -> mask axis order[j]
    for j in range(3):
        if rot[order[j], j] < 0:
            out = np.flip(out, axis=j)
    out = np.transpose(out, np.argsort(order))
    return out if out.shape == tuple(mask_shape[:3]) else None


def decoded(unit: Path, volume: int | None) -> tuple[np.ndarray, str]:
    """What segcli decodes for ``unit``, in the order of the mask it writes (nibabel x, y, z), and the route."""
    from segcli import io
    from segcli.io.medical import to_original_axes

    img = io.open_image(unit, volume=volume)
    values = np.transpose(to_original_axes(img.array[..., 0], img.meta), (2, 1, 0)).astype(np.float64)
    return values, "dcm2niix" if img.meta.get("source") == "dicom-converted" else "segcli"


def fresh_refs(unit: Path, work: Path) -> dict[str, list[Path]]:
    """Where the repository's Ref NIfTI is unavailable: the packaged dcm2niix's conversion of the unit."""
    import dcm2niix

    out = Path(tempfile.mkdtemp(dir=work, prefix="ref-"))
    src = unit
    if unit.is_file():
        src = Path(tempfile.mkdtemp(dir=work, prefix="one-"))
        os.symlink(unit.resolve(), src / unit.name)
    subprocess.run([dcm2niix.bin, "-b", "y", "-z", "n", "-f", "%s_%p", "-o", str(out), str(src)],
                   capture_output=True, timeout=900)
    return refs(out)


def judge(unit: Path, number: str, report: dict | None, candidates: list[Path], volume: int | None) -> dict:
    import nibabel as nib

    row = {"unit": str(unit), "series_number": number, "refs": [p.name for p in candidates]}
    if report is None:
        return {**row, "result": "crash", "why": "no report for this input"}
    error = report.get("error") or ""
    prefix = str(report.get("input", "")) + ": "
    error = error[len(prefix):] if error.startswith(prefix) else error
    if report.get("status") == "failed" or error:
        row["why"] = error
        if "this is a bug" in error or "internal error" in error:
            return {**row, "result": "crash"}
        if not candidates:
            return {**row, "result": "no-ref"}
        four_d = len(candidates) > 1 or any(len(nib.load(str(p)).shape) > 3 and nib.load(str(p)).shape[3] > 1
                                            for p in candidates)
        if "4D DICOM" in error:
            return {**row, "result": "refused-4D" if four_d else "wrong"}
        return {**row, "result": "refused"}
    if not candidates:
        return {**row, "result": "no-ref"}
    mask = nib.load(report["output"])
    best = (float("inf"), float("inf"), "")
    values, route = decoded(unit, volume)
    row.update(route=route, read_s=(report.get("seconds") or {}).get("read"))
    for ref_path in candidates:
        ref = nib.load(str(ref_path))
        err = grid_error(mask.shape, mask.affine, ref.shape, ref.affine)
        if err > NEAR_MM:
            best = min(best, (err, float("inf"), ref_path.name))
            continue
        data = np.asanyarray(ref.dataobj)
        if data.dtype.names:  # dcm2niix's RGB NIfTI: segcli's first channel is red
            data = data[data.dtype.names[0]]
        for k in range(data.shape[3] if data.ndim > 3 else 1):  # any volume: a file unit may be volume k
            one = data[..., k] if data.ndim > 3 else data
            mapped = ref_in_mask_order(np.asarray(one, np.float64), ref.affine, mask.shape, mask.affine)
            if mapped is None or mapped.shape != values.shape:
                best = min(best, (err, float("inf"), ref_path.name))
                continue
            diff = float(np.max(np.abs(mapped - values)))
            best = min(best, (err, diff / max(float(np.ptp(mapped)), 1e-6), f"{ref_path.name}[{k + 1}]"))
    row.update(corner_mm=best[0], intensity_rel=best[1], matched=best[2])
    if best[1] > 1e-3 or best[0] > NEAR_MM:
        return {**row, "result": "wrong"}
    if best[0] <= CORNER_MM:
        return {**row, "result": "OK"}
    # Over 0.01 mm from the Ref: which of the two grids do the files' own positions support?
    ref_path = next(p for p in candidates if best[2].startswith(p.name))
    ref = nib.load(str(ref_path))
    mine, theirs = ipp_error(unit, mask.affine, mask.shape), ipp_error(unit, ref.affine, ref.shape)
    row.update(ipp_mm=mine, ref_ipp_mm=theirs)
    if mine is not None and theirs is not None and mine <= CORNER_MM < theirs:
        return {**row, "result": "OK", "note": f"on every file's ImagePositionPatient within {mine:.4f} mm; "
                f"dcm2niix's grid is {theirs:.4f} mm off them"}
    return {**row, "result": "near"}


def predict(links: list[Path], out: Path, bundle_args: list[str]) -> dict[str, dict]:
    """One ``segcli predict`` call over ``links``; input link name -> its report."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "segcli", "predict", *map(str, links), "-o", f"{out}/", "--json", "-q",
           "--prefetch", "0", *bundle_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        files = json.loads(proc.stdout)["files"]
    except (ValueError, KeyError):
        files = []
        print(proc.stderr[-2000:], file=sys.stderr)
    return {Path(f["input"]).name: f for f in files}


def gunzipped(root: Path, work: Path) -> Path:
    """``root`` itself, or (when its In/ holds .dcm.gz files, as dcm_qa_xa30i does) a copy of In/ with them
    decompressed, as the repository's own batch.sh does before converting; Ref/ is linked."""
    if not any(root.glob("In/**/*.dcm.gz")):
        return root
    copy = work / f"{root.name}-gunzipped"
    for path in sorted((root / "In").rglob("*")):
        if path.is_file():
            dest = copy / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.name.endswith(".gz"):
                with gzip.open(path, "rb") as src, open(dest.with_suffix(""), "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                os.symlink(path, dest)
    os.symlink(root / "Ref", copy / "Ref")
    return copy


def run_repo(root: Path, work: Path, bundle_args: list[str]) -> list[dict]:
    root = gunzipped(root, work)
    found = units(root, work)
    by_number = refs(root / "Ref")
    stage = work / f"{root.name}-in"
    stage.mkdir(parents=True)
    links = []
    for i, (unit, _, _) in enumerate(found):
        link = stage / (f"u{i:04d}" + (".dcm" if unit.is_file() else ""))
        os.symlink(unit, link)
        links.append(link)
    reports = predict(links, work / f"{root.name}-out", bundle_args)
    rows, again = [], []
    for (unit, number, label), link in zip(found, links, strict=True):
        candidates, source = by_number.get(number, []), "Ref"
        if not candidates:
            candidates, source = fresh_refs(unit, work).get(number, []), "dcm2niix " + _version()
        row = judge(link, number, reports.get(link.name), candidates, None)
        row.update(unit=label, reference=source)
        rows.append(row)
        if row["result"] == "refused-4D":
            again.append((row, link, candidates))
    if again:  # the 4D ones once more with --volume 1
        second = predict([link for _, link, _ in again], work / f"{root.name}-vol1", [*bundle_args, "--volume", "1"])
        for row, link, candidates in again:
            v1 = judge(link, row["series_number"], second.get(link.name), candidates, 1)
            row["volume_1"] = v1["result"]
            row["volume_1_detail"] = {k: v1.get(k) for k in ("why", "corner_mm", "intensity_rel", "matched")}
    return rows


def _version() -> str:
    import dcm2niix

    return str(dcm2niix.__version__)


def table(rows: list[dict]) -> str:
    kinds = ("OK", "near", "refused-4D", "refused", "wrong", "crash", "no-ref")
    counts = {k: sum(r["result"] == k for r in rows) for k in kinds}
    return " | ".join(f"{counts[k]}" for k in kinds)


def markdown(results: dict[str, list[dict]]) -> str:
    """One table row per repository, for benchmarks/README.md."""
    lines = ["| repository | series | OK | near | refused-4D (OK with `--volume 1`) | refused | wrong | crash | no-ref |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        n = {k: sum(r["result"] == k for r in rows) for k in ("OK", "near", "refused-4D", "refused", "wrong",
                                                                "crash", "no-ref")}
        v1 = sum(r.get("volume_1") == "OK" for r in rows)
        lines.append(f"| {name} | {len(rows)} | {n['OK']} | {n['near']} | {n['refused-4D']} ({v1}) | {n['refused']} "
                     f"| {n['wrong']} | {n['crash']} | {n['no-ref']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--repos", nargs="*", default=list(REPOS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dicom_conformance.json")
    # --channels grey: colour secondary captures (an FA colour map) go through the grey model too
    ap.add_argument("--bundle-args", default="--model covid-ct --no-lung-gate --channels grey")
    ap.add_argument("--markdown", nargs="*", type=Path, help="only print the README table of these result JSONs")
    args = ap.parse_args()
    if args.markdown:
        merged: dict[str, list[dict]] = {}
        for path in args.markdown:
            merged.update(json.loads(path.read_text()))
        print(markdown(merged))
        return
    sys.path.insert(0, str(REPO))
    results = {}
    with tempfile.TemporaryDirectory(prefix="segcli-conformance-") as tmp:
        for name in args.repos:
            if not (args.root / name / "In").is_dir():
                print(f"{name}: not found under {args.root}, skipped", file=sys.stderr)
                continue
            rows = run_repo(args.root / name, Path(tmp), args.bundle_args.split())
            results[name] = rows
            print(f"{name}: OK | near | refused-4D | refused | wrong | crash | no-ref = {table(rows)}; --volume 1 on the "
                  f"refused-4D: {sum(r.get('volume_1') == 'OK' for r in rows)} OK", flush=True)
            for r in rows:
                if r["result"] not in ("OK", "refused-4D") or r.get("volume_1", "OK") != "OK":
                    print(f"  {r['result']:8s} {r['unit']} ({r['reference']}): {r.get('why') or r.get('matched', '')} "
                          f"{r.get('corner_mm', '')} {r.get('intensity_rel', '')} {r.get('volume_1_detail', '')}"[:400],
                          flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
