"""``segcli import nnunet``: an nnU-Net v2 results folder (``plans.json``, ``dataset.json``, ``fold_*/``).

segcli builds nnU-Net's ``PlainConvUNet`` itself from ``plans.json`` (no nnU-Net or
dynamic_network_architectures import), loads ``checkpoint_final.pth`` with ``weights_only=True``
(numpy's scalar and dtype classes allowed, nothing else), averages the chosen folds' logits (and
optionally the mirrorings, nnU-Net's test-time augmentation) inside one graph, and converts that to
ONNX. The patch size becomes the window and the normalisation scheme the bundle's normalisation, and the
bundle's params make the sliding window nnU-Net's (``overlap`` 0.5; ``blend`` ``nnunet``: logits averaged under
its discretised Gaussian, segcli.engines.direct). What segcli cannot reproduce (CT normalisation, per-channel
z-score, masks for normalisation, region-based labels, residual encoders, 3D) is refused by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from segcli.errors import BundleError
from segcli.importers.common import (
    ImportFacts,
    check_facts,
    check_graph,
    ort_session,
    read_json,
    write_onnx_bundle,
)
from segcli.importers.onnx import module_to_onnx

PLAIN = "PlainConvUNet"
#: nnUNetv2_predict's sliding window: tile step 0.5 of the patch, logits averaged under its Gaussian.
NNUNET_PARAMS = {"overlap": 0.5, "blend": "nnunet"}
NORMS = {"InstanceNorm2d", "BatchNorm2d"}
NONLINS = {"LeakyReLU", "ReLU"}


def _tail(name: Any) -> str:
    return str(name or "").rsplit(".", 1)[-1]


def arch_kwargs(plans: dict[str, Any], config: str, where: Path) -> dict[str, Any]:
    """The PlainConvUNet arguments of ``config``, checked against what segcli can build."""
    cfgs = plans.get("configurations") or {}
    if config not in cfgs:
        raise BundleError(f"plans has no configuration {config!r} (has {', '.join(cfgs)})", where)
    cfg = dict(cfgs[config])
    parent = cfg.get("inherits_from")
    while parent:  # 3d_cascade_fullres and custom configurations inherit keys
        base = dict(cfgs.get(parent) or {})
        parent = base.pop("inherits_from", None)
        cfg = {**base, **cfg}
    arch = cfg.get("architecture")
    if not isinstance(arch, dict):
        raise BundleError("plans use the pre-2.4 layout (no 'architecture'); re-plan with nnU-Net >= 2.4", where)
    if _tail(arch.get("network_class_name")) != PLAIN:
        raise BundleError(f"network {arch.get('network_class_name')!r} is not PlainConvUNet; segcli builds "
                          "nnU-Net's default U-Net only (residual encoder presets are not supported yet)", where)
    kw = dict(arch.get("arch_kwargs") or {})
    if _tail(kw.get("conv_op")) != "Conv2d":
        raise BundleError(f"configuration {config!r} is not 2D (conv_op {kw.get('conv_op')}); segcli imports 2D "
                          "nnU-Net configurations", where)
    if kw.get("norm_op") is not None and _tail(kw["norm_op"]) not in NORMS:
        raise BundleError(f"norm_op {kw['norm_op']} is not supported", where)
    if kw.get("nonlin") is not None and _tail(kw["nonlin"]) not in NONLINS:
        raise BundleError(f"nonlin {kw['nonlin']} is not supported", where)
    if str(kw.get("pool", "conv")) != "conv":
        raise BundleError(f"pooling {kw.get('pool')!r} is not supported (strided convolutions only)", where)
    return {**kw, "_config": cfg}


def normalization(cfg: dict[str, Any], channels: int, where: Path) -> dict[str, Any]:
    """segcli's normalisation for the configuration's schemes (one per channel), or a refusal saying why."""
    schemes = [_tail(s) for s in cfg.get("normalization_schemes") or []]
    if len(schemes) != channels:
        raise BundleError(f"plans name {len(schemes)} normalisation schemes for {channels} channels", where)
    if any(cfg.get("use_mask_for_norm") or []):
        raise BundleError("use_mask_for_norm is set (normalisation inside the nonzero mask); not supported", where)
    kinds = set(schemes)
    if len(kinds) != 1:
        raise BundleError(f"channels use different normalisation schemes {schemes}; not supported", where)
    kind = schemes[0]
    if kind == "RGBTo01Normalization":
        return {"kind": "scale", "factor": 1.0 / 255.0}
    if kind == "NoNormalization":
        return {"kind": "scale", "factor": 1.0}
    if kind in ("ZScoreNormalization", "RescaleTo01Normalization"):
        if channels > 1:
            raise BundleError(f"{kind} is per channel on {channels} channels; segcli's statistics pool the "
                              "channels, so it is refused (use rgb_to_0_1 channel names for RGB data)", where)
        return {"kind": "zscore"} if kind == "ZScoreNormalization" else {"kind": "minmax"}
    raise BundleError(f"normalisation scheme {kind} is not supported yet (CT normalisation needs clipping to "
                      "dataset percentiles)", where)


def class_names(dataset: dict[str, Any], where: Path) -> list[str]:
    """Classes in label order from dataset.json; region-based labels (sigmoid outputs) are refused."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise BundleError("dataset.json has no labels", where)
    if any(not isinstance(v, int) or isinstance(v, bool) for v in labels.values()):
        raise BundleError("dataset.json uses region-based labels (lists); segcli's classes are exclusive", where)
    by_value = sorted(labels.items(), key=lambda kv: kv[1])
    if [v for _, v in by_value if v >= 0] != list(range(len([v for _, v in by_value if v >= 0]))):
        raise BundleError(f"labels {dict(by_value)} are not 0, 1, 2, ...", where)
    return [k for k, v in by_value if v >= 0 and k != "ignore"]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``checkpoint_final.pth`` with weights_only: numpy scalars and dtypes are the only extra classes allowed."""
    # lazy: torch costs ~1.3 s to import
    import torch

    allowed: list[Any] = [np.dtype, np.core.multiarray.scalar] if hasattr(np, "core") else [np.dtype]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BundleError(f"refusing it: torch.load(weights_only=True) with numpy scalars allowed fails "
                          f"({first[:160]}); never unpickled", path) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise BundleError("not an nnU-Net checkpoint (no network_weights)", path)
    return ckpt


def canonical_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys that repeat others (``all_modules.*`` aliases, the decoder's copy of the encoder);
    a checkpoint of a ``torch.compile``d network has every key prefixed with ``_orig_mod.``."""
    plain = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    return {k: v for k, v in plain.items() if not k.startswith("decoder.encoder.") and ".all_modules." not in k}


def find_folds(src: Path, folds: list[str] | None) -> list[Path]:
    """The checkpoints to average: the folds asked for, else every ``fold_*`` with a final checkpoint."""
    if folds:
        paths = [src / f"fold_{f}" / "checkpoint_final.pth" for f in folds]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise BundleError(f"fold {missing[0].parent.name} has no checkpoint_final.pth", src)
        return paths
    found = sorted(p for p in src.glob("fold_*/checkpoint_final.pth"))
    if not found:
        raise BundleError("no fold_*/checkpoint_final.pth here (a training that has not finished?)", src)
    return found


def load_nets(ckpts: list[Path], in_ch: int, n_classes: int, kw: dict[str, Any]) -> tuple[list[Any], tuple[int, ...]]:
    """One PlainConvUNet per checkpoint, weights loaded strictly; and the mirror axes every fold allows."""
    # lazy: brings torch
    from segcli.importers.plainconv import PlainConvUNet

    nets, axes = [], None
    for path in ckpts:
        ckpt = read_checkpoint(path)
        net = PlainConvUNet(in_ch, n_classes, kw)
        state = canonical_weights(ckpt["network_weights"])
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"weights do not fit the network plans.json describes: "
                              f"{str(exc).splitlines()[0][:200]}", path) from None
        allowed = tuple(int(a) for a in (ckpt.get("inference_allowed_mirroring_axes") or ()))
        axes = allowed if axes is None else tuple(a for a in axes if a in allowed)
        nets.append(net.eval())
    return nets, axes or ()


def import_nnunet(src: Path, out: Path, *, folds: list[str] | None = None, mirror: bool = False,
                  pixel_size_um: float | None = None, force: bool = False) -> Path:
    """Import the nnU-Net v2 results folder ``src`` (``TRAINER__PLANS__CONFIG``) into the bundle ``out``."""
    # lazy: brings torch
    from segcli.importers.plainconv import Ensemble

    plans_path, ds_path = src / "plans.json", src / "dataset.json"
    plans, dataset = read_json(plans_path, "nnU-Net plans"), read_json(ds_path, "nnU-Net dataset.json")
    if not isinstance(plans, dict) or not isinstance(dataset, dict):
        raise BundleError("plans.json and dataset.json must hold JSON objects", src)
    config = src.name.rsplit("__", 1)[-1] if "__" in src.name else "2d"
    kw = arch_kwargs(plans, config, plans_path)
    cfg = kw.pop("_config")
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    in_ch = len(channels)
    classes = class_names(dataset, ds_path)
    norm = normalization(cfg, in_ch, plans_path)
    patch = [int(p) for p in cfg.get("patch_size") or []]
    if len(patch) != 2:
        raise BundleError(f"patch_size {patch} is not 2D", plans_path)
    ckpts = find_folds(src, folds)
    nets, axes = load_nets(ckpts, in_ch, len(classes), kw)
    notes = [f"configuration {config}, folds {', '.join(p.parent.name for p in ckpts)} (logits averaged)",
             f"mirroring {'on, axes ' + str(axes) if mirror and axes else 'off'} "
             "(nnUNetv2_predict mirrors unless --disable_tta)",
             "sliding window as nnUNetv2_predict's: half-window steps, logits averaged under its Gaussian (params blend)"]
    if patch[0] != patch[1]:
        notes.append(f"patch size {patch} is not square; segcli uses {max(patch)}² windows")
    spacing = [float(v) for v in cfg.get("spacing") or []]
    if spacing and any(abs(v - 1.0) > 1e-6 for v in spacing) and pixel_size_um is None:
        notes.append(f"plans spacing {spacing}: nnU-Net resamples inputs to it; segcli uses images at their own "
                     "pixel size unless the import is given --pixel-size-um")
    facts = ImportFacts(classes=classes, in_channels=in_ch, input_size=max(patch), normalization=norm,
                        output="logits", pixel_size_um=pixel_size_um, name=out.name,
                        task=f"imported nnU-Net v2 {src.parent.name} {config}", params=dict(NNUNET_PARAMS),
                        notes=notes)
    check_facts(facts, plans_path)
    model = Ensemble(nets, axes if mirror else ())
    data = module_to_onnx(model, facts, ckpts[0])
    facts.notes += check_graph(ort_session(data, ckpts[0]), facts, ckpts[0])
    digest = hashlib.sha256()
    for p in ckpts:
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    source = {"format": "nnunetv2", "path": str(src.resolve()), "sha256": digest.hexdigest(),
              "checkpoints": [str(p.relative_to(src)) for p in ckpts], "configuration": config,
              "mirroring": list(axes) if mirror else [], "patch_size": patch}
    return write_onnx_bundle(out, data, facts, source, force=force)
