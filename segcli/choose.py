"""Which shipped bundle an input gets when no ``--model`` is given, from what the input itself tells.

A model fed the wrong kind of image answers with confidence and in silence (a polyp network on an H&E
tile finds "nothing"), so the choice looks at the pixels, not the file extension: the number of
channels, the value type and range, and for colour images the optical-density colour of the stained
or lit tissue. The result is a *content kind*, looked up in ``models/index.json`` (``default_by_kind``);
a kind mapped to ``null`` has no shipped model and the file is refused with the list. Kinds whose rule
is a guess carry a one-line note naming the alternatives (``guesses`` in the index).

Measured on every image of the shared data sets: the H&E rule takes every MoNuSeg tile, no Kvasir or DRIVE
photo and 5 of PH2's 160 dermoscopy photos (hence the note that the choice is a guess).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: What each content kind is, in the user's words (used in notes and refusals).
KIND_WORDS = {
    "2d": "a colour photo",
    "he": "an H&E-stained tissue image",
    "slide": "an RGB TIFF slide",
    "grey": "a grey image (CT slice, electron micrograph or photo?)",
    "fluorescence": "a grey image with a dark background and bright objects (fluorescence microscopy)",
    "ct-slice": "a CT slice (in HU, or exported to 8 bits with --window)",
    "volume": "a CT volume",
    "volume-not-ct": "a volume without Hounsfield units (MR or another modality)",
}

#: Pixels sampled for the statistics (a strided subsample: cheap on a 4k photo).
SAMPLE_PIXELS = 200_000
#: Pixels sampled for the colour rules (grey, H&E). On the 1,110 shared photos and tiles (MoNuSeg, Kvasir, DRIVE,
#: PH2) the H&E share moved by at most 0.002 from the 200,000-pixel sample and no choice changed; a Kvasir
#: photo's choice took 26 ms, twice its whole stts pass, and takes 3 ms.
COLOUR_SAMPLE_PIXELS = 40_000
#: A colour image whose channels differ by less than this (8-bit levels, 99th percentile) is grey.
GREY_TOLERANCE = 6
#: Share of dark pixels of a fluorescence image, and the most its bright pixels may cover (see looks_fluorescent).
DARK_SHARE, BRIGHT_SHARE = 0.4, 0.2
#: Share of tissue pixels whose optical density is largest in green: H&E (haematoxylin and eosin both
#: absorb green most). On every shared image: MoNuSeg 0.97-1.00 (30 of 30 pass), Kvasir and DRIVE 0 (the mean-
#: direction check), PH2 0-0.99: 5 of its 160 dermoscopy photos pass, so the choice is a guess and says so
#: (models/index.json ``guesses``).
HE_GREEN_SHARE = 0.9


def _sample(a: np.ndarray, pixels: int = SAMPLE_PIXELS) -> np.ndarray:
    flat = a.reshape(-1, a.shape[-1])
    return flat[:: max(1, len(flat) // pixels)]


def is_grey(a: np.ndarray) -> bool:
    """True for one channel, grey + alpha, or colour channels that are (nearly) equal everywhere."""
    if a.shape[-1] < 3:
        return True
    s = _sample(a, COLOUR_SAMPLE_PIXELS)[:, :3].astype(np.float32)
    scale = 1.0 if a.dtype.itemsize == 1 else float(np.iinfo(a.dtype).max) / 255.0 if a.dtype.kind in "ui" else None
    if scale is None:  # float colour: compare relative to the range
        rng = float(np.nanmax(s) - np.nanmin(s)) or 1.0
        scale = rng / 255.0
    diff = np.maximum(np.abs(s[:, 0] - s[:, 1]), np.abs(s[:, 1] - s[:, 2])) / scale
    return bool(np.percentile(diff, 99) < GREY_TOLERANCE)


#: Optical density of each 8-bit level, -log((v + 1) / 256): a lookup instead of a log per pixel.
_OD8 = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)


def he_score(a: np.ndarray) -> float:
    """Share of tissue pixels (optical density > 0.3) whose optical density is largest in green, plus the
    mean OD direction check; 0 when there is hardly any tissue. 8-bit RGB expected."""
    s = _sample(a, COLOUR_SAMPLE_PIXELS)[:, :3]
    if a.dtype == np.uint8:
        od = _OD8[s]
    else:
        s = s.astype(np.float32)
        s = s / (float(np.iinfo(a.dtype).max) if a.dtype.kind in "ui" else max(float(s.max()), 1.0)) * 255.0
        od = -np.log((s + 1.0) / 256.0)
    tissue = od.sum(axis=1) > 0.3
    if tissue.mean() < 0.05:
        return 0.0
    o = od[tissue]
    green_max = (o[:, 1] >= o[:, 0]) & (o[:, 1] >= 0.9 * o[:, 2])
    norm = np.sqrt(np.einsum("ij,ij->i", o, o))
    direction = (o / np.maximum(norm, 1e-6)[:, None]).mean(axis=0)
    if not (direction[1] > direction[0] and direction[1] > direction[2]):
        return 0.0
    return float(green_max.mean())


def content_kind(array: np.ndarray, kind: str) -> str:
    """The content kind of a channel-last image or volume read whole (``kind``: "2d", "slide", "volume")."""
    if kind == "volume" or array.ndim == 4:
        return volume_kind(float(np.nanmin(_sample(array))) if array.size else 0.0)
    if kind == "slide":
        return "slide"
    if is_grey(array):
        if array.dtype.kind in "if" and float(np.nanmin(_sample(array))) < -200:
            return "ct-slice"  # a 2D slice in Hounsfield units (air near -1000): no photo or micrograph is negative
        return "fluorescence" if looks_fluorescent(array) else "grey"
    return "he" if he_score(array) >= HE_GREEN_SHARE else "2d"


def looks_fluorescent(a: np.ndarray) -> bool:
    """Dark background with sparse bright objects: at least 40 % of pixels under 15 % of the 99.5th
    percentile, a median under 16 % of it, and at most 20 % of pixels over half of it (CT slices have a dark
    surround too, but 36-39 % of bright body). All 43 grey DSB 2018 images, none of 50 CT slices (JPEG) or 41
    electron micrographs (ISBI 2012, drosophila-vnc); the thresholds were set on these same images (the
    earlier 60 %/12 % rule missed 12 of the 43)."""
    g = _sample(a)[:, 0].astype(np.float32)
    g = g[np.isfinite(g)]
    if g.size == 0:
        return False
    g = g - float(g.min())
    top = float(np.percentile(g, 99.5))
    if top <= 0:
        return False
    return bool((g < 0.15 * top).mean() >= DARK_SHARE and np.median(g) <= 0.16 * top
                and (g > 0.5 * top).mean() <= BRIGHT_SHARE)


def volume_kind(minimum: float, modality: str | None = None) -> str:
    """CT in Hounsfield units has air near -1000; a volume with no negative value is not such a CT."""
    if modality:
        return "volume" if modality.upper() == "CT" else "volume-not-ct"
    return "volume" if minimum < -200 else "volume-not-ct"


def guess_note(kind: str, name: str, index: dict[str, Any]) -> str | None:
    """The one-line note for a choice that is a guess (the index's ``guesses``), naming the alternatives."""
    alternatives = (index.get("guesses") or {}).get(kind)
    if not alternatives:
        return None
    return (f"model {name} chosen for {KIND_WORDS.get(kind, kind)} (a guess from the pixels); "
            f"if that is wrong pass --model: {', '.join(alternatives)}")
