"""nnU-Net's blend (issue 34): an imported nnU-Net bundle's sliding window averages the windows' logits under
nnU-Net's discretised Gaussian, then takes the softmax, as nnUNetv2_predict does. Checked against an
independent numpy/scipy implementation written here from the algorithm (a unit impulse smoothed by
``scipy.ndimage.gaussian_filter``, logits accumulated and divided by the summed weights, argmax), on the
in-memory route and the bounded one (the blend store spilled to disk)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from segcli.engines.base import ArrayPlane
from segcli.engines.direct import nnunet_gaussian, sliding
from segcli.engines.stts import stts
from segcli.errors import UsageError
from segcli.params import check_param
from segcli.runtimes.predictor import FunctionPredictor, logits_to_probs

S = 32


def _reference_gaussian(shape: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    delta = np.zeros(shape)
    delta[tuple(n // 2 for n in shape)] = 1
    g = gaussian_filter(delta, [n * sigma_scale for n in shape], 0, mode="constant", cval=0)
    g = g / g.max() * 10  # nnU-Net's value scaling; only ratios count
    g[g == 0] = g[g > 0].min()
    return g


def _logits(batch: np.ndarray, k: int) -> np.ndarray:
    """A deterministic 'network' whose logits depend on the window's own coordinates, so overlapping windows
    disagree (as a real network's do near its borders) and the blend decides."""
    n, _, h, w = batch.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = batch[:, 0]
    z = [np.zeros_like(x)]
    for c in range(1, k):
        z.append(6 * (x - 0.5 + 0.1 * c) + 1.5 * np.sin(yy / (3 + c)) * np.cos(xx / 5) + 0.02 * c * (xx - yy))
    return np.stack(z, 1).astype(np.float32)


def _net(k: int) -> FunctionPredictor:
    return FunctionPredictor(lambda b: logits_to_probs(_logits(b, k)), n_classes=k, in_channels=1)


def _image(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    return (0.5 + 0.3 * np.sin(yy / 9.0) * np.cos(xx / 13.0) + 0.05 * rng.standard_normal((h, w))).astype(np.float32)


def _reference(img: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's sliding window: steps of half a patch spread evenly, logits times the Gaussian summed and
    divided by the summed Gaussian, softmax for the probabilities, argmax for the labels."""
    H, W = img.shape

    def steps(n: int) -> list[int]:
        k_ = int(np.ceil((n - S) / (S / 2))) + 1
        return [int(np.round((n - S) / (k_ - 1) * i)) for i in range(k_)]

    g = _reference_gaussian((S, S))
    acc, wsum = np.zeros((k, H, W)), np.zeros((H, W))
    for y in steps(H):
        for x in steps(W):
            acc[:, y:y + S, x:x + S] += _logits(img[None, None, y:y + S, x:x + S], k)[0] * g
            wsum[y:y + S, x:x + S] += g
    z = acc / wsum
    e = np.exp(z - z.max(0))
    return np.argmax(z, 0).astype(np.uint8), e / e.sum(0)


@pytest.mark.parametrize("shape", [(32, 32), (48, 40), (7, 12)])
def test_gaussian_is_nnunets(shape):
    ref = _reference_gaussian(shape)
    assert np.allclose(nnunet_gaussian(shape), ref / ref.max(), rtol=1e-5, atol=0)


def test_gaussian_cut_at_four_sigma_keeps_no_zero():
    delta = np.zeros((40, 40))
    delta[20, 20] = 1
    ref = gaussian_filter(delta, 40 / 16, 0, mode="constant", cval=0)  # radius 10 < 20: zeros in the corners
    assert (ref == 0).any()
    ref[ref == 0] = ref[ref > 0].min()
    assert np.allclose(nnunet_gaussian((40, 40), 1 / 16), ref / ref.max(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_in_memory_sliding_blends_as_nnunet(k):
    img = _image(70, 90)
    want, want_p = _reference(img, k)
    res = sliding(ArrayPlane(img[None]), _net(k), size=S, overlap=0.5, threshold=0.5, batch_size=5,
                  return_probs=True, blend="nnunet")
    assert res.info["blend"] == "nnunet"
    assert np.array_equal(res.labels, want)
    assert np.abs(res.probs - want_p).max() < 1e-4
    # segcli's own blend (probabilities, its Gaussian) gives another mask here: the test can tell them apart
    own = sliding(ArrayPlane(img[None]), _net(k), size=S, overlap=0.5, threshold=0.5, batch_size=5)
    assert (own.labels != want).sum() > 0


@pytest.mark.parametrize("k", [2, 3])
def test_bounded_sliding_blends_as_nnunet(tmp_path, k):
    """The bounded route's stand-in (stts over the grid windows, fused in a spilled store) gives the same
    labels and probabilities, with a rough network that finds something everywhere."""
    img = _image(70, 90)
    want, want_p = _reference(img, k)
    everywhere = FunctionPredictor(lambda b: np.concatenate([np.zeros_like(b[:, :1])] * (k - 1) + [np.ones_like(b[:, :1])], 1),
                                   n_classes=k, in_channels=1)
    res = stts(ArrayPlane(img[None]), everywhere, _net(k), size=S, threshold=0.5, batch_size=4, crop_mode="grid",
               fusion="gaussian", overlap=0.5, lazy=True, spill_dir=tmp_path, fuse_cache=4 * 2**10, blend="nnunet")
    assert res.info["blend"] == "nnunet"
    assert np.array_equal(np.asarray(res.labels), want)
    assert np.abs(res.labels.read_probs((0, 0, 70, 90)) - want_p).max() < 1e-4


def test_blend_is_checked():
    assert check_param("blend", "nnunet") == "nnunet"
    with pytest.raises(UsageError, match="blend must be"):
        check_param("blend", "logits")


@pytest.mark.parametrize("classes", [2, 3])
def test_spilled_logit_store_equals_the_dense_logit_blend(tmp_path, classes):
    """The bounded route's store, its tiles evicted to disk after every window (a 1-byte cache), keeps the same
    logit sums as the dense in-memory blend: the same labels and probabilities."""
    from segcli.fusion import BlendStore, WeightedMean
    from segcli.geometry import sliding_grid

    rng = np.random.default_rng(5)
    H, W = 150, 170
    windows = sliding_grid((H, W), S, 0.5)
    z = rng.normal(0, 3, (len(windows), classes, S, S)).astype(np.float32)
    p = logits_to_probs(z)
    dense = WeightedMean((H, W), classes, 0.5, nnunet_gaussian((S, S)), logits=True)
    store = BlendStore((H, W), classes, 0.5, tile=64, spill_dir=tmp_path, cache_bytes=1, logits=True,
                       weight_for=nnunet_gaussian)
    for i, box in enumerate(windows):
        dense.aggregate(box, p[i])
        store.aggregate(box, p[i])
    labels, probs = dense.finalize(True)
    whole = (0, 0, H, W)
    assert np.array_equal(store.labels(whole), labels)
    assert np.abs(store.probs(whole) - probs).max() < 1e-5
