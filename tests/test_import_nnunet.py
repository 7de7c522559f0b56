"""``segcli import nnunet`` (issue 34): a tiny results folder in nnU-Net v2's own layout and checkpoint format,
made here without nnU-Net; the imported bundle's masks match nnU-Net's sliding window written out in the test
with torch's functional ops straight from the checkpoint's weights (logits averaged under its Gaussian)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from segcli.api import Segmenter
from segcli.bundle import load_bundle
from segcli.errors import BundleError
from segcli.importers.nnunet import import_nnunet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FEATS, PATCH, K = [4, 8, 16], 32, 3


def _plans(**arch_changes) -> dict:
    kw = {"n_stages": 3, "features_per_stage": FEATS, "conv_op": "torch.nn.modules.conv.Conv2d",
          "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [2, 2, 2],
          "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
    kw.update(arch_changes)
    return {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d", "batch_size": 2, "patch_size": [PATCH, PATCH], "spacing": [1.0, 1.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under nnU-Net's key names, aliases and decoder copy of the encoder included (344 keys
    for 128 tensors in a real 2D checkpoint)."""
    g = torch.Generator().manual_seed(seed)

    def block(prefix: str, cin: int, cout: int, out: dict) -> None:
        w = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        b, nw, nb = torch.randn(cout, generator=g) * 0.1, 1 + 0.1 * torch.randn(cout, generator=g), \
            0.1 * torch.randn(cout, generator=g)
        for name, t in (("conv.weight", w), ("conv.bias", b), ("norm.weight", nw), ("norm.bias", nb),
                        ("all_modules.0.weight", w), ("all_modules.0.bias", b), ("all_modules.1.weight", nw),
                        ("all_modules.1.bias", nb)):
            out[f"{prefix}.{name}"] = t

    sd: dict[str, torch.Tensor] = {}
    cin = 1
    for s, f in enumerate(FEATS):
        for i in range(2):
            block(f"encoder.stages.{s}.0.convs.{i}", cin if i == 0 else f, f, sd)
        cin = f
    sd.update({f"decoder.{k}": v for k, v in sd.items()})  # the decoder's reference to the encoder
    for s in range(1, len(FEATS)):
        below, skip = FEATS[-s], FEATS[-(s + 1)]
        sd[f"decoder.transpconvs.{s - 1}.weight"] = torch.randn(below, skip, 2, 2, generator=g) * 0.3
        sd[f"decoder.transpconvs.{s - 1}.bias"] = torch.zeros(skip)
        block(f"decoder.stages.{s - 1}.convs.0", 2 * skip, skip, sd)
        sd[f"decoder.seg_layers.{s - 1}.weight"] = torch.randn(K, skip, 1, 1, generator=g)
        sd[f"decoder.seg_layers.{s - 1}.bias"] = torch.randn(K, generator=g) * 0.1
    return sd


def _results(root: Path, folds=(0,), plans: dict | None = None, extra: object = None) -> Path:
    src = root / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__2d"
    plans = plans or _plans()
    ds = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
          "numTraining": 4, "file_ending": ".nii.gz"}
    for f in folds:
        (src / f"fold_{f}").mkdir(parents=True)
        ckpt = {"network_weights": _weights(int(f) if str(f).isdigit() else 9), "optimizer_state": {"state": {}},
                "init_args": {"plans": plans, "configuration": "2d", "fold": f, "dataset_json": ds},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1), "current_epoch": 1,
                "_best_ema": np.float64(0.42), "logging": {"ema_fg_dice": [np.float32(0.1)]}}
        if extra is not None:
            ckpt["extra"] = extra
        torch.save(ckpt, src / f"fold_{f}" / "checkpoint_final.pth")
    (src / "plans.json").write_text(json.dumps(plans))
    (src / "dataset.json").write_text(json.dumps(ds))
    return src


def _forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """PlainConvUNet's forward written with functional ops (conv, instance norm, leaky ReLU, up-convolution)."""
    def block(p: str, t: torch.Tensor, stride: int = 1) -> torch.Tensor:
        t = F.conv2d(t, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], stride=stride, padding=1)
        t = F.instance_norm(t, weight=sd[f"{p}.norm.weight"], bias=sd[f"{p}.norm.bias"], eps=1e-5)
        return F.leaky_relu(t, 0.01)

    skips = []
    for s in range(len(FEATS)):
        x = block(f"encoder.stages.{s}.0.convs.1", block(f"encoder.stages.{s}.0.convs.0", x, 1 if s == 0 else 2))
        skips.append(x)
    for s in range(len(FEATS) - 1):
        up = F.conv_transpose2d(x, sd[f"decoder.transpconvs.{s}.weight"], sd[f"decoder.transpconvs.{s}.bias"], stride=2)
        x = block(f"decoder.stages.{s}.convs.0", torch.cat([up, skips[-(s + 2)]], 1))
    return F.conv2d(x, sd["decoder.seg_layers.1.weight"], sd["decoder.seg_layers.1.bias"])


def _by_hand(sds: list[dict], img: np.ndarray, mirror: bool = False) -> np.ndarray:
    """Fold- (and mirror-) averaged logits per window, their mean over a half-overlap grid weighted by nnU-Net's
    Gaussian (an impulse at the patch's centre smoothed with σ = patch / 8), argmax."""
    x = torch.from_numpy(((img - img.mean()) / img.std()).astype(np.float32))[None, None]
    H, W = img.shape
    ky, kx = (int(np.ceil((n - PATCH) / (PATCH / 2))) + 1 for n in (H, W))
    ys = [round(i * (H - PATCH) / (ky - 1)) for i in range(ky)]
    xs = [round(i * (W - PATCH) / (kx - 1)) for i in range(kx)]
    delta = np.zeros((PATCH, PATCH))
    delta[PATCH // 2, PATCH // 2] = 1
    g = torch.from_numpy(gaussian_filter(delta, PATCH / 8, 0, mode="constant", cval=0) * 1e3).float()
    acc, wsum = torch.zeros(K, H, W), torch.zeros(H, W)
    flips = [[], [2], [3], [2, 3]] if mirror else [[]]
    with torch.no_grad():
        for y0 in ys:
            for x0 in xs:
                win = x[:, :, y0:y0 + PATCH, x0:x0 + PATCH]
                logits = sum(torch.flip(_forward(sd, torch.flip(win, f) if f else win), f) if f else _forward(sd, win)
                             for sd in sds for f in flips) / (len(sds) * len(flips))
                acc[:, y0:y0 + PATCH, x0:x0 + PATCH] += logits[0] * g
                wsum[y0:y0 + PATCH, x0:x0 + PATCH] += g
    return torch.argmax(acc / wsum, 0).numpy()


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:56, 0:64].astype(np.float32)
    return (100 * np.sin(yy / 7) * np.cos(xx / 11) + 20 * np.random.default_rng(0).standard_normal(yy.shape)
            + 300).astype(np.float32)


def _agree(src: Path, out: Path, sds: list[dict], mirror: bool = False) -> float:
    img = _image()
    got = Segmenter(out).segment_array(img[..., None])[0].labels
    want = _by_hand(sds, img, mirror)
    assert all(np.sum(want == k) > 50 for k in range(K)), "every class must appear for the check to mean much"
    return float(np.mean(got == want))


def test_one_fold_matches_the_network_written_out_by_hand(tmp_path):
    src = _results(tmp_path)
    out = import_nnunet(src, tmp_path / "b", folds=["0"])
    b = load_bundle(out)
    assert (b.classes, b.in_channels, b.input_size, b.normalization) == (
        ["background", "liver", "tumour"], 1, PATCH, {"kind": "zscore"})
    assert b.info["imported_from"]["checkpoints"] == ["fold_0/checkpoint_final.pth"]
    assert (b.params["overlap"], b.params["blend"]) == (0.5, "nnunet")  # nnUNetv2_predict's tile step and blend
    assert _agree(src, out, [_weights(0)]) > 0.999


def test_folds_averaged_with_mirroring(tmp_path):
    src = _results(tmp_path, folds=(0, 1))
    out = import_nnunet(src, tmp_path / "b", mirror=True)
    assert load_bundle(out).info["imported_from"]["mirroring"] == [0, 1]
    assert _agree(src, out, [_weights(0), _weights(1)], mirror=True) > 0.999


@pytest.mark.parametrize("plans_change, words", [
    ({"conv_op": "torch.nn.modules.conv.Conv3d"}, "is not 2D"),
    ({"norm_op": "torch.nn.GroupNorm"}, "norm_op torch.nn.GroupNorm is not supported"),
    ({"features_per_stage": [4, 8, 32]}, "weights do not fit the network plans.json describes"),
])
def test_plans_segcli_cannot_build_are_refused(tmp_path, plans_change, words):
    src = _results(tmp_path, plans=_plans(**plans_change))
    with pytest.raises(BundleError, match=words):
        import_nnunet(src, tmp_path / "b")


def test_normalisation_and_labels_segcli_cannot_reproduce_are_refused(tmp_path):
    plans = _plans()
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
    with pytest.raises(BundleError, match="CTNormalization is not supported"):
        import_nnunet(_results(tmp_path / "ct", plans=plans), tmp_path / "b")
    src = _results(tmp_path / "reg")
    ds = json.loads((src / "dataset.json").read_text())
    ds["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    (src / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(BundleError, match="region-based labels"):
        import_nnunet(src, tmp_path / "b")


def test_arbitrary_objects_in_a_checkpoint_are_never_unpickled(tmp_path):
    src = _results(tmp_path, extra=argparse.Namespace(lr=0.01))
    with pytest.raises(BundleError, match="never unpickled"):
        import_nnunet(src, tmp_path / "b")
    with pytest.raises(BundleError, match="fold fold_3 has no checkpoint_final.pth"):
        import_nnunet(_results(tmp_path / "x"), tmp_path / "c", folds=["3"])
