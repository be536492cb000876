"""Axis-aligned pixel boxes ``(y0, y1, x0, x1)``: half-open, level-0 pixel coordinates."""
from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]   # (y0, y1, x0, x1), half-open, level-0 pixels


def mask_box(mask: np.ndarray) -> Box | None:
    """Local ``(y0, y1, x0, x1)`` of the True pixels, or None."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def offset_box(box: Box | None, window: Box) -> Box | None:
    """``box`` (local to ``window``) in the coordinates ``window`` is given in; None stays None."""
    if box is None:
        return None
    return box[0] + window[0], box[1] + window[0], box[2] + window[2], box[3] + window[2]


def intersect_boxes(a: Box, b: Box) -> Box | None:
    """Overlap of two boxes, or None when they share no pixel."""
    box = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[1] and box[2] < box[3] else None
