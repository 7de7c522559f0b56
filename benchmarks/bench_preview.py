"""CPU cost of one compact ``--preview`` picture (the batch form), drawn from pixels and a mask in memory.

    python benchmarks/bench_preview.py --data ../shared/data/kvasir-seg --n 30 --rounds 5

Reads the first ``--n`` images and masks (sorted) of a dataset folder (``images/``, ``masks/``), draws and writes
each preview once to warm fonts and caches, then reports the CPU time per preview (min and median of the rounds).
Compare versions by running it from each checkout in turn, interleaved; the batch-level figure is
``segcli predict FRAMES/ -o OUT/ --model polyp -q [--preview]`` under ``/usr/bin/time``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segcli import viz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset folder with images/ and masks/")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    imgs = sorted((args.data / "images").iterdir())[: args.n]
    masks = sorted((args.data / "masks").iterdir())[: args.n]
    data = [(np.asarray(Image.open(i).convert("RGB")), (np.asarray(Image.open(m).convert("L")) > 127).astype(np.uint8))
            for i, m in zip(imgs, masks, strict=True)]
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        per = _rounds(data, Path(tmp), args.rounds)
    print(f"{len(data)} previews, {args.rounds} rounds: CPU per preview min {min(per):.2f} ms, "
          f"median {statistics.median(per):.2f} ms")


def _rounds(data: list[tuple[np.ndarray, np.ndarray]], out: Path, rounds: int) -> list[float]:
    def once() -> float:
        t = time.process_time()
        for k, (a, lab) in enumerate(data):
            viz.preview(a, lab, out / f"{k}_seg_preview.jpg", classes=["background", "object"],
                        normalization={"kind": "dtype"}, title=f"{k}.jpg · polyp (stts)", compact=True)
        return (time.process_time() - t) / len(data) * 1000

    once()  # fonts and caches warm
    return [once() for _ in range(rounds)]


if __name__ == "__main__":
    main()
