"""Tile grids for out-of-core inference: superblocks, crop-and-stitch tiles and blended tiles.

Work is split in two levels:

* **Superblocks** (:class:`Block`): squares of ``superblock`` pixels aligned to the output chunks,
  the unit of reading, writing, completion tracking and (later) of Dask tasks. A block is
  processed from nothing but picklable arguments and writes only its own chunks.
* **Tiles** (:class:`Tile`) inside a block, on a grid that is global to the image, so that the
  result never depends on how the image is cut into blocks.

Two tile modes:

* ``"crop"`` for translation-equivariant networks: the image is cut into cores of ``tile`` pixels on
  multiples of ``tile`` from the origin; each core is predicted from a window extended by a halo of
  ``overlap`` pixels (at least the receptive-field radius), and only the core is kept. Window
  origins are multiples of ``size_multiple`` (the pooling grid of the network), windows are
  clipped to the image, so every output pixel comes from exactly one tile and sees exactly the
  context it has in a whole-image pass: tiled equals whole-image up to float error.
* ``"blend"`` for networks pooling over the whole tile (not translation-equivariant): tiles of the
  training size with ``overlap`` pixels of overlap; each tile's prediction is weighted by the outer
  product of two 1-D profiles. A profile rises as ``sin²`` over the overlap, is 1 in the middle, falls
  as ``cos²``, and is flat at the image border; profiles are divided by their 1-D sum along the axis,
  so the weights of all tiles covering a pixel sum to 1 (exactly ``sin² + cos²`` on a regular grid)
  with no full-size count map. Tiles straddling a superblock border are run by both blocks (the
  price of independent blocks: about ``tile / superblock`` extra forward passes per axis).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

Region = tuple[int, int, int, int]   # (y0, y1, x0, x1), half-open, image pixels

DEFAULT_CROP_TILE = 1024     # core edge in crop mode: halo overhead (1 + 2·halo/tile)² stays < 1.5
DEFAULT_BLEND_TILE = 256     # training crop size used when the weights card does not say
DEFAULT_BLEND_OVERLAP = 0.25 # fraction of the tile (MONAI's default)
MAX_HALO = 256               # largest halo measured; beyond it the halo is capped and flagged


@dataclass(frozen=True)
class TileSettings:
    """How tiles are cut.

    Attributes:
        mode: ``"crop"`` (crop-and-stitch) or ``"blend"`` (weighted overlap).
        tile: crop: core edge (output pixels per tile); blend: tile edge fed to the network.
        overlap: crop: halo on each side; blend: overlap of neighbouring tiles (≤ tile/2).
        size_multiple: window origins (crop) and tile edges are multiples of this.
        covers_receptive_field: crop: whether the halo was measured to cover the receptive field
            (None: not measured, e.g. a halo chosen by the user).
    """

    mode: str
    tile: int
    overlap: int
    size_multiple: int = 1
    covers_receptive_field: bool | None = None

    def __post_init__(self) -> None:
        m = self.size_multiple
        if self.mode not in ("crop", "blend"):
            raise ValueError(f"tile mode must be 'crop' or 'blend', not {self.mode!r}")
        if self.tile <= 0 or self.tile % m:
            raise ValueError(f"tile {self.tile} must be a positive multiple of {m} for this model; "
                             f"use {max(m, round_up(self.tile, m))}")
        if self.mode == "crop" and (self.overlap < 0 or self.overlap % m):
            raise ValueError(f"the crop halo {self.overlap} must be a multiple of {m} for this model; "
                             f"use {round_up(max(self.overlap, 0), m)}")
        if self.mode == "blend" and not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap {self.overlap} must lie in 0..{self.tile // 2} (half the tile) "
                             f"for blended tiles of {self.tile}")

    @property
    def window(self) -> int:
        """Edge of the largest window fed to the network."""
        return self.tile + 2 * self.overlap if self.mode == "crop" else self.tile


@dataclass(frozen=True)
class Block:
    """A superblock: the unit of work and of completion tracking.

    Attributes:
        index: ``(row, column)`` in the superblock grid.
        region: output pixels ``(y0, y1, x0, x1)``, aligned to the output chunks.
    """

    index: tuple[int, int]
    region: Region


@dataclass(frozen=True, eq=False)
class Tile:
    """One forward pass.

    Attributes:
        window: input pixels ``(y0, y1, x0, x1)`` fed to the network, clipped to the image.
        keep: output pixels this tile contributes to (inside ``window`` and the block).
        pad_to: blend mode: ``(h, w)`` the window is reflect-padded to (bottom/right) when the image
            is smaller than a tile, else None.
        weights: blend mode: ``(wy, wx)`` float32 profiles over the ``keep`` rows and columns
            (the tile's weight is ``wy[:, None] * wx[None, :]``); None in crop mode.
    """

    window: Region
    keep: Region
    pad_to: tuple[int, int] | None = None
    weights: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ≥ ``value``."""
    return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------- superblocks
def chunk_aligned(region: Region, chunk: int, shape: tuple[int, int]) -> Region:
    """Grow ``region`` to whole output chunks, clipped to the image ``shape``."""
    y0, y1, x0, x1 = region
    height, width = shape
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(height, y1), min(width, x1)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"region {region} does not overlap the {height}x{width} image")
    return (y0 // chunk * chunk, min(height, round_up(y1, chunk)),
            x0 // chunk * chunk, min(width, round_up(x1, chunk)))


def superblocks(shape: tuple[int, int], superblock: int, chunk: int,
                region: Region | None = None) -> tuple[Block, ...]:
    """The superblocks covering ``region`` (default: the whole image), in raster order.

    Args:
        shape: image ``(H, W)``.
        superblock: block edge, a multiple of ``chunk``.
        chunk: output chunk edge.
        region: part of the image to cover; grown to whole chunks.
    """
    if superblock % chunk:
        raise ValueError(f"superblock {superblock} must be a multiple of the chunk size {chunk}")
    height, width = shape
    y0, y1, x0, x1 = chunk_aligned(region or (0, height, 0, width), chunk, shape)
    blocks = []
    for row in range(y0 // superblock, -(-y1 // superblock)):
        for col in range(x0 // superblock, -(-x1 // superblock)):
            by0, bx0 = max(y0, row * superblock), max(x0, col * superblock)
            by1, bx1 = min(y1, (row + 1) * superblock), min(x1, (col + 1) * superblock)
            blocks.append(Block((row, col), (by0, by1, bx0, bx1)))
    return tuple(blocks)


# ----------------------------------------------------------------------------- tiles
def block_tiles(block: Region, shape: tuple[int, int], settings: TileSettings) -> list[Tile]:
    """The tiles that contribute to ``block``, with what each keeps (and weighs).

    Args:
        block: output region ``(y0, y1, x0, x1)``.
        shape: image ``(H, W)``.
        settings: tile mode and sizes.

    Returns:
        Tiles in raster order; their ``keep`` regions cover ``block`` (crop: exactly once; blend:
        with weights summing to 1 at every pixel).
    """
    rows = _axis_tiles(block[0], block[1], shape[0], settings)
    cols = _axis_tiles(block[2], block[3], shape[1], settings)
    tiles = []
    for (wy0, wy1), (ky0, ky1), py, wy in rows:
        for (wx0, wx1), (kx0, kx1), px, wx in cols:
            pad = (py, px) if settings.mode == "blend" and (py > wy1 - wy0 or px > wx1 - wx0) else None
            weights = (wy, wx) if settings.mode == "blend" else None
            tiles.append(Tile((wy0, wy1, wx0, wx1), (ky0, ky1, kx0, kx1), pad, weights))
    return tiles


def _axis_tiles(lo: int, hi: int, length: int, settings: TileSettings) -> list:
    """Per tile along one axis: (window span, keep span, padded size, weights over keep)."""
    out = []
    if settings.mode == "crop":
        core, halo = settings.tile, settings.overlap
        for start in range(lo // core * core, hi, core):
            keep = (max(lo, start), min(hi, start + core, length))
            window = (max(0, start - halo), min(length, start + core + halo))
            out.append((window, keep, window[1] - window[0], None))
        return out
    spans = blend_spans(length, settings.tile, settings.overlap)
    profiles = blend_profiles(length, settings.tile, settings.overlap)
    for (a, b), profile in zip(spans, profiles):
        keep = (max(lo, a), min(hi, b))
        if keep[0] < keep[1]:
            weights = profile[keep[0] - a:keep[1] - a].astype(np.float32)
            out.append(((a, b), keep, settings.tile, weights))
    return out


@functools.lru_cache(maxsize=64)
def blend_spans(length: int, tile: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Global 1-D grid of blended tiles: starts on multiples of ``tile - overlap``, the last tile
    shifted back to end at the image border; one clipped span when the image is smaller."""
    if length <= tile:
        return ((0, length),)
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(k * stride, length - tile) for k in range(count)]
    return tuple((s, s + tile) for s in starts)


@functools.lru_cache(maxsize=64)
def blend_profiles(length: int, tile: int, overlap: int) -> tuple[np.ndarray, ...]:
    """1-D weights of every span of :func:`blend_spans`, float64, summing to 1 at each pixel.

    Raw profile: ``sin²`` ramp over the first ``overlap`` pixels, 1, ``cos²`` ramp over the last
    ``overlap`` pixels, with no ramp on a side touching the image border. Each is divided by the
    sum of all raw profiles along the axis (a 1-D array of ``length``, not a 2-D count map).
    """
    spans = blend_spans(length, tile, overlap)
    ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / max(overlap, 1)) ** 2
    raw = []
    for a, b in spans:
        profile = np.ones(b - a)
        if overlap and a > 0:
            profile[:overlap] = ramp
        if overlap and b < length:
            profile[-overlap:] = np.minimum(profile[-overlap:], ramp[::-1])
        raw.append(profile)
    total = np.zeros(length)
    for (a, b), profile in zip(spans, raw):
        total[a:b] += profile
    result = tuple(profile / total[a:b] for (a, b), profile in zip(spans, raw))
    for profile in result:
        profile.setflags(write=False)
    return result


def input_window(tiles: list[Tile]) -> Region:
    """Bounding box of the tiles' windows: the one region a block reads from the image."""
    return (min(t.window[0] for t in tiles), max(t.window[1] for t in tiles),
            min(t.window[2] for t in tiles), max(t.window[3] for t in tiles))


# ----------------------------------------------------------------------------- defaults per model
def default_tile_settings(model, card: dict | None = None, *, mode: str | None = None,
                          tile: int | None = None, overlap: int | None = None) -> TileSettings:
    """Tile settings for a model, each field overridable.

    Crop mode (translation-equivariant models): cores of ``model.default_crop_tile`` if the model
    declares one (IAU-Net: 512, for memory), else :data:`DEFAULT_CROP_TILE`, and a halo of
    the measured receptive-field radius (:func:`receptive_radius`). Blend mode (the others): the
    training tile size from the weights card (``tile_size``, ``train_size`` or
    ``training.crop_size``/``patch_size``; else :data:`DEFAULT_BLEND_TILE`) and a quarter overlap.
    """
    m = int(getattr(model, "size_multiple", 1))
    mode = mode or ("crop" if getattr(model, "translation_equivariant", True) else "blend")
    if mode == "blend":
        size = round_up(int(tile or training_tile_size(card) or DEFAULT_BLEND_TILE), m)
        over = int(overlap) if overlap is not None else int(size * DEFAULT_BLEND_OVERLAP)
        return TileSettings("blend", size, over, m)
    size = int(tile or getattr(model, "default_crop_tile", None) or DEFAULT_CROP_TILE)
    if overlap is not None:
        return TileSettings("crop", size, round_up(int(overlap), m), m)
    radius, covered = receptive_radius(model)
    return TileSettings("crop", size, round_up(max(radius, 1), m), m, covered)


def training_tile_size(card: dict | None) -> int | None:
    """The training crop size a weights card records, or None."""
    card = card or {}
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    for value in (card.get("tile_size"), card.get("train_size"), training.get("crop_size"),
                  training.get("patch_size"), training.get("tile_size")):
        if value:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    return None


_RADIUS_CACHE: dict = {}


def receptive_radius(model, max_radius: int = MAX_HALO) -> tuple[int, bool]:
    """Receptive-field radius of a network, measured by back-propagation.

    A model may declare it as ``model.receptive_radius`` (pixels). Otherwise the gradient of an
    ``m × m`` block of outputs (all pooling phases) with respect to a random probe input is
    computed; the radius is the largest distance from the block at which it is non-zero.

    Returns:
        ``(radius, covered)``: ``covered`` is False when the field reaches the probe border, i.e.
        is larger than ``max_radius``, which is then returned (a capped halo: tiled output then
        differs from a whole-image pass by the influence of pixels beyond the halo).
    """
    declared = getattr(model, "receptive_radius", None)
    if isinstance(declared, int):
        return declared, True
    key = (type(model), repr(getattr(model, "config", None)), max_radius)
    if key not in _RADIUS_CACHE:
        # Small probes first: a U-Net's field (~100 px) is found without a 500² backward pass.
        cap = min(64, max_radius)
        while True:
            radius, covered = _measure_radius(model, cap)
            if covered or cap >= max_radius:
                break
            cap = min(2 * cap, max_radius)
        _RADIUS_CACHE[key] = (radius, covered)
    return _RADIUS_CACHE[key]


def _measure_radius(model, max_radius: int) -> tuple[int, bool]:
    m = int(getattr(model, "size_multiple", 1))
    probe = round_up(2 * (max_radius + m), m) + m
    centre = probe // 2 // m * m
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(1, model.config.in_channels, probe, probe, generator=generator).to(device)
        x.requires_grad_(True)
        logits = model(x)["logits"]
        (grad,) = torch.autograd.grad(logits[..., centre:centre + m, centre:centre + m].sum(), x)
    model.train(was_training)
    support = (grad.abs().sum(dim=(0, 1)) > 0).cpu().numpy()
    rows, cols = np.nonzero(support.any(axis=1))[0], np.nonzero(support.any(axis=0))[0]
    reach = max(centre - rows.min(), rows.max() - (centre + m - 1),
                centre - cols.min(), cols.max() - (centre + m - 1))
    touches = rows.min() == 0 or cols.min() == 0 or rows.max() == probe - 1 or cols.max() == probe - 1
    if touches or reach > max_radius:
        return max_radius, False
    return int(reach), True
