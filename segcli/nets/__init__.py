"""Network registry: ``build(name, **config)`` returns an ``nn.Module`` mapping NCHW float to logits.

Contract for every registered network (engines and runtimes rely on nothing else):

* ``forward(x)`` takes ``(N, in_channels, H, W)`` float32 for ANY H, W >= 1 and returns logits
  ``(N, out_channels, H, W)`` at the same H, W (networks pad internally and crop back).
* ``out_channels == 1`` means a binary task read through a sigmoid; ``out_channels >= 2`` means
  classes read through a softmax.
* Optional ``compute_loss(x, target, loss_fn)`` lets a network with auxiliary objectives (an RPN,
  say) own its training loss; the training loop calls it when present.

Registering is a decorator, in the spirit of timm's model registry, so adding an architecture
never touches the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, ArchSpec] = {}
_LOADED = False


@dataclass(frozen=True)
class ArchSpec:
    name: str
    factory: Callable[..., Any]
    description: str
    defaults: dict[str, Any]


def register(name: str, description: str = "", **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a network factory under ``name`` (decorator)."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = ArchSpec(name, factory, description or (factory.__doc__ or "").strip().split("\n")[0], defaults)
        return factory

    return deco


def _load_builtin() -> None:
    # Import for the side effect of registration; kept lazy so `import segcli` stays light.
    from segcli.nets import unet  # noqa: F401

    for optional in ("deconvnet", "hrnet", "arsm", "rpn_fcn"):
        try:
            __import__(f"segcli.nets.{optional}")
        except ModuleNotFoundError as exc:  # a module not written yet, never a broken import
            if exc.name != f"segcli.nets.{optional}":
                raise


def available() -> dict[str, ArchSpec]:
    """All registered architectures by name."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        _load_builtin()
    return dict(_REGISTRY)


def build(name: str, **config: Any) -> Any:
    """Build the network ``name`` with ``config`` merged over the registered defaults."""
    from segcli.errors import BundleError

    archs = available()
    if name not in archs:
        raise BundleError(f"unknown architecture {name!r}; known: {', '.join(sorted(archs))}")
    spec = archs[name]
    cfg = {**spec.defaults, **config}
    try:
        return spec.factory(**cfg)
    except TypeError as exc:
        raise BundleError(f"bad config for architecture {name!r}: {exc}") from exc


def param_count(module: Any) -> int:
    """Number of parameters (trainable or not) of a torch module."""
    return sum(p.numel() for p in module.parameters())
