"""napari writer contributions: File → Save Layers writes a labels layer to a label TIFF, GeoJSON
polygons or a CSV object table.

The same code as Plugins → MedSeg → Export labels: a name ending in ``.ome.tif`` gets an OME-TIFF
with a pyramid, ``.tif`` a plain tiled label TIFF, ``.geojson`` and ``.csv`` the object exports. napari's save dialog has already asked before
replacing an existing file, so an existing file is replaced. Warnings (e.g. empty labels) are
issued as Python warnings, which napari shows as notifications.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .core.progress import drain
from .export_job import ExportRequest, export_job, format_for_path, source_from_layer_data


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write one labels layer to ``path`` (``.tif``/``.tiff``, or ``.ome.tif`` for OME-TIFF)."""
    return _write(path, data, meta, (".tif", ".tiff"))


def write_labels_geojson(path: str, data, meta: dict) -> list[str]:
    """Write one labels layer as GeoJSON polygons with measurements (QuPath opens it)."""
    return _write(path, data, meta, (".geojson",))


def write_labels_csv(path: str, data, meta: dict) -> list[str]:
    """Write one labels layer's object table (one row per object, with area and centroid) as CSV."""
    return _write(path, data, meta, (".csv",))


def _write(path: str, data, meta: dict, suffixes: tuple[str, ...]) -> list[str]:
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        target = target.with_name(target.name + suffixes[0])
    request = ExportRequest(source_from_layer_data(data, meta), target, format_for_path(target),
                            overwrite=True)
    result = drain(export_job(request))
    for message in result.warnings:
        warnings.warn(f"MedSeg: {message}", UserWarning, stacklevel=3)
    return [str(result.path)]
