"""The architecture registry itself: names to factories, filled by ``@register`` in each network module.

It imports no network, so a network module can import it without a cycle; :mod:`segcli.nets` loads the
built-in networks on first use and hands the registry on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, ArchSpec] = {}


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


def registered() -> dict[str, ArchSpec]:
    """The architectures registered so far (see :func:`segcli.nets.available` for the built-in ones)."""
    return dict(_REGISTRY)


def param_count(module: Any) -> int:
    """Number of parameters (trainable or not) of a torch module."""
    return sum(p.numel() for p in module.parameters())
