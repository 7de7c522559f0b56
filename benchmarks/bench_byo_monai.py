"""Bring your own network, the MONAI and plain-ONNX routes (issue 34): a MONAI bundle made here with MONAI's
bundle tools, and an ONNX file, each imported into segcli and run side by side with the peer's own inference
on the mosaics of ``bench_byo.py`` (run its ``dataset`` and ``big`` steps first: they make the frames and the
mosaics in ``--work``).

    python benchmarks/bench_byo_monai.py bundle --work /work/byo   # monai.bundle.init_bundle, then a MONAI UNet
                                                                    # trained 3 min on fold 0's 32 training frames
    python benchmarks/bench_byo_monai.py peer --work /work/byo --sizes 1920 3968 7936
    python benchmarks/bench_byo_monai.py peer --work /work/byo --sizes 40000 --no-maxmem

``bundle`` writes ``monai_bundle/`` (configs/inference.json, configs/metadata.json, models/model.pt) and
``kvasir.onnx`` + ``kvasir.spec.json`` (the same network exported by torch.onnx, for ``segcli import onnx``).
``peer`` runs, per mosaic, each under /usr/bin/time -v on one core:

* MONAI: the bundle's own parser builds the network, the intensity transform and the SlidingWindowInferer,
  which runs over the whole image as one float32 tensor (``monai_infer``); under ``prlimit --as`` (10 GB);
* ONNX: the ONNX file in ONNX Runtime, driven by MONAI's ``sliding_window_inference`` over the whole image,
  what a user without segcli would write (``ort_infer``); under the same cap;
* segcli ``predict --method sliding`` of the imported bundles, with and without ``--max-memory``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_byo as bb  # noqa: E402
import bench_byo_steps as st  # noqa: E402

ROI = 256
CONFIG = {
    "imports": ["$import torch"],
    "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 2,
                    "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"},
    "network": "$@network_def.to('cpu')",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255, "b_min": 0.0, "b_max": 1.0,
         "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [ROI, ROI], "sw_batch_size": 4, "overlap": 0.5,
                "mode": "gaussian"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
}
META = {"network_data_format": {"inputs": {"image": {"num_channels": 3}},
                                "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "polyp"}}}}}


def make_bundle(work: Path, seconds: float) -> dict:
    """``monai.bundle.init_bundle`` writes the skeleton; the UNet is trained briefly (Adam, Dice+CE, flips)."""
    import torch
    from monai.bundle import ConfigParser, init_bundle
    from monai.losses import DiceCELoss

    torch.set_num_threads(1)
    root = work / "monai_bundle"
    shutil.rmtree(root, ignore_errors=True)
    init_bundle(str(root))
    (root / "configs" / "inference.json").write_text(json.dumps(CONFIG, indent=1))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    meta.update(META)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    train = set(json.loads((work / "nnUNet_preprocessed" / bb.DATASET / "splits_final.json").read_text())[0]["train"])
    data = [(img, m) for case, img, m in st.frames(work) if case in train]
    x = torch.from_numpy(np.stack([d[0] for d in data]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    y = torch.from_numpy(np.stack([d[1] for d in data])[:, None].astype(np.int64))
    opt, loss_fn = torch.optim.Adam(net.parameters(), 1e-3), DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(0)
    t0, steps = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - t0 < seconds:
        idx = rng.choice(len(x), 4, replace=False)
        xb, yb = x[idx], y[idx]
        if rng.random() < 0.5:
            xb, yb = xb.flip(3), yb.flip(3)
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    torch.onnx.export(net, (torch.rand(1, 3, ROI, ROI),), str(work / "kvasir.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    spec = {"classes": ["background", "polyp"], "channels": 3, "input_size": ROI,
            "normalization": {"kind": "scale", "factor": 1 / 255}, "output": "logits", "pixel_size_um": None}
    (work / "kvasir.spec.json").write_text(json.dumps(spec))
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "last_loss": round(float(loss), 4)}


def peer_infer(kind: str, bundle: Path, onnx: Path, image: Path, out: Path) -> None:
    """MONAI's own inference (``monai``) or ONNX Runtime under MONAI's sliding window (``ort``) on one image,
    held whole as float32, as those tools do; the mask is written as PNG."""
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    Image.MAX_IMAGE_PIXELS = None
    from monai.bundle import ConfigParser
    from monai.inferers import sliding_window_inference

    img = np.asarray(Image.open(image).convert("RGB"))
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)[None]  # = ScaleIntensityRange(0, 255)
    del img
    if kind == "monai":
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        net = parser.get_parsed_content("network_def")
        net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
        net.eval()
        inferer = parser.get_parsed_content("inferer")
        with torch.no_grad():
            probs = inferer(x, lambda t: torch.softmax(net(t), 1))
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])

        def run(t: torch.Tensor) -> torch.Tensor:
            return torch.softmax(torch.from_numpy(sess.run(None, {"x": t.numpy()})[0]), 1)

        with torch.no_grad():
            probs = sliding_window_inference(x, (ROI, ROI), 4, run, overlap=0.5, mode="gaussian")
    Image.fromarray(torch.argmax(probs, 1)[0].numpy().astype(np.uint8)).save(out)


def peer(args: argparse.Namespace) -> dict:
    """Per mosaic: the peers under the cap, segcli on the imported bundles; time, peak RSS, masks compared."""
    env = st.segcli_env()
    bundles = {}
    for tag, cmd in (("monai", ["import", "monai", args.work / "monai_bundle"]),
                     ("onnx", ["import", "onnx", args.work / "kvasir.onnx", "--spec", args.work / "kvasir.spec.json"])):
        bundles[tag] = args.work / "bundles" / f"{tag}-kvasir"
        r = bb.run_logged(st.segcli(args.core, *cmd, "-o", bundles[tag], "--force"), env, args.work / f"import-{tag}.log")
        if r["rc"]:
            raise SystemExit(f"segcli import {tag} failed (see {args.work / f'import-{tag}.log'})")
    doc: dict = {}
    for size in args.sizes:
        tif, png, placed = st.mosaic(args.work, size, args.coverage)
        row: dict = {}
        for tag in ("monai", "onnx"):
            mask = args.work / "big" / f"{tag}-peer-{size}.png"
            mask.unlink(missing_ok=True)
            cmd = ["prlimit", f"--as={int(args.cap_gb * 2**30)}", "--", "taskset", "-c", str(args.core), "/usr/bin/time",
                   "-v", sys.executable, __file__, "infer", "--kind", tag, "--work", str(args.work), "--image", str(png),
                   "--out", str(mask)]
            row[f"{tag}-peer"] = bb.run_logged(cmd, env, args.work / f"peer-{tag}-{size}.log")
            log = (args.work / f"peer-{tag}-{size}.log").read_text()
            row[f"{tag}-peer"]["last_error"] = [ln for ln in log.splitlines() if "Error" in ln][-2:]
            variants = (("segcli", []), ("segcli-maxmem", ["--max-memory", args.max_memory]))
            for stag, extra in variants[: 1 if args.no_maxmem else 2]:
                out = args.work / "big" / f"{tag}-{stag}-{size}.tif"
                r = st.segcli_run(args, tif, bundles[tag], out, f"{tag}-{stag}-{size}", "--method", "sliding", *extra)
                if out.is_file() and mask.is_file():
                    r["vs_peer"] = st.compare(st.big_mask(out), st.read_mask(mask), placed, names=("segcli", "peer"))
                elif out.is_file():
                    r["vs_gt"] = st.bs.score(out, size, placed)["dice"]
                row[f"{tag}-{stag}"] = r
        doc[str(size)] = row
        print(json.dumps({size: row})[:1500], flush=True)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["bundle", "peer", "infer"])
    ap.add_argument("--work", type=Path, default=Path("/work/byo"))
    ap.add_argument("--core", type=int, default=1)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "byo-monai-onnx.json")
    # 256 + 128 k: MONAI's grid (steps of roi / 2, the last window flush) is then segcli's and nnU-Net's (windows
    # spread evenly); elsewhere a briefly trained network, far from shift-equivariant, makes them differ
    ap.add_argument("--sizes", type=int, nargs="+", default=[1920, 3968, 7936])
    ap.add_argument("--coverage", type=float, default=0.05)
    ap.add_argument("--cap-gb", type=float, default=10.0)
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--no-maxmem", action="store_true", help="skip segcli's --max-memory runs (40000²: 4 min each)")
    ap.add_argument("--train-seconds", type=float, default=180)
    ap.add_argument("--kind", choices=["monai", "ort"] + ["onnx"], help=argparse.SUPPRESS)
    ap.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step == "infer":  # the peers' own process, under /usr/bin/time and the cap
        peer_infer(args.kind, args.work / "monai_bundle", args.work / "kvasir.onnx", args.image, args.out)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    doc = json.loads(args.results.read_text()) if args.results.is_file() else {}
    if args.step == "bundle":
        doc["bundle"] = make_bundle(args.work, args.train_seconds)
    else:  # sizes add up over runs
        doc["peer"] = {**doc.get("peer", {}), **peer(args)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc[args.step], indent=1)[:3000])


if __name__ == "__main__":
    main()
