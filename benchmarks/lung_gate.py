"""What the covid-ct lung gate removes, and what it would cost on real lesions.

    python benchmarks/lung_gate.py --data ../shared/data --json benchmarks/results/lung-gate.json
    python benchmarks/lung_gate.py --data ../shared/data --model runs/<packed run> --no-proxy   # another bundle

1. **Normal scans** (ct-example, Apache-2.0): ``covid-ct`` on ``abdomen_3mm`` and ``aorta_1p5mm``
   with and without the gate (the same ``Segmenter``), lesion volume in mL, and where the false
   voxels lie by TotalSegmentator's labels (ct-example's masks are TotalSegmentator outputs). The
   gate's lung mask is compared with TotalSegmentator's five lung lobes (Dice).
2. **Real lesions, a 2-D proxy** (covid19-ct-slices, 50 labelled slices, all of them): the gate
   needs real HU and a 3-D volume, and these slices are 8-bit crops of unknown window, so the
   gate's gas rule cannot run on them. The proxy keeps the gate's geometry: lung = air components
   (below -400 HU after the bundle's mapping) of at least 100 mm², holes filled, dilated by the
   margin; each radiologist-labelled lesion component is kept when at least ``min_inside`` of it
   lies in that region. Pixel size is not recorded for the crops: ``--pixel-mm`` (0.75 mm, a
   512-px scan over a 38 cm field of view) sets it. It reports the share of lesion area and of
   lesion components the gate would remove, for several margins.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from segcli import lunggate  # noqa: E402
from segcli.lunggate import GateParams  # noqa: E402

LUNG_LOBES = range(10, 15)  # TotalSegmentator v2 "total": lung_upper_lobe_left ... lung_lower_lobe_right


def normal_scans(data: Path, tmp: Path, model: str = "covid-ct") -> list[dict]:
    import SimpleITK as sitk

    from segcli.api import Segmenter

    names = {0: "background"}
    for line in (data / "ct-example" / "labels_total_v2.txt").read_text().splitlines():
        key, _, name = line.partition(":")
        if key.strip().isdigit():
            names[int(key)] = name.strip()
    rows = []
    for stem in ("abdomen_3mm", "aorta_1p5mm"):
        img = data / "ct-example" / "images" / f"{stem}.nii.gz"
        ts = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "ct-example" / "masks" / f"{stem}.nii.gz")))
        row: dict = {"scan": stem}
        for gate in (False, True):
            seg = Segmenter(model, threads=1, overrides={"lung_gate": gate})
            out = tmp / f"{stem}-{gate}.nii.gz"
            rep = seg.predict_file(img, out)
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
            labels, counts = np.unique(ts[pred > 0], return_counts=True)
            where = {names.get(int(k), str(k)): int(c) for k, c in zip(labels, counts, strict=True)}
            row["gated" if gate else "ungated"] = {
                "volume_ml": rep.volume_ml, "lesion_voxels": int((pred > 0).sum()),
                "by_totalsegmentator_label": where, "gate": rep.info.get("lung_gate")}
            print(f"{stem} gate={gate}: {rep.volume_ml} mL; voxels by TS label {where}", flush=True)
        # The gate's lung mask against TotalSegmentator's lobes (where the scan has lungs).
        image = sitk.ReadImage(str(img))
        hu = sitk.GetArrayFromImage(image).astype(np.float32)
        lung, found = lunggate.lung_mask(hu, tuple(image.GetSpacing()[::-1]))
        ref = np.isin(ts, list(LUNG_LOBES))
        row["lung_mask"] = {**found, "totalsegmentator_lung_voxels": int(ref.sum()),
                            "dice_vs_totalsegmentator": float(2 * (lung & ref).sum() / (lung.sum() + ref.sum()))
                            if ref.any() else None}
        print(f"  lung mask {found['lung_ml']} mL, Dice vs TotalSegmentator {row['lung_mask']['dice_vs_totalsegmentator']}")
        rows.append(row)
    return rows


def proxy(data: Path, pixel_mm: float, margins: list[float], min_inside: float) -> list[dict]:
    from PIL import Image
    from scipy import ndimage as ndi

    src = data / "covid19-ct-slices"
    stems = sorted((p.stem for p in (src / "images").glob("*.jpg")), key=int)
    rows = []
    for margin in margins:
        area = removed_area = comps = removed_comps = 0
        for stem in stems:
            p = np.asarray(Image.open(src / "images" / f"{stem}.jpg").convert("L"), np.float32)
            hu = p / 255.0 * 1500.0 - 1350.0  # the mapping covid-ct was trained with (models/covid-ct/make_data.py)
            gt = np.asarray(Image.open(src / "masks" / f"{stem}.png")) > 0
            if not gt.any():
                continue
            air = hu < GateParams().air_hu
            lab, n = ndi.label(air)
            big = np.flatnonzero(np.bincount(lab.ravel(), minlength=n + 1)[1:] * pixel_mm ** 2 >= 100.0) + 1
            lung = np.isin(lab, big)[None]
            region = lunggate.lung_region(lung, (1.0, pixel_mm, pixel_mm), margin)
            comp, keep, info = lunggate.gate_components(gt[None], region, min_inside)
            sizes = np.bincount(comp.ravel())
            area += int(gt.sum())
            removed_area += int(sizes[1:][~keep[1:]].sum())
            comps += info["lesion_components"]
            removed_comps += info["removed_components"]
        rows.append({"margin_mm": margin, "min_inside": min_inside, "lesion_pixels": area,
                     "removed_area_share": removed_area / area, "lesion_components": comps,
                     "removed_component_share": removed_comps / comps})
        print(f"proxy margin {margin} mm: removes {removed_area / area:.1%} of the lesion area, "
              f"{removed_comps}/{comps} components", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the shared data folder (ct-example, covid19-ct-slices)")
    ap.add_argument("--pixel-mm", type=float, default=0.75)
    ap.add_argument("--margins", type=float, nargs="*", default=[0.0, 5.0, 10.0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", default="covid-ct", help="bundle to check (name or folder; default the shipped covid-ct)")
    ap.add_argument("--no-proxy", action="store_true", help="normal scans only (the proxy does not depend on the model)")
    args = ap.parse_args()
    import tempfile

    import onnxruntime
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "cores": len(__import__("os").sched_getaffinity(0))},
            "params": vars(GateParams()), "model": args.model, "normal_scans": normal_scans(args.data, Path(tmp), args.model),
            "proxy_covid_slices": None if args.no_proxy else proxy(args.data, args.pixel_mm, args.margins,
                                                                   GateParams().min_inside),
            "pixel_mm": args.pixel_mm,
        }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
