"""Lung gate for CT lesion models: keep only the lesions that lie in the lungs.

A slice-wise lesion network trained on lung crops has never seen the abdomen, and it marks bowel
content (gas mixed with stool, about -100 HU) as consolidation. On the normal abdomen of
``ct-example`` the ``covid-ct`` model's 19 false components (58 mL) all lay mostly in the colon
(76 % of the voxels in TotalSegmentator's colon label, 21 % in unlabelled tissue beside it, 2 % in the
lung bases). The gate removes them with anatomy instead of more training data:

1. **Aerated lung** = 3D components of ``HU < air_hu`` that are big enough and whose share of pure
   gas (``HU < gas_hu``, the emphysema index LAA-950) is low. Lung parenchyma mixes air with
   tissue and blood (about -850 HU, LAA-950 near 0 in a normal lung); air outside the body, in the
   trachea alone, in the bowel or the stomach reads -1000 (LAA-950 of 0.6-0.8 on ct-example).
   No body mask is needed, so a field of view that cuts the chest still works. An air path from the
   lungs to the room inside the field of view (an endotracheal tube leaving the body, a slice that
   is air from edge to edge) merges them with the outside air: then no lung is found, every lesion
   is removed, and the report says so.
2. **Lung region** = those components with holes filled per axial slice (lesions inside the lung
   are holes in its air), dilated by ``margin_mm`` (pleura, partial volume, juxtapleural lesions).
3. **Gate**: each 3D lesion component (all lesion classes together) is kept whole when at least
   ``min_inside`` of it lies in the region, and removed whole otherwise. A blob that straddles the
   diaphragm with most of it in the colon goes; a lesion against the chest wall stays.

Everything runs on a coarse grid (about ``grid_mm`` per voxel) built slab by slab, so memory stays
a fraction of the uint8 mask's (32 MB and 1.8 s for a 512×512×1000 CT); the share of pure gas per
cell is counted at full resolution, because block means blur colon gas into lung-like values. Pure numpy/scipy; known-answer tests in ``tests/test_lunggate.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from segcli.errors import UsageError


@dataclass(frozen=True)
class GateParams:
    """Thresholds of the gate (HU, mL, mm, fraction); a bundle may override any of them."""

    air_hu: float = -400.0  # aerated: below this
    gas_hu: float = -950.0  # pure gas: below this (LAA-950)
    max_gas_fraction: float = 0.35  # a lung component has less pure gas than this (emphysema up to moderate)
    min_lung_ml: float = 20.0  # smaller air pockets are bowel/stomach gas with partial volume, not lung
    margin_mm: float = 5.0  # lung region = filled lung dilated by this
    min_inside: float = 0.5  # a lesion component stays when this share of it lies in the region
    grid_mm: float = 3.0  # working grid: voxels are block-averaged to about this size

    @classmethod
    def from_param(cls, value: Any) -> GateParams | None:
        """``True`` → defaults, a dict → defaults with overrides, ``False``/``None`` → no gate."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = set(value) - known
            if unknown:
                raise UsageError(f"unknown lung_gate setting(s): {', '.join(sorted(unknown))}")
            return cls(**{k: float(v) for k, v in value.items()})
        raise UsageError(f"lung_gate must be true, false or a dict of settings, not {value!r}")


def grid_factors(spacing: tuple[float, float, float], grid_mm: float) -> tuple[int, int, int]:
    """Integer block size per axis so that the coarse voxel is about ``grid_mm`` (never below 1)."""
    return tuple(max(1, int(grid_mm // float(s))) for s in spacing)  # type: ignore[return-value]


def _block_reduce(a: np.ndarray, factors: tuple[int, ...], op: np.ufunc) -> np.ndarray:
    """``op.reduceat`` over blocks of ``factors`` along each axis; the last block may be short."""
    for axis, f in enumerate(factors):
        if f > 1:
            a = op.reduceat(a, np.arange(0, a.shape[axis], f), axis=axis)
    return a


def coarse_stats(blocks: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int, int],
                 factors: tuple[int, int, int], gas_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Per coarse cell: the mean HU and the share of voxels below ``gas_hu``, in one pass.

    ``blocks`` serves the volume as ``(z0, (dz, Y, X[, C]))`` along axis 0; slab boundaries need not
    align with the cells. The gas share is counted at full resolution, because block means blur pure
    gas into partial volume (colon gas at a 3 mm grid reads like lung). Only the first channel is used.
    """
    fz, fy, fx = factors
    out_shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    sums = np.zeros(out_shape, np.float32)  # sums of at most a few hundred voxels: float32 is exact enough
    gas = np.zeros(out_shape, np.float32)
    for z0, block in blocks:
        b = np.asarray(block)
        if b.ndim == 4:
            b = b[..., 0]
        for i in range(b.shape[0]):  # slice by slice: a float copy of a whole slab would be 2-4x its size
            plane = b[i].astype(np.float32)
            sums[(z0 + i) // fz] += _block_reduce(plane, (fy, fx), np.add)
            gas[(z0 + i) // fz] += _block_reduce((plane < gas_hu).astype(np.float32), (fy, fx), np.add)
        del block, b  # before the next block is decoded
    for axis, (n, f) in enumerate(zip(shape, factors, strict=True)):  # divide by the cell sizes, in place
        if f > 1 or n % f:
            sizes = np.minimum(f, n - np.arange(0, n, f)).astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
            sums /= sizes
            gas /= sizes
    return sums, gas


def lung_mask(hu: np.ndarray, spacing: tuple[float, float, float], params: GateParams = GateParams()) -> tuple[np.ndarray, dict[str, Any]]:
    """Aerated lung on a ``(Z, Y, X)`` HU volume (axis 0 = S/I), with what was found (mL, LAA-950)."""
    return lung_from_stats(hu < params.air_hu, (hu < params.gas_hu).astype(np.float32), spacing, params)


def lung_from_stats(air: np.ndarray, gas_share: np.ndarray, spacing: tuple[float, float, float],
                    params: GateParams = GateParams(), chunk: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`lung_mask` from the air mask and the per-voxel (or per-cell) share of pure gas."""
    # lazy: scipy costs ~0.4 s to import
    from scipy import ndimage as ndi

    voxel_ml = float(np.prod(spacing)) / 1000.0
    lab, n = ndi.label(air)
    if n == 0:
        return np.zeros(air.shape, bool), {"lung_ml": 0.0, "lung_components": []}
    count = np.zeros(n + 1, np.float64)
    pure = np.zeros(n + 1, np.float64)
    for z0 in range(0, lab.shape[0], chunk):  # a few slices at a time: no full-size index or weight arrays
        part = lab[z0:z0 + chunk].ravel()
        count += np.bincount(part, minlength=n + 1)
        pure += np.bincount(part, weights=gas_share[z0:z0 + chunk].ravel(), minlength=n + 1)
    gas_fraction = pure / np.maximum(count, 1)
    is_lung = (count * voxel_ml >= params.min_lung_ml) & (gas_fraction < params.max_gas_fraction)
    is_lung[0] = False
    lung = is_lung[lab]
    found = [{"ml": round(float(count[i] * voxel_ml), 1), "gas_fraction": round(float(gas_fraction[i]), 3)}
             for i in np.flatnonzero(is_lung)]
    return lung, {"lung_ml": round(float(lung.sum() * voxel_ml), 1), "lung_components": found}


def lung_region(lung: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> np.ndarray:
    """Lung with holes filled per axial slice, dilated by ``margin_mm`` (an ellipsoid in voxels)."""
    # lazy: scipy costs ~0.4 s to import
    from scipy import ndimage as ndi

    filled = np.stack([ndi.binary_fill_holes(s) for s in lung]) if lung.size else lung
    if margin_mm <= 0 or not filled.any():
        return filled
    # Exact Euclidean dilation in mm (anisotropic voxels), inside the lungs' bounding box grown by the margin:
    # a distance transform costs O(voxels), where a ball-shaped structuring element costs O(voxels x ball).
    r = [int(np.floor(margin_mm / float(s))) for s in spacing]
    nz = [np.flatnonzero(filled.any(axis=tuple(j for j in range(3) if j != a))) for a in range(3)]
    box = tuple(slice(max(0, int(w[0]) - k), int(w[-1]) + k + 1) for w, k in zip(nz, r, strict=True))
    out = np.zeros_like(filled)
    out[box] = ndi.distance_transform_edt(~filled[box], sampling=[float(s) for s in spacing]) <= margin_mm
    return out


def gate_components(lesion: np.ndarray, region: np.ndarray, min_inside: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """3D components of ``lesion`` (bool) with their share inside ``region``; which to keep.

    Returns ``(component labels, keep flag per label (index 0 = background, False), info)``.
    """
    # lazy: scipy costs ~0.4 s to import
    from scipy import ndimage as ndi

    lab, n = ndi.label(lesion)
    size = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    inside = np.bincount(lab[region], minlength=n + 1)
    share = inside / np.maximum(size, 1)
    keep = share >= min_inside
    keep[0] = False
    info = {"lesion_components": int(n), "removed_components": int(n - keep[1:].sum()),
            "max_removed_share": round(float(share[1:][~keep[1:]].max()), 3) if n and (~keep[1:]).any() else None}
    return lab, keep, info


def apply(labels: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], spacing: tuple[float, float, float],
          params: GateParams, chunk: int = 16) -> dict[str, Any]:
    """Gate a canonical ``(Z, Y, X)`` uint8 mask in place; ``blocks`` serves the HU volume along axis 0.

    The lesion components are found on the coarse grid (a coarse cell is lesion when any voxel in
    it is), and a full-resolution lesion voxel is removed when its cell's component is removed.
    Memory: the coarse grid, one ``chunk`` of slices and the box of one removed component at full resolution.
    """
    shape = tuple(int(s) for s in labels.shape)
    factors = grid_factors(spacing, params.grid_mm)
    fz = factors[0]
    coarse_shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
    lesion = np.zeros(coarse_shape, bool)
    step = max(fz, (chunk // fz) * fz)
    for z0 in range(0, shape[0], step):
        part = np.asarray(labels[z0:z0 + step]) > 0
        if part.any():
            lesion[z0 // fz: z0 // fz + -(-part.shape[0] // fz)] |= _block_reduce(part, factors, np.logical_or)
    info: dict[str, Any] = {"grid": list(factors), **{k: v for k, v in asdict(params).items()}}
    if not lesion.any():
        return {**info, "lung_ml": None, "lesion_components": 0, "removed_components": 0, "removed_voxels": 0}
    cspacing = tuple(float(s) * f for s, f in zip(spacing, factors, strict=True))
    hu, gas = coarse_stats(blocks, shape, factors, params.gas_hu)  # type: ignore[arg-type]
    air = hu < params.air_hu
    del hu
    lung, found = lung_from_stats(air, gas, cspacing, params)  # type: ignore[arg-type]
    del air, gas
    region = lung_region(lung, cspacing, params.margin_mm)  # type: ignore[arg-type]
    comp, keep, ginfo = gate_components(lesion, region, params.min_inside)
    removed = 0
    if ginfo["removed_components"]:
        # lazy: scipy costs ~0.4 s to import
        from scipy import ndimage as ndi

        # Only the boxes of removed components are touched at full resolution, ``chunk`` slices at a time.
        for cid, box in enumerate(ndi.find_objects(comp), start=1):
            if box is None or keep[cid]:
                continue
            hit = comp[box] == cid
            full = tuple(slice(b.start * f, min(n, b.stop * f)) for b, f, n in zip(box, factors, shape, strict=True))
            iy = np.arange(full[1].start, full[1].stop) // factors[1] - box[1].start
            ix = np.arange(full[2].start, full[2].stop) // factors[2] - box[2].start
            for z0 in range(full[0].start, full[0].stop, chunk):
                z1 = min(full[0].stop, z0 + chunk)
                cells = hit[np.arange(z0, z1) // fz - box[0].start][:, iy][:, :, ix]
                sub = labels[z0:z1, full[1], full[2]]
                kill = cells & (sub > 0)
                n_kill = int(kill.sum())
                if n_kill:
                    sub[kill] = 0
                    removed += n_kill
    return {**info, **found, **ginfo, "removed_voxels": removed}
