"""Names of the files written beside a mask: probabilities, previews.

One place decides them, so ``--skip-existing``, the preview writer and the overwrite checks agree.
"""

from __future__ import annotations

from pathlib import Path

from segcli.io.atomic import split_extension

#: Mask extension → extension of its probabilities file (PNG cannot hold float32; .nii becomes .nii.gz).
_PROBS_EXT = {".png": ".tif", ".tif": ".tif", ".tiff": ".tif", ".nii": ".nii.gz", ".nii.gz": ".nii.gz",
              ".mha": ".mha", ".nrrd": ".nrrd", ".ome.tif": ".ome.tif", ".ome.tiff": ".ome.tif",
              ".dcm": ".nii.gz"}


def probabilities_path(mask_path: Path) -> Path:
    """``NAME_probs.EXT`` beside the mask ``NAME.EXT`` (float32 class probabilities)."""
    mask_path = Path(mask_path)
    stem, ext = split_extension(mask_path.name)
    new_ext = _PROBS_EXT.get(ext)
    if new_ext is None:
        return mask_path.with_name(mask_path.name + "_probs.tif")
    return mask_path.with_name(f"{stem}_probs{new_ext}")


def with_extension(path: Path, ext: str) -> Path:
    """``path`` with its (possibly double) extension replaced by ``ext``."""
    path = Path(path)
    return path.with_name(split_extension(path.name)[0] + ext)


def geojson_path(mask_path: Path) -> Path:
    """``NAME.geojson`` beside the mask ``NAME.EXT`` (objects as polygons for QuPath)."""
    return with_extension(mask_path, ".geojson")


def instances_path(mask_path: Path) -> Path:
    """``NAME_instances.tif`` beside the mask ``NAME.EXT`` (uint32 object ids; PNG cannot hold uint32)."""
    mask_path = Path(mask_path)
    return mask_path.with_name(f"{split_extension(mask_path.name)[0]}_instances.tif")


def objects_path(mask_path: Path) -> Path:
    """``NAME_objects.csv`` beside the mask ``NAME.EXT`` (one row of measurements per instance)."""
    mask_path = Path(mask_path)
    return mask_path.with_name(f"{split_extension(mask_path.name)[0]}_objects.csv")


def preview_path(mask_path: Path) -> Path:
    """``NAME_preview.jpg`` beside the mask ``NAME.EXT`` (JPEG: a preview is looked at, not measured, and
    PNG's encoder cost a batch of photos 7 ms of its 34 ms a photo)."""
    mask_path = Path(mask_path)
    return mask_path.with_name(f"{split_extension(mask_path.name)[0]}_preview.jpg")
