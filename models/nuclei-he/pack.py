"""Pack the nuclei-he training run into this folder (fp16 weights, chosen method, sample, held-out scores).

    python models/nuclei-he/pack.py RUN --method sliding --scores LABEL=runs/eval/SCORES.json [--scores ...]

RUN is the `segcli train` output; each --scores is a label (how predict was run) and the `segcli evaluate
--json` output of the held-out split. The sample is a 320x320
crop of a held-out tile (the models test caps a sample at 200 KB) with its ground truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from segcli.bundle import load_bundle, save_bundle

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/monuseg")
SAMPLE_CASE = "TCGA-CH-5767-01Z-00-DX1"  # prostate, tissue-source site CH, held out
SAMPLE_NAME = "he_prostate_CH-5767"
SAMPLE_BOX = (0, 0, 320, 320)  # y0, x0, y1, x1


def mean_scores(path: Path) -> dict:
    doc = json.loads(path.read_text())
    mean = doc["mean"]["class_1"]
    keep = ("dice", "iou", "precision", "recall", "object_recall", "objects", "hit")
    return {"n_cases": doc["n_cases"], **{k: mean[k] for k in keep}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--method", required=True)
    ap.add_argument("--scores", action="append", default=[])
    ap.add_argument("--command", default=None, help="the training command as run")
    args = ap.parse_args()

    b = load_bundle(args.run)
    S = b.input_size
    params = {
        "threshold": 0.5,
        "keep_aspect": True,
        "mpp": 0.25,  # µm/px of the training tiles (40x MoNuSeg), the scale the fine network saw
        # the pixel-size rule (segcli.plan.physical_factor): a 20x slide (0.5 µm/px) is read at twice its size.
        # Without it the 14 MoNuSeg test tiles saved at 0.5 µm/px scored Dice 0.778 against 0.807 with it.
        "training_mpp": 0.25,
        "overlap": 0.25,  # sliding
        "patches": b.params.get("patches", 16),  # refine
        "patch_size": b.params.get("patch_size", S),  # refine: full-resolution patches (zoom 1)
        "criterion": b.params.get("criterion", "pixel"),
        "pad": S // 2,  # stts: crops of >= S full-res px, so the fine network sees zoom <= 1 as in training
        "max_zoom": 1.0,  # stts: big boxes are tiled at zoom 1 instead of squeezed
    }
    split = json.loads((HERE / "splits.json").read_text())
    held = {}
    for item in args.scores:
        label, _, p = item.rpartition("=")
        held[label] = {"file": Path(p).name, **mean_scores(Path(p))}
    training = dict(b.training)
    if args.command:
        training["command"] = args.command
    training["heldout"] = {
        "what": "segcli predict (full resolution, threads 1) + segcli evaluate on the val split = the tiles of "
                "tissue-source sites never seen in training",
        "sites": sorted({s.split("-")[1] for s in split["val"]}),
        "cases": split["val"],
        "scores": held,
    }
    nets = {role: (spec.arch, spec.config, b.load_module(role)) for role, spec in b.networks.items()}
    info = {
        "task": "nucleus segmentation in H&E histology at 40x (research use, not a medical device)",
        "dataset": "monuseg",
        "licence": "CC BY-NC-SA 4.0 (MoNuSeg challenge terms); research use only",
        "modality": "histology (H&E)",
        "mpp": 0.25,
        "coarse_mpp": round(0.25 * 1000 / S, 3),
        "description": f"H&E nuclei: 2 x U-Net f16, S={S}; fine network trained on full-resolution {S}-px "
                       f"patches (refine S2) with HED stain jitter; default {args.method}",
        "default_for": [],
    }
    # a run on the three-class targets (benchmarks/make_monuseg_boundary.py): the boundary is folded into the
    # nucleus in the mask and separates touching nuclei for --instances
    instances = b.raw.get("instances") or ({"boundary": "boundary", "object": "nucleus"}
                                           if b.classes == ["background", "nucleus", "boundary"] else None)
    save_bundle(HERE, name="nuclei-he", method=args.method, classes=b.classes, in_channels=b.in_channels,
                input_size=S, normalization=b.normalization, networks=nets, params=params, info=info,
                training=training, half=True, instances=instances)

    y0, x0, y1, x1 = SAMPLE_BOX
    (HERE / "sample" / "ground_truth").mkdir(parents=True, exist_ok=True)
    img = np.asarray(Image.open(DATA / "images" / f"{SAMPLE_CASE}.png").convert("RGB"))[y0:y1, x0:x1]
    gt = np.asarray(Image.open(DATA / "masks" / f"{SAMPLE_CASE}.png"))[y0:y1, x0:x1]
    Image.fromarray(img).save(HERE / "sample" / f"{SAMPLE_NAME}.png", optimize=True)
    Image.fromarray((gt > 0).astype(np.uint8)).save(HERE / "sample" / "ground_truth" / f"{SAMPLE_NAME}.png",
                                                    optimize=True)


if __name__ == "__main__":
    main()
