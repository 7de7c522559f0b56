"""The steps of ``bench_byo.py`` that compare segcli with nnU-Net: parity on the validation frames, the
mosaics side by side, and the distilled rough network (see bench_byo.py for the order and the commands)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_byo as bb  # noqa: E402
import bench_slide as bs  # noqa: E402

BG = (228, 222, 226)  # flat, glass-like background of the mosaics
TIFF_TILE = 512


def segcli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"})
    return env


def segcli(core: int, *args: Any) -> list[str]:
    return ["taskset", "-c", str(core), "/usr/bin/time", "-v", sys.executable, "-m", "segcli", *map(str, args)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2 * int((a & b).sum()) / s


def read_mask(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path) > 0
    from PIL import Image

    return np.asarray(Image.open(path)) > 0


def nn_predict(args: Any, env: dict, src: Path, out: Path, log: Path, *, tta: bool, cap_gb: float | None = None) -> dict:
    """``nnUNetv2_predict`` on the folder ``src`` (fold 0, one process), optionally under an address-space cap."""
    cmd = bb.nn_cmd(args.nnunet_venv, args.core, "nnUNetv2_predict", "-i", str(src), "-o", str(out), "-d",
                    str(bb.DATASET_ID), "-c", "2d", "-p", bb.PLANS, "-tr", bb.TRAINER, "-f", "0", "-device", "cpu",
                    "-npp", "1", "-nps", "1", *([] if tta else ["--disable_tta"]))
    if cap_gb:
        cmd = ["prlimit", f"--as={int(cap_gb * 2**30)}", "--", *cmd]
    shutil.rmtree(out, ignore_errors=True)
    return bb.run_logged(cmd, env, log)


def import_bundles(args: Any) -> dict[str, Path]:
    """``segcli import nnunet`` of fold 0, without and with mirroring (nnU-Net's test-time augmentation)."""
    out = {}
    for tag, extra in (("nnunet", []), ("nnunet-tta", ["--mirror"])):
        dst = args.work / "bundles" / tag
        cmd = segcli(args.core, "import", "nnunet", bb.results_folder(args.work), "-o", dst, "--fold", "0",
                     "--force", *extra)
        r = bb.run_logged(cmd, segcli_env(), args.work / f"import-{tag}.log")
        if r["rc"]:
            raise SystemExit(f"import {tag} failed: see {args.work / f'import-{tag}.log'}")
        out[tag] = dst
    return out


def parity(args: Any, env: dict) -> dict:
    """segcli's masks against nnUNetv2_predict's on fold 0's validation frames: Dice per image and pooled,
    without test-time augmentation and with it (segcli's import ``--mirror``)."""
    bundles = import_bundles(args)
    raw = args.work / "nnUNet_raw" / bb.DATASET
    cases = bb.val_cases(args.work)
    vin = args.work / "val" / "images"
    shutil.rmtree(vin, ignore_errors=True)
    vin.mkdir(parents=True)
    for c in cases:
        os.symlink(raw / "imagesTr" / f"{c}_0000.png", vin / f"{c}_0000.png")
    out: dict[str, Any] = {"cases": cases}
    for tta in (False, True):
        tag = "tta" if tta else "no-tta"
        nn_out, sc_out = args.work / "val" / f"nnunet-{tag}", args.work / "val" / f"segcli-{tag}"
        t_nn = nn_predict(args, env, vin, nn_out, args.work / f"predict-nnunet-{tag}.log", tta=tta)
        shutil.rmtree(sc_out, ignore_errors=True)
        t_sc = bb.run_logged(segcli(args.core, "predict", vin, "-o", sc_out, "--model",
                                    bundles["nnunet-tta" if tta else "nnunet"], "--threads", "1", "-q"),
                             segcli_env(), args.work / f"predict-segcli-{tag}.log")
        rows, inter, total = [], 0, 0
        for c in cases:
            a, b = read_mask(nn_out / f"{c}.png"), read_mask(sc_out / f"{c}_0000_seg.png")
            gt = read_mask(raw / "labelsTr" / f"{c}.png")
            inter, total = inter + int((a & b).sum()), total + int(a.sum()) + int(b.sum())
            rows.append({"case": c, "dice_segcli_vs_nnunet": round(dice(a, b), 5), "nnunet_px": int(a.sum()),
                         "segcli_px": int(b.sum()), "differing_px": int((a ^ b).sum()),
                         "dice_nnunet_vs_gt": round(dice(a, gt), 4), "dice_segcli_vs_gt": round(dice(b, gt), 4)})
        out[tag] = {"per_image": rows, "pooled_dice": round(2 * inter / max(1, total), 5),
                    "min_dice": min(r["dice_segcli_vs_nnunet"] for r in rows),
                    "mean_dice_vs_gt": {"nnunet": round(float(np.mean([r["dice_nnunet_vs_gt"] for r in rows])), 4),
                                        "segcli": round(float(np.mean([r["dice_segcli_vs_gt"] for r in rows])), 4)},
                    "nnunet_run": t_nn, "segcli_run": t_sc}
    return out


# -- mosaics ---------------------------------------------------------------------------------------------------

def frames(work: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The 40 frames of the nnU-Net dataset with their masks (training and validation alike)."""
    from PIL import Image

    raw = work / "nnUNet_raw" / bb.DATASET
    out = []
    for p in sorted((raw / "imagesTr").glob("*_0000.png")):
        case = p.name[: -len("_0000.png")]
        out.append((case, np.asarray(Image.open(p).convert("RGB")),
                    (np.asarray(Image.open(raw / "labelsTr" / f"{case}.png")) > 0).astype(np.uint8)))
    return out


def compose(y0: int, x0: int, h: int, w: int, placed: list[dict], key: str = "img") -> np.ndarray:
    """The region (y0, x0, h, w) of the mosaic: the background with the placed frames (or their masks, or
    ``footprint``: 1 where a frame lies)."""
    out = np.empty((h, w, 3), np.uint8) if key == "img" else np.zeros((h, w), np.uint8)
    if key == "img":
        out[:] = BG
    for t in placed:
        th, tw = t["mask"].shape[:2]
        a0, a1, b0, b1 = max(y0, t["y"]), min(y0 + h, t["y"] + th), max(x0, t["x"]), min(x0 + w, t["x"] + tw)
        if a0 < a1 and b0 < b1:
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = (
                1 if key == "footprint" else t[key][a0 - t["y"] : a1 - t["y"], b0 - t["x"] : b1 - t["x"]])
    return out


def write_tiff(path: Path, size: int, placed: list[dict]) -> None:
    """A tiled (512²), deflate-compressed BigTIFF streamed tile by tile, never held whole."""
    import tifffile

    def tiles():
        for y in range(0, size, TIFF_TILE):
            for x in range(0, size, TIFF_TILE):
                t = compose(y, x, TIFF_TILE, TIFF_TILE, placed)
                t[max(0, size - y):] = BG
                t[:, max(0, size - x):] = BG
                yield t

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE),
                     photometric="rgb", compression="zlib", compressionargs={"level": 1}, bigtiff=True,
                     metadata=None)


def write_png(path: Path, size: int, placed: list[dict], band: int = 512) -> None:
    """An RGB PNG streamed band by band (zlib, filter 0), so 40000² needs no 4.8 GB array."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)))
        for y in range(0, size, band):
            rows = compose(y, 0, min(band, size - y), size, placed)
            raw = np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows.reshape(rows.shape[0], -1)], axis=1)
            f.write(chunk(b"IDAT", z.compress(raw.tobytes())))
        f.write(chunk(b"IDAT", z.flush()) + chunk(b"IEND", b""))


def mosaic(work: Path, size: int, coverage: float, seed: int = 0, png: bool = True) -> tuple[Path, Path, list[dict]]:
    """The mosaic of ``size``², as a tiled BigTIFF (segcli) and a PNG (nnU-Net's 2D natural-image reader; not
    written with ``png=False``, where only segcli reads it)."""
    placed = bs.place(size, frames(work), coverage, seed, gap=32)
    want_png = png
    d = work / "big"
    (d / f"nn-in-{size}").mkdir(parents=True, exist_ok=True)
    tif, png = d / f"mosaic_{size}.tif", d / f"nn-in-{size}" / f"mosaic_{size}_0000.png"
    if not tif.is_file():
        write_tiff(tif, size, placed)
    if want_png and not png.is_file():
        write_png(png, size, placed)
    return tif, png, placed


def score_vs_gt(mask: np.ndarray, placed: list[dict]) -> float:
    gt = compose(0, 0, mask.shape[0], mask.shape[1], placed, key="mask") > 0
    return round(dice(mask, gt), 4)


def big_mask(path: Path) -> np.ndarray:
    """A segcli mask TIFF as a read-only memmap (decoded to a temporary file once), so 40000² is not held."""
    import tifffile

    return tifffile.imread(path, out="memmap") if path.stat().st_size > 2**28 else read_mask(path)


def compare(a: Any, b: Any, placed: list[dict] | None = None, band: int = 2048,
            names: tuple[str, str] = ("a", "b")) -> dict:
    """Dice between two masks (arrays or memmaps), band by band; and each against the mosaic's ground truth."""
    inter = tot = f_inter = f_tot = 0
    gt_i, gt_t, in_i, in_t = [0, 0], [0, 0], [0, 0], [0, 0]
    for y in range(0, a.shape[0], band):
        pa, pb = np.asarray(a[y : y + band]) > 0, np.asarray(b[y : y + band]) > 0
        inter, tot = inter + int((pa & pb).sum()), tot + int(pa.sum()) + int(pb.sum())
        if placed is not None:
            g = compose(y, 0, pa.shape[0], pa.shape[1], placed, key="mask") > 0
            f = compose(y, 0, pa.shape[0], pa.shape[1], placed, key="footprint") > 0
            f_inter, f_tot = f_inter + int((pa & pb & f).sum()), f_tot + int((pa & f).sum()) + int((pb & f).sum())
            for k, p in enumerate((pa, pb)):
                gt_i[k] += int((p & g).sum())
                gt_t[k] += int(p.sum()) + int(g.sum())
                in_t[k] += int((p & f).sum()) + int(g.sum())  # the truth lies inside the frames
                in_i[k] += int((p & g).sum())
    na, nb = names
    out = {f"dice_{na}_vs_{nb}": round(2 * inter / max(1, tot), 5)}
    if placed is not None:
        out.update({f"dice_{na}_vs_{nb}_in_frames": round(2 * f_inter / max(1, f_tot), 5),
                    f"dice_{na}_vs_gt": round(2 * gt_i[0] / max(1, gt_t[0]), 4),
                    f"dice_{nb}_vs_gt": round(2 * gt_i[1] / max(1, gt_t[1]), 4),
                    f"dice_{na}_vs_gt_in_frames": round(2 * in_i[0] / max(1, in_t[0]), 4),
                    f"dice_{nb}_vs_gt_in_frames": round(2 * in_i[1] / max(1, in_t[1]), 4)})
    return out


def segcli_run(args: Any, src: Path, model: Path, out: Path, tag: str, *extra: Any) -> dict:
    """``segcli predict`` under /usr/bin/time -v, one thread, with its --json report's route facts."""
    out.unlink(missing_ok=True)
    cmd = segcli(args.core, "predict", src, "-o", out, "--model", model, "--threads", "1", "--json", *extra)
    r = bb.run_logged(cmd, segcli_env(), args.work / f"{tag}.log")
    log = (args.work / f"{tag}.log").read_text()
    try:
        rep = bs.report_of(log.split("\n--- stderr ---\n")[0])
        info = rep.get("info") or {}
        r.update({k: info.get(k) for k in ("bounded_memory", "windows", "rough_factor", "method") if k in info})
        r["seconds"] = rep.get("seconds")
    except Exception as exc:  # a refused or failed run has no report; its log says why
        r["report_error"] = str(exc)[:200]
    return r


def big(args: Any, env: dict) -> dict:
    """Each mosaic size: segcli sliding (with and without --max-memory) and nnUNetv2_predict under an
    address-space cap; time, peak RSS, and the masks against each other and the ground truth."""
    bundle = args.work / "bundles" / "nnunet"
    doc: dict[str, Any] = {}
    for size in args.sizes:
        tif, png, placed = mosaic(args.work, size, args.coverage)
        row: dict[str, Any] = {"frames": len(placed), "coverage": args.coverage, "tiff_mb": round(tif.stat().st_size / 2**20, 1),
                               "png_mb": round(png.stat().st_size / 2**20, 1)}
        masks = {}
        for tag, extra in (("segcli", []), ("segcli-maxmem", ["--max-memory", args.max_memory])):
            out = args.work / "big" / f"{tag}-{size}.tif"
            row[tag] = segcli_run(args, tif, bundle, out, f"big-{tag}-{size}", "--method", "sliding", *extra)
            masks[tag] = out
        if size <= args.nn_max:
            nn_out = args.work / "big" / f"nn-out-{size}"
            row["nnunet"] = nn_predict(args, env, png.parent, nn_out, args.work / f"big-nnunet-{size}.log", tta=False,
                                       cap_gb=args.cap_gb)
            log = (args.work / f"big-nnunet-{size}.log").read_text()
            row["nnunet"]["last_error"] = [ln for ln in log.splitlines() if "Error" in ln][-3:]
            if (nn_out / f"mosaic_{size}.png").is_file():
                masks["nnunet"] = nn_out / f"mosaic_{size}.png"
        ref = masks.get("nnunet")
        for tag in ("segcli", "segcli-maxmem"):
            if masks[tag].is_file():
                a = big_mask(masks[tag])
                if ref is not None:
                    row[tag]["vs_nnunet"] = compare(a, read_mask(ref), placed, names=("segcli", "nnunet"))
                else:
                    row[tag]["vs_gt"] = bs.score(masks[tag], size, placed)["dice"]
        doc[str(size)] = row
        print(json.dumps({size: row})[:1500], flush=True)
    return doc


def distil(args: Any, env: dict) -> dict:
    """``segcli train --stage coarse --pair`` on label-free mosaics (the imported model's own masks are the
    targets), then stts against sliding on the biggest mosaic: time, and Dice against each other and the truth."""
    from PIL import Image

    src = args.work / "distil" / "images"
    shutil.rmtree(src.parent, ignore_errors=True)
    src.mkdir(parents=True)
    for i in range(args.distil_images):
        placed = bs.place(args.distil_size, frames(args.work), args.distil_coverage, 100 + i, gap=16)
        Image.fromarray(compose(0, 0, args.distil_size, args.distil_size, placed)).save(src / f"m{i:02d}.png")
    paired = args.work / "bundles" / "nnunet-paired"
    shutil.rmtree(paired, ignore_errors=True)
    train = bb.run_logged(segcli(args.core, "train", "--stage", "coarse", "--pair", args.work / "bundles" / "nnunet",
                                 "--data", src, "-o", paired, "--epochs", args.distil_epochs, "--features", "8",
                                 "--threads", "1", "--seed", "0"),
                          segcli_env(), args.work / "distil-train.log")
    size = max(args.sizes)
    tif, _, placed = mosaic(args.work, size, args.coverage, png=False)
    common = ["--max-downscale", args.rough_downscale]
    runs: dict[str, Any] = {"train": train}
    masks = {}
    for tag, model, extra in (("sliding-paired", paired, ["--method", "sliding"]),
                              ("stts-paired", paired, ["--method", "stts", *args.stts_args.split()])):
        out = args.work / "big" / f"{tag}-{size}.tif"
        runs[tag] = segcli_run(args, tif, model, out, f"distil-{tag}-{size}", *common, *extra)
        masks[tag] = out
    a, b = big_mask(masks["sliding-paired"]), big_mask(masks["stts-paired"])
    runs["stts_vs_sliding"] = compare(b, a, placed, names=("stts", "sliding"))
    plain = args.work / "big" / f"segcli-{size}.tif"
    if plain.is_file():  # the unpaired import's sliding run of the `big` step (its own network picks the windows)
        runs["stts_vs_unpaired_sliding"] = compare(b, big_mask(plain), placed, names=("stts", "unpaired_sliding"))
    return runs


def race(args: Any, env: dict) -> dict:
    """The distil step's two runs again, without training: sliding and stts of the paired bundle on the biggest
    mosaic, interleaved for ``--rounds`` rounds (the order swapped each round), each with the load average before
    it; Dice of each against the truth and of stts against the sliding window."""
    size = max(args.sizes)
    tif, _, placed = mosaic(args.work, size, args.coverage, png=False)
    paired = args.work / "bundles" / "nnunet-paired"
    common = ["--max-downscale", args.rough_downscale]
    kinds = {"sliding-paired": ["--method", "sliding"], "stts-paired": ["--method", "stts", *args.stts_args.split()]}
    runs: dict[str, Any] = {"rounds": [], "stts_args": args.stts_args, "rough_downscale": args.rough_downscale}
    for r in range(args.rounds):
        row = {}
        for tag in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
            load_before = os.getloadavg()[0]
            out = args.work / "big" / f"{tag}-{size}.tif"
            row[tag] = segcli_run(args, tif, paired, out, f"race-{tag}-{size}-{r}", *common, *kinds[tag])
            row[tag]["load_before"] = round(load_before, 2)
            print(tag, row[tag]["wall_s"], row[tag].get("seconds"), flush=True)
        runs["rounds"].append(row)
    a, b = big_mask(args.work / "big" / f"sliding-paired-{size}.tif"), big_mask(args.work / "big" / f"stts-paired-{size}.tif")
    runs["stts_vs_sliding"] = compare(b, a, placed, names=("stts", "sliding"))
    walls = {t: [rw[t]["wall_s"] for rw in runs["rounds"]] for t in kinds}
    runs["wall_s"] = walls
    runs["stts_over_sliding"] = round(sum(walls["stts-paired"]) / sum(walls["sliding-paired"]), 3)
    return runs


def blend(args: Any, env: dict) -> dict:
    """Why segcli's mask and nnU-Net's differ on a mosaic: the smallest mosaic re-blended four ways from the same
    window outputs of the imported graph (logits or probabilities; segcli's or nnU-Net's Gaussian), each
    against nnUNetv2_predict's mask."""
    import onnxruntime as ort
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    from segcli.geometry import gaussian_weight, sliding_grid

    size = min(args.sizes)
    _, png, _ = mosaic(args.work, size, args.coverage)
    ref = read_mask(args.work / "big" / f"nn-out-{size}" / f"mosaic_{size}.png")
    img = np.asarray(Image.open(png).convert("RGB")).astype(np.float32).transpose(2, 0, 1) / 255
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(args.work / "bundles" / "nnunet" / "fine.onnx"), so)
    name = sess.get_inputs()[0].name
    win = 256
    delta = np.zeros((win, win), np.float32)
    delta[win // 2, win // 2] = 1
    g_nn = gaussian_filter(delta, win / 8, 0, mode="constant", cval=0)
    g_nn = g_nn / g_nn.max() * 10
    g_nn[g_nn == 0] = g_nn[g_nn > 0].min()
    weights = {"segcli_gauss": gaussian_weight((win, win)), "nnunet_gauss": g_nn.astype(np.float32)}
    acc = {(w, k): np.zeros((2, size, size), np.float32) for w in weights for k in ("logits", "probs")}
    norm = {w: np.zeros((size, size), np.float32) for w in weights}
    for y0, x0, y1, x1 in sliding_grid((size, size), win, 0.5).tolist():
        z = sess.run(None, {name: img[None, :, y0:y1, x0:x1]})[0][0]
        p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
        for w, g in weights.items():
            acc[(w, "logits")][:, y0:y1, x0:x1] += z * g
            acc[(w, "probs")][:, y0:y1, x0:x1] += p * g
            norm[w][y0:y1, x0:x1] += g
    out = {}
    for (w, k), a in acc.items():
        m = (a / norm[w])[1] > (a / norm[w])[0]
        out[f"{k}+{w}"] = {"dice_vs_nnunet": round(dice(m, ref), 5), "differing_px": int((m ^ ref).sum())}
    return out


def rescore(args: Any, env: dict, big_doc: dict) -> dict:
    """The ``big`` step's mask comparisons again (no run repeated), e.g. after ``compare`` learnt a new figure."""
    for size in args.sizes:
        row = big_doc.get(str(size))
        ref = args.work / "big" / f"nn-out-{size}" / f"mosaic_{size}.png"
        if row is None or not ref.is_file():
            continue
        _, _, placed = mosaic(args.work, size, args.coverage)
        for tag in ("segcli", "segcli-maxmem"):
            out = args.work / "big" / f"{tag}-{size}.tif"
            if out.is_file():
                row[tag]["vs_nnunet"] = compare(big_mask(out), read_mask(ref), placed, names=("segcli", "nnunet"))
    return big_doc


def sttsmem(args: Any, env: dict) -> dict:
    """stts of the paired bundle against the imported model's full sliding window, both in memory (the mosaic as
    a PNG, a photo to segcli): every window of the grid against the rough network's crops; time and Dice."""
    runs: dict[str, Any] = {}
    for size in args.sizes:
        _, png, placed = mosaic(args.work, size, args.coverage)
        masks = {}
        stts = ["--method", "stts", "--max-downscale", args.rough_downscale]
        for tag, model, extra in (("sliding", "nnunet", ["--method", "sliding"]),
                                  ("stts", "nnunet-paired", stts),
                                  # every fine input at the network's own scale: boxes padded by S/2 are at least
                                  # S a side, and tiled at S instead of shrunk
                                  ("stts-native", "nnunet-paired", [*stts, "--pad", "128", "--max-zoom", "1"])):
            out = args.work / "big" / f"mem-{tag}-{size}.png"
            runs[f"{tag}-{size}"] = segcli_run(args, png, args.work / "bundles" / model, out, f"mem-{tag}-{size}", *extra)
            masks[tag] = out
        for tag in ("stts", "stts-native"):
            runs[f"{tag}_vs_sliding-{size}"] = compare(read_mask(masks[tag]), read_mask(masks["sliding"]), placed,
                                                        names=(tag.replace("-", "_"), "sliding"))
    return runs


NN_API = """
import sys, time, traceback, torch
from PIL import Image
Image.MAX_IMAGE_PIXELS = None  # what a user would do once the reader refuses the slide
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
t0 = time.time()
try:
    img, props = NaturalImage2DIO().read_images([sys.argv[2]])
    print('read', img.shape, img.dtype, round(time.time() - t0, 1), 's', flush=True)
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device('cpu'),
                        perform_everything_on_device=False)
    p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,), checkpoint_name='checkpoint_final.pth')
    p.predict_single_npy_array(img, props, None, None, False)
except BaseException:
    print('FAILED after', round(time.time() - t0, 1), 's:', traceback.format_exc().strip().splitlines()[-1])
    sys.exit(1)
"""


def nnapi(args: Any, env: dict) -> dict:
    """nnU-Net's own Python API on the biggest mosaic, with PIL's pixel limit lifted (its command line refuses
    the PNG there), under the address-space cap: where it stops."""
    size = max(args.sizes)
    _, png, _ = mosaic(args.work, size, args.coverage)
    cmd = ["prlimit", f"--as={int(args.cap_gb * 2**30)}", "--", *bb.nn_cmd(args.nnunet_venv, args.core, "python", "-c",
                                                                         NN_API, str(bb.results_folder(args.work)),
                                                                         str(png))]
    r = bb.run_logged(cmd, env, args.work / f"nnapi-{size}.log")
    r["said"] = [ln for ln in (args.work / f"nnapi-{size}.log").read_text().splitlines()
                 if ln.startswith(("read", "FAILED"))]
    return {str(size): r, "cap_gb": args.cap_gb}
