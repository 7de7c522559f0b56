"""Model bundles: a folder with ``segcli.json`` (versioned schema) and safetensors weights.

Everything inference needs (classes, input size S, padding, thresholds, normalisation) lives in
the bundle, not in CLI defaults, so a bundle trained with ``segcli train`` predicts with no
further flags. Loading never unpickles: weights are safetensors, and a ``.pt`` file goes through
``torch.load(weights_only=True)``. Every file path is checked to stay inside the bundle folder and
its SHA-256 is verified before use.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segcli import normalize
from segcli.choose import KIND_WORDS
from segcli.errors import BundleError, UsageError
from segcli.methods import METHODS, ROLES
from segcli.nets import build
from segcli.params import SPECS, check_param, lookup

SCHEMA_VERSION = 1
BUNDLE_FILE = "segcli.json"


def models_dir() -> Path:
    """Where shipped bundles live: ``$SEGCLI_MODELS`` or the repository's ``models/`` folder."""
    env = os.environ.get("SEGCLI_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inside(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` under ``root`` and refuse anything that escapes it (absolute, ``..``, symlinks)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise BundleError(f"{what} path {rel!r} must be a relative path inside the bundle", root)
    target = (root / rel).resolve()
    base = root.resolve()
    if target != base and base not in target.parents:
        raise BundleError(f"{what} path {rel!r} escapes the bundle folder; refused", root)
    return target


@dataclass
class NetworkSpec:
    arch: str
    config: dict[str, Any]
    weights: str
    sha256: str | None = None
    onnx: str | None = None
    onnx_sha256: str | None = None
    int8: str | None = None  # statically quantised QDQ export (segcli.quantize), checked against fp32
    int8_sha256: str | None = None


@dataclass
class Bundle:
    path: Path
    name: str
    method: str
    classes: list[str]
    in_channels: int
    input_size: int
    normalization: dict[str, Any]
    networks: dict[str, NetworkSpec]
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    #: load weights that carry no sha256 (an explicit user decision: ``--allow-unhashed``)
    allow_unhashed: bool = False
    #: optional DICOM codes per class name (see :func:`parse_codes`); a class without gets a generic code
    codes: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    #: a class the networks output only to separate touching objects (``"instances": {"boundary": NAME,
    #: "object": NAME}``): its index and the index of the object class it belongs to (see :meth:`fold`)
    boundary: tuple[int, int] | None = None
    #: for a view made by :meth:`folded`: the bundle whose networks (with the boundary class) serve it
    networks_of: Bundle | None = None

    @property
    def n_classes(self) -> int:
        """Classes the networks output (a boundary class included)."""
        return len(self.classes)

    @property
    def output_classes(self) -> list[str]:
        """Classes of the written mask: the boundary class, if any, is part of its object there."""
        if self.boundary is None:
            return self.classes
        return [c for i, c in enumerate(self.classes) if i != self.boundary[0]]

    def folded(self) -> Bundle:
        """This bundle as the engines of a run without instances see it: the mask's classes only, the networks'
        boundary probability added to its object's before any fusion (``segcli.inferer``), so such a run
        fuses and stores what a bundle without a boundary class would (one channel for one object class)."""
        if self.boundary is None:
            return self
        return replace(self, classes=self.output_classes, boundary=None, networks_of=self)

    def fold(self) -> np.ndarray | None:
        """uint8 table from network labels to mask labels (None when they are the same): the boundary class
        becomes its object's class and the classes after it move down by one."""
        if self.boundary is None:
            return None
        b, obj = self.boundary
        lut = np.array([i if i < b else i - 1 for i in range(self.n_classes)], np.uint8)
        lut[b] = obj if obj < b else obj - 1
        return lut

    def param(self, key: str) -> Any:
        """The bundle's value for a method parameter, else the default (segcli.params)."""
        return lookup(self.params, key, self.input_size)

    def network(self, role: str) -> NetworkSpec:
        """The network for ``role``; a one-network bundle serves both roles (direct training)."""
        if role in self.networks:
            return self.networks[role]
        other = "fine" if role == "coarse" else "coarse"
        if other in self.networks:
            return self.networks[other]
        raise BundleError(f"bundle has no {role!r} network", self.path)

    def weights_path(self, role: str) -> Path:
        return _inside(self.path, self.network(role).weights, "weights")

    def verify(self) -> list[str]:
        """Problems with the bundle's files (missing, hash mismatch); empty when all is well."""
        problems = []
        for role, spec in self.networks.items():
            for rel, digest in ((spec.weights, spec.sha256), (spec.onnx, spec.onnx_sha256), (spec.int8, spec.int8_sha256)):
                if rel is None:
                    continue
                try:
                    p = _inside(self.path, rel, "weights")
                except BundleError as exc:
                    problems.append(str(exc))
                    continue
                if not p.is_file():
                    problems.append(f"{role}: file {rel} is missing")
                elif digest and sha256_file(p) != digest:
                    problems.append(f"{role}: {rel} does not match its recorded SHA-256 (corrupted or tampered)")
        return problems

    def load_module(self, role: str, verify: bool = True):
        """Build the role's network and load its weights (safely)."""
        spec = self.network(role)
        if spec.arch == "onnx":  # an imported graph (segcli.importers): there is no torch network to build
            raise BundleError(f"the {role} network is an imported ONNX model; it runs on ONNX Runtime only "
                              "(--backend onnx or auto, fp32), not torch", self.path)
        path = self.weights_path(role)
        if not path.is_file():
            raise BundleError(f"weights file {spec.weights} is missing", self.path)
        if verify and not spec.sha256 and not self.allow_unhashed:
            raise BundleError(f"{spec.weights} has no recorded sha256 in {BUNDLE_FILE}; unhashed weights are refused "
                              "(pass --allow-unhashed only for a bundle you made yourself)", self.path)
        if verify and spec.sha256 and sha256_file(path) != spec.sha256:
            raise BundleError(f"{spec.weights} does not match its recorded SHA-256 (corrupted or tampered); refused", self.path)
        cfg = {"in_channels": self.in_channels, "out_channels": _out_channels(self.n_classes), **spec.config}
        module = build(spec.arch, **cfg)
        state = load_state_dict(path)
        _check_state(module, state, path)
        module.load_state_dict(state, strict=True)
        return module.eval()

    def summary(self) -> dict[str, Any]:
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "name": self.name,
            "path": str(self.path),
            "method": self.method,
            "task": self.info.get("task", ""),
            "classes": self.output_classes,
            "boundary_class": self.classes[self.boundary[0]] if self.boundary is not None else None,
            "input_size": self.input_size,
            "networks": {r: s.arch for r, s in self.networks.items()},
            "size_bytes": size,
            "val_score": self.training.get("val_score"),
            "val_score_means": self.score_words(),
            "reproduce": (self.info.get("headline") or {}).get("command") if isinstance(self.info.get("headline"), dict) else None,
            "default_for": self.info.get("default_for", []),
        }

    def score_words(self) -> str:
        """What ``val_score`` is: the metric, over how many held-out images, how measured (for `segcli models`)."""
        card = self.info.get("headline")  # a card's own figure (segcli evaluate on a named split) wins
        if isinstance(card, dict) and "value" in card:
            words = f"{card.get('metric', 'Dice')} {float(card['value']):.3f} on {card.get('split', 'held-out data')}"
            val = card.get("validation")  # the split that chose the checkpoint, shown beside the test figure
            if isinstance(val, dict) and "value" in val:
                words += f" (validation {float(val['value']):.3f} on {val.get('split', 'the val split')})"
            return words
        full = self.training.get("val_full_res") or {}
        if self.training.get("val_score") is None:
            return "no score recorded"
        n = full.get("cases")
        fg = self.n_classes - 1
        what = "Dice" if fg == 1 else f"mean Dice of {fg} classes"
        where = f"{n} validation images" if n else "the validation split"
        return f"{what} {float(self.training['val_score']):.3f} on {where} (full resolution, seed split)"


def _out_channels(n_classes: int) -> int:
    return 1 if n_classes == 2 else n_classes


def load_state_dict(path: Path) -> dict[str, Any]:
    """Read weights without ever unpickling untrusted data."""
    # lazy: torch costs ~1.3 s to import
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            # lazy: only .safetensors weights need it
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif suffix in (".pt", ".pth", ".ckpt"):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # the unpickler refused something: that is the point
                raise BundleError(f"refusing to load {path.name}: it is not a plain weights file ({type(exc).__name__})", path) from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
        else:
            raise BundleError(f"unsupported weights format {suffix!r}; use .safetensors", path)
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"cannot read weights: {exc}", path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError("weights file does not hold a flat dict of tensors", path)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def _check_state(module, state: dict[str, Any], path: Path) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise BundleError(
            f"weights do not fit the architecture (missing {len(missing)} e.g. {missing[:2]}, unexpected {len(extra)} e.g. {extra[:2]})",
            path,
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise BundleError(f"shape mismatch for {k}: bundle {tuple(state[k].shape)} vs network {tuple(v.shape)} (wrong class or channel count?)", path)


def _migrate(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Explicit schema migrations live here; an unknown version is refused, never guessed."""
    version = raw.get("schema_version")
    if version == SCHEMA_VERSION:
        return raw
    raise BundleError(f"unsupported bundle schema_version {version!r} (this segcli reads version {SCHEMA_VERSION})", path / BUNDLE_FILE)


CODE_ROLES = ("category", "type", "region")


def parse_codes(value: Any, classes: list[str], where: Path) -> dict[str, dict[str, dict[str, str]]]:
    """The optional ``codes`` field: ``{class name: {"category": code, "type": code[, "region": code]}}``.

    A code is ``{"scheme": "SCT", "value": "68496003", "meaning": "Polyp of colon"}`` (DICOM coded
    concept: CID 7150 categories, CID 7151 types, CID 4 regions). Used for DICOM SEG segment descriptions.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BundleError("codes must be an object mapping class names to their codes", where)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name, roles in value.items():
        if name not in classes:
            raise BundleError(f"codes: {name!r} is not a class of this bundle ({classes})", where)
        if not isinstance(roles, dict) or "type" not in roles or "category" not in roles:
            raise BundleError(f"codes: {name!r} needs a category and a type code", where)
        unknown = sorted(set(roles) - set(CODE_ROLES))
        if unknown:
            raise BundleError(f"codes: {name!r} has unknown {unknown[0]!r} (allowed: {', '.join(CODE_ROLES)})", where)
        out[name] = {}
        for role, code in roles.items():
            ok = isinstance(code, dict) and all(
                isinstance(code.get(k), str) and code[k].strip() for k in ("scheme", "value", "meaning")
            )
            if not ok or len(code["meaning"]) > 64 or len(code["value"]) > 64:
                raise BundleError(
                    f"codes: {name!r} {role} must be {{scheme, value, meaning}} strings (meaning up to 64 characters)",
                    where,
                )
            out[name][role] = {k: code[k].strip() for k in ("scheme", "value", "meaning")}
    return out


def boundary_of(value: Any, classes: list[str]) -> tuple[int, int] | None:
    """``"instances": {"boundary": "boundary", "object": "nucleus"}`` (a bundle's segcli.json, a dataset's
    dataset.json): the indices of the class that marks an object's edge (trained to separate touching ones)
    and of the class it is folded into in the mask; ValueError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(value.get(k), str) for k in ("boundary", "object")):
        raise ValueError('"instances" must be {"boundary": CLASS, "object": CLASS}')
    b, obj = value["boundary"], value["object"]
    for name in (b, obj):
        if name not in classes:
            raise ValueError(f'"instances": {name!r} is not one of the classes ({", ".join(classes)})')
    if b == obj or classes.index(b) == 0 or classes.index(obj) == 0:
        raise ValueError('"instances": the boundary and object classes must be two different foreground classes')
    return classes.index(b), classes.index(obj)


def _parse_boundary(value: Any, classes: list[str], where: Path) -> tuple[int, int] | None:
    try:
        return boundary_of(value, classes)
    except ValueError as exc:
        raise BundleError(f"malformed bundle: {exc}", where) from None


#: The JSON types of segcli.json's fields (required ones first), checked before anything is read from them.
_FIELDS: dict[str, tuple[type | tuple[type, ...], str, bool]] = {
    "method": (str, "a string", True),
    "classes": (list, "a list of class names", True),
    "in_channels": (int, "an integer", True),
    "input_size": (int, "an integer", True),
    "normalization": (dict, "an object", True),
    "networks": (dict, "an object mapping roles to networks", True),
    "name": (str, "a string", False),
    "params": (dict, "an object", False),
    "info": (dict, "an object", False),
    "training": (dict, "an object", False),
}


def _check_shape(raw: dict[str, Any], where: Path) -> None:
    """One-line refusals for a segcli.json of the wrong shape (wrong types, missing fields, NUL bytes)."""
    for key, (kind, words, required) in _FIELDS.items():
        if key not in raw:
            if required:
                raise BundleError(f"malformed bundle: the field {key!r} is missing", where)
            continue
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BundleError(f"malformed bundle: {key!r} must be {words}, not {type(value).__name__}", where)
    if not all(isinstance(c, str) and c and "\x00" not in c for c in raw["classes"]):
        raise BundleError("malformed bundle: 'classes' must be non-empty strings without NUL characters", where)
    for role, net in raw["networks"].items():
        if not isinstance(net, dict) or not isinstance(net.get("arch"), str) or not isinstance(net.get("weights"), str):
            raise BundleError(f"malformed bundle: network {role!r} must be an object with 'arch' and 'weights' "
                              "strings", where)
        if not isinstance(net.get("config", {}), dict):
            raise BundleError(f"malformed bundle: network {role!r} 'config' must be an object", where)
        if "\x00" in net["weights"] or "\x00" in net["arch"]:
            raise BundleError(f"malformed bundle: network {role!r} names hold NUL characters", where)


def _check_params(params: dict[str, Any], where: Path) -> None:
    """The bundle's method parameters, typed and in range, checked once at load: a bad one is one refusal
    naming segcli.json, not a failure per file. Keys segcli does not know as method parameters (the
    bundle's own facts: mpp, training_mpp, max_zoom...) are left alone."""
    for key, value in params.items():
        if key not in SPECS or value is None:
            continue
        if SPECS[key].kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BundleError(f"malformed bundle: params.{key} must be a number, not {value!r}", where)
        if SPECS[key].kind is bool and not isinstance(value, bool):
            raise BundleError(f"malformed bundle: params.{key} must be true or false, not {value!r}", where)
        try:
            check_param(key, value)
        except UsageError as exc:
            raise BundleError(f"malformed bundle: params.{key}: {exc}", where) from None


def resolve_model(model: str | os.PathLike[str] | None, kind: str = "2d") -> Path:
    """A bundle folder from a path, a shipped bundle name, or None for the default of ``kind`` (a content
    kind of :mod:`segcli.choose`); a kind the index maps to no model is refused with the shipped list."""
    if model is None:
        name = default_model_name(kind)
        if name is None:
            raise BundleError(no_model_message(kind))
        return models_dir() / name
    p = Path(model)
    if p.is_dir() or p.name == BUNDLE_FILE:
        return p.parent if p.name == BUNDLE_FILE else p
    candidate = models_dir() / str(model)
    if "/" not in str(model) and candidate.is_dir():
        return candidate
    names = [b.name for b in list_models()]

    close = difflib.get_close_matches(str(model), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise BundleError(f"no bundle at {model!r} and no shipped model of that name; {hint}"
                      f"shipped: {', '.join(names) or 'none'}")


def is_shipped(model: str | os.PathLike[str]) -> bool:
    """Whether ``model`` names a bundle shipped with segcli (by name, not a folder the user gave)."""
    return not Path(model).is_dir() and resolve_model(model).resolve().parent == models_dir().resolve()


def model_index() -> dict[str, Any]:
    """``models/index.json``: the default per content kind, the guesses and the refusal hints."""
    try:
        data = json.loads((models_dir() / "index.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def no_model_message(kind: str) -> str:
    """The refusal for a content kind no shipped model fits: what the input is and the list to pick from."""
    data = model_index()
    hint = (data.get("refuse_hints") or {}).get(kind)
    names = ", ".join(b.name for b in list_models()) or "none"
    what = KIND_WORDS.get(kind, f"{kind} inputs")
    return (f"no shipped model fits {what}; pass --model NAME" + (f" ({hint})" if hint else "")
            + f"; shipped: {names}")


def default_model_name(kind: str) -> str | None:
    """The default named in ``models/index.json`` for ``kind`` ("2d", "slide", "volume" or a content kind of
    segcli.choose); None when the index maps the kind to no model."""
    data = model_index()
    by_kind = data.get("default_by_kind") or {}
    if kind in by_kind:
        return by_kind[kind]
    # a slide (RGB TIFF) falls back to the 2D default when the index names no slide model
    return (by_kind.get("2d") if kind == "slide" else None) or data.get("default")


def load_bundle(model: str | os.PathLike[str] | None = None, kind: str = "2d") -> Bundle:
    """Load and validate a bundle; every problem is a one-line BundleError naming the file."""
    root = resolve_model(model, kind)
    cfg_path = root / BUNDLE_FILE
    if not cfg_path.is_file():
        raise BundleError(f"not a segcli bundle (no {BUNDLE_FILE})", root)
    try:
        raw = json.loads(cfg_path.read_text())
    except RecursionError:
        raise BundleError("cannot parse: JSON nested too deeply", cfg_path) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot parse: {exc}", cfg_path) from None
    if not isinstance(raw, dict):
        raise BundleError("must hold a JSON object", cfg_path)
    raw = _migrate(raw, root)
    _check_shape(raw, cfg_path)
    try:
        nets = {
            role: NetworkSpec(
                arch=str(n["arch"]),
                config=dict(n.get("config", {})),
                weights=n["weights"],
                sha256=n.get("sha256"),
                onnx=n.get("onnx"),
                onnx_sha256=n.get("onnx_sha256"),
                int8=n.get("int8"),
                int8_sha256=n.get("int8_sha256"),
            )
            for role, n in raw["networks"].items()
        }
        bundle = Bundle(
            path=root,
            name=str(raw.get("name", root.name)),
            method=str(raw["method"]),
            classes=[str(c) for c in raw["classes"]],
            in_channels=int(raw["in_channels"]),
            input_size=int(raw["input_size"]),
            normalization=dict(raw["normalization"]),
            networks=nets,
            params=dict(raw.get("params", {})),
            info=dict(raw.get("info", {})),
            training=dict(raw.get("training", {})),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"malformed bundle: missing or bad field {exc}", cfg_path) from None
    bundle.codes = parse_codes(raw.get("codes"), bundle.classes, cfg_path)
    bundle.boundary = _parse_boundary(raw.get("instances"), bundle.classes, cfg_path)
    _check_params(bundle.params, cfg_path)
    if bundle.method not in METHODS:
        raise BundleError(f"unknown method {bundle.method!r}", cfg_path)
    if bundle.n_classes < 2:
        raise BundleError("a bundle needs at least 2 classes (background and one more)", cfg_path)
    if not nets or not set(nets) <= set(ROLES):
        raise BundleError(f"networks must be among {ROLES}, got {sorted(nets)}", cfg_path)
    if bundle.input_size < 8:
        raise BundleError(f"input_size {bundle.input_size} is too small", cfg_path)

    try:
        normalize.validate(bundle.normalization)
    except ValueError as exc:
        raise BundleError(str(exc), cfg_path) from None
    for role in nets:
        bundle.weights_path(role)  # path-traversal check up front
    return bundle


def list_models() -> list[Bundle]:
    """Shipped bundles (folders of models/ with a segcli.json), sorted by name; broken ones skipped."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if (d / BUNDLE_FILE).is_file():
            try:
                out.append(load_bundle(d))
            except Exception:  # listed as broken by `segcli models --verify`, not here
                continue
    return out


def save_bundle(
    path: str | os.PathLike[str],
    *,
    name: str,
    method: str,
    classes: list[str],
    in_channels: int,
    input_size: int,
    normalization: dict[str, Any],
    networks: dict[str, tuple[str, dict[str, Any], Any]],
    params: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    half: bool = False,
    codes: dict[str, Any] | None = None,
    instances: dict[str, str] | None = None,
) -> Path:
    """Write a bundle: ``networks`` maps role → (arch, config, module). ``half`` stores fp16 weights.

    The JSON is written last and atomically, so a folder with a ``segcli.json`` is always complete.
    """
    # lazy: safetensors.torch brings torch (~1.3 s to import)
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if method not in METHODS:
        raise BundleError(f"unknown method {method!r}")
    nets: dict[str, Any] = {}
    for role, (arch, config, module) in networks.items():
        if role not in ROLES:
            raise BundleError(f"unknown network role {role!r}")
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        if half:
            state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
        fname = f"{role}.safetensors"
        tmp = root / f".{fname}.partial"
        save_file(state, str(tmp), metadata={"arch": arch})
        os.chmod(tmp, _file_mode())  # safetensors writes 0600; a bundle is shared like the rest of its folder
        os.replace(tmp, root / fname)
        nets[role] = {"arch": arch, "config": config, "weights": fname, "sha256": sha256_file(root / fname)}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "method": method,
        "classes": list(classes),
        "in_channels": int(in_channels),
        "input_size": int(input_size),
        "normalization": normalization,
        "networks": nets,
        "params": params or {},
        "info": info or {},
        "training": training or {},
    }
    if codes:
        doc["codes"] = codes  # DICOM SEG segment descriptions (see parse_codes)
    if instances:
        _parse_boundary(instances, list(classes), root / BUNDLE_FILE)  # refused here, not at the first load
        doc["instances"] = dict(instances)  # a boundary class folded into its object (see _parse_boundary)
    write_json_atomic(root / BUNDLE_FILE, doc)
    return root


def _file_mode() -> int:
    """0666 less the process umask: the mode an ordinary new file gets (0644 with the usual umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def pack_bundle(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, name: str | None = None,
                half: bool = True, info: dict[str, Any] | None = None) -> Path:
    """Copy a trained bundle into a shippable one: weights only (no checkpoint), fp16 storage by default.

    Half-precision storage halves the size (a 1.9M-parameter U-Net pair fits in 8 MB) while the
    networks still run in float32; the SHA-256 of the new files is recorded.
    """
    b = load_bundle(src)
    nets = {role: (spec.arch, spec.config, b.load_module(role)) for role, spec in b.networks.items()}
    return save_bundle(
        dst, name=name or b.name, method=b.method, classes=b.classes, in_channels=b.in_channels,
        input_size=b.input_size, normalization=b.normalization, networks=nets, params=b.params,
        info={**b.info, **(info or {})}, training=b.training, half=half, codes=b.codes,
        instances=b.raw.get("instances"),
    )
