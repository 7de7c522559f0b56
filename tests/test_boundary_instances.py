"""Networks with a boundary class: touching objects split at the boundary they mark, the mask keeps the
boundary as part of its object, on the in-memory and the tiled route."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_bundle

from segcli.bundle import load_bundle
from segcli.errors import BundleError
from segcli.instances import boundary_targets, split_by_boundary, split_labels, split_touching
from segcli.instances_tiled import TiledInstances


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _three_class(inst: np.ndarray, width: int = 1) -> np.ndarray:
    """0 / 1 interior / 2 boundary from instance ids: the targets ``segcli train --boundary`` trains on."""
    return boundary_targets(inst, width)


def test_a_neck_the_network_marks_splits_what_the_distance_map_cannot():
    # two square nuclei side by side make one 16 x 32 rectangle: its distance map has one ridge and no neck,
    # the boundary class marks the line between them
    inst = np.zeros((60, 80), np.uint32)
    inst[20:36, 10:26] = 1
    inst[20:36, 26:42] = 2
    labels = _three_class(inst)
    out = split_by_boundary(labels)
    assert out.max() == 2 and np.array_equal(out > 0, inst > 0)  # no foreground pixel lost or added
    for k in (1, 2):  # each object comes back whole, pixel for pixel
        assert len(np.unique(out[inst == k])) == 1
    assert split_touching(labels > 0).max() == 1  # the binary mask's split merges them


def test_a_region_with_no_core_is_kept_as_one_object():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:9, 5:30] = 2  # a thin boundary-only sliver: no interior pixel
    labels[20:35, 20:35] = 2
    labels[22:33, 22:33] = 1  # a nucleus with its rim
    out = split_by_boundary(labels)
    assert np.array_equal(out > 0, labels > 0) and out.max() == 2
    assert len(np.unique(out[5:9, 5:30])) == 1 and len(np.unique(out[20:35, 20:35])) == 1


def test_every_rim_pixel_goes_to_the_core_beside_it():
    inst = np.zeros((60, 80), np.uint32)
    inst[10:30, 10:30] = 1
    inst[10:30, 30:50] = 2  # touching along a vertical line
    inst[35:55, 20:40] = 3  # a third one 5 px below the touching pair
    out = split_by_boundary(_three_class(inst, width=2))
    pairs = np.unique(np.column_stack([inst[inst > 0], out[inst > 0]]), axis=0)
    assert len(pairs) == 3 and np.array_equal(out > 0, inst > 0)  # each nucleus exactly one object


def test_cores_the_boundary_left_joined_are_split_by_their_distance_map():
    # two round nuclei whose predicted boundary missed the neck: their interiors touch through a 3-px bridge
    yy, xx = np.mgrid[:60, :90]
    a, b = (yy - 30) ** 2 + (xx - 28) ** 2 <= 16**2, (yy - 30) ** 2 + (xx - 62) ** 2 <= 16**2
    fg = a | b | ((abs(yy - 30) <= 1) & (xx > 28) & (xx < 62))
    labels = fg.astype(np.uint8) * 2
    core_a, core_b = (yy - 30) ** 2 + (xx - 28) ** 2 <= 13**2, (yy - 30) ** 2 + (xx - 62) ** 2 <= 13**2
    labels[core_a | core_b | ((abs(yy - 30) <= 1) & (xx > 28) & (xx < 62))] = 1
    out = split_by_boundary(labels)
    assert out.max() == 2 and out[30, 28] != out[30, 62] and np.array_equal(out > 0, fg)


@pytest.mark.parametrize("tile", [32, 48])
def test_tiled_boundary_split_equals_the_whole_image_split(tile):
    rng = np.random.default_rng(1)
    inst = np.zeros((160, 200), np.uint32)
    for k in range(1, 41):
        inst[_disc(inst.shape, *rng.uniform((0, 0), inst.shape), rng.uniform(5, 10))] = k
    labels = _three_class(inst)
    whole = split_labels(labels, boundary=(2, 1))
    t = TiledInstances(lambda b: labels[b[0] : b[2], b[1] : b[3]], labels.shape, tile, margin=24, reach=128,
                       boundary=(2, 1), fold=np.array([0, 1, 1], np.uint8))
    out = np.zeros(labels.shape, np.uint32)
    for y in range(0, 160, tile):
        for x in range(0, 200, tile):
            box = (y, x, min(y + tile, 160), min(x + tile, 200))
            out[box[0] : box[2], box[1] : box[3]] = t.read(box)
    assert t.cut_components == 0 and t.summary["split"] == "boundary"
    assert out.max() == whole.max() > split_touching(labels > 0).max()
    fg = out > 0
    pairs = np.unique(np.column_stack([out[fg], whole[fg]]), axis=0)
    assert np.array_equal(fg, whole > 0) and len(pairs) == whole.max()  # the same partition


@pytest.fixture(scope="module")
def boundary_bundle(tmp_path_factory) -> Path:
    """A random three-class U-Net whose head is centred so that each class wins on about a third of a noise
    image's pixels (a random head would give one class everywhere)."""
    import torch

    from segcli.bundle import save_bundle
    from segcli.nets import build

    torch.manual_seed(3)
    config = {"features": 4, "depth": 2}
    nets = {}
    x = torch.rand(1, 3, 64, 64)
    for role in ("coarse", "fine"):
        m = build("unet", in_channels=3, out_channels=3, **config).eval()
        head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            logits = m(x)
            head.bias -= logits.mean(dim=(0, 2, 3))
            head.weight *= 20.0 / float(logits.std())  # sharp enough that the classes alternate in patches
            head.bias *= 20.0 / float(logits.std())
        nets[role] = ("unet", config, m)
    path = save_bundle(tmp_path_factory.mktemp("bnd") / "bnd", name="bnd", method="sliding",
                       classes=["background", "nucleus", "boundary"], in_channels=3, input_size=32,
                       normalization={"kind": "dtype"}, networks=nets, info={"task": "test bundle"})
    cfg = json.loads((path / "segcli.json").read_text())
    cfg["instances"] = {"boundary": "boundary", "object": "nucleus"}
    (path / "segcli.json").write_text(json.dumps(cfg))
    return path


def test_the_bundle_folds_the_boundary_into_its_object(boundary_bundle):
    b = load_bundle(boundary_bundle)
    assert b.boundary == (2, 1) and b.output_classes == ["background", "nucleus"]
    assert b.fold().tolist() == [0, 1, 1]


@pytest.mark.parametrize("bad", [{"boundary": "edge", "object": "nucleus"}, {"boundary": "background",
                                 "object": "nucleus"}, "boundary", {"boundary": "boundary", "object": "boundary"}])
def test_a_bad_instances_field_is_refused(tmp_path, bad):
    path = make_bundle(tmp_path / "b", classes=("background", "nucleus", "boundary"))
    cfg = json.loads((path / "segcli.json").read_text())
    cfg["instances"] = bad
    (path / "segcli.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="instances"):
        load_bundle(path)


def _image(tmp_path: Path, tiled: bool) -> Path:
    rng = np.random.default_rng(0)
    img = (rng.random((200, 240, 3)) * 255).astype(np.uint8)
    path = tmp_path / ("slide.tif" if tiled else "tile.png")
    if tiled:
        tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", resolution=(40000, 40000), resolutionunit=3)
    else:
        from PIL import Image

        Image.fromarray(img).save(path)
    return path


@pytest.mark.parametrize("bounded", [False, True])
def test_a_run_writes_the_folded_mask_and_splits_at_the_boundary(tmp_path, boundary_bundle, bounded):
    from segcli.api import Segmenter

    path = _image(tmp_path, bounded)
    kw = {"lazy_pixels": 0, "tile_size": 64} if bounded else {}
    seg = Segmenter(str(boundary_bundle), instances=True, **kw)
    out = tmp_path / "out" / ("slide_seg.tif" if bounded else "tile_seg.tif")
    rep = seg.predict_file(path, out)
    assert rep.status == "ok", rep.error
    assert bool(rep.info.get("bounded_memory")) is bounded
    mask = tifffile.imread(out)
    inst = tifffile.imread(out.parent / out.name.replace("_seg.tif", "_seg_instances.tif"))
    assert set(np.unique(mask).tolist()) <= {0, 1} and mask.any()  # the boundary is part of the nucleus
    assert np.array_equal(inst > 0, mask > 0)
    assert rep.info["instances"]["split"] == "boundary"
    assert list(rep.voxel_counts) == ["nucleus"]  # the report counts the mask's classes only
    assert rep.voxel_counts["nucleus"] == int(mask.sum())
    # the network's own labels hold all three classes; the mask is their foreground
    res, _ = seg.segment_array(np.asarray(tifffile.imread(path) if bounded else _png(path)), kind="2d")
    assert res.parts is not None and set(np.unique(res.parts).tolist()) == {0, 1, 2}
    assert np.array_equal(res.labels, (res.parts > 0).astype(np.uint8))
    if not bounded:  # the written objects are the boundary split of those labels
        whole = split_labels(res.parts, boundary=(2, 1))
        assert np.array_equal(inst, whole)


def test_a_photo_folds_the_boundary_after_fusion_so_instances_leave_its_mask_alone(tmp_path, boundary_bundle):
    """A photo's mask is the three-class labels with the boundary folded into the nucleus, with or without
    --instances (stts scored better so); a slide without --instances folds the boundary before fusion instead
    (the boundary's probability added to the nucleus's per window, as a binary bundle would fuse), and its
    probabilities equal the three-class run's folded ones, since blending is linear."""
    from segcli.api import Segmenter

    img = _png(_image(tmp_path, False))
    plain, _ = Segmenter(str(boundary_bundle)).segment_array(img, kind="2d", return_probs=True)
    inst, _ = Segmenter(str(boundary_bundle), instances=True).segment_array(img, kind="2d", return_probs=True)
    slide, _ = Segmenter(str(boundary_bundle)).segment_array(img, kind="slide", return_probs=True)
    for res in (plain, inst, slide):
        assert res.probs is not None and res.probs.shape == (2, *img.shape[:2])
        assert np.allclose(res.probs.sum(axis=0), 1.0, atol=1e-4)
    assert plain.parts is not None and inst.parts is not None and slide.parts is None
    assert np.array_equal(plain.labels, inst.labels) and np.array_equal(plain.parts, inst.parts)
    assert np.array_equal(plain.labels, (plain.parts > 0).astype(np.uint8))
    assert np.array_equal(slide.labels, (slide.probs[1] > 0.5).astype(np.uint8))
    assert np.allclose(slide.probs, inst.probs, atol=1e-4)
    assert np.all(inst.probs[1][inst.parts == 2] > 0)  # the boundary counts as nucleus


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_boundary_targets_known_answer():
    """Width 1: a nucleus's rim and the line where two nuclei touch are boundary, the rest interior."""
    inst = np.zeros((7, 10), np.uint32)
    inst[1:6, 1:5] = 1
    inst[1:6, 5:9] = 2
    want = np.zeros((7, 10), np.uint8)
    want[1:6, 1:9] = 2
    want[2:5, 2:4] = 1  # interior of 1: not on its rim, not next to nucleus 2
    want[2:5, 6:8] = 1
    assert np.array_equal(boundary_targets(inst, 1), want)
