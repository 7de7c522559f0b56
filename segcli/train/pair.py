"""``segcli train --pair BUNDLE``: train only the rough network for a one-network bundle (an imported one).

The bundle's fine network stays as it is; a small network is trained on the whole image at the
bundle's window size and normalisation, and the two become one bundle. On slides the rough network
then decides where the fine network's windows go (the tissue-only pass), instead of the big network
itself running on the overview. Without masks in the dataset (or with ``distill``) the targets are the
fine network's own predictions, so no labels are needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from segcli import io
from segcli.bundle import BUNDLE_FILE, load_bundle, write_json_atomic
from segcli.errors import BundleError, UsageError
from segcli.inferer import Inferer
from segcli.options import PredictOptions
from segcli.train import Reporter, train

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _pair_bundle(pair: str) -> Any:
    try:
        b = load_bundle(pair)
    except BundleError as exc:
        raise UsageError(f"--pair: {exc}") from None
    if b.method != "sliding" or set(b.networks) != {"fine"}:
        raise UsageError(f"--pair {pair}: pairing trains a rough network for a one-network sliding bundle "
                         f"(an imported model); this one is {b.method}")
    return b


def distill_dataset(images: Path, fine: Any, work: Path, log: Any) -> Path:
    """A ``shared``-layout dataset of ``images`` with the fine bundle's own masks as the labels."""
    from PIL import Image  # lazy: Pillow is only needed when a pair is distilled from images

    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise UsageError(f"--pair: no images ({', '.join(IMAGE_EXTS)}) in {images}")
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "masks").mkdir(parents=True, exist_ok=True)
    seg = Inferer(PredictOptions.from_kwargs(fine.path))
    for i, f in enumerate(files):
        img = io.open_image(f)
        labels = np.asarray(seg.segment_array(img.array, spacing=img.spacing, path=f)[0].labels, dtype=np.uint8)
        os.symlink(f.resolve(), work / "images" / f.name)
        Image.fromarray(labels).save(work / "masks" / f"{f.stem}.png")
        log(f"distil: {f.name} ({i + 1}/{len(files)}), {int((labels > 0).sum())} foreground pixels")
    labels = {name: k for k, name in enumerate(fine.classes)}
    (work / "dataset.json").write_text(json.dumps({"name": f"{images.name} (distilled from {fine.name})",
                                                   "labels": labels}))
    return work


def train_pair(data: str | os.PathLike[str], out: str | os.PathLike[str], pair: str, *, distill: bool | None = None,
               **options: Any) -> Any:
    """Train the rough network for ``pair`` on ``data`` and write ``out``: the pair bundle plus ``coarse``."""
    fine = _pair_bundle(pair)
    options = {k: v for k, v in options.items() if v is not None}  # the CLI passes every option, unset ones as None
    data, out = Path(data), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; pick a new folder for the paired bundle")
    for key in ("method", "size", "normalization", "init", "fine_arch", "fine_epochs"):
        if options.get(key) is not None:
            raise UsageError(f"--pair sets {key} from {pair}; drop that option")
    reporter = Reporter(bool(options.get("quiet")))
    work = out.parent / f".{out.name}.pair-work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        masks = (data / "masks").is_dir() or (data / "labelsTr").is_dir()
        if distill or (distill is None and not masks):
            src = data / "images" if (data / "images").is_dir() else data
            data = distill_dataset(src, fine, work / "data", reporter.log)
        res = train(data, work / "run", method="direct", size=fine.input_size, normalization=fine.normalization,
                    reporter=reporter, **options)
        rough = load_bundle(work / "run")
        out.mkdir(parents=True, exist_ok=True)
        for f in fine.path.iterdir():
            if f.is_file() and f.name != BUNDLE_FILE:
                shutil.copy2(f, out / f.name)
        shutil.copy2(work / "run" / "coarse.safetensors", out / "coarse.safetensors")
        doc = json.loads((fine.path / BUNDLE_FILE).read_text())
        doc["networks"]["coarse"] = rough.raw["networks"]["coarse"]
        doc["training"] = {**rough.training, "pair": str(fine.path), "distilled": data == work / "data"}
        doc["name"] = options.get("name") or out.name
        write_json_atomic(out / BUNDLE_FILE, doc)
        load_bundle(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.out = out
    return res
