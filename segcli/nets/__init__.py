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

from typing import Any

from segcli.errors import BundleError
from segcli.nets.registry import ArchSpec, param_count, register, registered

__all__ = ["ArchSpec", "available", "build", "param_count", "register"]

_LOADED = False


def _load_builtin() -> None:
    # Import for the side effect of registration; kept lazy so `import segcli` stays light (torch).
    from segcli.nets import arsm, deconvnet, hrnet, rpn_fcn, unet  # noqa: F401


def available() -> dict[str, ArchSpec]:
    """All registered architectures by name, the built-in ones loaded on first call."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        _load_builtin()
    return registered()


def build(name: str, **config: Any) -> Any:
    """Build the network ``name`` with ``config`` merged over the registered defaults."""
    archs = available()
    if name not in archs:
        raise BundleError(f"unknown architecture {name!r}; known: {', '.join(sorted(archs))}")
    spec = archs[name]
    cfg = {**spec.defaults, **config}
    try:
        return spec.factory(**cfg)
    except TypeError as exc:
        raise BundleError(f"bad config for architecture {name!r}: {exc}") from exc
