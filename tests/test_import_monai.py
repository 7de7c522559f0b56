"""``segcli import monai`` (issue 34): a MONAI bundle made here runs in segcli like MONAI runs it itself."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segcli.api import Segmenter
from segcli.bundle import load_bundle
from segcli.errors import BundleError
from segcli.importers.monai import import_monai

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROI = 32


def _config(**changes) -> dict:
    cfg = {
        "imports": ["$import torch"],
        "n_classes": 3,
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1, "out_channels": "@n_classes",
                        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "batch"},
        "network": "$@network_def.to('cpu')",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [ROI, ROI], "sw_batch_size": 4, "overlap": 0.5,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    cfg.update(changes)
    return cfg


def _make_bundle(root: Path, cfg: dict | None = None, weights: object = None) -> Path:
    """A MONAI bundle as MONAI's tools lay it out: configs/inference.json, configs/metadata.json, models/model.pt."""
    from monai.bundle import ConfigParser

    cfg = cfg or _config()
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(cfg))
    meta = {"network_data_format": {"outputs": {"pred": {"num_channels": 3, "channel_def": {
        "0": "background", "1": "liver", "2": "tumour"}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    with torch.no_grad():  # weights that give all classes somewhere on the test image
        for p in net.parameters():
            p.mul_(3.0)
    torch.save(weights if weights is not None else net.state_dict(), root / "models" / "model.pt")
    return root


def _image() -> np.ndarray:
    """80 x 96: MONAI's window grid (steps of roi*overlap, last one flush) and segcli's (windows spread evenly)
    coincide at this size. An untrained network is far from shift-equivariant, so on other grids the two
    disagree for reasons that say nothing about the import."""
    yy, xx = np.mgrid[0:80, 0:96].astype(np.float32)
    return (150 * np.sin(yy / 9) + 150 * np.cos(xx / 13) + 50).astype(np.int16)


def _monai_reference(root: Path, img: np.ndarray) -> np.ndarray:
    """MONAI's own pipeline: its parser builds the network, transforms and inferer from the bundle."""
    from monai.bundle import ConfigParser
    from monai.transforms import ScaleIntensityRange

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    x = ScaleIntensityRange(a_min=-100, a_max=300, b_min=0.0, b_max=1.0, clip=True)(img.astype(np.float32)[None])
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():  # MONAI blends what the predictor returns: probabilities, as segcli's predictors do
        probs = inferer(torch.as_tensor(np.asarray(x))[None], lambda t: torch.softmax(net(t), 1))
    return torch.argmax(probs, 1)[0].numpy()


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return 2 * np.sum((a == k) & (b == k)) / max(1, np.sum(a == k) + np.sum(b == k))


def test_monai_bundle_matches_monai_inference(tmp_path):
    src = _make_bundle(tmp_path / "mb")
    out = import_monai(src, tmp_path / "seg")
    b = load_bundle(out)
    assert b.classes == ["background", "liver", "tumour"] and b.input_size == ROI and b.in_channels == 1
    assert b.normalization == {"kind": "ct_window", "center": 100.0, "width": 400.0}
    assert b.params["overlap"] == 0.5 and b.info["imported_from"]["network"]["class"] == "UNet"
    img = _image()
    got = Segmenter(out).segment_array(img[..., None])[0].labels
    want = _monai_reference(src, img)
    dices = [_dice(got, want, k) for k in (1, 2)]
    assert min(np.sum(want == k) for k in (1, 2)) > 100, "the reference must hold every class"
    assert min(dices) >= 0.99, dices


@pytest.mark.parametrize("change, words", [
    ({"network_def": {"_target_": "$torch.nn.Identity()"}}, "is not a MONAI network class"),
    ({"network_def": {"_target_": "NoSuchNet"}}, "not a class of monai.networks.nets"),
    ({"network_def": {"_target_": "os.system"}}, "not a MONAI network class"),
    ({"network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                      "channels": [4, 8], "strides": [2]}}, "is not 2D"),
    ({"n_classes": "$__import__('os').getcwd()"}, "is a Python expression"),
    ({"inferer": {"_target_": "SimpleInferer"}}, "not a SlidingWindowInferer"),
])
def test_config_code_and_unsupported_parts_are_refused(tmp_path, change, words):
    src = _make_bundle(tmp_path / "mb")
    (src / "configs" / "inference.json").write_text(json.dumps(_config(**change)))
    with pytest.raises(BundleError, match=words):
        import_monai(src, tmp_path / "seg")


def test_unknown_intensity_transform_and_pickled_objects_are_refused(tmp_path):
    src = _make_bundle(tmp_path / "mb")
    cfg = _config()
    cfg["preprocessing"]["transforms"][2] = {"_target_": "HistogramNormalized", "keys": "image"}
    (src / "configs" / "inference.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="HistogramNormalized.*cannot reproduce"):
        import_monai(src, tmp_path / "seg")
    sd = torch.load(src / "models" / "model.pt", weights_only=True)
    bad = _make_bundle(tmp_path / "bad", weights={"model": sd, "args": argparse.Namespace(lr=1)})
    with pytest.raises(BundleError, match="never unpickled"):
        import_monai(bad, tmp_path / "seg2")


def test_torchscript_model_is_converted_and_checked(tmp_path):
    src = _make_bundle(tmp_path / "mb")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(src / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(src / "models" / "model.pt", weights_only=True))
    torch.jit.script(net.eval()).save(str(src / "models" / "model.ts"))
    (src / "models" / "model.pt").unlink()
    out = import_monai(src, tmp_path / "seg")
    img = _image()
    got = Segmenter(out).segment_array(img[..., None])[0].labels
    want = _monai_reference_from(net, img)
    assert min(_dice(got, want, k) for k in (1, 2)) >= 0.99


def _monai_reference_from(net, img: np.ndarray) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    x = np.clip((img.astype(np.float32) + 100) / 400, 0, 1)[None, None]
    with torch.no_grad():
        probs = sliding_window_inference(torch.from_numpy(x), (ROI, ROI), 4, lambda t: torch.softmax(net(t), 1),
                                         overlap=0.5, mode="gaussian")
    return torch.argmax(probs, 1)[0].numpy()
