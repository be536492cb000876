"""napari reader contribution: ``.zarr`` folders (plain or OME-Zarr) and large TIFFs, opened lazily."""
from __future__ import annotations

from pathlib import Path


def get_reader(path):
    """Return a reader for a ``.zarr`` folder or TIFF file, or None to let other readers try."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.suffix.lower() == ".zarr" and p.is_dir():
        return read_image
    if p.suffix.lower() in (".tif", ".tiff") and p.is_file():
        return read_image
    return None


def read_image(path):
    """Open ``path`` lazily as an image layer (multiscale when the file has a pyramid)."""
    from .core.io import layer_data_for_napari

    if isinstance(path, list):
        path = path[0]
    return [layer_data_for_napari(path)]
