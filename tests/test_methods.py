"""The method table owns each method's variants: what the bounded (tiled TIFF) route runs for it, and its
fusion rule. The pipeline asks the table instead of branching on names, and, as StarDist checks blocked
against whole-image prediction, the bounded route gives the in-memory route's mask on an image that fits both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcli import plan
from segcli.api import Segmenter
from segcli.engines.base import ArrayPlane
from segcli.io.bigtiff import TiffPlane
from segcli.methods import BOUNDED, METHODS, TABLE
from segcli.params import DEFAULT_PARAMS
from segcli.runtimes import FunctionPredictor
from tests.conftest import make_bundle
from tests.test_bigimage import DTYPE, mosaic

PKG = Path(__file__).resolve().parent.parent / "segcli"


def _smooth(batch: np.ndarray) -> np.ndarray:
    """Dark pixels are the object, with soft edges: the fusion of floats is exercised."""
    p = 1.0 / (1.0 + np.exp(-(0.6 - batch[:, :1]) * 12))
    return np.concatenate([1 - p, p], axis=1)


def test_every_method_has_a_fusion_rule_and_a_known_bounded_variant():
    for m in TABLE.values():
        assert m.fusion, m.name
        assert m.bounded is None or m.bounded in TABLE, m.name
        assert m.bounded_params == tuple(p for p in m.bounded_params if p in m.params), m.name
        if m.bounded not in (None, m.name):  # a stand-in says how its fusion differs
            assert m.bounded_fusion, m.name
    assert BOUNDED == ("stts", "sliding")


def test_bounded_variant_comes_from_the_table():
    p = plan.Plan("sliding", 64, dict(DEFAULT_PARAMS, overlap=0.5))
    variant, extra = plan.bounded_variant(p)
    assert (variant.method, variant.size, variant.roles) == ("stts", 64, ("coarse", "fine"))
    assert extra == {"crop_mode": "grid", "max_zoom": None, "fusion": "gaussian", "look": "tissue", "overlap": 0.5,
                     "blend": "probs"}
    assert plan.bounded_variant(plan.Plan("stts", 64, dict(DEFAULT_PARAMS)))[1] == {}
    for name in ("refine", "direct"):
        with pytest.raises(KeyError, match=name):
            plan.bounded_variant(plan.Plan(name, 64, dict(DEFAULT_PARAMS)))


@pytest.mark.parametrize("module", ["pipeline.py", "inferer.py", "api.py", "batch.py", "outputs.py"])
def test_the_pipeline_never_compares_a_method_name(module):
    """``method == "sliding"`` and the like belong in the method table, not in the layers that run it."""
    tree = ast.parse((PKG / module).read_text(encoding="utf-8"))
    names = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(isinstance(c, ast.Constant) and c.value in METHODS for c in [node.left, *node.comparators])]
    assert not names, names


@pytest.mark.parametrize("method", [m for m in METHODS if TABLE[m].bounded is not None])
def test_bounded_route_equals_in_memory_route_engine_level(method, tmp_path):
    """The method's bounded variant, read by region from a tiled TIFF into a spilled fuse store, equals the
    same variant on the image held in memory (sliding's variant, stts over grid windows, included)."""
    img = mosaic(480, 560)
    path = tmp_path / "m.tif"
    tifffile.imwrite(path, img, tile=(128, 128), compression="zlib")
    variant, extra = plan.bounded_variant(plan.Plan(method, 64, dict(DEFAULT_PARAMS)))
    kw = {"size": 64, "max_zoom": 1.5, "batch_size": 8, "keep_coarse": True, **extra}

    def nets(role):
        return FunctionPredictor(_smooth)

    ref = plan.run_2d(variant, ArrayPlane(img[None].astype(np.float32) / 255.0), nets, kw, return_probs=False,
                      progress=None)
    with TiffPlane(path, spec=DTYPE, channels_want=1) as tif:
        lazy = plan.run_2d(variant, tif, nets, kw, return_probs=False, progress=None, spill_dir=tmp_path,
                           lazy=True, prefetch=True)
        np.testing.assert_array_equal(np.asarray(lazy.labels), ref.labels)
    assert 0 < int(ref.labels.sum()) < ref.labels.size
    lazy.labels.store.close()


@pytest.mark.parametrize("method", METHODS)
def test_bounded_route_equals_in_memory_route(method, tmp_path):
    """Through the pipeline, on a TIFF that fits both routes: asking for the bounded route (``lazy_pixels=0``)
    gives the in-memory mask, for every method. stts runs its own engine there; sliding runs its windows over
    the tissue the rough pass finds, blended by the same Gaussian; a method that needs the whole image never
    takes that route."""
    bundle = make_bundle(tmp_path / "b", size=32, normalization=DTYPE, method=method)
    tifffile.imwrite(tmp_path / "m.tif", mosaic(400, 480), tile=(128, 128), compression="zlib")
    common = {"method": method, "max_downscale": 8, "max_zoom": 4, "overrides": {"patches": 2}}
    mem = Segmenter(bundle, **common).predict_file(tmp_path / "m.tif", tmp_path / "mem.tif")
    lazy = Segmenter(bundle, lazy_pixels=0, **common).predict_file(tmp_path / "m.tif", tmp_path / "lazy.tif")
    assert mem.status == lazy.status == "ok", (mem.error, lazy.error)
    assert "bounded_memory" not in mem.info
    assert bool(lazy.info.get("bounded_memory")) == (method in BOUNDED)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mem.tif"), tifffile.imread(tmp_path / "lazy.tif"))
    assert mem.voxel_counts == lazy.voxel_counts
