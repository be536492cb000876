"""napari reader contribution: ``.zarr`` folders (plain, OME-Zarr, MedSeg outputs) and TIFFs
(whole-slide SVS, NDPI, SCN included), lazily.

A MedSeg output store opens as its input image (when still on disk), its maps and its editable
labels; any other zarr or TIFF opens as one image layer (multiscale when it has a pyramid) with
its pixel size as scale and contrast limits from a small sample. Nothing reads the whole image.
"""
from __future__ import annotations

from pathlib import Path

ZARR_SUFFIXES = (".zarr",)
# TIFF and the whole-slide formats built on it that tifffile reads (Aperio, Hamamatsu, Leica, BigTIFF)
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".btf", ".tf8", ".tf2")


def get_reader(path):
    """Return a reader for a ``.zarr`` folder or TIFF file, or None to let other readers try."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    name = p.name.lower().rstrip("/")
    if name.endswith(ZARR_SUFFIXES) and p.is_dir():
        return read_image
    if name.endswith(TIFF_SUFFIXES) and p.is_file():
        return read_image
    return None


def read_image(path):
    """Layer data tuples for ``path`` (see the module docstring)."""
    from .layer_data import read_layers

    if isinstance(path, list):
        path = path[0]
    return read_layers(path)
