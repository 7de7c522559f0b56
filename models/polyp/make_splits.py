"""Write the polyp bundle's three-way Kvasir-SEG split (issue 33): train / val / test.

Test = the 180 frames the previous bundle (issue 22) held out as its val split, so that bundle never
trained on them and the two bundles are compared on the same untouched frames; the other 720 are split
by a seeded permutation into train and val (val chooses the checkpoint, test is scored once).

    python models/polyp/make_splits.py models/polyp/segcli.json -o models/polyp/splits-3way.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def three_way(previous: dict[str, list[str]], n_val: int, seed: int) -> dict[str, list[str]]:
    """Previous val → test; previous train shuffled with ``seed`` → ``n_val`` val + the rest train."""
    rest = sorted(previous["train"])
    random.Random(seed).shuffle(rest)
    return {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": sorted(previous["val"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle_json", type=Path, help="segcli.json of the bundle whose split to extend")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--val", type=int, default=90, help="val frames taken from the previous train part")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    split = json.loads(args.bundle_json.read_text())["training"]["split"]
    doc = three_way(split, args.val, args.seed)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print({k: len(v) for k, v in doc.items()})


if __name__ == "__main__":
    main()
