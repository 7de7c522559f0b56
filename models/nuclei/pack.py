"""Pack a `segcli train --boundary` run on DSB 2018 into this folder (fp16 weights, card facts, sample).

    python models/nuclei/pack.py RUN --splits SPLITS.json --test-dice D --val-dice V

RUN is the `segcli train` output; SPLITS the train / val / test split it was trained with (its test images
chose nothing). The sample is a test image with its ground truth, so the known-answer test never reads a
training image.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from segcli.bundle import load_bundle, save_bundle

HERE = Path(__file__).resolve().parent
DATA = Path("/work/shared/data/dsb2018-nuclei")
SAMPLE_CASE = "53df5150ee56253fe5bc91a9230d377bb21f1300f443ba45a758bcb01a15c0e4"  # test split, 256x256, grey


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--test-dice", type=float, required=True)
    ap.add_argument("--val-dice", type=float, required=True)
    args = ap.parse_args()
    b = load_bundle(args.run)
    old = json.loads((HERE / "segcli.json").read_text())
    split = json.loads(args.splits.read_text())
    assert SAMPLE_CASE in split["test"]
    training = dict(b.training)
    training["test"] = {"cases": split["test"], "dice": args.test_dice,
                        "what": "segcli predict + segcli evaluate on images neither training nor selection saw"}
    info = dict(old["info"])
    info["description"] = ("segment-then-segment U-Net (features 16) at S=128 with a boundary class "
                           "(--instances splits touching nuclei at it); the large-TIFF demo model")
    info["headline"] = {
        "metric": "Dice", "value": args.test_dice,
        "split": f"{len(split['test'])} DSB 2018 test images (benchmarks/results/dsb-3way-splits.json) that "
                 "neither training nor checkpoint selection saw",
        "validation": {"value": args.val_dice, "split": f"{len(split['val'])} val images that chose the checkpoint"},
        "command": "python benchmarks/eval_split.py models/nuclei /work/shared/data/dsb2018-nuclei runs/ev-nuclei "
                   "--model models/nuclei --splits benchmarks/results/dsb-3way-splits.json --part test",
    }
    nets = {role: (spec.arch, spec.config, b.load_module(role)) for role, spec in b.networks.items()}
    save_bundle(HERE, name="nuclei", method=b.method, classes=b.classes, in_channels=b.in_channels,
                input_size=b.input_size, normalization=b.normalization, networks=nets, params=dict(b.params),
                info=info, training=training, half=True, codes=old.get("codes"), instances=b.raw.get("instances"))
    sample = HERE / "sample"
    shutil.rmtree(sample)
    (sample / "ground_truth").mkdir(parents=True)
    name = f"dsb_{SAMPLE_CASE[:8]}.png"
    shutil.copy(DATA / "images" / f"{SAMPLE_CASE}.png", sample / name)
    shutil.copy(DATA / "masks" / f"{SAMPLE_CASE}.png", sample / "ground_truth" / name)


if __name__ == "__main__":
    main()
