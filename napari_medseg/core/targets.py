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
