"""Types the io modules share, kept out of the package face so a reader never imports the package that
imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LoadedImage:
    """A decoded image: channel-last pixels plus what the writers need to reproduce its geometry."""

    path: Path
    kind: str  # "volume", "medical2d", "tiff" or "raster"
    array: np.ndarray  # (H, W, C) or canonical (Z, Y, X, C)
    spacing: tuple[float, ...] | None  # mm, array axis order
    meta: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return 3 if self.kind == "volume" else 2

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Array shape without the channel axis: the shape a mask must have."""
        return tuple(self.array.shape[: self.ndim])

    @property
    def channels(self) -> int:
        """Number of channels (1 for grey/scalar images)."""
        return int(self.array.shape[-1])
