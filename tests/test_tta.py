"""--tta: each network input's probabilities averaged over its flips (and transposes), on every route."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segcli.api import Segmenter
from segcli.memplan import make_plan
from segcli.runtimes import FunctionPredictor
from segcli.runtimes.tta import TransformAveraged
from tests.conftest import run_cli


def _position_dependent(batch: np.ndarray) -> np.ndarray:
    """Not flip-equivariant: the foreground probability depends on the pixel's row and column."""
    h, w = batch.shape[-2:]
    ramp = np.arange(h, dtype=np.float32)[:, None] * 0.3 - np.arange(w, dtype=np.float32)[None, :] * 0.7
    fg = 1.0 / (1.0 + np.exp(-(batch[:, :1] + ramp)))
    return np.concatenate([1.0 - fg, fg], axis=1)


def _by_hand(batch: np.ndarray, transposes: bool) -> np.ndarray:
    """The average written out with np.flip / np.transpose, independently of segcli.runtimes.tta."""
    outs = []
    for t in ((False, True) if transposes else (False,)):
        x = np.transpose(batch, (0, 1, 3, 2)) if t else batch
        for axes in ((), (3,), (2,), (2, 3)):
            p = np.flip(_position_dependent(np.flip(x, axes) if axes else x), axes) if axes else _position_dependent(x)
            outs.append(np.transpose(p, (0, 1, 3, 2)) if t else p)
    return np.mean(outs, axis=0)


@pytest.mark.parametrize("tta,calls", [("flips", 4), ("dihedral", 8)])
def test_the_average_is_the_transforms_undone_and_averaged(tta: str, calls: int) -> None:
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    base = FunctionPredictor(_position_dependent)
    out = TransformAveraged(base, tta)(x)
    np.testing.assert_allclose(out, _by_hand(x, tta == "dihedral"), rtol=1e-6, atol=1e-7)
    assert base.calls == calls and out.dtype == np.float32
    assert not np.allclose(out, _position_dependent(x), atol=1e-3)  # the transforms did change something


def test_a_pixelwise_network_is_unchanged_and_non_square_inputs_get_the_flips() -> None:
    pixelwise = FunctionPredictor(lambda b: np.concatenate([1 - 1 / (1 + np.exp(-b)), 1 / (1 + np.exp(-b))], 1))
    x = np.random.default_rng(1).normal(size=(2, 1, 6, 10)).astype(np.float32)
    out = TransformAveraged(pixelwise, "dihedral")(x)
    np.testing.assert_allclose(out, pixelwise.fn(x), rtol=1e-6)
    assert pixelwise.calls == 4  # 6x10: no transposes (a fixed-shape network could not take 10x6)


def test_the_option_wraps_every_network_of_the_run(grey_bundle, tmp_path) -> None:
    img = (np.random.default_rng(2).random((96, 80)) * 255).astype(np.uint8)
    img[20:60, 10:50] = 250
    with_tta = Segmenter(grey_bundle, tta="flips")
    got = with_tta.segment_array(img[..., None], return_probs=True)[0]
    plain = Segmenter(grey_bundle)
    bundle = plain.warm_up("2d")
    for role in plain.roles(bundle):
        inner = plain.predictor(bundle, role)

        def by_hand(b: np.ndarray, inner=inner) -> np.ndarray:
            return np.mean([np.flip(inner(np.ascontiguousarray(np.flip(b, a))), a) for a in
                            ((), (3,), (2,), (2, 3))], axis=0)

        plain.set_predictor(bundle, role, FunctionPredictor(by_hand))
    want = plain.segment_array(img[..., None], return_probs=True)[0]
    assert np.array_equal(np.asarray(got.labels), np.asarray(want.labels))
    np.testing.assert_allclose(np.asarray(got.probs), np.asarray(want.probs), atol=1e-6)
    alone = Segmenter(grey_bundle).segment_array(img[..., None], return_probs=True)[0]
    assert np.abs(np.asarray(got.probs) - np.asarray(alone.probs)).max() > 1e-3


def test_the_plan_counts_one_transformed_batch_and_one_sum_per_item() -> None:
    args = {"budget": 10**12, "kind": "2d", "name": "m", "base": 100 * 10**6, "costs": {"fine": {1: 10**7}},
            "how": "measured", "size": 256, "channels": 3, "n_classes": 5, "zoom": 1.0, "wanted": 1}
    assert make_plan(**args, tta=4).minimum - make_plan(**args).minimum == 4 * 256 * 256 * (3 + 5)


def test_the_cli_takes_tta_and_says_so_in_the_report(grey_bundle, tmp_path) -> None:
    from PIL import Image

    Image.fromarray((np.random.default_rng(3).random((64, 64)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    r = run_cli("predict", tmp_path / "a.png", "--model", grey_bundle, "--tta", "dihedral", "--json", "-q")
    assert r.returncode == 0, r.stderr
    providers = json.loads(r.stdout)["files"][0]["providers"]
    assert providers and all(p.endswith(":tta-dihedral") for p in providers.values())
    bad = run_cli("predict", tmp_path / "a.png", "--model", grey_bundle, "--tta", "mirror")
    assert bad.returncode == 2 and bad.stderr.startswith("segcli: error: --tta must be one of none, flips, dihedral")
