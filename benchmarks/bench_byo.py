"""Bring your own network (issue 34): a real nnU-Net v2 2D model, trained here with nnU-Net's own commands,
imported with ``segcli import nnunet`` and checked against ``nnUNetv2_predict``; then both on big images.

nnU-Net lives in its OWN virtual environment (``--nnunet-venv``, default /work/nnunet-venv): installing
nnunetv2 next to segcli's pinned CPU torch pulls a CUDA torchvision whose ``nms`` fails. Every nnU-Net step
runs its console command from there, on one core (``taskset -c CORE``, one thread), because the machine is
shared. Steps (each reads what the earlier ones wrote in ``--work``; run them in this order):

    V=/work/nnunet-venv; W=/work/byo
    python3 -m venv $V && $V/bin/pip install "torch==2.13.*" && $V/bin/pip install nnunetv2
    python benchmarks/bench_byo.py dataset --work $W     # 40 Kvasir-SEG frames at 256² as Dataset501_KvasirByo
    python benchmarks/bench_byo.py plan --work $W        # nnUNetv2_plan_and_preprocess -d 501 -c 2d, then
                                                         # nnUNetPlans_small.json: the 2d plans, features / 4
    python benchmarks/bench_byo.py train --work $W       # nnUNetv2_train 501 2d 0 -p nnUNetPlans_small
                                                         #   -tr nnUNetTrainer_5epochs -device cpu
    python benchmarks/bench_byo.py parity --work $W      # import, then segcli predict vs nnUNetv2_predict on fold 0's
                                                         # validation images: Dice per image and pooled
    python benchmarks/bench_byo.py big --work $W --sizes 2000 4000 8000 40000
                                                         # mosaics of the frames: time and peak RSS side by side
    python benchmarks/bench_byo.py blend --work $W --sizes 2000     # why the mosaics' masks differ
    python benchmarks/bench_byo.py distil --work $W --sizes 40000   # segcli train --stage coarse --pair, stts
    python benchmarks/bench_byo.py race --work $W --sizes 40000 --rounds 2  # the distil step's two runs again,
                                                         # interleaved, no training
    python benchmarks/bench_byo.py sttsmem --work $W --sizes 8000   # stts against the full sliding window
    python benchmarks/bench_byo.py nnapi --work $W --sizes 40000    # nnU-Net's Python API there, under the cap
    python benchmarks/bench_byo.py rescore --work $W --sizes 4000 8000  # the big step's comparisons again

Why smaller plans: nnU-Net's default 2D plans for 256² frames are a 33.5 M-parameter PlainConvUNet that
takes about 0.4-0.8 s per 256² window on one core, so 5 epochs (1,250 steps) or a 4000² image (961 windows)
would take most of an hour each. ``nnUNetPlans_small`` is the planner's own output with every stage's
features divided by 4 (nnU-Net's documented way: edit a copy of the plans, give it a new plans name; the
preprocessed data is shared, so ``data_identifier`` stays). Everything else (7 stages, kernels, strides,
instance norm, leaky ReLU, patch 256², batch 2, rgb_to_0_1) is what nnU-Net planned.

Figures go to ``--results`` (JSON). The load average is stored next to each timing: another training job
ran on the other core while these were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_slide as bs  # noqa: E402  (time_v, run_timed)

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_KvasirByo"
FRAME = 256
N_IMAGES = 40
TRAINER = "nnUNetTrainer_5epochs"
PLANS = "nnUNetPlans_small"
FEATURE_DIVISOR = 4
RESULTS = "nnUNet_results"


def nn_env(work: Path, core: int) -> dict[str, str]:
    """nnU-Net's folders and one thread for everything it starts."""
    env = dict(os.environ)
    env.update({"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                "nnUNet_results": str(work / RESULTS), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "nnUNet_compile": "f"})
    env.pop("PYTHONPATH", None)
    return env


def nn_cmd(venv: Path, core: int, tool: str, *args: str) -> list[str]:
    return ["taskset", "-c", str(core), "/usr/bin/time", "-v", str(venv / "bin" / tool), *args]


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 6 * 3600) -> dict:
    """Run ``cmd``, keep its output in ``log``, return wall / peak RSS from /usr/bin/time."""
    print("$", " ".join(cmd), flush=True)
    proc, wall = bs.run_timed(cmd, env, timeout, cmd[0])
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    out = {"rc": proc.returncode, "wall_s": round(wall, 1), **bs.time_v(proc.stderr), "load": os.getloadavg()[0]}
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return out


# -- the dataset -----------------------------------------------------------------------------------------------

def make_dataset(data: Path, work: Path) -> dict:
    """The first 40 Kvasir-SEG frames (sorted by name), squashed to 256², as an nnU-Net raw dataset (RGB PNG,
    ``rgb_to_0_1`` channels)."""
    from PIL import Image

    raw = work / "nnUNet_raw" / DATASET
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in (data / "images").glob("*.jpg"))[:N_IMAGES]
    for i, name in enumerate(names):
        img = Image.open(data / "images" / f"{name}.jpg").convert("RGB").resize((FRAME, FRAME), Image.BILINEAR)
        m = np.asarray(Image.open(next((data / "masks").glob(f"{name}.*"))).convert("L"))
        m = m > (127 if m.max() > 1 else 0)  # 0/1 PNG masks here; JPEG masks thresholded at 128
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((FRAME, FRAME), Image.NEAREST))
        img.save(raw / "imagesTr" / f"kv_{i:03d}_0000.png")
        Image.fromarray((m > 127).astype(np.uint8)).save(raw / "labelsTr" / f"kv_{i:03d}.png")
    ds = {"channel_names": {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"},
          "labels": {"background": 0, "polyp": 1}, "numTraining": len(names), "file_ending": ".png",
          "name": DATASET, "description": f"first {len(names)} Kvasir-SEG frames by name, squashed to {FRAME}²"}
    (raw / "dataset.json").write_text(json.dumps(ds, indent=1))
    (raw / "sources.json").write_text(json.dumps({f"kv_{i:03d}": n for i, n in enumerate(names)}, indent=1))
    return {"images": len(names), "raw": str(raw)}


def small_plans(work: Path) -> dict:
    """``nnUNetPlans_small.json``: nnU-Net's own 2d plans with every stage's features divided by 4."""
    pre = work / "nnUNet_preprocessed" / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [max(4, f // FEATURE_DIVISOR) for f in arch["features_per_stage"]]
    plans["configurations"] = {"2d": plans["configurations"]["2d"]}
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=1))
    return {"features_per_stage": arch["features_per_stage"], "patch_size": plans["configurations"]["2d"]["patch_size"],
            "batch_size": plans["configurations"]["2d"]["batch_size"]}


def results_folder(work: Path) -> Path:
    return work / RESULTS / DATASET / f"{TRAINER}__{PLANS}__2d"


def val_cases(work: Path) -> list[str]:
    """Fold 0's validation cases, from nnU-Net's own splits_final.json."""
    splits = json.loads((work / "nnUNet_preprocessed" / DATASET / "splits_final.json").read_text())
    return sorted(splits[0]["val"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["dataset", "plan", "train", "parity", "big", "blend", "distil", "race", "sttsmem",
                                     "nnapi", "rescore"])
    ap.add_argument("--work", type=Path, default=Path("/work/byo"))
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "kvasir-seg")
    ap.add_argument("--nnunet-venv", type=Path, default=Path("/work/nnunet-venv"))
    ap.add_argument("--core", type=int, default=1, help="the one CPU core every heavy step runs on")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "byo-nnunet.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000, 40000])
    ap.add_argument("--cap-gb", type=float, default=10.0, help="address-space cap for nnU-Net's big runs")
    ap.add_argument("--nn-max", type=int, default=40000, help="the largest mosaic nnU-Net is tried on (under --cap-gb)")
    ap.add_argument("--coverage", type=float, default=0.05, help="fraction of a mosaic the frames cover")
    ap.add_argument("--max-memory", default="1GB", help="segcli's budget in the --max-memory runs")
    ap.add_argument("--distil-images", type=int, default=16, help="label-free mosaics the rough network learns from")
    ap.add_argument("--distil-size", type=int, default=2048)
    ap.add_argument("--distil-coverage", type=float, default=0.25)
    ap.add_argument("--distil-epochs", type=int, default=40)
    ap.add_argument("--rough-downscale", default="8", help="--max-downscale of the distil step's runs: the rough "
                    "network sees the slide at the scale it learnt (distil-size / window)")
    ap.add_argument("--rounds", type=int, default=2, help="race: interleaved rounds of sliding and stts")
    ap.add_argument("--stts-args", default="", help="extra segcli options for the stts run (e.g. '--pad 64')")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = nn_env(args.work, args.core)
    doc = json.loads(args.results.read_text()) if args.results.is_file() else {}
    t0 = time.perf_counter()
    if args.step == "dataset":
        doc["dataset"] = make_dataset(args.data, args.work)
    elif args.step == "plan":
        doc["plan"] = run_logged(nn_cmd(args.nnunet_venv, args.core, "nnUNetv2_plan_and_preprocess", "-d",
                                        str(DATASET_ID), "-c", "2d", "-np", "1", "--verify_dataset_integrity"),
                                 env, args.work / "plan.log")
        doc["plan"]["small"] = small_plans(args.work)
    elif args.step == "train":
        doc["train"] = run_logged(nn_cmd(args.nnunet_venv, args.core, "nnUNetv2_train", str(DATASET_ID), "2d", "0",
                                         "-p", PLANS, "-tr", TRAINER, "-device", "cpu"), env, args.work / "train.log")
    elif args.step == "rescore":
        import bench_byo_steps as steps

        doc["big"] = steps.rescore(args, env, doc.get("big", {}))
    else:
        import bench_byo_steps as steps  # the steps that compare segcli with nnU-Net

        res = getattr(steps, args.step)(args, env)
        doc[args.step] = {**doc.get(args.step, {}), **res} if args.step == "big" else res  # sizes add up
    doc.setdefault("seconds", {})[args.step] = round(time.perf_counter() - t0, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc.get(args.step, doc.get("big")), indent=1)[:4000])


if __name__ == "__main__":
    main()
