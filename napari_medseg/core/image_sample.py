"""A small, representative pixel sample of an image (for normalisation statistics), read without
ever scanning a large pyramid level."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import ImageSource

STATISTICS_PIXELS = 1 << 21   # pixel budget of the normalisation sample (~1450²)
SAMPLE_TILE = 256             # edge of one sampled tile when no pyramid level fits the budget


@dataclass(frozen=True)
class StatisticsSample:
    """Pixels for normalisation statistics.

    Attributes:
        pixels: ``(C, h, w)`` stored dtype (tiles side by side when sampled).
        description: where they came from, for the run's provenance.
        nonfinite: NaN/inf pixels (counted over all channels) in the sample.
    """

    pixels: np.ndarray
    description: str
    nonfinite: int


def statistics_sample(source: ImageSource, max_pixels: int = STATISTICS_PIXELS,
                      tile: int = SAMPLE_TILE) -> StatisticsSample:
    """A small, representative sample of the image; never a full scan of a large level.

    Uses the finest pyramid level with at most ``max_pixels`` pixels (the whole level 0 for a small
    image). Without such a level, reads an evenly spaced grid of ``tile``² tiles of the coarsest
    level, at most ``max_pixels`` pixels in all.
    """
    fitting = [k for k, (h, w) in enumerate(source.levels) if h * w <= max_pixels]
    if fitting:
        level = fitting[0]
        pixels = source.read_region(0, source.levels[level][0], 0, source.levels[level][1], level)
        description = f"pyramid level {level} ({pixels.shape[1]}x{pixels.shape[2]})"
    else:
        level = len(source.levels) - 1
        pixels = _sample_tiles(source, level, max_pixels, tile)
        description = f"a grid of tiles ({pixels.shape[1]}x{pixels.shape[2]} pixels) from level {level}"
    nonfinite = 0
    if pixels.dtype.kind == "f":
        nonfinite = int(np.count_nonzero(~np.isfinite(pixels)))
    return StatisticsSample(pixels, description, nonfinite)


def _sample_tiles(source: ImageSource, level: int, max_pixels: int, tile: int) -> np.ndarray:
    """``(C, tile, n * tile)``: ``n`` tiles on an even grid of one level, side by side."""
    height, width = source.levels[level]
    th, tw = min(tile, height), min(tile, width)   # a very thin strip gets thinner tiles
    per_axis = max(1, int(np.sqrt(max_pixels // (th * tw))))
    ys = np.linspace(0, height - th, per_axis).astype(int)
    xs = np.linspace(0, width - tw, per_axis).astype(int)
    tiles = [source.read_region(y, y + th, x, x + tw, level) for y in ys for x in xs]
    return np.concatenate(tiles, axis=2)
