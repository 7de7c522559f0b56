"""What one input needs from its header alone, before any pixel is read (issue 28).

Two checks ask here. The whole run's (:func:`header_need`, from :func:`segcli.batch.check_some_file_fits`): when
no input can fit ``--max-memory``, the run is refused (exit 2) before any work. Each file's own (the pipeline,
as it opens a file): one that cannot fit is refused alone (exit 1) and the batch goes on.

* photos and volumes bring their decoded buffers (:func:`segcli.memory.estimate_2d`, ``estimate_volume``);
* a TIFF too big to hold (or to fit the budget) is read by region (:func:`wants_tiles`); so are OpenSlide's
  formats. Such a slide brings, beyond the plan's working set, only its rough map, dense over the rough
  grid: the working set was measured with a rough grid of :data:`GRID_ROUGH_PIXELS`, so a slide whose rough
  grid is larger needs the difference (:func:`bounded_own`);
* a DICOM series is sized from its files' headers, streamed when it can be, else read whole.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from segcli import io, memory, plan
from segcli.errors import SegcliError
from segcli.io.bigtiff import tiff_header, tiff_spacing
from segcli.io.dicomseries import decoded_size
from segcli.io.openslide_reader import open_plane, wants_openslide
from segcli.io.volstream import open_streamed, streamable
from segcli.methods import BOUNDED

#: Largest rough grid (pixels) of a bounded sliding run, whose rough pass only selects tissue windows.
GRID_ROUGH_PIXELS = 2048 * 2048
#: An RGB TIFF with more pixels than this as the networks see it (after the mpp rule) takes the bounded route:
#: an 8000² slide slid in memory over all 1,764 windows took 37 s and 2.29 GB; 324 held tissue (issue 28).
SLIDE_PIXELS = 16 * 2**20
#: Bytes per rough-grid pixel per class (float32 sum and probabilities, float16 map) and per pixel (weights,
#: labels, foreground, the components' int32 labels): the rough pass's dense arrays (segcli.engines.stts).
ROUGH_PER_CLASS, ROUGH_PER_PIXEL = 10, 10


def network_shape(ctx: Any, kind: str, shape: tuple[int, int], spacing: Any) -> tuple[tuple[int, int], Any]:
    """A slide's shape and pixel size as the networks see it (the mpp rule, :func:`segcli.plan.physical_factor`)."""
    bundle = ctx.bundle_for(kind)
    scale = plan.physical_factor(bundle, spacing) if kind == "slide" else None
    if scale is None:
        return (int(shape[0]), int(shape[1])), spacing
    H, W = (max(1, round(s / scale[0])) for s in shape)
    return (H, W), (float(bundle.params["training_mpp"]) / 1000.0,) * 2


def rough_floor(shape: tuple[int, int]) -> float:
    """The smallest rough factor of a bounded sliding run: its rough grid holds at most GRID_ROUGH_PIXELS."""
    return (shape[0] * shape[1] / GRID_ROUGH_PIXELS) ** 0.5


def rough_pixels(ctx: Any, kind: str, shape: tuple[int, int], spacing: Any) -> int:
    """Pixels of the rough grid the bounded route makes for a slide of ``shape`` (at the networks' scale)."""
    bundle = ctx.bundle_for(kind)
    run, extra = plan.bounded_variant(ctx.plan_for(bundle))
    f = plan.scale_rule(bundle, ctx.options, shape, spacing)["max_downscale"]
    if extra.get("crop_mode") == "grid":
        f = max(f or 1.0, rough_floor(shape))
    if f is None or max(shape) / run.size <= f:  # one S x S rough pass
        return int(run.size) ** 2
    return math.ceil(shape[0] / f) * math.ceil(shape[1] / f)


def bounded_own(ctx: Any, kind: str, shape: tuple[int, int], spacing: Any) -> int:
    """What a slide read by region brings beyond the plan's working set: its rough map past GRID_ROUGH_PIXELS."""
    k = ctx.bundle_for(kind).n_classes
    extra = rough_pixels(ctx, kind, shape, spacing) - GRID_ROUGH_PIXELS
    return max(0, extra) * (ROUGH_PER_CLASS * k + ROUGH_PER_PIXEL)


def check_bounded(ctx: Any, kind: str, shape: tuple[int, int], spacing: Any, path: Path) -> None:
    """Refuse, before its rough pass, a slide whose rough map does not fit the budget (exit 1 for the file)."""
    net, sp = network_shape(ctx, kind, shape, spacing)
    own = bounded_own(ctx, kind, net, sp)
    if own:
        memory.check_file(ctx, kind, own, path, f"the rough pass over this {shape[0]}x{shape[1]} slide",
                          "give --max-downscale a larger factor (a coarser rough pass)")


def wants_tiles(ctx: Any, path: Path, out: Path, kind: str, head: tuple) -> bool:
    """True when this TIFF must not be decoded whole (size or budget), from its header alone.

    Also refuses, before decoding, a whole-image method whose in-memory peak would not fit.
    """
    (H, W), channels, itemsize = head
    p = ctx.plan_for(ctx.bundle_for(kind))
    (H, W), _ = network_shape(ctx, kind, (H, W), tiff_spacing(path))
    tif_out = out.name.lower().endswith((".tif", ".tiff"))
    if kind == "slide" and p.method in BOUNDED and H * W > SLIDE_PIXELS and tif_out:
        return True  # a slide, resampled or not: tissue windows only, never glass, in bounded memory
    est = memory.image_bytes(ctx, kind, (H, W), channels, itemsize, return_probs=False)
    if ctx.options.lazy_pixels >= H * W and memory.fits(ctx, kind, est):
        return False
    if p.method not in BOUNDED:
        memory.check_file(ctx, kind, est, path, f"--method {p.method} on this {H}x{W} image",
                          "use --method stts, which reads only a rough view and the crops")
        return False
    if tif_out:
        return True
    memory.check_file(ctx, kind, est, path, f"writing this {H}x{W} mask as {out.suffix}",
                      "write it as .tif (streamed, tiled) instead")
    return False


def _slide_need(seg: Any, path: Path, out: Path, vendor: bool) -> tuple[str, int, str] | None:
    """A TIFF's or an OpenSlide slide's need, on the route :func:`wants_tiles` (or OpenSlide) would take."""
    if vendor:
        try:  # OpenSlide reads its headers only when it opens a slide
            with open_plane(path, spec={"kind": "dtype"}) as plane:
                head, spacing = (plane.shape, 3, 1), plane.spacing
        except (SegcliError, OSError):
            return None
    else:
        head, spacing = tiff_header(path), tiff_spacing(path)
    if head is None or min(head[0]) < 2:
        return None
    kind = "slide" if vendor or head[1] in (3, 4) else "2d"
    try:
        bounded = vendor or wants_tiles(seg, path, out, kind, head)
    except SegcliError:  # cannot fit in memory, and no bounded route for it: its in-memory need
        bounded = False
    H, W = head[0]
    if bounded:
        net, sp = network_shape(seg, kind, (H, W), spacing)
        return kind, bounded_own(seg, kind, net, sp), f"the rough pass over this {H}x{W} slide"
    net, _ = network_shape(seg, kind, (H, W), spacing)
    own = memory.image_bytes(seg, kind, net, head[1], head[2], return_probs=False)
    return kind, own, f"--method {seg.plan_for(seg.bundle_for(kind)).method} on this {H}x{W} image"


def _dicom_need(seg: Any, path: Path) -> tuple[str, int, str] | None:
    """A DICOM series' need from its files' headers: streamed when it can be (segcli.io.volstream), else whole."""
    try:
        vol = open_streamed(path, "dicom", seg.options.series) if seg.options.stream_volumes else None
        if vol is not None:
            shape, channels, itemsize, streamed = vol.spatial_shape, vol.channels, vol.dtype.itemsize, True
        elif (size := decoded_size(path, seg.options.volume, seg.options.series)) is not None:
            (shape, channels, itemsize), streamed = size, False
        else:
            return None
    except (SegcliError, OSError):
        return None  # the reader names the problem when the file is read
    if len(shape) != 3 or min(shape) < 2:
        return None  # one slice: a 2D image, whose bundle this run may not load
    own = memory.image_bytes(seg, "volume", tuple(shape), channels, itemsize, streamed=streamed)
    return "volume", own, f"this {'x'.join(map(str, shape))} volume"


def header_need(seg: Any, path: Path, out: Path | None = None) -> tuple[str, int, str] | None:
    """(kind, bytes the file itself brings, what it is) from its header, or None when the header does not say.

    ``out``: where its mask goes (a TIFF's route depends on it; default: a tiled .tif beside it).
    """
    if path.is_dir():
        return _dicom_need(seg, path) if io.is_dicom_series(path) else None
    vendor = wants_openslide(path)
    content = None if vendor else io.sniff_input(path)
    if vendor or content == "tiff":
        return _slide_need(seg, path, out or path.with_name(f"{path.stem}_seg.tif"), vendor)
    if content in ("png", "jpeg", "bmp"):
        # lazy: Pillow loads only where a picture is read or written
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h, bands, mode = im.width, im.height, len(im.getbands()), im.mode
        except (OSError, UnidentifiedImageError, ValueError):
            return None
        itemsize = 2 if mode.startswith("I;16") else (4 if mode in ("I", "F") else 1)
        return "2d", memory.image_bytes(seg, "2d", (h, w), bands, itemsize), f"this {h}x{w} image"
    if content in ("nrrd", "metaimage", "nifti", "nifti-gz") and (head := io.header_size(path, content)):
        shape, channels, itemsize = head
        if len(shape) != 3 or min(shape) < 2:
            return None
        streamed = seg.options.stream_volumes and streamable(path, content)
        own = memory.image_bytes(seg, "volume", shape, channels, itemsize, streamed=streamed)
        return "volume", own, f"this {'x'.join(map(str, shape))} volume"
    return None
