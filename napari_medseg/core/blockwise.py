"""Block-wise instance decoding of probability arrays too large for memory (zarr, dask, numpy).

Each block is decoded on block + halo with :func:`.instances._decode_parts`; the locality of that
decoding (see :mod:`.instances`) makes IDs agree across neighbouring blocks without a relabel pass.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Generator, Iterable

import numpy as np
from scipy import ndimage as ndi

from .instances import DecodeSettings, _decode_parts
from .progress import Progress

log = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), bool)

@dataclass(frozen=True)
class BlockResult:
    """What one block wrote: its index, its region ``(y0, y1, x0, x1)``, the number of objects it
    owns (anchor inside the region), the halo finally used, and whether every unit touching the
    region fitted inside the halo (False: decoded with the largest halo anyway, see
    :func:`decode_block`)."""

    index: int
    region: tuple[int, int, int, int]
    objects: int
    halo: int
    complete: bool


@dataclass(frozen=True)
class BlockwiseStats:
    """Summary of a block-wise run; :meth:`to_dict` is JSON-ready."""

    blocks: int
    objects: int
    escalated: int  # blocks that needed a larger halo than asked for
    unresolved: int  # blocks where a unit was larger than ``max_halo`` (possible seams)
    largest_halo: int

    def to_dict(self) -> dict:
        return asdict(self)


def label_dtype(shape: tuple[int, ...]) -> np.dtype:
    """Smallest unsigned dtype that holds the position-derived IDs of an ``(H, W)`` image:
    uint32 while ``H * W < 2**32`` (up to 65,535 × 65,535 pixels), uint64 beyond."""
    pixels = int(np.prod(shape[-2:], dtype=np.int64))
    return np.dtype(np.uint32 if pixels < 2 ** 32 else np.uint64)


def block_regions(shape: tuple[int, int],
                  block: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Raster-ordered ``(y0, y1, x0, x1)`` regions of an ``(H, W)`` image cut into blocks
    (the last row/column of blocks is clipped at the image edge)."""
    (height, width), (bh, bw) = shape, block
    return [(y, min(y + bh, height), x, min(x + bw, width))
            for y in range(0, height, bh) for x in range(0, width, bw)]


def _cut_units(support: np.ndarray, core: tuple, cut_sides: tuple[bool, bool, bool, bool]) -> int:
    """Number of units (8-connected components of ``support``) that reach into ``core`` (slices
    of the decoded crop) and also touch one of the crop's sides that lie inside the image."""
    units, n = ndi.label(support, _EIGHT)
    if n == 0:
        return 0
    top, bottom, left, right = cut_sides
    edges = [units[0] if top else (), units[-1] if bottom else (),
             units[:, 0] if left else (), units[:, -1] if right else ()]
    at_edge = np.unique(np.concatenate([np.ravel(e) for e in edges]).astype(np.int64))
    in_core = np.unique(units[core])
    return int(np.count_nonzero(np.isin(in_core[in_core > 0], at_edge)))


def _support(mask: np.ndarray, labels: np.ndarray, settings: DecodeSettings) -> np.ndarray:
    """``(H, W) bool`` pixels whose 8-connected components must lie whole inside a crop for
    its decode to equal the whole image's: the foreground and objects, widened by the context
    the decode reads around a unit (:attr:`.DecodeSettings.context_radius`; units closer than
    that count as one)."""
    support = mask | (labels > 0)
    radius = settings.context_radius
    return ndi.maximum_filter(support, size=2 * radius + 1) if radius else support


def decode_block(probs_array, labels_array, index: int, block: tuple[int, int], halo: int,
                 settings: DecodeSettings | None = None,
                 max_halo: int | None = None) -> BlockResult:
    """Decode one block on block + halo and write its labels; a pure function of its arguments.

    Args:
        probs_array: ``(K, H, W)`` probabilities with numpy-style slicing (zarr, numpy, ...).
        labels_array: ``(H, W)`` unsigned integer output with numpy-style slice assignment.
        index: raster index of the block in :func:`block_regions` ``(shape, block)``.
        block: ``(bh, bw)`` block size (a multiple of the output's chunks: writes never share
            a chunk, so blocks may run in any order or in parallel).
        halo: context read around the block on every side, in pixels.
        settings: decoding parameters.
        max_halo: largest halo tried (default ``8 * halo``).

    Every object gets ID = (global raster index of its anchor pixel) + 1, the anchor being the
    first pixel, in raster order, of its seed (or of the object itself when it has none); the
    block whose region holds the anchor owns the object. A unit (connected foreground: a nucleus or a cluster
    of touching nuclei) that reaches into the block but also touches the crop's inner edge is
    decoded again with twice the halo, up to ``max_halo``; then the decode of every unit that
    touches the block equals the whole-image decode, so neighbouring blocks agree pixel for pixel
    with no relabel pass. A unit still larger than ``max_halo`` is written as decoded
    (``complete=False``, logged): its objects whose seeds lie inside the crop keep consistent IDs,
    but its pixels near the seam may differ from the neighbour's decode.
    """
    settings = settings or DecodeSettings()
    height, width = labels_array.shape
    y0, y1, x0, x1 = block_regions((height, width), block)[index]
    max_halo = 8 * halo if max_halo is None else max(max_halo, halo)
    current = halo
    while True:
        ey0, ey1 = max(0, y0 - current), min(height, y1 + current)
        ex0, ex1 = max(0, x0 - current), min(width, x1 + current)
        labels, anchors, mask = _decode_parts(probs_array[:, ey0:ey1, ex0:ex1], settings)
        core = (slice(y0 - ey0, y1 - ey0), slice(x0 - ex0, x1 - ex0))
        cut = _cut_units(_support(mask, labels, settings), core,
                         (ey0 > 0, ey1 < height, ex0 > 0, ex1 < width))
        if cut == 0 or current >= max_halo:
            break
        current = min(2 * max(current, 1), max_halo)
    if cut:
        log.warning("instances: block %d (%d:%d, %d:%d) has %d object cluster(s) larger than the "
                    "maximum halo %d px; labels near its edges may not match its neighbours'.",
                    index, y0, y1, x0, x1, cut, max_halo)
    anchor_y, anchor_x = np.divmod(anchors, ex1 - ex0)
    anchor_y, anchor_x = anchor_y + ey0, anchor_x + ex0
    ids = np.zeros(len(anchors) + 1, labels_array.dtype)
    ids[1:] = anchor_y * width + anchor_x + 1
    labels_array[y0:y1, x0:x1] = ids[labels[core]]
    owned = (anchor_y >= y0) & (anchor_y < y1) & (anchor_x >= x0) & (anchor_x < x1)
    return BlockResult(index, (y0, y1, x0, x1), int(owned.sum()), current, cut == 0)


def _check_blockwise(probs_array, labels_array, block: tuple[int, int], halo: int) -> None:
    """Clear errors for shapes, dtypes and block sizes that would give wrong or racing writes."""
    if len(probs_array.shape) != 3 or tuple(probs_array.shape[1:]) != tuple(labels_array.shape):
        raise ValueError(f"probabilities {tuple(probs_array.shape)} must be (K, H, W) with (H, W) "
                         f"equal to the labels' shape {tuple(labels_array.shape)}.")
    dtype = np.dtype(labels_array.dtype)
    if dtype.kind != "u" or np.iinfo(dtype).max < np.prod(labels_array.shape, dtype=np.float64):
        raise ValueError(f"labels dtype {dtype} cannot hold position-derived IDs of a "
                         f"{labels_array.shape} image; create the labels array with dtype "
                         f"{label_dtype(labels_array.shape)} (blockwise.label_dtype).")
    # zarr v3 sharded arrays write whole shards: those are the unit that must not be shared.
    chunks = getattr(labels_array, "shards", None) or getattr(labels_array, "chunks", None) or block
    if len(block) != 2 or min(block) < 1 or any(b % c for b, c in zip(block, chunks)):
        raise ValueError(f"block {tuple(block)} must be a positive multiple of the labels' chunks "
                         f"{tuple(chunks)}, so that no two blocks write into the same chunk.")
    if halo < 0:
        raise ValueError(f"halo must be >= 0 pixels, got {halo}.")


def instances_blockwise(probs_array, labels_array, block: tuple[int, int] = (1024, 1024),
                        halo: int = 128, settings: DecodeSettings | None = None, *,
                        max_halo: int | None = None, blocks: Iterable[int] | None = None,
                        ) -> Generator[Progress, None, BlockwiseStats]:
    """Instance labels for an image of any size, one block at a time (memory ~ one block).

    Args:
        probs_array: ``(K, H, W)`` probabilities (zarr array or anything sliceable like numpy;
            float, or uint8/uint16 fixed point).
        labels_array: ``(H, W)`` output, dtype :func:`label_dtype` (uint32 up to 65,535² pixels),
            chunks dividing ``block``.
        block: ``(bh, bw)`` pixels per block, a multiple of the labels' chunk size.
        halo: context in pixels around each block; make it wider than the largest nucleus
            cluster (larger ones are retried with a bigger halo, see :func:`decode_block`).
        settings: decoding parameters.
        max_halo: largest halo tried (default ``8 * halo``).
        blocks: block indices to run, in this order (default all, raster order), e.g. the
            blocks left to do when resuming or a scatter of them across dask workers.

    Yields:
        :class:`Progress` (stage ``"instances"``) after each block, with its ``region``.

    Returns:
        :class:`BlockwiseStats`. The output does not depend on the order or grouping of blocks.
    """
    settings = settings or DecodeSettings()
    _check_blockwise(probs_array, labels_array, tuple(block), halo)
    n_blocks = len(block_regions(tuple(labels_array.shape), tuple(block)))
    todo = list(range(n_blocks)) if blocks is None else [int(b) for b in blocks]
    if any(not 0 <= b < n_blocks for b in todo):
        raise ValueError(f"block indices must lie in [0, {n_blocks}) for this image and "
                         "block size.")
    objects = escalated = unresolved = largest = 0
    for done, index in enumerate(todo, 1):
        result = decode_block(probs_array, labels_array, index, tuple(block), halo, settings,
                              max_halo)
        objects += result.objects
        escalated += result.halo > halo
        unresolved += not result.complete
        largest = max(largest, result.halo)
        yield Progress("instances", done, len(todo), f"block {done}/{len(todo)}: "
                       f"{objects} objects", {"objects": objects}, result.region)
    return BlockwiseStats(len(todo), objects, escalated, unresolved, largest)
