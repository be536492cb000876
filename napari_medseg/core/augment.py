"""Random training crops with augmentation, shared by training and fine-tuning.

Each item is a normalised image with its class targets and an optional support mask (1 where the
target is known). A batch is built by choosing items (weighted), cutting a region whose size is
``crop / scale`` for a random mild scale, resizing it to ``crop`` (bilinear for the image, nearest for
targets), then flipping, rotating by 90°, and jittering intensity (and, for colour images, each
channel separately: stain jitter). Pixels added by padding are marked unsupported, never background.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Augmentation strengths (defaults: mild, suitable for nuclei of all modalities)."""

    scale_range: tuple[float, float] = (0.8, 1.25)
    flips: bool = True
    rot90: bool = True
    contrast_range: tuple[float, float] = (0.75, 1.3)
    brightness_shift: float = 0.1
    channel_jitter: float = 0.08   # per-channel gain/shift for colour images (stain jitter)
    gamma_range: tuple[float, float] = (0.75, 1.35)


@dataclass
class TrainItem:
    """One training image in memory.

    Attributes:
        image: ``(C, H, W) float16`` normalised network input.
        classes: ``(H, W) uint8`` class targets.
        valid: ``(H, W) uint8`` support mask (1 = supervised) or None for fully labelled images.
        weight: relative sampling weight.
        labels: optional ``(H, W)`` int32 instance IDs (kept for evaluation and fine-tuning).
        pixel_weight: optional ``(H, W) float16`` per-pixel loss weights (e.g.
            :func:`.targets.separation_weights`); batches then carry ``"pixel_weight"``.
    """

    image: torch.Tensor
    classes: torch.Tensor
    valid: torch.Tensor | None = None
    weight: float = 1.0
    labels: np.ndarray | None = None
    pixel_weight: torch.Tensor | None = None


def _region(item: TrainItem, size: int, rng: np.random.Generator):
    """A ``size``×``size`` region of an item: image, classes, valid, pixel weight (zero-padded;
    padding unsupported; the weight is all ones when the item has none)."""
    _, h, w = item.image.shape
    y = int(rng.integers(0, max(h - size, 0) + 1))
    x = int(rng.integers(0, max(w - size, 0) + 1))
    image = item.image[:, y:y + size, x:x + size].float()
    classes = item.classes[y:y + size, x:x + size].long()
    valid = (item.valid[y:y + size, x:x + size].float() if item.valid is not None
             else torch.ones(classes.shape))
    weight = (item.pixel_weight[y:y + size, x:x + size].float() if item.pixel_weight is not None
              else torch.ones(classes.shape))
    ph, pw = size - image.shape[1], size - image.shape[2]
    if ph or pw:
        image, classes, valid, weight = (F.pad(t, (0, pw, 0, ph)) for t in (image, classes, valid, weight))
    return image, classes, valid, weight


def _geometry(tensors: tuple[torch.Tensor, ...], rng, settings: AugmentSettings) -> tuple[torch.Tensor, ...]:
    """The same random flips and 90° rotation applied to every tensor (over its last two axes)."""
    if settings.flips and rng.random() < 0.5:
        tensors = tuple(t.flip(-1) for t in tensors)
    if settings.flips and rng.random() < 0.5:
        tensors = tuple(t.flip(-2) for t in tensors)
    if settings.rot90:
        k = int(rng.integers(0, 4))
        if k:
            tensors = tuple(t.rot90(k, (-2, -1)) for t in tensors)
    return tensors


def _intensity(image: torch.Tensor, rng, settings: AugmentSettings) -> torch.Tensor:
    gamma = float(rng.uniform(*settings.gamma_range))
    image = image.clamp_min(0) ** gamma
    contrast = float(rng.uniform(*settings.contrast_range))
    shift = float(rng.uniform(-settings.brightness_shift, settings.brightness_shift))
    image = image * contrast + shift
    if image.shape[0] > 1 and settings.channel_jitter:
        c = image.shape[0]
        gains = 1 + torch.from_numpy(rng.uniform(-1, 1, (c, 1, 1))).float() * settings.channel_jitter
        shifts = torch.from_numpy(rng.uniform(-1, 1, (c, 1, 1))).float() * settings.channel_jitter / 2
        image = image * gains + shifts
    return image


def sample_batch(items: list[TrainItem], batch: int, crop: int, rng: np.random.Generator,
                 settings: AugmentSettings = AugmentSettings()) -> dict[str, torch.Tensor]:
    """One augmented batch.

    Returns:
        ``{"image": (B, C, crop, crop) float32, "labels": (B, crop, crop) int64,
        "valid": (B, crop, crop) float32}``, plus ``"pixel_weight": (B, crop, crop) float32`` when
        any item has pixel weights (ones for the items without).
    """
    weights = np.array([it.weight for it in items], dtype=np.float64)
    picks = rng.choice(len(items), size=batch, p=weights / weights.sum())
    with_weights = any(it.pixel_weight is not None for it in items)
    images, targets, masks, pixel_weights = [], [], [], []
    for index in picks:
        scale = float(np.exp(rng.uniform(*np.log(settings.scale_range))))
        size = max(8, int(round(crop / scale)))
        image, classes, valid, weight = _region(items[index], size, rng)
        if size != crop:
            image = F.interpolate(image[None], size=(crop, crop), mode="bilinear", align_corners=False)[0]
            classes = F.interpolate(classes[None, None].float(), size=(crop, crop), mode="nearest")[0, 0].long()
            valid, weight = F.interpolate(torch.stack([valid, weight])[None], size=(crop, crop),
                                          mode="nearest")[0]
        image, classes, valid, weight = _geometry((image, classes, valid, weight), rng, settings)
        images.append(_intensity(image, rng, settings))
        targets.append(classes)
        masks.append(valid)
        pixel_weights.append(weight)
    batch_dict = {"image": torch.stack(images).contiguous(), "labels": torch.stack(targets).contiguous(),
                  "valid": torch.stack(masks).contiguous()}
    if with_weights:
        batch_dict["pixel_weight"] = torch.stack(pixel_weights).contiguous()
    return batch_dict
