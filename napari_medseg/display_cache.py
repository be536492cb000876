"""In-memory copies of the small-chunk pyramid levels napari shows of a run (Qt-free).

An output store's level ``l`` is chunked by ``chunk >> l`` (so parallel workers never share a
chunk, see :mod:`napari_medseg.core.store`): the coarse levels napari shows when a whole huge
image is in view hold 16-64 pixel chunks, and showing one of them reads about a thousand chunk
files, 0.2-0.6 s on the GUI thread, at every refresh during a run. A :class:`MirroredLevel` keeps
such a level in memory instead and re-reads only the chunks a block written since has changed:

- chunks whose level-0 cell the store has not written yet (its ``_progress`` grid) are known to
  hold the fill value (0) and are never read;
- other chunks are read on first display, as one rectangle;
- :meth:`MirroredLevel.invalidate` marks a level-0 region stale (the widget calls it for every
  block the worker reports), so the next display re-reads just those chunks.

Level 0 is never mirrored (the instance step may write level-0 labels around a block) and nor is
a level larger than :data:`MIRROR_MAX_BYTES`: its chunks are large enough to read directly.
"""
from __future__ import annotations

import threading

import numpy as np

MIRROR_MAX_CHUNK = 64             # mirror levels whose chunk edge is at most this (pixels)
MIRROR_MAX_BYTES = 16 << 20       # ... and whose one-channel copy fits in this many bytes


def should_mirror(array, level: int) -> bool:
    """Whether level ``level`` of a store pyramid (zarr array ``([k,] H, W)``) is worth mirroring."""
    height, width = array.shape[-2:]
    small_chunks = int(array.chunks[-1]) <= MIRROR_MAX_CHUNK
    return level > 0 and small_chunks and height * width * np.dtype(array.dtype).itemsize <= MIRROR_MAX_BYTES


class MirroredLevel:
    """``(H, W)`` in-memory copy of one channel of a pyramid level, read from zarr lazily.

    Implements napari's array protocol (``shape``, ``dtype``, ``ndim``, ``size``, ``__getitem__``)
    in the level's stored dtype; thread-safe (napari may slice on another thread).

    Args:
        array: zarr array ``(k, H, W)`` (with ``channel``) or ``(H, W)`` (``channel=None``).
        channel: channel index of a map, None for labels.
        written: ``(ceil(H / c), ceil(W / c)) bool`` chunks the store has written (its progress
            grid for the stage that writes this array), or None when unknown (read everything).
    """

    def __init__(self, array, channel: int | None = None, written: np.ndarray | None = None):
        self.array = array
        self.channel = channel
        self.shape = tuple(int(n) for n in array.shape[-2:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = 2
        self.size = self.shape[0] * self.shape[1]
        self.chunk = int(array.chunks[-1])
        self.data = np.zeros(self.shape, dtype=self.dtype)
        grid = tuple(-(-n // self.chunk) for n in self.shape)
        self.fresh = np.zeros(grid, dtype=bool)              # True: self.data holds the stored chunk
        if written is not None and tuple(written.shape) == grid:
            self.fresh = ~np.asarray(written, dtype=bool)      # unwritten chunks hold the fill value
        self._lock = threading.Lock()

    def invalidate(self, cells: tuple[int, int, int, int] | None = None) -> None:
        """Mark chunks stale: ``(cy0, cy1, cx0, cx1)`` of the chunk grid (the same grid as level 0's),
        or every chunk (None)."""
        with self._lock:
            if cells is None:
                self.fresh[...] = False
            else:
                cy0, cy1, cx0, cx1 = cells
                self.fresh[cy0:cy1, cx0:cx1] = False

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = _yx_slices(key, self.shape)
        c = self.chunk
        with self._lock:
            cy0, cy1 = rows.start // c, -(-rows.stop // c)
            cx0, cx1 = cols.start // c, -(-cols.stop // c)
            stale = ~self.fresh[cy0:cy1, cx0:cx1]
            if stale.any():
                ys, xs = np.nonzero(stale)
                by0, by1 = (cy0 + ys.min()) * c, min(self.shape[0], (cy0 + ys.max() + 1) * c)
                bx0, bx1 = (cx0 + xs.min()) * c, min(self.shape[1], (cx0 + xs.max() + 1) * c)
                lead = () if self.channel is None else (self.channel,)
                self.data[by0:by1, bx0:bx1] = self.array[(*lead, slice(by0, by1), slice(bx0, bx1))]
                self.fresh[by0 // c:-(-by1 // c), bx0 // c:-(-bx1 // c)] = True
            return self.data[key].copy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[...]
        return data.astype(dtype) if dtype is not None else data

    def __repr__(self) -> str:
        return f"MirroredLevel({self.array.path!r}, channel={self.channel}, shape={self.shape})"


def _yx_slices(key, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The bounding row and column ranges (step 1) a NumPy basic index of a 2-D array touches."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (2 - len(key) + 1) + key[at + 1:]
    key = tuple(key) + (slice(None),) * (2 - len(key))
    bounds = []
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step < 0:
                start, stop = stop + 1, start + 1
            bounds.append(slice(max(0, start), max(max(0, start), min(n, stop))))
        else:
            i = int(k) % n
            bounds.append(slice(i, i + 1))
    return bounds[0], bounds[1]


def region_cells(region: tuple[int, int, int, int], chunk: int) -> tuple[int, int, int, int]:
    """The level-0 chunk cells ``(cy0, cy1, cx0, cx1)`` a level-0 pixel region touches."""
    y0, y1, x0, x1 = region
    return y0 // chunk, -(-y1 // chunk), x0 // chunk, -(-x1 // chunk)


def invalidate_layer(layer, region: tuple[int, int, int, int] | None = None) -> None:
    """Mark what a run's layer mirrors of a level-0 region (or of everything) stale, so napari's
    next refresh re-reads it from the store. Layers without mirrored levels are left alone."""
    data = layer.data
    levels = list(data) if getattr(layer, "multiscale", False) else [data]
    chunk = (layer.metadata.get("medseg") or {}).get("chunk")
    for level in levels:
        mirror = getattr(level, "mirror", level)
        if isinstance(mirror, MirroredLevel):
            mirror.invalidate(None if region is None or chunk is None else region_cells(region, chunk))
