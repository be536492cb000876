"""Bundled sample images (CC0 DSB2018 nuclei) and a generated large mosaic for tiling demos."""
from __future__ import annotations

import numpy as np
import tifffile
from skimage import io as skio

from .resources import SAMPLE_NAMES, sample_image_path, sample_labels_path


def load_sample(name: str) -> np.ndarray:
    """A bundled sample image: ``(H, W) uint8`` grey or ``(H, W, 3) uint8`` RGB."""
    return skio.imread(sample_image_path(name))


def load_sample_labels(name: str) -> np.ndarray:
    """Ground-truth instances of a bundled sample: ``(H, W) uint16``."""
    return tifffile.imread(sample_labels_path(name))


def all_samples() -> dict[str, np.ndarray]:
    """Every bundled sample by name."""
    return {name: load_sample(name) for name in SAMPLE_NAMES}


def mosaic(size: int = 8192, source: str = "fluorescence_large", chunk: int = 1024):
    """A lazy ``(size, size) uint8`` dask mosaic of flipped copies of a sample.

    Nothing is computed until read, so very large demo images cost no memory. Copies alternate
    between the four flips so that neighbouring tiles differ.
    """
    import dask.array as da

    tile = load_sample(source)
    if tile.ndim == 3:
        tile = tile.mean(axis=2).astype(np.uint8)
    variants = [tile, tile[::-1], tile[:, ::-1], tile[::-1, ::-1]]
    th, tw = tile.shape
    rows, cols = -(-size // th), -(-size // tw)
    blocks = [[da.from_array(np.ascontiguousarray(variants[(r * 3 + c) % 4]), chunks=tile.shape)
               for c in range(cols)] for r in range(rows)]
    return da.block(blocks)[:size, :size].rechunk(chunk)


def write_mosaic_zarr(path, size: int = 8192, chunk: int = 1024, source: str = "fluorescence_large"):
    """Write :func:`mosaic` to a zarr array at ``path`` (block by block; memory stays small)."""
    import zarr

    lazy = mosaic(size, source, chunk)
    out = zarr.open_array(str(path), mode="w-", shape=lazy.shape, chunks=(chunk, chunk), dtype=np.uint8)
    lazy.store(out, lock=False)
    return out
