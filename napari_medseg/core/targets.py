"""Instance label maps → per-pixel class targets (DESIGN.md §5).

The default task is three classes {0 background, 1 interior, 2 boundary}; the boundary is a thin
band at each instance's edge, so touching nuclei are separated by boundary pixels and a seeded
watershed (:mod:`napari_medseg.core.instances`) can split them again.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2
CLASS_NAMES = ("background", "interior", "boundary")


def instances_to_classes(instances: np.ndarray, boundary_width: int = 1) -> np.ndarray:
    """Three-class target from an instance map.

    Args:
        instances: ``(H, W)`` integer instance labels, 0 = background.
        boundary_width: width in pixels of the boundary band, measured inwards from each
            instance's edge.

    Returns:
        ``(H, W) uint8`` with 0 background, 1 interior, 2 boundary.
    """
    instances = np.asarray(instances)
    foreground = instances > 0
    # A pixel is boundary when a different label (another object or background) lies within
    # ``boundary_width`` pixels (chessboard distance): a band inside each object's edge.
    window = 2 * boundary_width + 1
    differs = (ndi.maximum_filter(instances, size=window, mode="nearest") != instances) | (
        ndi.minimum_filter(instances, size=window, mode="nearest") != instances)
    classes = np.zeros(instances.shape, np.uint8)
    classes[foreground] = INTERIOR
    classes[foreground & differs] = BOUNDARY
    return classes


def semantic_to_classes(foreground: np.ndarray) -> np.ndarray:
    """Binary foreground mask (e.g. ISBI-2012 cell interior) → ``(H, W) uint8`` {0, 1}."""
    return (np.asarray(foreground) > 0).astype(np.uint8)


def separation_weights(instances: np.ndarray, weight: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """U-Net weight map that stresses the pixels between touching instances (Ronneberger 2015, eq. 2).

    ``w(x) = 1 + weight · exp(−(d1(x) + d2(x))² / 2σ²)``, with ``d1`` and ``d2`` the distances from
    ``x`` to the nearest and second-nearest instance (0 inside an instance, so inside instance ``i``
    the term is driven by the distance to the nearest *other* instance). The weight is high on the
    boundary bands where two nuclei touch and in the narrow gaps between them, where a missed
    boundary merges two instances; it is 1 wherever fewer than two instances lie within ~3σ.
    The class-balancing term ``w_c`` of the paper is left out (each model's loss balances classes).

    Args:
        instances: ``(H, W)`` integer instance labels, 0 = background.
        weight: ``w0`` (paper: 10).
        sigma: ``σ`` in pixels (paper: 5).

    Returns:
        ``(H, W) float32`` weights ≥ 1.
    """
    instances = np.asarray(instances)
    out = np.ones(instances.shape, np.float32)
    if weight <= 0:
        return out
    margin = int(np.ceil(3 * sigma))
    nearest = np.full(instances.shape, np.inf, np.float32)
    second = np.full(instances.shape, np.inf, np.float32)
    for index, box in enumerate(ndi.find_objects(instances), start=1):
        if box is None:
            continue
        window = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                       for s, n in zip(box, instances.shape))
        distance = ndi.distance_transform_edt(instances[window] != index).astype(np.float32)
        near, sec = nearest[window], second[window]
        # Keep the two smallest distances per pixel (views: updated in place).
        sec[...] = np.minimum(sec, np.maximum(near, distance))
        near[...] = np.minimum(near, distance)
    both = np.isfinite(second)
    out[both] += weight * np.exp(-((nearest[both] + second[both]) ** 2) / (2 * sigma**2))
    return out
