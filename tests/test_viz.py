"""Previews (--preview), error maps for evaluate, and --arsm-maps: what is drawn, where, in which colour."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from segcli import drawing, viz
from tests.conftest import make_bundle, run_cli
from tests.test_cli import png, write_volume

CLASSES = ["background", "liver", "tumour"]


def two_class_case(h=60, w=80, grey=100):
    img = np.full((h, w, 3), grey, np.uint8)
    lab = np.zeros((h, w), np.uint8)
    lab[10:30, 10:35] = 1  # 20 x 25 = 500 px
    lab[35:55, 45:75] = 2  # 20 x 30 = 600 px
    return img, lab


def blended(grey: int, colour, alpha: float) -> np.ndarray:
    return np.array([int((1 - alpha) * grey + alpha * c + 0.5) for c in colour])


def crop(pv: viz.Preview, panel: drawing.Panel) -> np.ndarray:
    x0, y0, x1, y1 = panel.box
    return pv.pixels[y0:y1, x0:x1]


def test_palette_is_distinct_and_colour_blind_safe():
    cols = {drawing.class_colour(c) for c in range(1, 8)}
    assert len(cols) == 7 and (0, 0, 0) not in cols
    assert drawing.class_colour(1) == (86, 180, 233)  # Okabe-Ito sky blue
    assert drawing.class_colour(8) == drawing.class_colour(1)  # cycles past the palette


def test_two_classes_contours_fill_and_legend():
    img, lab = two_class_case()
    pv = viz.render_preview(img, lab, classes=CLASSES, normalization={"kind": "dtype"}, title="case")
    assert pv.layout == "side-by-side" and [p.kind for p in pv.panels] == ["image", "overlay"]
    image_panel, ov_panel = pv.panels
    ov, raw = crop(pv, ov_panel), crop(pv, image_panel)
    assert ov.shape == raw.shape
    s = ov.shape[0] // 60  # tiny images are enlarged by an integer factor
    assert s >= 2 and ov.shape[:2] == (60 * s, 80 * s)
    for c, (r0, r1, c0, c1) in ((1, (10, 30, 10, 35)), (2, (35, 55, 45, 75))):
        col = np.array(drawing.class_colour(c))
        # Contour: every side of the rectangle, at full opacity.
        mid_r, mid_c = (r0 + r1) // 2 * s, (c0 + c1) // 2 * s
        for y, x in ((r0 * s, mid_c), (r1 * s - 1, mid_c), (mid_r, c0 * s), (mid_r, c1 * s - 1)):
            assert (ov[y, x] == col).all(), (c, y, x, ov[y, x])
        # Fill: the light blend of the class colour over the grey image.
        got = ov[mid_r, mid_c].astype(int)
        assert np.abs(got - blended(100, col, drawing.FILL_ALPHA)).max() <= 1, (c, got)
        # The plain image beside it is untouched.
        assert (raw[mid_r, mid_c] == 100).all() and (raw[r0 * s, mid_c] == 100).all()
        # The contour colour appears only on that class's boundary band.
        ys, xs = np.nonzero((ov == col).all(-1))
        assert len(ys) and ((ys >= r0 * s) & (ys < r1 * s) & (xs >= c0 * s) & (xs < c1 * s)).all()
    assert (ov[2 * s, 2 * s] == 100).all()  # background stays the image
    # Legend: one entry per class with its colour and area, and it is drawn.
    assert [(e.label, e.name, e.colour, e.amount, e.count) for e in pv.entries] == [
        (1, "liver", drawing.class_colour(1), "500 px (10.4 %)", 500),
        (2, "tumour", drawing.class_colour(2), "600 px (12.5 %)", 600),
    ]
    assert "liver  500 px (10.4 %)" in pv.texts and "tumour  600 px (12.5 %)" in pv.texts
    assert pv.texts[0] == "case" and not pv.empty
    x0, y0, x1, y1 = pv.legend_box
    legend = pv.pixels[y0:y1, x0:x1]
    assert (legend != np.array(drawing.BG)).any(-1).mean() > 0.01
    for e in pv.entries:  # the swatches
        assert (legend == np.array(e.colour)).all(-1).sum() >= 9


def test_areas_in_mm2_with_spacing_and_window_from_normalisation():
    img, lab = two_class_case()
    pv = viz.render_preview(img[..., 0], lab, classes=CLASSES, spacing=(0.5, 0.5))
    assert [e.amount for e in pv.entries] == ["125 mm² (10.4 %)", "150 mm² (12.5 %)"]
    # The bundled font has no "²": it is drawn as a raised small "2".
    assert drawing._segments("125 mm² (10.4 %)") == [("125 mm", False), ("2", True), (" (10.4 %)", False)]
    assert viz.window_for(np.zeros((4, 4), np.int16), {"kind": "ct_window", "center": 40, "width": 400}) == (-160, 240)
    assert viz.window_for(np.zeros((4, 4, 3), np.uint8), {"kind": "dtype"}) == (0, 255)
    ramp = np.arange(1000, dtype=np.float32).reshape(10, 100)
    lo, hi = viz.window_for(ramp, {"kind": "percentile", "lower": 1, "upper": 99})
    assert lo == pytest.approx(9.99) and hi == pytest.approx(989.01)


def test_empty_mask_says_nothing_found():
    img, _ = two_class_case()
    pv = viz.render_preview(img, np.zeros((60, 80), np.uint8), classes=CLASSES)
    assert pv.empty and "nothing found" in pv.texts
    assert [(e.name, e.count, e.amount) for e in pv.entries] == [("liver", 0, "0 px"), ("tumour", 0, "0 px")]
    ov = crop(pv, pv.panels[1])
    for c in (1, 2):
        assert not (ov == np.array(drawing.class_colour(c))).all(-1).any()
    assert (ov != 100).any(-1).any()  # the banner is written on the overlay


def test_large_image_is_downscaled_before_contours():
    h, w = 2000, 3000
    img = np.full((h, w), 80, np.uint8)
    lab = np.zeros((h, w), np.uint8)
    lab[:, 1001] = 1  # a 1-px vessel on an odd column: plain 2x nearest sampling would lose it
    lab[200:600, 2000:2600] = 2
    pv = viz.render_preview(img, lab, classes=CLASSES)
    assert pv.layout == "overlay" and len(pv.panels) == 1
    ov = crop(pv, pv.panels[0])
    assert max(ov.shape[:2]) <= viz.MAX_SIDE and ov.shape[:2] == (1000, 1500)
    col1, col2 = np.array(drawing.class_colour(1)), np.array(drawing.class_colour(2))
    assert (ov[:, 500] == col1).all(-1).mean() > 0.9
    # The rectangle's contour is 2 display px wide at this size, traced after downscaling.
    assert (ov[100, 1000:1300] == col2).all() and (ov[101, 1000:1300] == col2).all()
    assert not (ov[102, 1010:1290] == col2).all(-1).any()
    assert any("contours traced at this scale" in t for t in pv.texts)


def test_volume_slices_are_labelled_and_windowed(tmp_path):
    vol = np.full((20, 40, 40, 1), -1000, np.int16)
    vol[:, 10:30, 10:30] = 300  # brighter than the window
    lab = np.zeros((20, 40, 40), np.uint8)
    lab[5:13, 15:25, 15:25] = 1
    norm = {"kind": "ct_window", "center": 40, "width": 400}
    pv = viz.render_preview(vol, lab, classes=["background", "lesion"], spacing=(2.0, 1.0, 1.0),
                            normalization=norm, n_slices=4)
    assert pv.layout == "slices" and len(pv.slices) == 4 and all(5 <= z <= 12 for z in pv.slices)
    for z, p in zip(pv.slices, pv.panels, strict=True):
        assert p.z == z and p.caption == f"z={z}/20" and f"z={z}/20" in pv.texts
        tile = crop(pv, p)
        y, x = p.to_canvas(12, 12)  # inside the bright block, outside the lesion: white in this window
        assert (pv.pixels[y, x] == 255).all()
        y, x = p.to_canvas(2, 2)  # air: black
        assert (pv.pixels[y, x] == 0).all()
        assert (tile == np.array(drawing.class_colour(1))).all(-1).any()
    assert pv.entries[0].amount == "1.60 mL"  # 800 voxels of 2 mm³
    # The index is the file's own: a volume stored inferior-up is labelled from the other end.
    flipped = SimpleNamespace(array=vol, spacing=(2.0, 1.0, 1.0), meta={"signed_perm": [[1, 0, 0], [0, 1, 0], [0, 0, -1]]})
    pv2 = viz.render_preview(flipped, lab, n_slices=3)
    assert [p.caption for p in pv2.panels] == [f"z={19 - z}/20" for z in pv2.slices]
    # An empty volume: evenly spaced slices, each saying so.
    pv3 = viz.render_preview(vol, np.zeros_like(lab), n_slices=3)
    assert pv3.slices == [0, 10, 19] and pv3.empty and pv3.texts.count("nothing found") >= 3


def test_error_preview_colours_false_positives_and_negatives(tmp_path):
    img = np.full((60, 80), 100, np.uint8)
    truth = np.zeros((60, 80), np.uint8)
    pred = np.zeros((60, 80), np.uint8)
    truth[10:40, 10:40] = 1
    pred[10:40, 20:50] = 1  # FP: cols 40-49, FN: cols 10-19, TP: cols 20-39
    out = tmp_path / "e" / "case_errors.png"
    pv = viz.error_preview(img, pred, truth, ["background", "polyp"], out, title="case")
    assert pv.path == out and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["case_errors.png"]  # no temporary left behind
    assert (np.asarray(Image.open(out)) == pv.pixels).all()
    assert pv.dice == pytest.approx(2 * 600 / 1800) and pv.title == "case · Dice 0.667"
    assert [(e.name, e.colour, e.count) for e in pv.entries] == [
        ("false positive", viz.FP_COLOUR, 300), ("false negative", viz.FN_COLOUR, 300),
        ("correct (outline)", viz.TP_COLOUR, 600)]
    p = next(p for p in pv.panels if p.kind == "errors")
    for (r, c), colour in (((25, 45), viz.FP_COLOUR), ((25, 14), viz.FN_COLOUR)):
        y, x = p.to_canvas(r, c)
        assert np.abs(pv.pixels[y, x].astype(int) - blended(100, colour, viz.ERROR_ALPHA)).max() <= 1
    s = (p.box[3] - p.box[1]) // 60
    y0, x0 = p.box[1], p.box[0]
    assert (pv.pixels[y0 + 25 * s, x0 + 50 * s - 1] == viz.FP_COLOUR).all()  # FP region's outer edge
    assert (pv.pixels[y0 + 25 * s, x0 + 10 * s] == viz.FN_COLOUR).all()  # FN region's outer edge
    assert (pv.pixels[y0 + 10 * s, x0 + 30 * s] == viz.TP_COLOUR).all()  # TP outline
    y, x = p.to_canvas(25, 30)
    assert (pv.pixels[y, x] == 100).all()  # correct pixels stay visible
    y, x = p.to_canvas(50, 70)
    assert (pv.pixels[y, x] == 100).all()
    # A volume shows the slices with the most errors; a perfect empty case says so.
    t3 = np.zeros((8, 20, 20), np.uint8)
    p3 = t3.copy()
    p3[6, 5:10, 5:10] = 1
    pv3 = viz.error_preview(None, p3, t3, None, None, n_slices=2)
    assert pv3.slices == [6] and pv3.panels[0].caption == "z=6/8" and pv3.dice == 0.0
    pv4 = viz.error_preview(None, t3, t3, None, None)
    assert pv4.empty and pv4.dice == 1.0 and "nothing in either mask" in pv4.texts


def test_error_preview_scores_inside_the_field_of_view_only():
    img = np.full((40, 40), 100, np.uint8)
    truth = np.zeros((40, 40), np.uint8)
    pred = truth.copy()
    pred[2:8, 2:8] = 1  # a false positive outside the field of view
    fov = np.zeros((40, 40), bool)
    fov[10:, 10:] = True
    pv = viz.error_preview(img, pred, truth, None, None, fov=fov)
    assert pv.dice == 1.0 and pv.entries[0].count == 0
    assert "outside the field of view: darkened, not scored" in pv.texts
    p = next(p for p in pv.panels if p.kind == "errors")
    y, x = p.to_canvas(4, 4)
    assert (pv.pixels[y, x] == 100 // 3).all()
    y, x = p.to_canvas(30, 30)
    assert (pv.pixels[y, x] == 100).all()


def test_legend_of_many_classes_is_summarised_and_class_0_named():
    lab = np.repeat(np.arange(21, dtype=np.uint8), 5)[None].repeat(30, 0)  # 30 x 105, classes 0..20
    pv = viz.render_preview(np.zeros(lab.shape, np.uint8), lab)
    assert len(pv.entries) == 20 and "and 9 more classes" in pv.texts
    pv = viz.render_preview(np.zeros(lab.shape, np.uint8), (lab > 10).astype(np.uint8),
                            classes=["intracellular", "membrane"])
    assert "class 0 (intracellular) is not drawn" in pv.texts and [e.name for e in pv.entries] == ["membrane"]


def test_write_error_previews_from_an_evaluate_result(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "data" / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir(parents=True)
    png(tmp_path / "data" / "a.png")  # the source image, beside the ground-truth folder
    t = np.zeros((64, 80), np.uint8)
    t[10:30, 20:50] = 255  # a 0/255 ground truth against a 0/1 prediction
    p = np.zeros((64, 80), np.uint8)
    p[12:32, 20:50] = 1
    Image.fromarray(t).save(gt_dir / "a.png")
    Image.fromarray(p).save(pred_dir / "a_seg.png")
    result = {"classes": {"0": "background", "1": "object"},
              "cases": [{"case": "a", "prediction": str(pred_dir / "a_seg.png"), "ground_truth": str(gt_dir / "a.png")},
                        {"case": "b", "prediction": str(pred_dir / "nope.png"), "ground_truth": str(gt_dir / "a.png")}]}
    logged: list[str] = []
    paths = viz.write_error_previews(result, tmp_path / "errs", log=logged.append)
    assert paths == [tmp_path / "errs" / "a_errors.png"]
    assert len(logged) == 1 and logged[0].startswith("case b: no error preview")
    pic = np.asarray(Image.open(paths[0]))
    assert pic.ndim == 3 and (pic == np.array(viz.FP_COLOUR)).all(-1).any() and (pic == np.array(viz.FN_COLOUR)).all(-1).any()


def test_write_preview_for_names_output_with_split_extension(tmp_path):
    img, lab = two_class_case()
    Image.fromarray(img).save(tmp_path / "x.v2.png")
    Image.fromarray(lab).save(tmp_path / "x.v2_seg.png")
    rep = SimpleNamespace(status="ok", input=str(tmp_path / "x.v2.png"), output=str(tmp_path / "x.v2_seg.png"),
                          model="not-a-shipped-model", method="stts", voxel_counts={"liver": 500, "tumour": 600})
    out = viz.write_preview_for(rep)
    assert out == tmp_path / "x.v2_seg_preview.jpg" and out.is_file()
    assert viz.write_preview_for(SimpleNamespace(status="failed", output=None)) is None


def test_preview_png_for_image_and_volume(tmp_path, grey_bundle):
    src = png(tmp_path / "a.png")
    vol = tmp_path / "v.nii.gz"
    write_volume(vol)
    r = run_cli("predict", src, vol, "--model", grey_bundle, "--preview", "--json")
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    for f in files:
        p = f["info"]["preview"]
        pic = np.asarray(Image.open(p))
        assert pic.ndim == 3 and pic.shape[2] == 3 and pic.dtype == np.uint8
    assert files[0]["info"]["preview"].endswith("a_seg_preview.jpg")
    assert files[1]["info"]["preview"].endswith("v_seg_preview.jpg")
    assert np.asarray(Image.open(files[0]["info"]["preview"])).shape[1] >= 2 * 80  # image | overlay


def test_arsm_maps(tmp_path):
    b = make_bundle(tmp_path / "arsm", arch="arsm", classes=("bg", "a", "b"),
                    config={"width": "w18-small-v1", "base_channels": 4, "stem_stride": 4})
    src = png(tmp_path / "x.png")
    r = run_cli("predict", src, "--model", b, "--arsm-maps", tmp_path / "maps", "--method", "direct", "--json")
    assert r.returncode == 0, r.stderr
    maps = sorted((tmp_path / "maps").glob("x_arsm_*.png"))
    assert [m.name for m in maps] == ["x_arsm_0_bg.png", "x_arsm_1_a.png", "x_arsm_2_b.png"]
    a = np.asarray(Image.open(maps[1]))
    assert a.shape == (32, 32, 3)
    # Without an ARSM network the request is a warning, not a failure.
    u = make_bundle(tmp_path / "unet")
    r = run_cli("predict", src, "--model", u, "--arsm-maps", tmp_path / "m2")
    assert r.returncode == 0 and "no ARSM gate" in r.stderr


def test_contour_band_equals_scipy_erosion() -> None:
    """The shifted-view erosion draws the same contour band as scipy's binary_erosion (border counted inside)."""
    from scipy import ndimage

    from segcli.drawing import edges

    rng = np.random.default_rng(0)
    for t in (1, 2, 3):
        for _ in range(10):
            m = ndimage.binary_dilation(rng.random((40, 37)) > 0.9, iterations=2)
            m[:, :3] = True  # touching the image border: not an edge there
            want = m & ~ndimage.binary_erosion(m, iterations=t, border_value=1)
            np.testing.assert_array_equal(edges(m, t), want)


def test_jpeg_preview_keeps_contour_colours(tmp_path):
    """``--preview`` is JPEG without chroma subsampling: a contour a few pixels wide keeps its class colour
    within a few levels, and the file is the picture render_preview drew."""
    img, lab = two_class_case()
    out = viz.preview(img, lab, tmp_path / "a_seg_preview.jpg", classes=CLASSES, normalization={"kind": "dtype"},
                      title="case", compact=True)
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, whatever the name said
    pv = viz.render_preview(img, lab, classes=CLASSES, normalization={"kind": "dtype"}, title="case", compact=True)
    back = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert back.shape == pv.pixels.shape
    assert np.abs(back - pv.pixels).mean() < 2.0
    for c in (1, 2):
        on_contour = (pv.pixels == np.array(drawing.class_colour(c))).all(-1)
        assert on_contour.sum() > 20
        assert np.median(np.abs(back[on_contour] - np.array(drawing.class_colour(c))).max(-1)) <= 12
