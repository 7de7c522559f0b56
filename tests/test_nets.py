"""Network definitions: parameter counts, shapes at odd sizes, ONNX parity, and the parts that are easy
to get subtly wrong (ROI-convolution gradients, Gumbel gates, scatter unpooling, box coding)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcli.nets import available, build, param_count

# The registry loads its built-ins only while it is empty: fill it before importing a network module
# directly, or that import alone would leave e.g. "unet" unregistered for every later test.
available()

from segcli.nets.arsm import ARSM, ShuffleUnit, gumbel_softmax_safe  # noqa: E402
from segcli.nets.layers import max_unpool_scatter  # noqa: E402
from segcli.nets.rpn_fcn import (  # noqa: E402
    RPNFCN,
    ROIConv2d,
    box_iou,
    boxes_from_mask,
    decode_boxes,
    encode_boxes,
    grid_anchors,
    make_base_anchors,
    union_mask,
)

# Tiny configurations: a forward pass on 64x64 takes milliseconds on one core.
TINY_HRNET = {"width": "w18-small-v1", "base_channels": 4}
TINY: dict[str, dict[str, Any]] = {
    "hrnet": TINY_HRNET,
    "arsm": {**TINY_HRNET, "gate_units": 1},
    "rpn-fcn": {"width_mult": 0.125, "fc_channels": 16, "anchor_sizes": (8, 16, 32)},
    "deconvnet": {"widths": (8, 16, 32)},
}
OURS = ["hrnet", "arsm", "rpn-fcn", "deconvnet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets run faster on one thread, and OpenMP threads spinning on a shared 2-core machine can
    make them 20x slower; restore the setting for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(name: str, in_channels: int = 1, out_channels: int = 2, **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    return build(name, in_channels=in_channels, out_channels=out_channels, **{**TINY[name], **extra})


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN real running statistics (as training would), so eval outputs are O(1) and a 1e-4
    absolute ONNX tolerance means something; then switch to eval."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


def _square(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images (one flipped, so BN never sees a single value per channel): a bright square on dark."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.rand(1, 1, size, size, generator=g)
    t = torch.zeros(1, size, size, dtype=torch.long)
    x[..., 8:20, 10:22] += 0.8
    t[..., 8:20, 10:22] = 1
    return torch.cat([x, x.flip(-1)]), torch.cat([t, t.flip(-1)])


# --- registry and parameter counts ------------------------------------------------------------------


def test_registered() -> None:
    assert set(OURS) <= set(available())


@pytest.mark.parametrize(
    ("width", "classes", "expected"),
    [
        ("w18", 19, 9_641_119),
        ("w32", 19, 29_546_515),
        ("w18", 2, 9_636_512),
        ("w18-small-v1", 19, 1_540_819),
        ("w18-small-v2", 19, 3_939_579),
    ],
)
def test_hrnet_param_counts(width: str, classes: int, expected: int) -> None:
    assert param_count(build("hrnet", width=width, in_channels=3, out_channels=classes)) == expected


def test_hrnet_stem_stride_keeps_param_count() -> None:
    a = build("hrnet", width="w18-small-v1", out_channels=2, stem_stride=4)
    b = build("hrnet", width="w18-small-v1", out_channels=2, stem_stride=1)
    assert param_count(a) == param_count(b)


def test_arsm_head_param_counts() -> None:
    """Experts and gate match the hand counts of the spec (W18, K=2, two shuffle units)."""
    net = build("arsm", width="w18", in_channels=3, out_channels=2)
    assert isinstance(net, ARSM)
    assert param_count(net.experts) == 548
    assert param_count(net.gate) == 79_118
    assert param_count(ShuffleUnit(270)) == 38_475


def test_deconvnet_param_counts() -> None:
    assert param_count(build("deconvnet", in_channels=3, out_channels=2)) == 2_325_890
    assert param_count(build("deconvnet", in_channels=1, out_channels=2)) == 2_324_738
    assert param_count(build("deconvnet", in_channels=3, out_channels=2, widths=(16, 32, 64))) == 146_018


def test_rpn_fcn_param_count() -> None:
    """0.25x VGG16-BN (16..128 ch) + RPN with 12 anchors + fc 512 / 3x3 fc6 head ~ 1.9M (spec section 3.7)."""
    net = build("rpn-fcn", in_channels=3, out_channels=2)
    assert isinstance(net, RPNFCN)
    assert param_count(net.backbone) == 921_840  # the spec's 920,784 with conv bias traded for BN
    rpn = param_count(net.rpn_conv) + param_count(net.rpn_cls) + param_count(net.rpn_reg)
    assert rpn == 155_324
    head = sum(param_count(m) for m in (net.fc6, net.fc7, net.score, net.up))
    assert head == 858_114
    assert param_count(net) == 1_935_278


# --- shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("out_channels", [1, 3])
def test_forward_shapes_odd_sizes(name: str, out_channels: int) -> None:
    net = _tiny(name, in_channels=2, out_channels=out_channels).eval()
    with torch.no_grad():
        for h, w in [(37, 53), (1, 1), (16, 5)]:
            y = net(torch.randn(2, 2, h, w))
            assert y.shape == (2, out_channels, h, w)
            assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", OURS)
def test_training_forward_shape(name: str) -> None:
    net = _tiny(name).train()
    x, _ = _square()
    assert net(x[..., :29, :31]).shape == (2, 2, 29, 31)


def test_hrnet_stem_stride_one_and_arsm_stride_four() -> None:
    with torch.no_grad():
        for name, cfg in (
            ("hrnet", {"stem_stride": 1}),
            ("arsm", {"stem_stride": 4}),
            ("arsm", {"stem_stride": 2}),
        ):
            net = _tiny(name, **cfg).eval()
            assert net(torch.randn(1, 1, 21, 19)).shape == (1, 2, 21, 19)


# --- ARSM gates -------------------------------------------------------------------------------------


def test_gumbel_gates_sum_to_one_in_training() -> None:
    net = _tiny("arsm", out_channels=3).train()
    x, _ = _square()
    g = net.gates(x)
    assert g.shape == (2, 4, 3, 32, 32)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.sum(dim=1), torch.ones(2, 3, 32, 32))
    # T = 0.1 makes samples nearly one-hot
    assert g.max(dim=1).values.mean() > 0.8


def test_gumbel_softmax_safe_never_nan_at_extremes() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0, 0.0]]).expand(10_000, -1)
    g = gumbel_softmax_safe(logits, tau=0.1, dim=1)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.sum(dim=1), torch.ones(10_000))


def test_gate_eval_modes() -> None:
    x = torch.randn(1, 1, 24, 20)
    nets = {}
    for mode in ("expectation", "mc", "hard"):
        nets[mode] = _tiny("arsm", out_channels=2, gate_eval=mode).eval()
    with torch.no_grad():
        # expectation: deterministic, and equal to softmax over the resolutions of the gate logits
        torch.testing.assert_close(nets["expectation"](x), nets["expectation"](x), rtol=0, atol=0)
        g_exp = nets["expectation"].gates(x)
        _, a = nets["expectation"]._experts_and_gate_logits(x)
        torch.testing.assert_close(g_exp, torch.softmax(a, dim=1))
        # mc: seeded, so two calls agree; another seed differs; the average approaches the expectation
        torch.testing.assert_close(nets["mc"](x), nets["mc"](x), rtol=0, atol=0)
        g_mc = nets["mc"].gates(x)
        nets["mc"].mc_seed = 1
        assert not torch.equal(g_mc, nets["mc"].gates(x))
        assert (g_mc - g_exp).abs().mean() < 0.05
        # hard: one-hot across resolutions, at the argmax of the expectation gates
        g_hard = nets["hard"].gates(x)
        assert set(g_hard.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(g_hard.sum(dim=1), torch.ones_like(g_hard[:, 0]))
        assert torch.equal(g_hard.argmax(dim=1), g_exp.argmax(dim=1))


def test_gate_maps() -> None:
    net = _tiny("arsm", out_channels=3, stem_stride=4).train()
    maps = net.gate_maps(torch.randn(2, 1, 27, 35))
    assert maps.shape == (2, 3, 27, 35)
    assert maps.dtype == torch.long
    assert int(maps.min()) >= 0 and int(maps.max()) <= 3
    assert net.training  # restored


def test_arsm_rejects_unknown_gate_mode() -> None:
    with pytest.raises(ValueError, match="gate_eval"):
        build("arsm", gate_eval="sample")


# --- unpooling --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(8, 8), (7, 9), (5, 2), (3, 3)])
def test_scatter_unpool_matches_max_unpool(h: int, w: int) -> None:
    x = torch.randn(2, 3, h, w, requires_grad=True)
    pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    ours = max_unpool_scatter(pooled, idx, x)
    ref = nn.MaxUnpool2d(2, 2)(pooled, idx, output_size=x.shape[-2:])
    assert torch.equal(ours, ref)
    g = torch.randn_like(ours)
    (ga,) = torch.autograd.grad(ours, x, g, retain_graph=True)
    (gb,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(ga, gb)


# --- RPN-FCN: geometry ------------------------------------------------------------------------------


def test_base_anchors_known_values() -> None:
    a = make_base_anchors([16], [0.5, 1.0, 2.0])
    s2 = math.sqrt(2)
    expected = torch.tensor(
        [[-8 * s2, -4 * s2, 8 * s2, 4 * s2], [-8, -8, 8, 8], [-4 * s2, -8 * s2, 4 * s2, 8 * s2]]
    )
    torch.testing.assert_close(a, expected)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    torch.testing.assert_close(area, torch.full((3,), 256.0))


def test_grid_anchors_order_and_centres() -> None:
    base = make_base_anchors([16, 32], [1.0])
    g = grid_anchors(base, 2, 3, stride=16)
    assert g.shape == (2 * 3 * 2, 4)
    # ordered (y, x, anchor): the 4th location is (y=0, x=1)... index (0*3 + 1)*2 + 1 -> size 32 at (24, 8)
    torch.testing.assert_close(g[3], torch.tensor([24 - 16, 8 - 16, 24 + 16, 8 + 16.0]))
    torch.testing.assert_close(g[-2], torch.tensor([40 - 8, 24 - 8, 40 + 8, 24 + 8.0]))


def test_box_coding_round_trip_and_known_deltas() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 40.0, 5.0]])
    d = encode_boxes(boxes, anchors)
    torch.testing.assert_close(d[0], torch.tensor([0.1, 0.7, 0.0, math.log(2.0)]))
    torch.testing.assert_close(decode_boxes(d, anchors), boxes)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(100, 4, generator=g)
    a = torch.rand(100, 2, generator=g) * 50
    a = torch.cat([a, a + 1 + torch.rand(100, 2, generator=g) * 50], dim=1)
    torch.testing.assert_close(encode_boxes(decode_boxes(d, a), a), d, atol=1e-4, rtol=1e-4)


def test_box_iou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1.0, 25 / 175, 0.0], [4 / 100, 0.0, 0.0]]))


def test_boxes_from_mask() -> None:
    m = np.zeros((20, 30), dtype=bool)
    m[2:5, 3:8] = True  # 3x5 component
    m[10:18, 20:21] = True  # 8x1 component
    m[0, 29] = True  # 1 px, dropped as tiny
    comps = boxes_from_mask(m, "components")
    assert sorted(comps.tolist()) == [[3, 2, 8, 5], [20, 10, 21, 18]]
    assert boxes_from_mask(m, "enclosing").tolist() == [[3, 0, 30, 18]]
    assert boxes_from_mask(np.zeros((4, 4)), "components").shape == (0, 4)
    only_tiny = np.zeros((5, 5), dtype=bool)
    only_tiny[1, 1] = True
    assert boxes_from_mask(only_tiny).tolist() == [[1, 1, 2, 2]]


def test_union_mask_pixels_and_cells() -> None:
    boxes = torch.tensor([[[3.0, 2.0, 8.0, 5.0], [0.0, 0.0, 40.0, 40.0]]])
    keep = torch.tensor([[1.0, 0.0]])
    px = union_mask(boxes, keep, 10, 12)
    expected = torch.zeros(1, 10, 12, dtype=torch.bool)
    expected[0, 2:5, 3:8] = True
    assert torch.equal(px, expected)
    cells = union_mask(torch.tensor([[[17.0, 0.0, 33.0, 10.0]]]), torch.ones(1, 1), 3, 4, cell=16)
    expected = torch.zeros(1, 3, 4, dtype=torch.bool)
    expected[0, 0, 1:3] = True  # columns 16..32 and 32..48 overlap [17, 33)
    assert torch.equal(cells, expected)
    empty = union_mask(torch.zeros(2, 0, 4), torch.zeros(2, 0), 5, 6)
    assert empty.shape == (2, 5, 6) and not empty.any()


# --- RPN-FCN: ROI convolution and inference ---------------------------------------------------------


def test_roi_conv_zero_outside_and_gradients_only_from_inside() -> None:
    torch.manual_seed(0)
    conv = ROIConv2d(3, 4, 3, padding=1)
    nn.init.normal_(conv.bias)
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    mask = torch.zeros(1, 1, 12, 12)
    mask[..., 4:7, 5:9] = 1
    y = conv(x, mask)
    assert torch.equal(y[..., mask[0, 0] == 0], torch.zeros_like(y[..., mask[0, 0] == 0]))  # bias too
    y.pow(2).sum().backward()
    # input gradient: only within the receptive field (radius 1) of ROI outputs
    near = F.max_pool2d(mask, 3, 1, padding=1)[0, 0] > 0
    assert x.grad is not None and conv.weight.grad is not None
    assert torch.equal(x.grad[..., ~near], torch.zeros_like(x.grad[..., ~near]))
    assert x.grad[..., near].abs().sum() > 0
    # weight gradient: unchanged when the input changes only outside that receptive field
    w_grad = conv.weight.grad.clone()
    conv.zero_grad()
    x2 = x.detach().clone()
    x2[..., ~near] = 100.0
    conv(x2, mask).pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_grad)
    # and no ROI at all: no gradient anywhere
    conv.zero_grad()
    conv(x2, torch.zeros_like(mask)).sum().backward()
    assert conv.weight.grad.abs().sum() == 0 and conv.bias.grad.abs().sum() == 0


def _spread_rpn(net: RPNFCN, x: torch.Tensor) -> RPNFCN:
    """Untrained objectness is ~0 everywhere; spread it around 0 on ``x`` so the score threshold keeps
    some anchors and drops others (and ties, which TopK may break differently, are unlikely)."""
    with torch.no_grad():
        nn.init.normal_(net.rpn_cls.weight, std=0.5)
        net.rpn_cls.bias.zero_()
        obj = net._rpn(x)[1]
        net.rpn_cls.bias.fill_(-float(obj.median()))
    return net


def test_rpn_fcn_forces_background_outside_rois() -> None:
    for k in (1, 3):
        x = torch.randn(1, 1, 80, 96)
        net = _spread_rpn(_tiny("rpn-fcn", out_channels=k, topk=3).eval(), x)
        with torch.no_grad():
            y, inside = net(x), net.roi_mask(x)
        assert 0 < inside.float().mean() < 1
        outside = y.permute(0, 2, 3, 1)[~inside]
        if k == 1:
            assert (outside < -20).all()
        else:
            assert (outside.argmax(dim=1) == 0).all() and (torch.softmax(outside, 1)[:, 0] > 0.999).all()


def test_rpn_fcn_loss_parts_and_modes() -> None:
    x, t = _square()
    for targets in ("components", "enclosing"):
        for seg_loss in ("roi_ce", "loss_fn"):
            net = _tiny("rpn-fcn", rpn_targets=targets, seg_loss=seg_loss).train()
            loss = net.compute_loss(x, t, F.cross_entropy)
            assert torch.isfinite(loss) and loss > 0
            loss.backward()
            assert net.rpn_cls.weight.grad is not None and net.fc6.weight.grad is not None
    # an image without foreground still gives a finite loss (all anchors background)
    net = _tiny("rpn-fcn", out_channels=1).train()
    loss = net.compute_loss(x, torch.zeros_like(t), F.binary_cross_entropy_with_logits)
    assert torch.isfinite(loss)


# --- ONNX parity ------------------------------------------------------------------------------------

ONNX_CASES = [(name, {}) for name in OURS] + [
    ("arsm", {"gate_eval": "hard", "stem_stride": 4}),
    ("hrnet", {"stem_stride": 1}),
    ("rpn-fcn", {"out_channels": 1, "topk": 4}),
    ("deconvnet", {"batch_norm": True}),
]


@pytest.mark.parametrize(
    ("name", "extra"), ONNX_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ONNX_CASES)]
)
def test_onnx_parity_two_sizes(name: str, extra: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime as ort

    extra = dict(extra)
    out_channels = extra.pop("out_channels", 2)
    net = _tiny(name, out_channels=out_channels, **extra)
    net = _calibrate_bn(net, torch.rand(2, 1, 48, 40))
    if isinstance(net, RPNFCN):
        _spread_rpn(net, torch.rand(2, 1, 64, 64))
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.rand(1, 1, 32, 48),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N", 2: "H", 3: "W"}},
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # idle ORT threads spin and would slow the rest of the suite
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for shape in [(1, 1, 37, 53), (2, 1, 64, 29)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4
        if isinstance(net, RPNFCN) and net.topk <= 4:  # the ROI rule ran: some pixels kept, some forced
            assert 0 < float(net.roi_mask(x).float().mean()) < 1


# --- overfit smoke test -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OURS)
def test_overfit_smoke(name: str) -> None:
    """30 Adam steps on one synthetic image lower the training loss (the whole loss path is wired)."""
    net = _tiny(name, out_channels=2).train()
    x, t = _square()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        compute = getattr(net, "compute_loss", None)
        loss = compute(x, t, F.cross_entropy) if compute else F.cross_entropy(net(x), t)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
