"""``segcli import monai``: a MONAI bundle (``configs/inference.json`` + ``models/model.pt`` or ``model.ts``).

The config is read as data, never executed: MONAI's own parser evaluates ``$`` expressions (arbitrary
Python), so segcli takes only literal arguments (and ``@name`` references to literal top-level values),
a network class from ``monai.networks.nets``, and the intensity transform of the pre-processing, which
it maps onto its own normalisation or refuses by name. Weights load with ``torch.load(weights_only=True)``.
The network is converted to ONNX once (ONNX Runtime checked against torch), so predicting needs no MONAI.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from segcli.errors import BundleError, UsageError
from segcli.importers.common import (
    ImportFacts,
    check_facts,
    check_graph,
    ort_session,
    read_json,
    write_onnx_bundle,
)
from segcli.importers.onnx import module_to_onnx

#: Pre-processing transforms that do not change intensities (reading, layout, dtype): skipped.
NEUTRAL = {"LoadImage", "EnsureChannelFirst", "EnsureType", "ToTensor", "AsChannelFirst", "AddChannel", "CastToType",
           "Orientation", "ToNumpy", "SqueezeDim", "DeleteItems", "Identity", "CopyItems", "SaveImage"}
#: Intensity transforms segcli reproduces.
INTENSITY = {"ScaleIntensityRange", "ScaleIntensityRangePercentiles", "NormalizeIntensity", "ScaleIntensity"}


def _short(target: Any) -> str:
    name = str(target).rsplit(".", 1)[-1]
    return name[:-1] if name.endswith("d") and name[:-1] in NEUTRAL | INTENSITY | {"Spacing"} else name


def _literal(value: Any, top: dict[str, Any], where: Path, key: str) -> Any:
    """A config value as plain data: ``$`` code is refused, ``@name`` follows one literal top-level value."""
    if isinstance(value, str) and value.startswith("$"):
        raise BundleError(f"{key} is a Python expression ({value[:40]!r}); segcli does not run bundle code", where)
    if isinstance(value, str) and value.startswith("@"):
        ref = value[1:]
        if "::" in ref or "#" in ref or ref not in top:
            raise BundleError(f"{key} refers to {value!r}, which is not a plain top-level value", where)
        return _literal(top[ref], top, where, key)
    if isinstance(value, list):
        return [_literal(v, top, where, key) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v, top, where, f"{key}.{k}") for k, v in value.items()}
    return value


def build_network(cfg: dict[str, Any], where: Path) -> tuple[Any, dict[str, Any]]:
    """The network of ``network_def``: a class of ``monai.networks.nets`` with literal arguments."""
    # lazy: torch costs ~1.3 s to import
    import torch

    try:
        # lazy: MONAI is optional (segcli[monai]) and costs ~3 s to import
        from monai.networks import nets
    except ModuleNotFoundError:
        raise UsageError("segcli import monai needs MONAI while importing: pip install 'segcli[monai]'") from None

    net_def = cfg.get("network_def")
    if not isinstance(net_def, dict) or "_target_" not in net_def:
        raise BundleError("inference.json has no network_def with a _target_", where)
    target = str(net_def["_target_"])
    name = target.rsplit(".", 1)[-1]
    if "." in target and not target.startswith("monai.networks.nets."):
        raise BundleError(f"network {target!r} is not a MONAI network class; segcli builds only "
                          "monai.networks.nets classes", where)
    cls = getattr(nets, name, None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise BundleError(f"network {target!r} is not a class of monai.networks.nets", where)
    args = {k: _literal(v, cfg, where, f"network_def.{k}") for k, v in net_def.items() if not k.startswith("_")}
    if int(args.get("spatial_dims", args.get("dimensions", 3))) != 2:
        raise BundleError(f"network {name} is not 2D (spatial_dims {args.get('spatial_dims', 3)}); "
                          "segcli imports 2D MONAI networks", where)
    try:
        return cls(**args).eval(), {"class": name, **args}
    except Exception as exc:
        raise BundleError(f"cannot build {name} from network_def: {exc}", where) from None


def load_weights(root: Path, module: Any, where: Path) -> tuple[Any, Path]:
    """``models/model.pt`` (a state dict, read with weights_only) into ``module``, else ``models/model.ts``."""
    # lazy: torch costs ~1.3 s to import
    import torch

    pt, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    if pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BundleError(f"refusing {pt.name}: not a plain weights file torch.load(weights_only=True) accepts "
                              f"({type(exc).__name__}); never unpickled", pt) from None
        if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
            state = next(iter(state.values()))  # {"model": state_dict}, as MONAI's CheckpointSaver writes
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BundleError("does not hold a state dict of tensors", pt)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"weights do not fit network_def: {str(exc).splitlines()[0][:200]}", pt) from None
        return module.eval(), pt
    if ts.is_file():
        try:
            return torch.jit.load(str(ts), map_location="cpu").eval(), ts
        except Exception as exc:
            raise BundleError(f"not a TorchScript archive torch.jit.load can read ({type(exc).__name__})", ts) from None
    raise BundleError("no models/model.pt or models/model.ts", root)


def intensity(cfg: dict[str, Any], where: Path, channels: int) -> tuple[dict[str, Any], float | None]:
    """segcli's normalisation for the pre-processing's intensity transform, and a Spacing pixdim (mm) if any."""
    pre = cfg.get("preprocessing")
    transforms = pre.get("transforms", []) if isinstance(pre, dict) else pre or []
    found: list[tuple[str, dict[str, Any]]] = []
    pixdim = None
    for t in transforms:
        if not isinstance(t, dict) or "_target_" not in t:
            raise BundleError("a pre-processing transform is not a {_target_: ...} object", where)
        name = _short(t["_target_"])
        args = {k: _literal(v, cfg, where, name) for k, v in t.items() if not k.startswith("_")}
        if name in NEUTRAL:
            continue
        if name == "Spacing":
            dims = args.get("pixdim")
            dims = dims if isinstance(dims, list) else [dims]
            if len(set(dims)) != 1:
                raise BundleError(f"Spacing pixdim {dims} is anisotropic; segcli resamples slides isotropically", where)
            pixdim = float(dims[0])
            continue
        if name not in INTENSITY:
            raise BundleError(f"pre-processing transform {t['_target_']!r} changes the image in a way segcli "
                              "cannot reproduce; refused rather than run the network on other inputs", where)
        found.append((name, args))
    if len(found) > 1:
        raise BundleError(f"pre-processing chains {len(found)} intensity transforms; segcli reproduces one", where)
    if not found:
        return {"kind": "scale", "factor": 1.0}, pixdim
    return _map_intensity(*found[0], where, channels), pixdim


def _map_intensity(name: str, a: dict[str, Any], where: Path, channels: int) -> dict[str, Any]:
    if name == "ScaleIntensityRange":
        a_min, a_max = float(a["a_min"]), float(a["a_max"])
        b_min, b_max = float(a.get("b_min", 0.0) or 0.0), float(a.get("b_max", 1.0) or 1.0)
        if a.get("clip", False):
            if (b_min, b_max) != (0.0, 1.0):
                raise BundleError("ScaleIntensityRange with clip to a range other than [0, 1] is not supported", where)
            return {"kind": "ct_window", "center": (a_min + a_max) / 2, "width": a_max - a_min}
        factor = (b_max - b_min) / (a_max - a_min)
        return {"kind": "scale", "factor": factor, "offset": b_min - a_min * factor}
    if name == "ScaleIntensityRangePercentiles":
        if (float(a.get("b_min", 0) or 0), float(a.get("b_max", 1) or 1)) != (0.0, 1.0) or not a.get("clip", False):
            raise BundleError("ScaleIntensityRangePercentiles is supported with b_min 0, b_max 1, clip true", where)
        if a.get("relative") or a.get("channel_wise"):
            raise BundleError("ScaleIntensityRangePercentiles relative / channel_wise is not supported", where)
        return {"kind": "percentile", "lower": float(a["lower"]), "upper": float(a["upper"])}
    if name == "ScaleIntensity":
        if (float(a.get("minv", 0.0)), float(a.get("maxv", 1.0))) != (0.0, 1.0) or a.get("factor") is not None:
            raise BundleError("ScaleIntensity is supported only as min-max to [0, 1]", where)
        if a.get("channel_wise") and channels > 1:
            raise BundleError("channel-wise ScaleIntensity on several channels is not supported", where)
        return {"kind": "minmax"}
    # NormalizeIntensity
    if a.get("nonzero"):
        raise BundleError("NormalizeIntensity(nonzero=True) is not supported (segcli's z-score uses every pixel)", where)
    if a.get("subtrahend") is not None or a.get("divisor") is not None:
        sub, div = a.get("subtrahend"), a.get("divisor")
        if isinstance(sub, list) or isinstance(div, list) or sub is None or div is None:
            raise BundleError("NormalizeIntensity with per-channel or partial constants is not supported", where)
        return {"kind": "scale", "factor": 1.0 / float(div), "offset": -float(sub) / float(div)}
    if a.get("channel_wise") and channels > 1:
        raise BundleError("channel-wise NormalizeIntensity on several channels is not supported (segcli's z-score "
                          "pools the channels)", where)
    return {"kind": "zscore"}


def window(cfg: dict[str, Any], where: Path, notes: list[str]) -> tuple[int, dict[str, Any]]:
    """The window (``roi_size``) and overlap of the bundle's SlidingWindowInferer."""
    inf = cfg.get("inferer")
    if not isinstance(inf, dict) or _short(inf.get("_target_", "")) != "SlidingWindowInferer":
        raise BundleError("the bundle's inferer is not a SlidingWindowInferer; segcli needs its roi_size", where)
    a = {k: _literal(v, cfg, where, f"inferer.{k}") for k, v in inf.items() if not k.startswith("_")}
    roi = a.get("roi_size")
    roi = [int(r) for r in (roi if isinstance(roi, list) else [roi, roi])]
    if len(roi) != 2 or min(roi) < 8:
        raise BundleError(f"roi_size {a.get('roi_size')} is not a 2D window", where)
    if roi[0] != roi[1]:
        notes.append(f"roi_size {roi} is not square; segcli uses {max(roi)}² windows")
    if str(a.get("mode", "constant")).lower() != "gaussian":
        notes.append("the bundle blends windows with constant weights; segcli blends with a Gaussian")
    params: dict[str, Any] = {"overlap": float(a.get("overlap", 0.25))}
    return max(roi), params


def outputs(cfg: dict[str, Any], out_channels: int, where: Path, notes: list[str], params: dict[str, Any]) -> None:
    """Refuse post-processing segcli cannot mirror (multi-label sigmoid, custom activations)."""
    post = cfg.get("postprocessing")
    transforms = post.get("transforms", []) if isinstance(post, dict) else post or []
    for t in transforms:
        name = _short(t.get("_target_", "")) if isinstance(t, dict) else ""
        if name in ("Activations", "Activationsd"):
            if t.get("other") or t.get("other_activation"):
                raise BundleError("post-processing uses a custom activation; segcli applies softmax or sigmoid only",
                                  where)
            if t.get("sigmoid") is True and out_channels > 1:
                raise BundleError(f"post-processing applies a sigmoid to {out_channels} channels (multi-label); "
                                  "segcli's classes are exclusive", where)
        if name in ("AsDiscrete", "AsDiscreted") and t.get("threshold") is not None and out_channels == 1:
            params["threshold"] = float(_literal(t["threshold"], cfg, where, "threshold"))
    if not transforms:
        notes.append("no post-processing in inference.json: the network's output is taken as logits")


def class_names(root: Path, out_channels: int, notes: list[str]) -> list[str]:
    """Class names from ``configs/metadata.json`` (channel_def), else generic ones."""
    meta_path = root / "configs" / "metadata.json"
    defs: dict[str, Any] = {}
    if meta_path.is_file():
        meta = read_json(meta_path, "metadata.json")
        outs = ((meta.get("network_data_format") or {}).get("outputs") or {}) if isinstance(meta, dict) else {}
        first = next(iter(outs.values()), {}) if isinstance(outs, dict) else {}
        defs = first.get("channel_def") or {} if isinstance(first, dict) else {}
    k = max(2, out_channels)
    names = [str(defs.get(str(i), defs.get(i, ""))) for i in range(k)] if defs else []
    if out_channels == 1 and defs:
        names = ["background", str(defs.get("0", "foreground"))]
    if not names or not all(names) or len(set(names)) != len(names):
        notes.append("no class names in configs/metadata.json; named class1.. (edit segcli.json)")
        names = ["background"] + [f"class{i}" for i in range(1, k)]
    return names


def import_monai(src: Path, out: Path, *, pixel_size_um: float | None = None, force: bool = False) -> Path:
    """Import the MONAI bundle folder ``src`` into the segcli bundle ``out``."""
    cfg_path = src / "configs" / "inference.json"
    cfg = read_json(cfg_path, "MONAI bundle config")
    if not isinstance(cfg, dict):
        raise BundleError("must hold a JSON object", cfg_path)
    notes: list[str] = []
    module, arch = build_network(cfg, cfg_path)
    module, weights = load_weights(src, module, cfg_path)
    in_ch = int(arch.get("in_channels", 1))
    out_ch = int(arch.get("out_channels", 1))
    norm, pixdim = intensity(cfg, cfg_path, in_ch)
    size, params = window(cfg, cfg_path, notes)
    outputs(cfg, out_ch, cfg_path, notes, params)
    if pixel_size_um is None and pixdim is not None:
        pixel_size_um = pixdim * 1000.0  # MONAI pixdim is in mm
        notes.append(f"Spacing pixdim {pixdim} mm: slides are resampled to {pixel_size_um:g} µm/px")
    facts = ImportFacts(classes=class_names(src, out_ch, notes), in_channels=in_ch, input_size=size,
                        normalization=norm, output="logits", pixel_size_um=pixel_size_um, name=out.name,
                        task=f"imported MONAI bundle {src.name}", params=params, notes=notes)
    check_facts(facts, cfg_path)
    data = module_to_onnx(module, facts, weights)
    facts.notes += check_graph(ort_session(data, weights), facts, weights)
    source = {"format": "monai", "path": str(src.resolve()), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "weights": str(weights.relative_to(src)), "network": arch}
    return write_onnx_bundle(out, data, facts, source, force=force)
