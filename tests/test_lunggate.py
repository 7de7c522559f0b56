"""Lung gate (segcli.lunggate): known answers on a synthetic chest/abdomen phantom in HU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segcli import lunggate
from segcli.errors import UsageError
from segcli.io import open_image
from segcli.lunggate import GateParams
from tests.conftest import REPO, run_cli

SPACING = (2.0, 2.0, 2.0)  # (Z, Y, X) mm; 8 mm³ voxels


def _ellipsoid(shape, centre, radii):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((x - c) / r) ** 2 for x, c, r in zip(g, centre, radii, strict=True)) <= 1.0


def phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(hu, labels before the gate, labels the gate must leave, masks by name).

    Air outside a soft-tissue body; two lungs (-850 HU with noise: parenchyma) in the upper slices;
    a bowel gas pocket (-1000 HU) lower down. Lesions: one inside the right lung, one against the
    chest wall of the left lung (half of it in the wall), one in the bowel, and one blob that
    straddles the diaphragm with only its tip in the right lung.
    """
    rng = np.random.default_rng(seed)
    shape = (24, 80, 80)
    hu = np.full(shape, -1000.0, np.float32)
    body = _ellipsoid(shape, (12, 40, 40), (100, 36, 36))  # a cylinder in practice
    hu[body] = 40.0
    right = _ellipsoid(shape, (17, 40, 24), (7, 16, 10))
    left = _ellipsoid(shape, (17, 40, 56), (7, 16, 10))
    lungs = right | left
    hu[lungs] = -850.0 + rng.normal(0, 40, lungs.sum())
    gas = _ellipsoid(shape, (4, 40, 40), (3, 8, 8))
    hu[gas] = -1000.0 + rng.normal(0, 15, gas.sum())
    labels = np.zeros(shape, np.uint8)
    inside = _ellipsoid(shape, (17, 40, 24), (2, 3, 3))
    hu[inside] = -300.0  # denser than aerated lung: a hole in its air
    labels[inside] = 1
    wall = np.zeros(shape, bool)
    wall[15:19, 36:44, 63:71] = True  # x 63..70: the lung ends at 66, the wall goes on
    labels[wall] = 2
    hu[wall & ~lungs] = 40.0
    bowel = _ellipsoid(shape, (4, 40, 40), (2, 10, 10)) & ~gas
    labels[bowel] = 2
    straddle = np.zeros(shape, bool)
    straddle[3:12, 36:44, 20:28] = True  # z 10..11 reach the right lung's base
    labels[straddle] = 2
    expect = labels.copy()
    expect[bowel | straddle] = 0
    return hu, labels, expect, {"lungs": lungs, "gas": gas, "straddle": straddle, "wall": wall}


def _blocks(hu: np.ndarray, step: int):
    for z0 in range(0, hu.shape[0], step):
        yield z0, hu[z0:z0 + step, ..., None]


def test_grid_factors():
    assert lunggate.grid_factors((3.0, 0.7, 0.7), 2.0) == (1, 2, 2)
    assert lunggate.grid_factors((0.5, 0.5, 1.0), 2.0) == (4, 4, 2)
    assert lunggate.grid_factors((5.0, 2.5, 2.5), 2.0) == (1, 1, 1)


@pytest.mark.parametrize("step", [1, 3, 7, 100])
def test_coarse_stats_are_block_means_and_gas_shares_whatever_the_slabs(step):
    rng = np.random.default_rng(1)
    a = rng.normal(-900, 80, size=(11, 9, 14)).astype(np.float32)
    factors = (3, 2, 4)
    mean, gas = lunggate.coarse_stats(_blocks(a, step), a.shape, factors, -950.0)
    want_mean = np.zeros((4, 5, 4), np.float64)
    want_gas = np.zeros((4, 5, 4), np.float64)
    for i in range(4):
        for j in range(5):
            for k in range(4):
                cell = a[3 * i:3 * i + 3, 2 * j:2 * j + 2, 4 * k:4 * k + 4]  # edge cells are smaller
                want_mean[i, j, k] = cell.mean()
                want_gas[i, j, k] = (cell < -950).mean()
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5)
    np.testing.assert_allclose(gas, want_gas, atol=1e-6)
    assert 0.2 < gas.mean() < 0.4  # the test exercises both sides of the threshold


def test_lung_mask_finds_parenchyma_not_gas_or_outside_air():
    hu, _, _, m = phantom()
    lung, info = lunggate.lung_mask(hu, SPACING)
    assert np.array_equal(lung, m["lungs"] & (hu < -400))
    assert len(info["lung_components"]) == 2
    assert all(c["gas_fraction"] < 0.01 for c in info["lung_components"])
    # Pure gas (outside air, bowel) is never lung; a lung with half its voxels below -950 HU is not either.
    emphysema = hu.copy()
    emphysema[m["lungs"]] = -960.0
    assert not lunggate.lung_mask(emphysema, SPACING)[0].any()
    # Too small: a 50 mL floor drops both (each lung here is about 37 mL).
    assert not lunggate.lung_mask(hu, SPACING, GateParams(min_lung_ml=50.0))[0].any()


def test_lungs_joined_to_outside_air_are_not_found_and_say_so():
    """A known limit: an all-air slice (here the top one) joins the lungs to the outside air in 3D, so
    no lung is found and every lesion goes; the report's lung_ml of 0 is what tells the user."""
    hu, labels, _, m = phantom()
    top = hu.copy()
    top[-1] = -1000.0  # the lungs reach slice 23
    assert m["lungs"][-1].any()
    out = labels.copy()
    info = lunggate.apply(out, _blocks(top, 8), SPACING, GateParams())
    assert info["lung_ml"] == 0.0 and not out.any()
    # A lung cut by the field of view (touching the slice edge) is still found: no body mask is used.
    assert m["lungs"][:, :, 14].any()
    assert len(lunggate.lung_mask(hu[:, :, 14:], SPACING)[1]["lung_components"]) == 2


def test_gate_keeps_lung_lesions_and_removes_the_rest():
    hu, labels, expect, m = phantom()
    out = labels.copy()
    info = lunggate.apply(out, _blocks(hu, 5), SPACING, GateParams())
    assert np.array_equal(out, expect)
    assert info["lesion_components"] == 4 and info["removed_components"] == 2
    assert info["removed_voxels"] == int((labels > 0).sum() - (expect > 0).sum())
    # The straddling blob has some of it in the lung region, but less than half.
    assert 0.0 < info["max_removed_share"] < 0.5
    # The wall lesion is kept although part of it lies outside the lung itself.
    assert (m["wall"] & ~m["lungs"]).any() and (out[m["wall"]] == 2).all()


def test_gate_without_margin_or_with_a_strict_share_removes_more():
    hu, labels, expect, m = phantom()
    strict = labels.copy()
    lunggate.apply(strict, _blocks(hu, 24), SPACING, GateParams(min_inside=0.99))
    assert not strict[m["wall"]].any()  # a juxtapleural lesion needs the margin and the majority rule
    assert (strict == 1).sum() == (expect == 1).sum()


def test_gate_on_a_coarse_grid_matches_full_resolution():
    """Spacing 1 mm → 2×2×2 blocks; the phantom upsampled by 2 must give the upsampled answer."""
    hu, labels, expect, _ = phantom()

    def up(a: np.ndarray) -> np.ndarray:
        return a.repeat(2, 0).repeat(2, 1).repeat(2, 2)

    out = up(labels)
    half = tuple(s / 2 for s in SPACING)
    info = lunggate.apply(out, _blocks(up(hu), 9), half, GateParams(grid_mm=2.0), chunk=5)
    assert info["grid"] == [2, 2, 2]
    assert np.array_equal(out, up(expect))


def test_gate_writes_through_a_strided_view_and_skips_empty_masks():
    hu, labels, expect, _ = phantom()
    buf = np.ascontiguousarray(labels[::-1].transpose(2, 1, 0))  # a file-order buffer
    view = buf.transpose(2, 1, 0)[::-1]
    lunggate.apply(view, _blocks(hu, 4), SPACING, GateParams())
    assert np.array_equal(view, expect)
    empty = np.zeros_like(labels)
    never = iter(())  # no lesion: the HU volume must not even be read
    info = lunggate.apply(empty, never, SPACING, GateParams())
    assert info["lesion_components"] == 0 and info["lung_ml"] is None


def test_gate_params_from_bundle_values():
    assert GateParams.from_param(False) is None and GateParams.from_param(None) is None
    assert GateParams.from_param(True) == GateParams()
    assert GateParams.from_param({"margin_mm": 8}).margin_mm == 8.0
    with pytest.raises(UsageError, match="unknown lung_gate setting"):
        GateParams.from_param({"margin": 8})
    with pytest.raises(UsageError):
        GateParams.from_param("yes")


def _voxels(args, tmp_path):
    """Lesion voxels in the report and in the written mask (a streamed .nii.gz: the gate writes through)."""
    sample = REPO / "models" / "covid-ct" / "sample" / "abdomen_ct.nii.gz"
    out = tmp_path / "m.nii.gz"
    r = run_cli("predict", sample, "-o", out, "--json", "--threads", "1", *args)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout[r.stdout.index("{"):])["files"][0]
    written = int((np.asarray(open_image(out).array) > 0).sum())
    assert written == sum(rep["voxel_counts"].values())
    return written, rep["info"].get("lung_gate"), rep["warnings"]


def test_cli_covid_ct_gates_the_normal_abdomen_sample(tmp_path):
    """The shipped covid-ct bundle turns the gate on: its false consolidation in the bowel is removed."""
    ungated, none, _ = _voxels(["--no-lung-gate"], tmp_path)
    gated, info, warnings = _voxels([], tmp_path)
    assert none is None and ungated > 0
    assert gated == 0 and info["removed_voxels"] == ungated and info["lung_components"] == []
    assert any("no aerated lung found" in w for w in warnings)
