"""napari writer contribution: File → Save Layers writes a labels layer to a label TIFF.

The same code as Plugins → MedSeg → Export labels: a name ending in ``.ome.tif`` gets an OME-TIFF
with a pyramid, any other a plain tiled label TIFF. napari's save dialog has already asked before
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
    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        target = target.with_name(target.name + ".tif")
    request = ExportRequest(source_from_layer_data(data, meta), target, format_for_path(target),
                            overwrite=True)
    result = drain(export_job(request))
    for message in result.warnings:
        warnings.warn(f"MedSeg: {message}", UserWarning, stacklevel=2)
    return [str(result.path)]
