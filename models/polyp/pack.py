"""Pack a polyp training run into this folder: fp16 weights, the previous bundle's DICOM codes, and the
held-out scores (Kvasir-SEG test split, another centre) that the card quotes, so `segcli models` prints
the test figure and the command that reproduces it.

    python models/polyp/pack.py RUN --test EVAL.json --val EVAL.json --other EVAL.json

Each EVAL.json is `segcli evaluate --json-file` output: ``--test``/``--val`` of
``benchmarks/eval_split.py RUN DATA OUT --splits models/polyp/splits-3way.json --part test|val``
(OUT/eval.json), ``--other`` of CVC-ClinicDB (MODEL_CARD.md says where it comes from).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segcli.bundle import load_bundle, save_bundle

HERE = Path(__file__).resolve().parent
SPLITS = "models/polyp/splits-3way.json"


def mean_scores(path: Path) -> dict[str, Any]:
    """The foreground class's mean scores from a ``segcli evaluate`` JSON, with its case count."""
    doc = json.loads(path.read_text())
    mean = next(iter(doc["mean"].values()))
    keep = ("dice", "iou", "precision", "recall", "object_recall", "objects", "hit")
    return {"n_cases": doc["n_cases"], **{k: round(mean[k], 4) if isinstance(mean[k], float) else mean[k] for k in keep}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--test", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True)
    ap.add_argument("--other", type=Path, default=None)
    args = ap.parse_args()

    b = load_bundle(args.run)
    codes = load_bundle(HERE).codes  # read before the folder is replaced
    test, val = mean_scores(args.test), mean_scores(args.val)
    split = {k: len(v) for k, v in json.loads((HERE / "splits-3way.json").read_text()).items()}
    heldout = {"splits": SPLITS, "split_sizes": split, "test": test, "val": val}
    if args.other is not None:
        heldout["cvc_clinicdb"] = mean_scores(args.other)
    info = {
        **b.info,
        "task": "polyp segmentation in colonoscopy frames (research use, not a medical device)",
        "description": f"stts, 2 x U-Net f16, S={b.input_size}, endoscopy jitter; trained on "
                       f"{split['train']} Kvasir-SEG frames, checkpoint chosen on {split['val']}",
        "headline": {
            "metric": "Dice",
            "value": round(test["dice"], 3),
            "split": f"{split['test']} Kvasir-SEG test frames that neither training nor checkpoint choice saw "
                     f"({SPLITS}: {split['train']} train / {split['val']} val / {split['test']} test)",
            "command": f"python benchmarks/eval_split.py models/polyp /work/shared/data/kvasir-seg runs/ev-polyp "
                       f"--model models/polyp --splits {SPLITS} --part test",
            "validation": {"value": round(val["dice"], 3), "split": f"{split['val']} val frames"},
        },
    }
    training = {**b.training, "heldout": heldout}
    nets = {role: (spec.arch, spec.config, b.load_module(role)) for role, spec in b.networks.items()}
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        out = save_bundle(Path(tmp) / "b", name="polyp", method=b.method, classes=b.classes,
                          in_channels=b.in_channels, input_size=b.input_size, normalization=b.normalization,
                          networks=nets, params=b.params, info=info, training=training, half=True, codes=codes)
        for f in ("segcli.json", "coarse.safetensors", "fine.safetensors"):
            shutil.copy2(out / f, HERE / f)
    print(json.dumps(heldout, indent=1))


if __name__ == "__main__":
    main()
