"""Review helpers for a run's labels (Qt-free): per-object uncertainty, "next most uncertain
object", the current view as a region, and bookkeeping of the user's label edits.

Per-object uncertainty is the mean, over the object's pixels, of the run's uncertainty map: the
first map of kind ``"uncertainty"`` (V-UNet's predictive entropy), else a single-channel
``"background"`` map (PraNet-V2's foreground/background disagreement), else ``1 − max class
probability``. It is computed block by block (superblocks of the store), so its memory does not
grow with the image, and returned as a table napari shows as the labels layer's ``features``.
"""
from __future__ import annotations

import datetime
import math

import numpy as np

from .core.blockwise import block_regions
from .core.progress import JobGenerator, Progress
from .core.store import LABELS, PROBS, OutputStore

FEATURE_COLUMNS = ("index", "uncertainty", "area", "centroid_y", "centroid_x")
EDITS_KEY = "labels_edits"          # root attribute recording the user's edits
CONTEXT = 6.0                        # an object fills about 1/CONTEXT of the view when jumped to


def uncertainty_source(store: OutputStore) -> tuple[str, str]:
    """``(map name, description)`` of the map whose object means rank objects (see module doc)."""
    maps = store.layout.maps
    for info in maps:
        if info.kind == "uncertainty":
            return info.name, f"mean {info.name.replace('_', ' ')} over the object"
    for info in maps:
        if info.kind == "background" and info.channels == 1:
            return info.name, f"mean {info.name.replace('_', ' ')} over the object"
    return PROBS, "mean of 1 − max class probability over the object"


def object_table(store: OutputStore) -> JobGenerator:
    """Per-object uncertainty, area and centroid over every block whose labels are written.

    Yields one :class:`Progress` (stage ``"objects"``) per block and returns a pandas DataFrame
    with columns :data:`FEATURE_COLUMNS` (``index`` = label id, centroid in level-0 pixels),
    sorted by label id; objects cut by block borders are merged by id.
    """
    import pandas as pd

    name, _ = uncertainty_source(store)
    shape = store.layout.image_shape
    size = store.layout.superblock
    regions = [r for r in block_regions(shape, (size, size)) if store.is_done(r, "labels")]
    parts = []
    for done, region in enumerate(regions, start=1):
        parts.append(_block_sums(store, name, region))
        yield Progress("objects", done, len(regions), "per-object uncertainty")
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    sums = np.concatenate([p[1] for p in parts], axis=1) if parts else np.zeros((4, 0))
    unique, inverse = np.unique(ids, return_inverse=True)
    total = np.stack([np.bincount(inverse, weights=row, minlength=unique.size) for row in sums]) \
        if unique.size else np.zeros((4, 0))
    area = total[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pd.DataFrame({
            "index": unique.astype(np.int64),
            "uncertainty": (total[1] / area).astype(np.float32),
            "area": area.astype(np.int64),
            "centroid_y": total[2] / area,
            "centroid_x": total[3] / area,
        })
    return table


def _block_sums(store: OutputStore, name: str, region) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of one block and, per id, ``[pixels, Σ uncertainty, Σ y, Σ x]``."""
    y0, y1, x0, x1 = region
    labels = np.asarray(store.labels()[y0:y1, x0:x1])
    mask = labels > 0
    if not mask.any():
        return np.zeros(0, np.int64), np.zeros((4, 0))
    values = store.read_map(name, region)
    values = 1.0 - values.max(axis=0) if name == PROBS else values[0]
    ids, inverse = np.unique(labels[mask], return_inverse=True)
    ys, xs = np.nonzero(mask)
    rows = [np.bincount(inverse, minlength=ids.size).astype(np.float64)]
    for weights in (values[mask], ys + y0, xs + x0):
        rows.append(np.bincount(inverse, weights=np.asarray(weights, np.float64), minlength=ids.size))
    return ids.astype(np.int64), np.stack(rows)


def ranked_objects(features) -> np.ndarray:
    """Row positions of a features table, most uncertain first (NaN last, ties by label id)."""
    if features is None or len(features) == 0 or "uncertainty" not in features:
        return np.zeros(0, np.int64)
    values = np.nan_to_num(np.asarray(features["uncertainty"], np.float64), nan=-np.inf)
    ids = np.asarray(features["index"], np.int64)
    return np.lexsort((ids, -values))


def object_view(row, layer, canvas_size) -> tuple[tuple[float, float], float]:
    """Camera ``(center (y, x) in world coordinates, zoom)`` showing one object with context.

    Args:
        row: a features row (``centroid_y``, ``centroid_x``, ``area`` in level-0 pixels).
        layer: the labels layer (its scale and translate map pixels to the world).
        canvas_size: ``(height, width)`` of the canvas in screen pixels.
    """
    center = layer.data_to_world((float(row["centroid_y"]), float(row["centroid_x"])))
    diameter = max(16.0, 2.0 * math.sqrt(float(row["area"]) / math.pi))
    world = diameter * CONTEXT * float(max(abs(s) for s in layer.scale[-2:]))
    low, high = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    world = min(world, float(np.max(high - low)))   # never zoom out beyond the whole layer
    zoom = min(canvas_size[-2:]) / max(world, 1e-9)
    return (float(center[-2]), float(center[-1])), zoom


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def view_region(viewer, layer) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` of a layer's level-0 pixels visible on the canvas, clipped to the
    layer; None when the view does not overlap it."""
    zoom = camera(viewer).zoom
    half = np.asarray(viewer.canvas.size[-2:], dtype=float) / (2.0 * zoom)
    cy, cx = camera(viewer).center[-2:]
    corners = [(cy + dy, cx + dx) for dy in (-half[0], half[0]) for dx in (-half[1], half[1])]
    ndim = layer.ndim
    point = list(viewer.dims.point[-ndim:]) if ndim > 2 else []
    pixels = np.array([layer.world_to_data((*point[:-2], y, x))[-2:] if ndim > 2
                       else layer.world_to_data((y, x)) for y, x in corners])
    height, width = layer.data[0].shape[-2:] if layer.multiscale else layer.data.shape[-2:]
    if getattr(layer, "rgb", False):
        height, width = (layer.data[0] if layer.multiscale else layer.data).shape[-3:-1]
    y0, x0 = np.floor(pixels.min(axis=0)).astype(int)
    y1, x1 = np.ceil(pixels.max(axis=0)).astype(int) + 1
    y0, x0, y1, x1 = max(0, y0), max(0, x0), min(height, y1), min(width, x1)
    return (int(y0), int(y1), int(x0), int(x1)) if y1 > y0 and x1 > x0 else None


# ----------------------------------------------------------------------------- edits
def edited_region(atoms, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, y1, x0, x1)`` of the pixels a napari ``Labels.events.paint`` changed.

    Accepts napari's paint atoms (with ``slice_key``) and older ``(indices, old, new)`` tuples.
    """
    boxes = []
    for atom in atoms or []:
        key = getattr(atom, "slice_key", None)
        if key is not None:
            ys, xs = key[-2:]
            boxes.append((ys.start or 0, shape[0] if ys.stop is None else ys.stop,
                          xs.start or 0, shape[1] if xs.stop is None else xs.stop))
        elif isinstance(atom, (tuple, list)) and atom and len(atom[0]) >= 2:
            ys, xs = (np.asarray(a) for a in atom[0][-2:])
            if ys.size:
                boxes.append((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    if not boxes:
        return None
    box = np.array(boxes)
    return (max(0, int(box[:, 0].min())), min(shape[0], int(box[:, 1].max())),
            max(0, int(box[:, 2].min())), min(shape[1], int(box[:, 3].max())))


def record_label_edit(store: OutputStore, region: tuple[int, int, int, int]) -> None:
    """After a brush stroke wrote ``labels/0``: rebuild the pyramid of the touched chunks and
    record the edit in the store (so re-runs never overwrite it unasked)."""
    chunk = store.layout.chunk
    height, width = store.layout.image_shape
    y0, y1, x0, x1 = region
    aligned = (y0 // chunk * chunk, min(height, -(-y1 // chunk) * chunk),
               x0 // chunk * chunk, min(width, -(-x1 // chunk) * chunk))
    store.refresh_pyramid(LABELS, aligned)
    edits = dict(store.attrs.get(EDITS_KEY) or {})
    cells = {tuple(c) for c in edits.get("chunks", [])}
    cells.update((cy, cx) for cy in range(aligned[0] // chunk, -(-aligned[1] // chunk))
                 for cx in range(aligned[2] // chunk, -(-aligned[3] // chunk)))
    edits.update(strokes=int(edits.get("strokes", 0)) + 1, chunks=sorted(list(c) for c in cells),
                 last=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    status = store.attrs["stages"].get(LABELS, "incomplete")
    # TODO(core.store): a first-class record of edited chunks; the root attributes do for now.
    store.set_stage_status(LABELS, status, **{EDITS_KEY: edits})


def labels_edited(store: OutputStore) -> bool:
    """Whether the user has painted on this store's labels."""
    return bool((store.attrs.get(EDITS_KEY) or {}).get("strokes"))
