"""``segcli train --init BUNDLE``: fine-tune an existing bundle (shipped, trained or packed) on new data.

The bundle decides everything its weights depend on — method, architectures and their configs, input
size S and normalisation — so a fine-tuned network sees inputs scaled exactly as it was trained on.
The dataset must have the bundle's channels and classes. An imported ONNX network (segcli.importers)
has no torch weights and is refused, as is a ``sliding`` bundle (segcli trains coarse-to-fine methods).
"""

from __future__ import annotations

from typing import Any

from segcli.bundle import load_bundle
from segcli.errors import BundleError, UsageError
from segcli.methods import TRAINABLE, roles


def apply_init(cfg: Any) -> Any:
    """Take the bundle's method, architectures, size and normalisation into ``cfg``; returns the bundle."""
    try:
        b = load_bundle(cfg.init)
    except BundleError as exc:
        raise UsageError(f"--init: {exc}") from None
    if any(spec.arch == "onnx" for spec in b.networks.values()):
        raise UsageError(f"--init {cfg.init}: its network is an imported ONNX graph, which segcli cannot train "
                         "(no torch weights)")
    if b.method not in TRAINABLE:
        raise UsageError(f"--init {cfg.init}: method {b.method!r} is not one segcli train makes "
                         f"({', '.join(TRAINABLE)})")
    cfg.method = b.method
    rs = roles(b.method)
    cfg.arch = b.network(rs[0]).arch
    cfg.fine_arch = b.network(rs[-1]).arch
    cfg.size = b.input_size
    cfg.normalization = dict(b.normalization)
    return b


def role_configs(cfg: Any) -> dict[str, dict[str, Any]] | None:
    """The bundle's architecture config per role (None without ``--init``)."""
    if not cfg.init:
        return None

    b = load_bundle(cfg.init)
    return {r: dict(b.network(r).config) for r in roles(b.method)}


def check_dataset(cfg: Any, ds: Any) -> None:
    """The dataset must match the bundle's input channels and classes (names may differ, the count may not)."""
    if not cfg.init:
        return

    b = load_bundle(cfg.init)
    if ds.in_channels != b.in_channels:
        raise UsageError(f"--init {cfg.init} takes {b.in_channels} channel(s); the dataset has {ds.in_channels} "
                         "(convert with --channels)")
    if len(ds.classes) != b.n_classes:
        raise UsageError(f"--init {cfg.init} has {b.n_classes} classes {b.classes}; the dataset has "
                         f"{len(ds.classes)} {ds.classes}")


def load_init_weights(model: Any, cfg: Any, role: str) -> None:
    """Copy the bundle's (hash-checked) weights of ``role`` into the freshly built network."""
    model.load_state_dict(load_bundle(cfg.init).load_module(role).state_dict(), strict=True)
