"""napari writer contribution: File → Save Layers writes a labels layer to a label TIFF."""
from __future__ import annotations

from pathlib import Path

from .core.export import export_label_tiff
from .core.progress import drain


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write one labels layer to ``path`` (.tif) through the same code as Export labels."""
    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        target = target.with_suffix(".tif")
    scale = meta.get("scale")
    pixel_size = float(scale[-1]) if scale is not None and float(scale[-1]) != 1.0 else None
    written = drain(export_label_tiff(data, target, overwrite=True, pixel_size_um=pixel_size))
    return [str(written)]
