"""Multiscale pyramids built block by block, with OME-NGFF 0.4 ``multiscales`` metadata.

Level ``l`` is level 0 downsampled by ``2**l``: the 2×2 mean for maps, the top-left pixel
("nearest") for labels, which must keep their IDs. Level ``l`` is chunked by ``chunk >> l``, so a
chunk-aligned block of level 0 lands on whole chunks of every level and a block can write its own
pyramid right after its data, in any order or process, with no second pass over the image.
"""
from __future__ import annotations

import numpy as np

CHUNK_KEYS = {"name": "v2", "separator": "/"}   # NGFF 0.4 asks for "/" chunk keys


def level_count(shape: tuple[int, int], chunk: int, min_chunk: int = 16, min_size: int = 64,
                max_levels: int = 8) -> int:
    """Levels (level 0 included) while the chunk stays ≥ ``min_chunk`` and the longer side of
    the level ≥ ``min_size``."""
    count, longest = 1, max(shape)
    while count < max_levels and chunk >> count >= min_chunk and -(-longest // 2 ** count) >= min_size:
        count += 1
    return count


def create_pyramid(group, name: str, shape: tuple[int, int], chunk: int, levels: int, dtype: str,
                   channels: int | None, pixel_size=None, unit: str | None = None) -> dict:
    """Create ``name/0 .. name/<levels-1>`` (filled with 0) and return the ``multiscales`` attrs.

    Args:
        group: zarr group to create the arrays in.
        name: sub-group name (``"probs"``, ``"labels"``...).
        shape: ``(H, W)`` of level 0.
        chunk: chunk edge of level 0.
        levels: number of levels.
        dtype: array dtype.
        channels: leading channel axis length, or None for ``(H, W)`` arrays (labels).
        pixel_size: ``(y, x)`` physical size of a level-0 pixel (default 1).
        unit: physical unit of ``pixel_size``.
    """
    height, width = shape
    py, px = pixel_size or (1.0, 1.0)
    lead = (channels,) if channels else ()
    one, zero = ([1.0], [0.0]) if channels else ([], [])
    datasets = []
    for level in range(levels):
        f = 2 ** level
        group.create_array(f"{name}/{level}", shape=lead + (-(-height // f), -(-width // f)),
                           chunks=lead + (chunk >> level,) * 2, dtype=dtype, fill_value=0,
                           chunk_key_encoding=CHUNK_KEYS)
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": one + [py * f, px * f]},
            # a mean over 2**l pixels is centred (2**l - 1) / 2 pixels after the block's origin
            {"type": "translation", "translation": zero + [py * (f - 1) / 2, px * (f - 1) / 2]},
        ]})
    space = {"type": "space", **({"unit": unit} if unit else {})}
    axes = ([{"name": "c", "type": "channel"}] if channels else []) + [
        {"name": "y", **space}, {"name": "x", **space}]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets,
                             "type": "mean" if channels else "nearest"}]}


def pyramid_blocks(region, data: np.ndarray, levels: int, method: str):
    """Every level of one block.

    Args:
        region: ``(y0, y1, x0, x1)`` of the block at level 0 (origin a multiple of ``2**(levels-1)``).
        data: ``(k, h, w)`` level-0 values of the block.
        levels: number of levels to yield (level 0 first).
        method: ``"mean"`` or ``"nearest"``.

    Yields:
        ``(level, (y slice, x slice), (k, h_l, w_l) array)``.
    """
    y0, _, x0, _ = region
    for level in range(levels):
        if level:
            data = halve(data, method)
        oy, ox = y0 >> level, x0 >> level
        yield level, (slice(oy, oy + data.shape[1]), slice(ox, ox + data.shape[2])), data


def halve(data: np.ndarray, method: str) -> np.ndarray:
    """``(k, h, w)`` → ``(k, ceil(h/2), ceil(w/2))``: float32 2×2 mean (an odd last row or column
    averages the pixels it has) or the top-left pixel of each 2×2 (``"nearest"``)."""
    if method == "nearest":
        return data[:, ::2, ::2]
    k, h, w = data.shape
    if h % 2 or w % 2:
        data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    return data.reshape(k, data.shape[1] // 2, 2, data.shape[2] // 2, 2).mean(axis=(2, 4), dtype=np.float32)


def encode(data: np.ndarray, dtype: str) -> np.ndarray:
    """Float values → stored dtype (``uint8``: ``round(p · 255)`` clipped to 0..255)."""
    if dtype == "uint8":
        return np.clip(np.rint(data * 255.0), 0, 255).astype(np.uint8)
    return data.astype(dtype)


def decode(data: np.ndarray) -> np.ndarray:
    """Stored values → float32 (``uint8`` divided by 255)."""
    return data.astype(np.float32) / 255.0 if data.dtype == np.uint8 else data.astype(np.float32)
