"""Running weights at the pixel size they were trained at.

Nuclei 40 px wide at 40× are 20 px wide at 20×; weights trained on one magnification miss or merge
them on the other (MoNuSeg validation, bundled H&E V-UNet, one view: AJI 0.564 at the training
0.25 µm/px, 0.399 on the same images halved to 0.5 µm/px). The engine therefore resamples every
tile by ``scale`` (model pixels per image pixel) before the network and resamples the maps back, so
tiling, outputs, labels, edits and exports all stay on the image's own pixel grid.

``scale`` is chosen by :func:`resolve_scale`: the user's, else image pixel size / the weights'
training pixel size (card ``"inference": {"pixel_size_um": ...}``) when both are known and their
ratio lies outside :data:`SCALE_TOLERANCE` (the training augmentation's scale range: inside it the
network has seen such sizes and a resampling would only blur), else 1.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .export_source import unit_info
from .instances import DecodeSettings
from .tiling import TileSettings

SCALE_TOLERANCE = (0.8, 1.25)   # = the training augmentation's scale range (augment.AugmentSettings)


def image_pixel_um(source) -> float | None:
    """Mean level-0 pixel edge of ``source`` (an ``ImageSource``) in µm, or None when unknown."""
    unit = unit_info(source.unit)
    if not source.pixel_size or unit is None:
        return None
    return unit[1] * 1e4 * (float(source.pixel_size[0]) + float(source.pixel_size[1])) / 2


def weights_pixel_um(card: dict | None) -> float | None:
    """The training pixel size of the weights (card ``inference.pixel_size_um``), or None."""
    value = ((card or {}).get("inference") or {}).get("pixel_size_um")
    return float(value) if value else None


def resolve_scale(requested: float | None, card: dict | None, source) -> tuple[float, str | None]:
    """``(scale, why)``: model pixels per image pixel, and a sentence for the run's warnings
    (None when nothing is resampled).

    Args:
        requested: the user's scale (1 = never resample), or None for automatic.
        card: the weights card.
        source: the ``ImageSource`` (its ``pixel_size`` and ``unit``).
    """
    if requested is not None:
        scale = float(requested)
        return scale, (None if scale == 1 else f"tiles resampled ×{scale:.3g} (scale given) before the model")
    image_um, weights_um = image_pixel_um(source), weights_pixel_um(card)
    scale = scale_for_pixel_size(image_um, card)
    if scale == 1:
        return 1.0, None
    return scale, (f"the image has {image_um:.3g} µm pixels and the weights were trained at "
                   f"{weights_um:.3g} µm: tiles resampled ×{scale:.3g} before the model and back "
                   "(pass scale=1 / --scale 1 to turn this off)")


def scale_for_pixel_size(image_um: float | None, card: dict | None) -> float:
    """Model pixels per image pixel for an image of ``image_um`` µm pixels: image / weights pixel
    size, or 1 when either is unknown or their ratio lies inside :data:`SCALE_TOLERANCE`."""
    weights_um = weights_pixel_um(card)
    if not image_um or weights_um is None:
        return 1.0
    ratio = image_um / weights_um
    low, high = SCALE_TOLERANCE
    return 1.0 if low <= ratio <= high else ratio


def check_scale(scale: float | None) -> None:
    """Refuses scales the engine cannot honour (must be positive, at most 8× either way)."""
    if scale is not None and not (math.isfinite(scale) and 1 / 8 <= scale <= 8):
        raise ValueError(f"scale must lie between 0.125 and 8 (model pixels per image pixel), not {scale}")


def image_grid_tiles(tiles: TileSettings, scale: float) -> TileSettings:
    """Tile settings on the image's grid for tiles that are ``tiles`` on the model's grid.

    The halo grows (rounded up) so it still covers the receptive field after resampling. Window
    origins keep the network's pooling grid where ``size_multiple / scale`` is a whole number
    (e.g. 32 / 2 = 16 image pixels), else any origin is allowed (``predict`` pads what it gets).
    """
    if scale == 1:
        return tiles
    step = tiles.size_multiple / scale
    m = int(step) if step >= 1 and step.is_integer() else 1
    tile = max(m, round(tiles.tile / scale / m) * m, 8)
    tile += -tile % m
    overlap = math.ceil(tiles.overlap / scale / m) * m
    if tiles.mode == "blend":
        overlap = min(overlap, tile // 2)
    return dataclasses.replace(tiles, tile=tile, overlap=overlap, size_multiple=m)


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w)`` float → ``(B, C, *size)``, bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def model_size(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The model-grid ``(h, w)`` of an image-grid window of ``shape``."""
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def decode_at_scale(decode: DecodeSettings, scale: float) -> DecodeSettings:
    """Decoding settings tuned on the model's grid, for maps on an image grid ``scale`` times
    coarser: areas divided by ``scale²``, lengths (smoothing, split depth) by ``scale``."""
    if scale == 1:
        return decode
    return dataclasses.replace(
        decode, min_area=max(1, round(decode.min_area / scale ** 2)),
        min_seed_area=max(0, round(decode.min_seed_area / scale ** 2)),
        seed_smoothing=decode.seed_smoothing / scale, split_depth=decode.split_depth / scale)
