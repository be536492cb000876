"""Input conversion shared by training, fine-tuning and tiled inference.

Every image reaches a network the same way: channels converted to what the network takes
(:func:`to_model_channels`), then intensities mapped by one pair of percentiles computed jointly
over all channels (:func:`percentile_range`, :func:`apply_range`), so colour ratios of H&E stay intact
and dim fluorescence is stretched. During tiled inference the percentiles come from a coarse
pyramid level or a sample of tiles, never from a full-image scan.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_LOW_PERCENTILE = 1.0
DEFAULT_HIGH_PERCENTILE = 99.8


@dataclass(frozen=True)
class Normalization:
    """How raw pixels become network input: ``(x - low) / (high - low)``.

    Attributes:
        low, high: intensity values mapped to 0 and 1.
        low_percentile, high_percentile: the percentiles they came from.
    """

    low: float
    high: float
    low_percentile: float = DEFAULT_LOW_PERCENTILE
    high_percentile: float = DEFAULT_HIGH_PERCENTILE

    def to_dict(self) -> dict:
        return {"method": "percentile", "low": self.low, "high": self.high,
                "low_percentile": self.low_percentile, "high_percentile": self.high_percentile}


def to_model_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Convert a channel-first image to the network's channel count.

    Args:
        image: ``(C, H, W)`` any dtype; C = 1 grey, 2, 3 RGB or 4 RGBA.
        in_channels: channels the network takes (1 or 3).

    Returns:
        ``(in_channels, H, W) float32``. RGBA drops alpha; grey is repeated to RGB; RGB becomes grey
        by the channel mean; two channels get a zero third channel.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {x.shape}")
    if x.shape[0] == 4:
        x = x[:3]
    if x.shape[0] == in_channels:
        return x
    if in_channels == 1:
        return x.mean(axis=0, keepdims=True)
    if x.shape[0] == 1:
        return np.repeat(x, in_channels, axis=0)
    if x.shape[0] == 2 and in_channels == 3:
        return np.concatenate([x, np.zeros_like(x[:1])], axis=0)
    raise ValueError(f"cannot map {x.shape[0]} channels to the {in_channels} the model takes")


def percentile_range(samples: np.ndarray, low_percentile: float = DEFAULT_LOW_PERCENTILE,
                     high_percentile: float = DEFAULT_HIGH_PERCENTILE) -> Normalization:
    """Joint percentiles over all channels of ``samples`` (any shape), ignoring NaN/inf."""
    values = np.asarray(samples, dtype=np.float32).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Normalization(0.0, 1.0, low_percentile, high_percentile)
    low, high = np.percentile(values, [low_percentile, high_percentile])
    if not high > low:
        high = low + 1.0
    return Normalization(float(low), float(high), low_percentile, high_percentile)


def apply_range(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """``(x - low) / (high - low)`` as float32; NaN/inf pixels become 0."""
    out = (np.asarray(x, dtype=np.float32) - norm.low) / (norm.high - norm.low)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0, copy=False)


def normalize_image(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Whole small image ``(C, H, W)`` → ``(in_channels, H, W) float32`` network input."""
    x = to_model_channels(image, in_channels)
    return apply_range(x, percentile_range(x))
