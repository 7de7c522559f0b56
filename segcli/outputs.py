"""What a run writes for one input, and where: the mask's name, the files beside it, DICOM SEG and GeoJSON
specifics. The pipeline, the batch checks (overwrite, output formats) and ``--skip-existing`` all ask here,
so they always agree on the same names.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segcli import __version__, io
from segcli.errors import SegcliError
from segcli.inferer import RunContext
from segcli.instances import split_instances
from segcli.io import dicomseg
from segcli.io.atomic import split_extension
from segcli.io.dicomframes import frame_planes, multiframe_seg_refusal
from segcli.io.naming import (
    geojson_path,
    instances_path,
    objects_path,
    preview_path,
    probabilities_path,
    with_extension,
)
from segcli.io.tiff import write_pages
from segcli.job import Job
from segcli.objects import ObjectSink, describe, is_he

if TYPE_CHECKING:
    from segcli.bundle import Bundle



def plan_output(options: Any, path: Path, output: str | Path | None, input_root: Path | None,
                content: str | None = None) -> Path:
    """Where the mask of ``path`` goes (``io.default_output_path``, with ``.dcm`` for DICOM SEG output)."""
    if output is not None and str(output).lower().endswith(".geojson"):
        # -o slide.geojson: the objects go there, the mask beside it under the same stem
        ext = split_extension(io.default_output_path(path, None, content=content).name)[1]
        return with_extension(Path(output), ext)
    out = io.default_output_path(path, Path(output) if output is not None else None,
                                 is_dir_input_root=input_root, content=content)
    if options.output_type == "dicom-seg" and not out.name.lower().endswith(".dcm"):
        out = with_extension(out, ".dcm")
    return out


def planned_outputs(options: Any, out: Path) -> list[tuple[str, Path]]:
    """Every file a run writes for one input, named: the mask, and its GeoJSON, probabilities and preview if
    asked for."""
    files = [("mask", out)]
    if options.geojson:
        files.append(("GeoJSON", geojson_path(out)))
    if options.probabilities:
        files.append(("probabilities", probabilities_path(out)))
    if getattr(options, "instances", False):
        files.append(("instances", instances_path(out)))
        if options.stats:
            files.append(("objects", objects_path(out)))
    if options.preview:
        files.append(("preview", preview_path(out)))
    return files


#: Class names QuPath should get as detections (cells, nuclei) when the bundle does not say; others are annotations.
_DETECTION_NAMES = ("nucleus", "nuclei", "cell", "cells", "mitosis", "lymphocyte")


def detection_classes(bundle: Bundle) -> set[str]:
    """Classes written as QuPath detections: the bundle's ``geojson_detections`` param, else cell-like names."""
    named = bundle.params.get("geojson_detections")
    if named is not None:
        return set(named) & set(bundle.output_classes)
    return {c for c in bundle.output_classes[1:] if c.lower() in _DETECTION_NAMES}


def write_dicom_seg(ctx: RunContext, job: Job, file_order_labels: np.ndarray, meta: dict[str, Any]) -> None:
    """The mask as a DICOM SEG referencing the input series (file-order planes, one per source file).

    An empty mask writes no SEG: the report says so and the output field is cleared.
    """
    files = meta.get("files")
    if meta.get("source") not in ("dicom", "dicom-converted") or not files:
        raise SegcliError("DICOM SEG output needs a DICOM series as input", job.path)
    if meta.get("source") == "dicom-converted":  # one enhanced multi-frame file: back onto its frames

        if (why := multiframe_seg_refusal(files)) is not None:
            raise SegcliError(f"--output-type dicom-seg: {why}", job.path)
        file_order_labels = frame_planes(file_order_labels, meta["geometry"], files[0])
    bundle = ctx.bundle_for(getattr(job.route, "kind", "volume"))
    coarse = bundle.networks.get("coarse") or next(iter(bundle.networks.values()))
    version = str(bundle.raw.get("version") or (coarse.sha256 or "unknown")[:12])
    assert job.out is not None
    with warnings.catch_warnings(record=True) as caught:  # highdicom's remarks become one-line report warnings
        warnings.simplefilter("always")
        result = dicomseg.write_dicom_seg(job.out, file_order_labels, files, classes=bundle.output_classes,
                                          codes=bundle.codes, bundle_name=bundle.name, bundle_version=version,
                                          segcli_version=__version__)
    job.rep.warnings.extend(sorted({f"DICOM SEG: {str(w.message).split('.')[0]}" for w in caught}))
    job.rep.info["dicom_seg"] = {k: v for k, v in result.items() if k in (
        "written", "status", "segments", "frames", "compression", "transfer_syntax", "referenced_series_instance_uid",
        "sop_instance_uid", "series_instance_uid", "bytes")}
    if not result.get("written"):
        job.rep.output = None
        job.rep.warnings.append("no foreground: no DICOM SEG written")


def write_instances(ctx: RunContext, job: Job, labels: np.ndarray, img: Any, kind: str,
                    parts: np.ndarray | None = None) -> None:
    """``NAME_instances.tif``: uint32 object ids of every foreground class, touching objects split by the
    seeded watershed (:mod:`segcli.instances`), with the input's resolution tags; the count goes in the report.
    ``parts``: the network's labels of a bundle with a boundary class, whose object cores seed the split.
    With ``--geojson`` the GeoJSON holds one detection per instance, with ``--stats`` ``NAME_objects.csv``
    one row per instance (:mod:`segcli.objects`)."""
    bundle = ctx.bundle_for(kind)
    inst, how = split_instances(labels, parts, bundle)
    path = instances_path(job.out)
    write_pages(inst, img, path)
    job.rep.info["instances"] = {"path": str(path), "objects": int(inst.max(initial=0)), "split": how}
    sink = ObjectSink(bundle.output_classes, geojson_path(job.out) if ctx.options.geojson else None,
                      objects_path(job.out) if ctx.options.stats else None, input_name=str(job.rep.input))
    if not sink.wanted:
        return
    try:
        rgb = img.array if is_he(bundle, kind, img.channels) else None
        sink.add(describe(inst, labels, rgb=rgb, spacing=img.spacing, want_outlines=sink.geo is not None))
    except BaseException:
        sink.abort()
        raise
    job.rep.info.update(sink.close())
