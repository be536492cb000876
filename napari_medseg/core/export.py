"""Label export: tiled, compressed label TIFFs streamed tile by tile from any array (zarr included).

The whole label image is never held in memory: tiles are read one at a time and handed to
tifffile. Files are written under a temporary name in the destination folder and renamed at the
end, so a cancelled or failed export never leaves a half-written file under the final name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile

from .progress import JobGenerator, Progress

TILE = 256
BIGTIFF_THRESHOLD = 2**32 - 2**25  # bytes; leave headroom under 4 GiB for tags and offsets


class ExportError(ValueError):
    """Bad labels or destination for an export; the message says what to do."""


def label_dtype(max_label: int) -> np.dtype:
    """uint16 when the IDs fit, else uint32."""
    if max_label < 0:
        raise ExportError("labels must be non-negative integers")
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def check_labels(labels) -> None:
    """Refuse float or signed-negative labels and non-2D arrays with a clear message."""
    dtype = np.dtype(labels.dtype)
    if dtype.kind not in "ui":
        raise ExportError(f"labels must be integers, got {dtype}; convert the layer to labels first")
    if len(labels.shape) != 2:
        raise ExportError(f"expected 2D labels (H, W), got shape {tuple(labels.shape)}")


def blockwise_max(labels, block: int = 2048) -> tuple[int, int]:
    """(max, min) of a 2D array read block by block."""
    h, w = labels.shape
    high, low = 0, 0
    for y in range(0, h, block):
        for x in range(0, w, block):
            part = np.asarray(labels[y:y + block, x:x + block])
            if part.size:
                high, low = max(high, int(part.max())), min(low, int(part.min()))
    return high, low


def _tiles(labels, dtype, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of ``labels`` padded to ``tile``×``tile`` (tifffile's tile order)."""
    h, w = labels.shape
    for y in range(0, h, tile):
        band = np.asarray(labels[y:y + tile, :])
        for x in range(0, w, tile):
            out = np.zeros((tile, tile), dtype)
            part = band[:, x:x + tile]
            out[:part.shape[0], :part.shape[1]] = part
            yield out


def temporary_sibling(final: Path) -> Path:
    """A fresh hidden temporary path next to ``final`` (same filesystem, so rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def export_label_tiff(labels, path, overwrite: bool = False, pixel_size_um: float | None = None,
                      tile: int = TILE) -> JobGenerator[Path]:
    """Write labels to a tiled, zlib-compressed TIFF, tile by tile.

    Args:
        labels: ``(H, W)`` integer array-like (numpy, zarr, dask), read in bands of ``tile`` rows.
        path: destination ``.tif``.
        overwrite: replace an existing file; otherwise refuse.
        pixel_size_um: physical pixel size written as the TIFF resolution (pixels per cm).

    Yields:
        Progress per band of tiles. Returns the written path.
    """
    check_labels(labels)
    final = Path(path)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; choose another name or pass --overwrite")
    if not final.parent.is_dir():
        raise ExportError(f"folder {final.parent} does not exist")
    high, low = blockwise_max(labels)
    if low < 0:
        raise ExportError("labels contain negative values; label IDs must be ≥ 0")
    dtype = label_dtype(high)
    h, w = labels.shape
    bigtiff = h * w * dtype.itemsize > BIGTIFF_THRESHOLD
    resolution = None
    if pixel_size_um:
        resolution = (1e4 / pixel_size_um, 1e4 / pixel_size_um, "CENTIMETER")
    tmp = temporary_sibling(final)
    rows = -(-h // tile)
    try:
        tiles = _tiles(labels, dtype, tile)
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            tif.write(tiles, shape=(h, w), dtype=dtype, tile=(tile, tile), compression="zlib",
                      resolution=resolution, photometric="minisblack", metadata=None)
        yield Progress("export", rows, rows, f"wrote {final.name}")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final
