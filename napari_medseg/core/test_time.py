"""Test-time augmentation: average a model's maps over flipped and transposed views of each tile.

The networks are trained with random flips and 90° rotations (:mod:`.augment`), so every view of
the dihedral group is an image they know; averaging their predictions, each mapped back to the
original orientation, removes orientation-dependent noise. Measured on the validation splits
(README, "Starter weights"): GCA-ResUNet DSB2018 F1 at IoU 0.5 0.818 → 0.834 with 8 views at the
same decoding thresholds, V-UNet ISBI 2012 cell Dice 0.9488 → 0.9509, for about 4.7× the CPU time.

Views are counted as 1 (off), 2 (+ left-right flip), 4 (all flips) or 8 (flips × transpose).
Every map is averaged, auxiliary ones included (uncertainty, DSRA background maps): each is a
per-pixel map that the same inverse flip puts back in place.
"""
from __future__ import annotations

import torch

VIEW_COUNTS = (1, 2, 4, 8)
_FLIPS = ((), (-1,), (-2,), (-2, -1))


def check_views(views: int) -> int:
    """``views`` if it is one of :data:`VIEW_COUNTS`; a clear ``ValueError`` otherwise."""
    if views not in VIEW_COUNTS:
        raise ValueError(f"test-time augmentation takes 1 (off), 2, 4 or 8 views, not {views!r}")
    return int(views)


def dihedral_views(views: int) -> list[tuple[tuple[int, ...], bool]]:
    """The first ``views`` (flip dims, transpose) pairs: identity, left-right, up-down, both,
    then the same four after swapping the two image axes."""
    check_views(views)
    every = [(flips, False) for flips in _FLIPS] + [(flips, True) for flips in _FLIPS]
    return every[:views]


def _forward_view(x: torch.Tensor, flips: tuple[int, ...], transpose: bool) -> torch.Tensor:
    if transpose:
        x = x.transpose(-1, -2)
    return x.flip(flips) if flips else x


def _inverse_view(y: torch.Tensor, flips: tuple[int, ...], transpose: bool) -> torch.Tensor:
    if flips:
        y = y.flip(flips)
    return y.transpose(-1, -2) if transpose else y


def predict_views(model, x: torch.Tensor, mc_samples: int = 0, views: int = 1) -> dict[str, torch.Tensor]:
    """``model.predict`` averaged over ``views`` orientations of the input.

    Args:
        model: a ``SegmentationModel`` (anything with ``predict(x, mc_samples)``).
        x: ``(B, C, H, W) float32`` normalised tiles (any H, W; transposed views swap them).
        mc_samples: Monte-Carlo samples per view (models offering uncertainty).
        views: 1, 2, 4 or 8 (see :func:`dihedral_views`).

    Returns:
        ``{name: (B, k, H, W) float32}``, the mean over views of each map in the input's orientation.
    """
    total: dict[str, torch.Tensor] = {}
    chosen = dihedral_views(views)
    for flips, transpose in chosen:
        maps = model.predict(_forward_view(x, flips, transpose), mc_samples)
        for name, value in maps.items():
            value = _inverse_view(value, flips, transpose)
            total[name] = value if name not in total else total[name] + value
    if len(chosen) == 1:
        return total
    return {name: value / len(chosen) for name, value in total.items()}


__all__ = ["VIEW_COUNTS", "check_views", "dihedral_views", "predict_views"]
