"""Drawing primitives of the previews: the palette, display windows, contours over a light fill, fonts,
legends and the canvas that lays panels out. :mod:`segcli.viz` composes them into the pictures users see.

Only numpy, scipy.ndimage and Pillow are used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcli.normalize import _sample

# Okabe & Ito (2008), a palette distinguishable under the common colour-vision deficiencies; black is left
# out because it vanishes on dark images. Row 0 (background) is never drawn; classes beyond 7 cycle.
PALETTE = np.array(
    [[0, 0, 0], [86, 180, 233], [230, 159, 0], [0, 158, 115], [240, 228, 66], [213, 94, 0],
     [204, 121, 167], [0, 114, 178]], dtype=np.uint8)
FP_COLOUR = (255, 0, 255)  # magenta: predicted, not in the ground truth
FN_COLOUR = (0, 230, 255)  # cyan: in the ground truth, missed
TP_COLOUR = (240, 228, 66)  # yellow outline of the correctly found region
RES_COLOURS = np.array([[215, 48, 39], [252, 141, 89], [145, 191, 219], [69, 117, 180]], dtype=np.uint8)

FILL_ALPHA = 0.28  # class fill over the image
ERROR_ALPHA = 0.5  # false positive / negative fill: errors should stand out
MAX_SIDE = 1600  # longest side of a preview panel for a large image
SIDE_BY_SIDE_WIDTH = 1024  # images narrower than this are shown as image | overlay
PAIR_MAX_SIDE = 800  # longest side of each panel in the side-by-side layout
MIN_SIDE = 320  # tiny images are enlarged (nearest neighbour) to at least this
SLICE_MAX_SIDE = 400  # one volume slice
SLICE_MIN_SIDE = 256
BG = (24, 24, 24)  # canvas behind panels, title and legend
FG_TEXT = (235, 235, 235)
DIM_TEXT = (170, 170, 170)
GAP = 8
MAX_LEGEND = 12  # legend lines drawn; more classes are summarised in one note
MAX_PIXELS = 200_000_000


# ----------------------------------------------------------------------------------------------- records


@dataclass
class LegendEntry:
    """One legend line: what was drawn in ``colour`` and how much of it there is."""

    label: int  # class id (error maps: 1 = false positive, 2 = false negative, 3 = true positive)
    name: str
    colour: tuple[int, int, int]
    amount: str  # "1,234 px (4.1 %)", "12.5 mm²", "3.21 mL"
    count: int  # pixels / voxels in the full-resolution mask


@dataclass
class Panel:
    """Where one picture lies on the canvas and how it maps to the input."""

    kind: str  # "image", "overlay" or "errors"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 on the canvas (x1, y1 exclusive)
    source_shape: tuple[int, int]  # (rows, cols) of the input plane it shows
    z: int | None = None  # canonical slice index for a volume
    caption: str = ""

    def to_canvas(self, row: float, col: float) -> tuple[int, int]:
        """Canvas (y, x) of the centre of input pixel (row, col), as nearest-neighbour display maps it."""
        x0, y0, x1, y1 = self.box
        h, w = self.source_shape
        return (y0 + min(y1 - y0 - 1, int((row + 0.5) * (y1 - y0) / h)),
                x0 + min(x1 - x0 - 1, int((col + 0.5) * (x1 - x0) / w)))


@dataclass
class Preview:
    """A rendered preview and a description of what was drawn on it (tests and callers read this)."""

    image: Any  # the picture, a Pillow RGB image (``pixels`` is its array)
    title: str
    entries: list[LegendEntry]
    panels: list[Panel]
    legend_box: tuple[int, int, int, int]
    texts: list[str] = field(default_factory=list)  # every string drawn, in drawing order
    empty: bool = False
    slices: list[int] = field(default_factory=list)  # canonical slice indices shown (volumes)
    dice: float | None = None
    layout: str = "overlay"  # "side-by-side", "overlay" or "slices"
    path: Path | None = None

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8, made on first use (a batch's previews are saved without it)."""
        return np.array(self.image)


# ------------------------------------------------------------------------------------------- colours


def class_colour(label: int) -> tuple[int, int, int]:
    """The palette colour of class ``label`` (>= 1); classes past the palette cycle through it."""
    k = 1 + (int(label) - 1) % (len(PALETTE) - 1)
    return tuple(int(v) for v in PALETTE[k])  # type: ignore[return-value]


def window_for(arr: np.ndarray, normalization: dict[str, Any] | None = None) -> tuple[float, float]:
    """The intensity range shown black to white, following the bundle's normalisation when known.

    A CT window shows that window; ``percentile`` its own percentiles; ``minmax`` the range; 8-bit photos
    (``dtype``, or no spec) their native 0-255; anything else the 1st-99th percentile.
    """
    spec = normalization or {}
    kind = spec.get("kind")
    if kind == "ct_window":
        c, w = float(spec["center"]), float(spec["width"])
        return c - w / 2.0, c + w / 2.0
    if arr.dtype == np.uint8 and kind in (None, "dtype"):
        return 0.0, 255.0
    if arr.dtype == np.bool_:
        return 0.0, 1.0
    s = _sample(np.asarray(arr)).astype(np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return 0.0, 1.0
    if kind == "dtype" and arr.dtype.kind == "f" and s.min() >= 0 and s.max() <= 1:
        return 0.0, 1.0
    if kind == "minmax":
        lo, hi = float(s.min()), float(s.max())
    elif kind == "percentile":
        lo, hi = (float(v) for v in np.percentile(s, [spec.get("lower", 0.5), spec.get("upper", 99.5)]))
    else:
        lo, hi = (float(v) for v in np.percentile(s, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def to_rgb8(img: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W, C) of any dtype → uint8 RGB, ``window`` (default: 1-99 percentile) mapped to black-white."""
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    a = a[..., :1].repeat(3, axis=-1) if a.shape[-1] < 3 else a[..., :3]
    lo, hi = window if window is not None else window_for(a)
    if a.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return np.ascontiguousarray(a)
    f = (a.astype(np.float32) - lo) / (hi - lo)
    return (np.clip(np.nan_to_num(f), 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- geometry


def _display_size(h: int, w: int, spacing: Sequence[float] | None, max_side: int, min_side: int
                  ) -> tuple[int, int, int]:
    """(block factor, rows, cols): shrink by an integer block factor, then fit the physical aspect ratio."""
    f = max(1, math.ceil(max(h, w) / max_side))
    bh, bw = math.ceil(h / f), math.ceil(w / f)
    ry = rx = 1.0
    if spacing is not None and len(spacing) >= 2 and min(spacing[-2:]) > 0:
        sy, sx = float(spacing[-2]), float(spacing[-1])
        ry, rx = sy / min(sy, sx), sx / min(sy, sx)
        if max(ry, rx) > 10:  # a nonsense spacing should not produce a 1-pixel-wide picture
            ry = rx = 1.0
    ph, pw = bh * ry, bw * rx
    s = 1.0
    if max(ph, pw) > max_side:
        s = max_side / max(ph, pw)
    elif max(ph, pw) < min_side:
        s = min_side / max(ph, pw)
        if ry == rx:
            s = float(max(1, math.floor(s)))  # integer enlargement keeps pixels square and crisp
    return f, max(1, round(ph * s)), max(1, round(pw * s))


def _block_mean(img: np.ndarray, f: int, band: int = 64) -> np.ndarray:
    """(H, W, C) → (ceil(H/f), ceil(W/f), C) box-filter means, row band by row band (uint8 stays uint8:
    Pillow's reduce has already rounded, and :func:`to_rgb8` then passes a 0-255 window through untouched)."""
    if f == 1:
        return img
    h, w, c = img.shape
    bh, bw = math.ceil(h / f), math.ceil(w / f)
    if img.dtype == np.uint8 and c in (1, 3):  # Pillow's box reduce in C: 10x faster than the float means below
        # lazy: Pillow loads only where a picture is read or written
        from PIL import Image

        src = Image.fromarray(np.ascontiguousarray(img[..., 0] if c == 1 else img))
        small = np.asarray(src.reduce(f))
        return small[..., None] if c == 1 else small
    out = np.empty((bh, bw, c), np.float32)
    for b0 in range(0, bh, band):
        b1 = min(bh, b0 + band)
        part = np.asarray(img[b0 * f: b1 * f], dtype=np.float32)
        part = np.pad(part, ((0, (b1 - b0) * f - part.shape[0]), (0, bw * f - w), (0, 0)), mode="edge")
        out[b0:b1] = part.reshape(b1 - b0, f, bw, f, c).mean(axis=(1, 3))
    return out


def _block_labels(labels: np.ndarray, f: int, band: int = 64) -> np.ndarray:
    """Downscale class ids by ``f``: each block takes its most frequent foreground class when that class
    covers at least a quarter of the block, so a thin vessel survives where nearest sampling breaks it."""
    if f == 1:
        return labels
    h, w = labels.shape
    bh, bw = math.ceil(h / f), math.ceil(w / f)
    present = [c for c in np.flatnonzero(label_counts(labels)) if c > 0]
    out = np.zeros((bh, bw), np.uint8)
    if labels.ndim == 2 and labels.size <= 64 << 20:  # Pillow's box reduce of each class's 0/255 mask: ~10x faster
        # lazy: Pillow loads only where a picture is read or written
        from PIL import Image

        best = np.zeros((bh, bw), np.uint8)
        for c in present:
            mask = np.multiply(labels == c, 255, dtype=np.uint8)  # no int64 temporary: 8x less memory traffic
            share = np.asarray(Image.fromarray(mask).reduce(f))[:bh, :bw]  # rounded means of 0/255
            win = share >= 64  # at least a quarter of the block (63.75 rounds up)
            if len(present) > 1:
                win &= share > best
                best = np.where(win, share, best)
            out[win] = c
        return out
    for b0 in range(0, bh, band):
        b1 = min(bh, b0 + band)
        part = labels[b0 * f: b1 * f]
        part = np.pad(part, ((0, (b1 - b0) * f - part.shape[0]), (0, bw * f - w)))
        part = part.reshape(b1 - b0, f, bw, f)
        best = np.zeros((b1 - b0, bw), np.int64)
        for c in present:
            n = (part == c).sum(axis=(1, 3))
            win = (n > best) & (4 * n >= f * f)
            out[b0:b1][win] = c
            best = np.maximum(best, np.where(win, n, best))
    return out


def _nearest(a: np.ndarray, oh: int, ow: int) -> np.ndarray:
    h, w = a.shape[:2]
    if (h, w) == (oh, ow):
        return a
    ys = np.minimum((np.arange(oh) * h) // oh, h - 1)
    xs = np.minimum((np.arange(ow) * w) // ow, w - 1)
    return a[ys][:, xs]


#: Below this many class ids a uint8 mask is counted class by class instead of by bincount.
FEW_CLASSES = 8


def label_counts(labels: np.ndarray) -> np.ndarray:
    """Pixels per class id, without materialising an int64 copy of a large mask."""
    counts = np.zeros(256, np.int64)
    flat = np.asarray(labels).reshape(-1)
    top = int(flat.max(initial=0)) if flat.dtype == np.uint8 else 256
    if top < FEW_CLASSES:  # one count_nonzero pass per class: 0.2 ms a photo against bincount's 2.5 ms
        for c in range(1, top + 1):
            counts[c] = np.count_nonzero(flat == c)
        counts[0] = flat.size - counts[1:].sum()
        return counts
    step = 1 << 22  # bincount's int64 copy of 4 M pixels at a time (32 MB); per row was 3 ms a photo
    for i in range(0, flat.size, step):
        part = flat[i:i + step]
        if part.dtype != np.uint8:
            part = np.clip(part, 0, 255).astype(np.uint8)
        counts += np.bincount(part, minlength=256)[:256]
    return counts


def edges(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Inner boundary band of ``mask`` (``thickness`` px); the image border is not an edge.

    ``thickness`` erosions by the 4-neighbour cross, outside the image counted as inside (scipy's
    ``binary_erosion(iterations=t, border_value=1)``), done with shifted views: 10x faster on preview-sized
    planes, where scipy's call overhead dominated."""
    if not mask.any():
        return mask
    inner = np.asarray(mask, dtype=bool).copy()
    for _ in range(thickness):
        er = inner.copy()
        er[1:] &= inner[:-1]
        er[:-1] &= inner[1:]
        er[:, 1:] &= inner[:, :-1]
        er[:, :-1] &= inner[:, 1:]
        inner = er
    return mask & ~inner


def contour_width(oh: int, ow: int) -> int:
    return 2 if max(oh, ow) >= 400 else 1


# ------------------------------------------------------------------------------------------- drawing


def blend(rgb: np.ndarray, mask: np.ndarray, colour: Sequence[int], alpha: float) -> None:
    """``rgb`` (uint8) mixed with ``colour`` at opacity ``alpha`` where ``mask``, in place (in 1/256 steps,
    rounded: 16-bit integer arithmetic, 3x faster than float32 on a preview)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1  # the mask's box: often a fraction
    box, m = rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    a = int(round(alpha * 256))
    mixed = box.astype(np.uint16)
    mixed *= 256 - a
    mixed += (np.asarray(colour, np.uint16) * a + 128)
    mixed >>= 8
    np.copyto(box, mixed, where=m[..., None], casting="unsafe")


def paint_labels(rgb: np.ndarray, lab: np.ndarray, alpha: float = FILL_ALPHA) -> None:
    """Fill each class lightly and trace its contour at full opacity, in place, on display-sized arrays."""
    t = contour_width(*lab.shape)
    present = np.flatnonzero(label_counts(lab)) if lab.dtype == np.uint8 else np.unique(lab)
    for c in present:  # label_counts: a few count_nonzero passes where np.unique sorted the plane
        if c == 0:
            continue
        m = lab == c
        edge = edges(m, t)
        col = class_colour(int(c))
        blend(rgb, m & ~edge, col, alpha)
        rgb[edge] = col


def draw_plane(img: np.ndarray, labels: np.ndarray, spacing: Sequence[float] | None, max_side: int, min_side: int,
           window: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """An input plane and its labels at display size (RGB uint8, class ids)."""
    h, w = labels.shape
    f, oh, ow = _display_size(h, w, spacing, max_side, min_side)
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    win = window if window is not None else window_for(arr)
    if f > 1:
        small = _block_mean(arr[..., : min(3, arr.shape[-1])], f)
        rgb = to_rgb8(small, win)
    else:
        rgb = to_rgb8(arr, win)
    lab = _block_labels(np.asarray(labels), f) if f > 1 else np.asarray(labels)
    out = _nearest(rgb, oh, ow)
    if np.shares_memory(out, arr) or not out.flags.writeable or not out.flags.c_contiguous:
        out = np.array(out, order="C")  # painted next: never the caller's (maybe read-only) pixels
    return out, _nearest(lab, oh, ow)


@functools.lru_cache(maxsize=16)
def _font(size: int):
    """Pillow's bundled font at ``size`` (loaded once per size: a FreeType load is ~2 ms, a preview draws
    a dozen strings)."""
    # lazy: Pillow loads only where a picture is read or written
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


# Glyphs Pillow's bundled font lacks: drawn as a raised small digit, or replaced.
_SUPERSCRIPTS = {"²": "2", "³": "3"}
_REPLACE = {"×": "x", "–": "-", "—": "-", "μ": "u"}


def _segments(text: str) -> list[tuple[str, bool]]:
    """``text`` as (run, superscript) pieces the default font can draw."""
    out: list[tuple[str, bool]] = []
    for ch in text:
        sup = ch in _SUPERSCRIPTS
        ch = _SUPERSCRIPTS.get(ch, _REPLACE.get(ch, ch))
        if out and out[-1][1] == sup:
            out[-1] = (out[-1][0] + ch, sup)
        else:
            out.append((ch, sup))
    return out


def _sup_font(font):
    size = getattr(font, "size", None)
    return _font(max(8, int(size * 0.62))) if size else font


@functools.lru_cache(maxsize=4096)
def _glyph(ch: str, font) -> tuple[np.ndarray, int, int, float]:
    """One character rendered once per font: its coverage (uint8), the offset of its corner from the pen
    position, and its advance. Text is put together from these, because a batch's titles (one file name
    each) missed any cache of whole strings and FreeType's rendering and measuring of them was most of a
    compact preview's text cost."""
    # lazy: Pillow loads only where a picture is drawn
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(ch)
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    if ch.strip():
        ImageDraw.Draw(mask).text((-left, -top), ch, fill=255, font=font)
    return np.asarray(mask), left, top, float(font.getlength(ch))


def _pen(run: str, font) -> list[float]:
    """Pen positions before each character of ``run`` and after the last (advances summed, no kerning)."""
    xs = [0.0]
    for ch in run:
        xs.append(xs[-1] + _glyph(ch, font)[3])
    return xs


def _run_w(run: str, font) -> int:
    """Width of one run in ``font``: the sum of its glyphs' advances, as :func:`_run_mask` draws it."""
    return int(_pen(run, font)[-1])


def _text_w(draw, text: str, font) -> int:
    w = 0
    for run, sup in _segments(text):
        w += _run_w(run, _sup_font(font) if sup else font)
    return w


@functools.lru_cache(maxsize=1024)
def _run_mask(run: str, font) -> tuple[Any, tuple[int, int]]:
    """``run`` as one coverage mask ('L') from its cached glyphs, and the offset of its corner from the
    text anchor (the same notes, banners and class names come back preview after preview)."""
    # lazy: Pillow loads only where a picture is drawn
    from PIL import Image

    xs = _pen(run, font)
    parts = [(_glyph(ch, font), int(round(x))) for ch, x in zip(run, xs, strict=False) if ch.strip()]
    if not parts:
        return Image.new("L", (1, 1), 0), (0, 0)
    x0 = min(x + g[1] for g, x in parts)
    y0 = min(g[2] for g, _ in parts)
    x1 = max(x + g[1] + g[0].shape[1] for g, x in parts)
    y1 = max(g[2] + g[0].shape[0] for g, _ in parts)
    out = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for (cov, left, top, _), x in parts:
        ys, xs_ = top - y0, x + left - x0
        view = out[ys: ys + cov.shape[0], xs_: xs_ + cov.shape[1]]
        np.maximum(view, cov, out=view)
    return Image.fromarray(out), (x0, y0)


def _draw_text(draw, xy: tuple[int, int], text: str, font, fill) -> None:
    """Draw ``text`` with superscripts raised, left-top anchored at ``xy`` (each run's coverage pasted in
    ``fill``, which blends as Pillow's own text drawing does)."""
    x, y = xy
    canvas = draw._image
    for run, sup in _segments(text):
        f = _sup_font(font) if sup else font
        if run.strip():
            mask, (dx, dy) = _run_mask(run, f)
            canvas.paste(tuple(fill), (x + dx, y - (2 if sup else 0) + dy), mask)
        x += _run_w(run, f)


def _fit_text(draw, text: str, font, width: int) -> str:
    if _text_w(draw, text, font) <= width:
        return text
    while len(text) > 1 and _text_w(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _fmt(v: float, unit: str) -> str:
    if v == 0:
        return f"0 {unit}"
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}"
    if abs(v) >= 10:
        return f"{v:.1f} {unit}"
    if abs(v) >= 0.01:
        return f"{v:.2f} {unit}"
    return f"{v:.2g} {unit}"


def amount_text(n: int, total: int, spacing: Sequence[float] | None, ndim: int) -> str:
    """Area (2D) or volume (3D) of ``n`` pixels, in physical units when the spacing is known."""
    unit = float(np.prod(spacing[-ndim:])) if spacing is not None and len(spacing) >= ndim else None
    if unit is not None and unit > 0 and ndim == 3:
        return _fmt(n * unit / 1000.0, "mL")
    pct = 100.0 * n / total if total else 0.0
    share = "" if n == 0 else (f" ({pct:.1f} %)" if pct >= 0.1 else " (<0.1 %)")
    if unit is not None and unit > 0:
        return _fmt(n * unit, "mm²") + share
    return f"{n:,} {'voxels' if ndim == 3 else 'px'}{share}"


def legend_entries(labels: np.ndarray, classes: Sequence[str] | None, spacing: Sequence[float] | None) -> list[LegendEntry]:
    counts = label_counts(labels)
    present = [int(c) for c in np.flatnonzero(counts) if c > 0]
    ids = sorted(set(range(1, len(classes))) | set(present)) if classes else present
    out = []
    for c in ids:
        name = classes[c] if classes and c < len(classes) else f"class {c}"
        n = int(counts[c]) if c < len(counts) else 0
        out.append(LegendEntry(c, name, class_colour(c), amount_text(n, labels.size, spacing, labels.ndim), n))
    return out


def compose(panels: list[tuple[np.ndarray, str, str, tuple[int, int], int | None]], title: str,
            entries: list[LegendEntry], notes: Sequence[str] = (), banner_on: Sequence[int] = (),
            banner: str = "", subtitle: str = "") -> tuple[Any, list[Panel], tuple[int, int, int, int], list[str]]:
    """Lay panels out in a row under a title bar, captions above each, legend below; returns the picture (a
    Pillow image: it is saved as it is, without a round trip through numpy) etc.

    ``panels`` are (rgb, kind, caption, source_shape, z). ``banner`` is written centred on the panels whose
    indices are in ``banner_on`` (e.g. "nothing found").
    """
    # lazy: Pillow loads only where a picture is read or written
    from PIL import Image, ImageDraw

    width = sum(p[0].shape[1] for p in panels) + GAP * (len(panels) + 1)
    width = max(width, 480)
    fs = int(min(22, max(14, round(width / 75))))
    font, small = _font(fs), _font(max(12, fs - 2))
    line = fs + 8
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    texts: list[str] = []

    shown = entries if len(entries) <= MAX_LEGEND else entries[: MAX_LEGEND - 1]
    if len(shown) < len(entries):
        notes = [f"and {len(entries) - len(shown)} more classes", *notes]
    rows = _legend_rows(probe, [(e.colour, f"{e.name}  {e.amount}") for e in shown], font, fs, width)
    note_lines = [_fit_text(probe, n, small, width - 2 * GAP) for n in notes]
    legend_h = GAP + line * (len([r for r in rows if r]) + len(note_lines)) + GAP // 2
    has_caps = any(p[2] for p in panels)
    cap_h = line if has_caps else 0
    title_h = line + 8 + (line - 4 if subtitle else 0)
    panel_h = max(p[0].shape[0] for p in panels)
    height = title_h + cap_h + panel_h + GAP + legend_h
    canvas = np.empty((height, width, 3), np.uint8)
    row = np.empty((width, 3), np.uint8)
    row[:] = BG
    canvas[:] = row  # row by row: broadcasting the 3-tuple to every pixel took 1.3 ms, a third of a preview
    placed = _place_panels(canvas, panels, width, title_h + cap_h, banner_on, line)

    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    t = _fit_text(draw, title, font, width - 2 * GAP)
    _draw_text(draw, (GAP, 6), t, font, FG_TEXT)
    texts.append(t)
    if subtitle:
        s = _fit_text(draw, subtitle, small, width - 2 * GAP)
        _draw_text(draw, (GAP, 6 + line), s, small, DIM_TEXT)
        texts.append(s)
    for p in placed:
        if p.caption:
            x0, py0, x1, _ = p.box
            c = _fit_text(draw, p.caption, small, x1 - x0)
            _draw_text(draw, (x0, py0 - cap_h + 3), c, small, FG_TEXT)
            texts.append(c)
    for i in banner_on:
        x0, py0, x1, py1 = placed[i].box
        b = _fit_text(draw, banner, font, x1 - x0 - 4)
        draw.text(((x0 + x1) // 2, (py0 + py1) // 2), b, fill=(255, 255, 255), font=font, anchor="mm")
        texts.append(b)
    ly = title_h + cap_h + panel_h + GAP
    legend_box = (0, ly, width, height)
    texts += _draw_legend(draw, rows, note_lines, ly + 2, font, small, fs)
    return im, placed, legend_box, texts


def _legend_rows(probe: Any, items: list[tuple[Any, str]], font: Any, fs: int, width: int) -> list[list[tuple[Any, str, int]]]:
    """Legend lines: [swatch] name  amount, flowing and wrapping to the canvas width."""
    sw = fs
    rows: list[list[tuple[Any, str, int]]] = [[]]
    x = GAP
    for colour, text in items:
        text = _fit_text(probe, text, font, width - 2 * GAP - sw - 8)
        wi = sw + 6 + _text_w(probe, text, font)
        if rows[-1] and x + wi > width - GAP:
            rows.append([])
            x = GAP
        rows[-1].append((colour, text, wi))
        x += wi + 3 * fs // 2
    return rows


def _place_panels(canvas: np.ndarray, panels: list[tuple[np.ndarray, str, str, tuple[int, int], int | None]],
                  width: int, y0: int, banner_on: Sequence[int], line: int) -> list[Panel]:
    """Copy the panels into the canvas, centred in a row, and darken a band behind each banner."""
    placed: list[Panel] = []
    x = GAP + (width - (sum(p[0].shape[1] for p in panels) + GAP * (len(panels) + 1))) // 2
    for rgb, kind, caption, shape, z in panels:
        ph, pw = rgb.shape[:2]
        canvas[y0: y0 + ph, x: x + pw] = rgb
        placed.append(Panel(kind, (x, y0, x + pw, y0 + ph), shape, z, caption))
        x += pw + GAP
    for i in banner_on:  # darken a band behind the banner text
        x0, py0, x1, py1 = placed[i].box
        cy = (py0 + py1) // 2
        b0, b1 = max(py0, cy - line // 2 - 4), min(py1, cy + line // 2 + 4)
        canvas[b0:b1, x0:x1] = (canvas[b0:b1, x0:x1].astype(np.uint16) * 2 // 5).astype(np.uint8)
    return placed


def _draw_legend(draw: Any, rows: list[list[tuple[Any, str, int]]], note_lines: list[str], y: int, font: Any,
                 small: Any, fs: int) -> list[str]:
    """Draw the legend rows (swatch and text) and the notes from ``y`` down; returns the texts drawn."""
    line, sw = fs + 8, fs
    texts = []
    for row in rows:
        if not row:
            continue
        x = GAP
        for colour, text, wi in row:
            top = y + (line - sw) // 2 - 2
            draw.rectangle((x, top, x + sw - 1, top + sw - 1), fill=tuple(colour))
            _draw_text(draw, (x + sw + 6, y), text, font, FG_TEXT)
            texts.append(text)
            x += wi + 3 * fs // 2
        y += line
    for n in note_lines:
        _draw_text(draw, (GAP, y + 2), n, small, DIM_TEXT)
        texts.append(n)
        y += line
    return texts


# ------------------------------------------------------------------------------------------- previews
