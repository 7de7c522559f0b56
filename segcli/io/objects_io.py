"""Writers of instance objects: QuPath detections as GeoJSON, and the per-object CSV; both streamed, atomic.

GeoJSON (``ObjectsGeoJSON``): one Feature per instance, written as soon as the object is complete (a whole
image at once, or a slide tile by tile), with ``"objectType": "detection"``, the class as QuPath's
``classification``, the measurements as QuPath's ``measurements`` map and the instance id (the value in
``NAME_instances.tif``) in ``metadata``. Geometry is in level-0 pixel coordinates, pixel edges on integers,
as :mod:`segcli.io.geojson` writes them. The file is written under a hidden partial name and renamed when
:meth:`close` succeeds; :meth:`abort` deletes it.
"""

from __future__ import annotations

import csv
import json
import secrets
from pathlib import Path
from typing import Any

from segcli.io.atomic import StreamedText
from segcli.io.geojson import default_colours


class ObjectsGeoJSON(StreamedText):
    """A FeatureCollection of instance detections, one :meth:`add` per object."""

    def __init__(self, path: Path | str, classes: list[str]) -> None:
        super().__init__(path)
        self.classes = list(classes)
        colours = default_colours(self.classes)
        self._cls = [
            json.dumps({"name": n, "color": colours.get(n, [255, 0, 0])}, ensure_ascii=False, separators=(",", ":"))
            for n in self.classes]
        r = secrets.token_hex(10)
        self._uid = f"{r[:8]}-{r[8:12]}-4{r[12:15]}-{'89ab'[int(r[15], 16) & 3]}{r[16:19]}-"
        self.n = 0
        self._fh.write('{"type":"FeatureCollection","features":[\n')

    def add(self, obj_id: int, cls: int, geometry: tuple[str, str], measurements: dict[str, float]) -> None:
        """One detection: ``geometry`` = (type, coordinates as JSON text) from :func:`segcli.objects.outlines`."""
        kind, coords = geometry
        name = self._cls[cls] if 0 <= cls < len(self._cls) else json.dumps({"name": f"class {cls}"})
        meas = json.dumps(measurements, ensure_ascii=False, separators=(",", ":"))
        sep = ",\n" if self.n else ""
        self._fh.write(f'{sep}{{"type":"Feature","id":"{self._uid}{self.n:012x}",'
                       f'"geometry":{{"type":"{kind}","coordinates":{coords}}},'
                       f'"properties":{{"objectType":"detection","classification":{name},'
                       f'"measurements":{meas},"metadata":{{"instance":"{int(obj_id)}"}}}}}}')
        self.n += 1

    def close(self) -> dict[str, Any]:
        self._finish("\n]}\n")
        return {"path": str(self.path), "features": self.n, "objects": "instances"}


class ObjectsCSV(StreamedText):
    """The per-object CSV: one row per instance (columns: :data:`segcli.objects.CSV_FIELDS`)."""

    def __init__(self, path: Path | str, fields: list[str], input_name: str) -> None:
        super().__init__(path)
        self.input_name = input_name
        self.n = 0
        self._w = csv.DictWriter(self._fh, fieldnames=fields, lineterminator="\n")
        self._w.writeheader()

    def add(self, row: dict[str, Any], class_name: str) -> None:
        r = {k: ("" if v is None else v) for k, v in row.items()}
        r["class"], r["input"] = class_name, self.input_name
        self._w.writerow(r)
        self.n += 1

    def close(self) -> dict[str, Any]:
        self._finish()
        return {"path": str(self.path), "rows": self.n}
