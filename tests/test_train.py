"""Training: dataset layouts and checks, crop geometry, a tiny end-to-end run, resume, determinism.

Everything runs on the committed fixtures (tests/fixtures/make_fixtures.py) with a 4-feature
U-Net at S = 32, so the whole file stays well under a minute and a half on two CPU cores.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcli.bundle import load_bundle
from segcli.errors import DatasetError, UsageError
from segcli.geometry import component_boxes, crop_boxes
from segcli.train import CHECKPOINT, METRICS, checkpoint_path, load_checkpoint, parse_duration, train
from segcli.train.data import crop_candidates, discover, fine_box, load_dataset, make_split
from tests.conftest import run_cli

FIX = Path(__file__).parent / "fixtures"
SHARED = FIX / "shared"
NNUNET = FIX / "nnunet"
TINY = {"size": 32, "features": 4, "batch_size": 4, "quiet": True, "threads": 1}


# --------------------------------------------------------------------------------------------- datasets
def test_shared_layout() -> None:
    spec = discover(SHARED)
    assert spec.layout == "shared" and spec.name == "tiny-shared"
    assert spec.classes == ["background", "blob"]
    assert len(spec.cases) == 8 and spec.cases[0].fov is not None
    ds = load_dataset(SHARED, seed=0, val_fraction=0.25)
    assert ds.in_channels == 3 and ds.n_out == 1 and ds.normalization == {"kind": "dtype"}
    assert len(ds.train) == 6 and len(ds.val) == 2
    assert ds.train[0].image.dtype == np.uint8  # 8-bit sources stay 8-bit in the cache
    assert len({s.shape for s in ds.train}) > 1  # images of several sizes
    grey = load_dataset(SHARED, channels="grey")
    assert grey.in_channels == 1


def test_nnunet_layout_stacks_channels() -> None:
    spec = discover(NNUNET)
    assert spec.layout == "nnunet" and spec.classes == ["background", "left", "right"]
    assert [len(c.images) for c in spec.cases] == [2] * 5
    ds = load_dataset(NNUNET, val_fraction=0.2)
    assert ds.in_channels == 2 and ds.n_out == 3
    s = ds.train[0]
    assert s.image.shape == (2, *s.shape)
    assert set(np.unique(s.mask)) == {0, 1, 2}


def test_split_is_seeded_and_splits_file_wins(tmp_path: Path) -> None:
    stems = [f"c{i}" for i in range(10)]
    a = make_split(stems, seed=3, val_fraction=0.3)
    assert a.train == make_split(stems, seed=3, val_fraction=0.3).train
    assert len(a.val) == 3 and not set(a.val) & set(a.train)
    data = tmp_path / "d"
    shutil.copytree(SHARED, data)
    (data / "splits.json").write_text(json.dumps({"train": ["c0", "c1", "c2", "c3"], "val": ["c4"]}))
    ds = load_dataset(data)
    assert ds.split.train == ["c0", "c1", "c2", "c3"] and ds.split.val == ["c4"]
    assert ds.split.source.endswith("splits.json")


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("size", r"case 'c1': mask is 10x10 but image is"),
        ("missing", r"case 'c2': no mask"),
        ("label", r"case 'c3': mask holds label 2 but the dataset has 2 classes"),
    ],
)
def test_bad_dataset_stops_before_training(tmp_path: Path, breakage: str, match: str) -> None:
    data = tmp_path / "d"
    shutil.copytree(SHARED, data)
    if breakage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / "c1.png")
    elif breakage == "missing":
        (data / "masks" / "c2.png").unlink()
    else:
        m = np.array(Image.open(data / "masks" / "c3.png"))
        m[0, 0] = 2
        Image.fromarray(m).save(data / "masks" / "c3.png")
    with pytest.raises(DatasetError, match=match):
        train(data, tmp_path / "out", method="direct", epochs=1, **TINY)
    assert not checkpoint_path(tmp_path / "out").exists() and not (tmp_path / "out" / CHECKPOINT).exists()


def test_parse_duration() -> None:
    assert parse_duration("10m") == 600 and parse_duration("90") == 90 and parse_duration("1h30m") == 5400
    with pytest.raises(UsageError):
        parse_duration("soon")


# --------------------------------------------------------------------------------------------- crops
def test_stain_jitter_known_answers() -> None:
    from segcli.train.augment import _RGB_FROM_HED, stain_jitter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 0.9 + 0.05
    one, zero = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(stain_jitter(x, one, zero), x, atol=1e-5)  # identity
    # a pure-haematoxylin pixel: OD = c * h; doubling H doubles its optical density, E/D untouched
    h = _RGB_FROM_HED[0].float()
    px = torch.exp(-0.5 * h).view(1, 3, 1, 1)
    twice = stain_jitter(px, torch.tensor([[2.0, 1.0, 1.0]]), torch.zeros(1, 3))
    assert torch.allclose(twice.flatten(), torch.exp(-1.0 * h), atol=1e-5)
    assert torch.allclose(stain_jitter(px, torch.tensor([[1.0, 3.0, 0.5]]), torch.zeros(1, 3)), px, atol=1e-5)
    white = torch.ones(1, 3, 2, 2)
    assert torch.equal(stain_jitter(white, torch.tensor([[1.3, 0.7, 1.1]]), torch.zeros(1, 3)), white)


def test_stain_jitter_is_opt_in_and_only_recolours() -> None:
    from segcli.train.augment import AugmentConfig, augment

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = (x[:, :1] > 0.5).float().repeat(1, 2, 1, 1)
    xa, ya = augment(x, y, torch.Generator().manual_seed(3), AugmentConfig())
    xb, yb = augment(x, y, torch.Generator().manual_seed(3), AugmentConfig(stain=0.2))
    assert torch.equal(ya, yb)  # same geometry: the stain draws come after all the others
    assert not torch.allclose(xa, xb) and torch.isfinite(xb).all()
    xc, _ = augment(x, y, torch.Generator().manual_seed(3), AugmentConfig(stain=0.0))
    assert torch.equal(xa, xc)  # off by default, and off leaves the random stream alone
    with pytest.raises(ValueError, match="RGB"):
        augment(x[:, :1], y, torch.Generator().manual_seed(3), AugmentConfig(stain=0.1))


def test_stain_jitter_trains_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "he"
    train(SHARED, out, method="direct", epochs=1, val_full_res=False, stain_jitter=0.1, endoscopy_jitter=0.3, **TINY)
    b = load_bundle(out)
    assert b.training["stain_jitter"] == 0.1 and b.training["endoscopy_jitter"] == 0.3
    with pytest.raises(UsageError, match="stain-jitter"):
        train(SHARED, tmp_path / "bad", method="direct", epochs=1, stain_jitter=1.5, **TINY)
    with pytest.raises(UsageError, match="stain-jitter"):
        train(NNUNET, tmp_path / "grey", method="direct", epochs=1, stain_jitter=0.1, **TINY)
    with pytest.raises(UsageError, match="endoscopy-jitter needs RGB"):
        train(NNUNET, tmp_path / "grey2", method="direct", epochs=1, endoscopy_jitter=0.1, **TINY)


def test_crop_jitter_bounds() -> None:
    """Training crops are geometry.crop_boxes' boxes: inside the image, jitter within ±J before squaring."""
    rng_mask = np.random.default_rng(5)
    J, pad = 16, 4
    for trial in range(40):
        H, W = int(rng_mask.integers(30, 120)), int(rng_mask.integers(30, 120))
        mask = np.zeros((H, W), bool)
        for _ in range(int(rng_mask.integers(1, 4))):
            y, x = int(rng_mask.integers(0, H - 3)), int(rng_mask.integers(0, W - 3))
            mask[y : y + int(rng_mask.integers(2, 20)), x : x + int(rng_mask.integers(2, 20))] = True
        base = component_boxes(mask)
        jittered, final = crop_candidates(base, (H, W), pad, J, np.random.default_rng(trial))
        # The same draws through the inference function give the same boxes.
        expect = crop_boxes(mask, (H, W), pad, jitter=J, rng=np.random.default_rng(trial))
        np.testing.assert_array_equal(final, expect)
        assert np.all(final[:, :2] >= 0) and np.all(final[:, 2] <= H) and np.all(final[:, 3] <= W)
        assert np.all(final[:, 2] > final[:, 0]) and np.all(final[:, 3] > final[:, 1])
        # Jitter acts on (top, left, height, width), each by at most J (so bottom/right by 2J).
        all_j, _ = crop_candidates(base, (H, W), pad, J, np.random.default_rng(trial))
        for jb in all_j:
            d = np.abs(base[:, None, :] - jb[None, None, :])[:, 0]
            h0, w0 = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
            hj, wj = jb[2] - jb[0], jb[3] - jb[1]
            ok = (d[:, 0] <= J) & (d[:, 1] <= J) & (np.abs(h0 - hj) <= J) & (np.abs(w0 - wj) <= J)
            assert ok.any(), (jb, base)


def test_fine_box_falls_back_to_whole_image() -> None:
    ds = load_dataset(SHARED, val_fraction=0.0)
    empty = next(s for s in ds.train if s.stem == "c5")
    assert len(empty.boxes) == 0
    np.testing.assert_array_equal(fine_box(empty, 4, 16, np.random.default_rng(0)), [0, 0, *empty.shape])


# --------------------------------------------------------------------------------------------- training
def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**{f"c.{k}": v for k, v in load_file(str(path / "coarse.safetensors")).items()},
            **({f"f.{k}": v for k, v in load_file(str(path / "fine.safetensors")).items()}
               if (path / "fine.safetensors").exists() else {})}


def test_stts_two_epochs_makes_a_loadable_bundle(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = train(SHARED, out, method="stts", epochs=2, **TINY)
    b = load_bundle(out)
    assert b.method == "stts" and b.classes == ["background", "blob"] and b.input_size == 32
    assert b.in_channels == 3 and b.normalization == {"kind": "dtype"} and b.param("pad") == 4
    assert set(b.networks) == {"coarse", "fine"} and not b.verify()
    for role in ("coarse", "fine"):
        m = b.load_module(role)
        with torch.no_grad():
            y = m(torch.rand(2, 3, 32, 32))
        assert y.shape == (2, 1, 32, 32)
    t = b.training
    assert t["dataset"] == "tiny-shared" and t["licence"] == "CC0"
    assert t["split"]["seed"] == 0 and len(t["split"]["train"]) == 6 and len(t["split"]["val"]) == 2
    assert set(t["stages"]) == {"coarse", "fine"} and t["stages"]["coarse"]["epochs_run"] == 2
    assert t["val_score"] is not None and t["command"].startswith("segcli train")
    # The fine stage draws crops_per_image (8) crops per image per epoch, so by default it runs
    # ceil(epochs / 8) epochs: as many optimizer steps as the coarse stage.
    # 6 train images, batch 4: coarse 2 steps x 2 epochs; fine 6 x 8 crops / 4 = 12 steps x 1 epoch.
    assert res.stages["fine"]["epochs_run"] == 1
    assert (t["stages"]["coarse"]["steps"], t["stages"]["fine"]["steps"]) == (4, 12)
    recs = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in recs] == [("coarse", 1), ("coarse", 2), ("fine", 1)]
    # The bundle holds what inference needs; the resume state (optimiser, best states) lives beside it.
    assert CHECKPOINT not in {p.name for p in out.iterdir()}
    assert checkpoint_path(out) == tmp_path / "run.resume" / CHECKPOINT and checkpoint_path(out).is_file()


def test_refine_multiclass_nnunet(tmp_path: Path) -> None:
    out = tmp_path / "ref"
    train(NNUNET, out, method="refine", epochs=1, patches=2, val_full_res=False, **TINY)
    b = load_bundle(out)
    assert b.method == "refine" and b.n_classes == 3 and b.in_channels == 2
    assert b.param("patch_size") == 32 and b.training["stages"]["fine"]["val_miou"] is not None


def test_same_seed_same_weights(tmp_path: Path) -> None:
    opts = dict(method="stts", epochs=1, val_full_res=False, seed=7, **TINY)
    train(SHARED, tmp_path / "a", **opts)
    train(SHARED, tmp_path / "b", **opts)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "r"
    train(SHARED, out, method="direct", epochs=1, val_full_res=False, **TINY)
    with pytest.raises(UsageError, match="--resume"):
        train(SHARED, out, method="direct", epochs=1, **TINY)
    # A run made before the resume state moved out of the bundle (checkpoint.pt inside) still resumes there.
    checkpoint_path(out).rename(out / CHECKPOINT)
    res = train(None, None, resume=out, val_full_res=False)  # a finished run: the bundle is written again
    assert res.stages["coarse"]["epochs_run"] == 1 and (out / CHECKPOINT).is_file()
    assert not checkpoint_path(out).exists()


def _cli_train(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segcli", "train", "--method", "direct", "--data", str(SHARED), "-o", str(out),
            "--size", "32", "--features", "4", "--batch-size", "2", "--threads", "1", "--no-val-full-res", "-q", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path.name} appeared: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.005)


def test_resume_after_kill9_is_exact(tmp_path: Path) -> None:
    """kill -9 after the first checkpoint, --resume: epochs continue and the result equals an unbroken run."""
    epochs = 6
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli_train(out, "--epochs", str(epochs)), stderr=subprocess.PIPE, text=True)
    _wait_for(checkpoint_path(out), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    ck = load_checkpoint(checkpoint_path(out))
    done = int(ck["current"]["epoch"])
    assert 1 <= done < epochs, "the run finished before it could be killed"
    steps_per_epoch = 3  # 6 training images, batch 2

    # the resumed and the reference runs need no process of their own (the kill did)
    r = run_cli(*_cli_train(out, "--epochs", str(epochs), "--resume", str(out))[3:])
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [x["epoch"] for x in recs] == list(range(1, epochs + 1))  # no epoch repeated, none lost
    # The optimiser state travelled: Adam's step counter covers the epochs before AND after the kill.
    final = load_checkpoint(checkpoint_path(out))
    summary = final["finished"]["coarse"]["summary"]
    assert summary["steps"] == epochs * steps_per_epoch
    assert summary["optimizer_step"] == epochs * steps_per_epoch  # Adam's own counter, restored from the checkpoint
    assert final["current"] is None
    # Same weights as a run that was never interrupted (same seed, same thread count).
    ref = tmp_path / "ref"
    assert run_cli(*_cli_train(ref, "--epochs", str(epochs))[3:]).returncode == 0
    wa, wb = _weights(out), _weights(ref)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigint_saves_checkpoint_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "int"
    proc = subprocess.Popen(_cli_train(out, "--epochs", "200"), stderr=subprocess.PIPE, text=True)
    _wait_for(checkpoint_path(out), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err
    ck = load_checkpoint(checkpoint_path(out))
    assert ck["current"]["stage"] == "coarse" and ck["current"]["epoch"] < 200


def _volume_dataset(root: Path) -> None:
    """nnU-Net layout with two CT-like int16 volumes whose coarsest spacing is along x."""
    import SimpleITK as sitk

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        lab = np.zeros((12, 20, 6), np.uint8)  # (z, y, x) as SimpleITK arrays are
        lab[3:9, 5 + i : 12 + i, 1:5] = 1
        img = (rng.normal(-100, 20, lab.shape) + 300.0 * lab).astype(np.int16)
        for arr, path in ((img, root / "imagesTr" / f"vol_{i:03d}_0000.nii.gz"), (lab, root / "labelsTr" / f"vol_{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((3.0, 0.8, 0.8))  # x, y, z in mm: x is the coarse axis
            sitk.WriteImage(im, str(path))
    (root / "dataset.json").write_text(json.dumps({"name": "tiny-ct", "channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))


def test_volumes_become_slices_along_the_coarsest_axis(tmp_path: Path) -> None:
    from segcli.io import open_image

    data = tmp_path / "ct"
    _volume_dataset(data)
    ref = open_image(data / "imagesTr" / "vol_000_0000.nii.gz")
    axis = int(np.argmax(ref.spacing))
    assert ref.spacing[axis] == pytest.approx(3.0)
    ds = load_dataset(data, val_fraction=0.34)
    assert ds.slice_axis == axis
    n_slices = ref.array.shape[axis]
    assert len(ds.train) == 2 * n_slices and len(ds.val) == n_slices  # split by volume, never by slice
    in_plane = tuple(v for i, v in enumerate(ref.array.shape[:3]) if i != axis)
    assert ds.train[0].shape == in_plane and ds.train[0].stem.startswith(ds.split.train[0])
    assert ds.normalization["kind"] == "ct_window"  # CT in HU: a fixed window, recorded in the bundle
    train(data, tmp_path / "out", method="direct", epochs=1, val_full_res=False, **{**TINY, "size": 16})
    b = load_bundle(tmp_path / "out")
    assert b.normalization["kind"] == "ct_window" and b.training["slice_axis"] == axis


def test_nnunet_rgb_images_in_one_file(tmp_path: Path) -> None:
    """nnU-Net v2's RGB convention (its Dataset120): one case_0000.png, channel_names R, G, B (issue 20)."""
    from PIL import Image

    root = tmp_path / "Dataset120_Road"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "imagesTr" / f"r_{i:03d}_0000.png")
        Image.fromarray((rng.random((24, 32)) > 0.5).astype(np.uint8)).save(root / "labelsTr" / f"r_{i:03d}.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R", "1": "G", "2": "B"},
                                                   "labels": {"background": 0, "road": 1}, "file_ending": ".png"}))
    spec = discover(root)
    assert [len(c.images) for c in spec.cases] == [1] * 4
    ds = load_dataset(root, val_fraction=0.25)
    assert ds.in_channels == 3 and ds.train[0].image.shape[0] == 3


def test_time_limit_is_checked_after_every_step(tmp_path: Path) -> None:
    """A limit no step can fit: each stage makes exactly one optimiser step (no full epoch past the limit),
    and the CLI says the model is undertrained, even with -q."""
    out = tmp_path / "tl"
    r = run_cli("train", "--method", "stts", "--data", SHARED, "-o", out, "--size", "32", "--features", "4",
                "--batch-size", "1", "--threads", "1", "--no-val-full-res", "-q", "--epochs", "50", "--time-limit",
                "0.001")
    assert r.returncode == 0, r.stderr
    stages = load_bundle(out).training["stages"]
    assert {k: (v["steps"], v["stopped"]) for k, v in stages.items()} == {"coarse": (1, "time"), "fine": (1, "time")}
    assert re.match(r"segcli: warning: the time limit stopped training \(coarse after 1 of \d+ steps of its first "
                    r"epoch; fine after 1 of \d+ steps", r.stderr), r.stderr
    assert f"segcli train --resume {out} --time-limit" in r.stderr


def test_lr_schedule_follows_whichever_runs_out_first() -> None:
    """Under a time limit the cosine schedule reads max(step share, time share): known values at both ends."""
    from segcli.train.loop import lr_factor

    spent = [0.0]
    f = lr_factor("cosine", 100, lambda: spent[0])
    assert f(0) == pytest.approx(1.0) and f(50) == pytest.approx(0.505)
    spent[0] = 0.5  # half the time gone after 10 % of the planned steps: the LR is already halfway down
    assert f(10) == pytest.approx(0.505)
    spent[0] = 1.7  # past the budget (the stage's last step): fully annealed, never below the floor
    assert f(10) == pytest.approx(0.01)
    assert lr_factor("cosine", 100)(10) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * 0.1)))


def _boundary_dataset(root: Path, instances: object) -> Path:
    """The tiny dataset with each blob's outer ring as a third class, and dataset.json naming it."""
    from scipy import ndimage as ndi

    shutil.copytree(SHARED, root)
    for p in (root / "masks").glob("*.png"):
        m = np.array(Image.open(p)) > 0
        ring = m & ~ndi.binary_erosion(m)
        Image.fromarray(np.where(ring, 2, m).astype(np.uint8)).save(p)
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "blob": 1, "edge": 2}
    meta["instances"] = instances
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_a_dataset_naming_a_boundary_class_trains_a_bundle_that_folds_it(tmp_path: Path) -> None:
    data = _boundary_dataset(tmp_path / "d", {"boundary": "edge", "object": "blob"})
    train(data, tmp_path / "out", method="direct", epochs=1, val_full_res=False, **TINY)
    b = load_bundle(tmp_path / "out")
    assert b.classes == ["background", "blob", "edge"] and b.boundary == (2, 1)
    assert b.output_classes == ["background", "blob"]


@pytest.mark.parametrize("bad", [{"boundary": "edge", "object": "edge"}, {"boundary": "rim", "object": "blob"},
                                 ["edge", "blob"], {"boundary": "background", "object": "blob"}])
def test_a_bad_boundary_declaration_stops_before_training(tmp_path: Path, bad: object) -> None:
    data = _boundary_dataset(tmp_path / "d", bad)
    with pytest.raises(DatasetError, match='^.*dataset.json: "instances"'):
        train(data, tmp_path / "out", method="direct", epochs=1, **TINY)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _with_instances(root: Path) -> Path:
    """The tiny dataset plus instances/: each blob's connected component as one object id."""
    from scipy import ndimage as ndi

    shutil.copytree(SHARED, root)
    (root / "instances").mkdir()
    for p in (root / "masks").glob("*.png"):
        ids, _ = ndi.label(np.array(Image.open(p)) > 0)
        Image.fromarray(ids.astype(np.uint16)).save(root / "instances" / p.name)
    return root


def test_boundary_training_learns_from_instance_ids(tmp_path: Path) -> None:
    data = _with_instances(tmp_path / "d")
    ds = load_dataset(data, boundary=1)
    assert ds.classes == ["background", "blob", "boundary"] and ds.spec.meta["instances"]["object"] == "blob"
    m = np.array(Image.open(data / "masks" / "c0.png")) > 0
    target = next(s for s in ds.train + ds.val if s.case == "c0").mask
    assert set(np.unique(target).tolist()) == {0, 1, 2} and np.array_equal(target > 0, m)
    train(data, tmp_path / "out", method="direct", epochs=1, boundary=1, val_full_res=False, **TINY)
    b = load_bundle(tmp_path / "out")
    assert b.classes == ["background", "blob", "boundary"] and b.boundary == (2, 1)


def test_boundary_training_without_instances_stops_before_training(tmp_path: Path) -> None:
    data = _with_instances(tmp_path / "d")
    (data / "instances" / "c3.png").unlink()
    with pytest.raises(DatasetError, match=r"case 'c3': --boundary needs its object ids in instances/"):
        train(data, tmp_path / "out", method="direct", epochs=1, boundary=1, **TINY)
