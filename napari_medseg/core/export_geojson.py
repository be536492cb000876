"""Instance polygons as a GeoJSON FeatureCollection of QuPath detection objects, block by block.

Two passes over the labels, neither holding the whole image:

1. :func:`~napari_medseg.core.export_tables.measure_objects` finds every object's bounding box
   and measurements block by block;
2. objects are grouped by the block holding their bounding box's top-left corner; each group is
   traced from one crop of the labels covering all its boxes (objects larger than a block are read
   on their own), and features are written to the file as they are made.

Geometry: the outline of each object's pixels, traced with marching squares at level 0.5 on the
object's mask (``skimage.measure.find_contours``) and shifted by half a pixel, so vertices lie on
pixel edges in QuPath's coordinates (pixel ``(y, x)`` covers ``[x, x+1] × [y, y+1]``; x first as
GeoJSON wants); convex corners are cut by half-pixel diagonals and collinear vertices dropped.
Holes become inner rings and disconnected pieces of one label a ``MultiPolygon``.

Properties follow QuPath (≥ 0.4): ``objectType: "detection"``, ``measurements`` (the CSV's
numeric columns), an optional ``classification``; the label ID and the model travel along for
other readers, the run's provenance in the collection's ``napari_medseg`` member.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from .export_source import (SCAN_BLOCK, ExportResult, LabelSource, atomic_output,
                            export_warnings, open_label_source)
from .export_tables import ObjectTable, measure_objects
from .progress import JobGenerator, Progress

CLASS_COLOR = [255, 0, 0]


def object_geometry(mask: np.ndarray, origin: tuple[int, int]) -> dict:
    """The GeoJSON geometry of one object.

    Args:
        mask: ``(h, w) bool`` pixels of the object inside its bounding box.
        origin: ``(y, x)`` of the box's top-left pixel in the image.

    Returns:
        ``{"type": "Polygon" | "MultiPolygon", "coordinates": ...}`` with ``[x, y]`` vertices in
        image pixels, rings closed, holes as inner rings.
    """
    from scipy import ndimage

    padded = np.pad(mask, 1)
    pieces, count = ndimage.label(padded, structure=np.ones((3, 3), bool))
    polygons = []
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
        ys, xs = box
        piece = np.pad(pieces[ys, xs] == index, 1)
        offset = (origin[0] + ys.start - 2 + 0.5, origin[1] + xs.start - 2 + 0.5)
        polygons.append(_rings(piece, offset))
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def _rings(piece: np.ndarray, offset: tuple[float, float]) -> list:
    """Outer ring first, then holes, of one 8-connected piece, as ``[[x, y], ...]`` lists."""
    from skimage.measure import find_contours

    contours = find_contours(piece.astype(np.uint8), 0.5, fully_connected="high")
    contours.sort(key=lambda c: -abs(_area(c)))
    rings = []
    for contour in contours:
        simple = drop_collinear(contour)
        rings.append(np.column_stack([simple[:, 1] + offset[1], simple[:, 0] + offset[0]]).tolist())
    return rings


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ``(n, 2)`` ring (first point = last) without the vertices lying on a straight line
    between their neighbours; the outline is unchanged (vertices sit on a half-pixel grid, so the
    test is exact)."""
    points = ring[:-1]
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = ((points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1])
             - (points[:, 1] - before[:, 1]) * (after[:, 0] - points[:, 0]))
    kept = points[np.abs(cross) > 1e-9]
    return np.vstack([kept, kept[:1]])


def _area(contour: np.ndarray) -> float:
    y, x = contour[:, 0], contour[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def trace_groups(table: ObjectTable, block: int) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Objects grouped for tracing: ``[(crop region (y0, y1, x0, x1), object indices)]``.

    Objects are grouped by the block of their box's top-left pixel; a group's crop covers all its
    boxes (at most 2·``block`` square). Objects taller or wider than ``block`` form their own
    group, so no crop grows with the image.
    """
    groups = []
    if not len(table):
        return groups
    y0, x0, y1, x1 = table.bbox.T
    big = ((y1 - y0) > block) | ((x1 - x0) > block)
    keys = (y0 // block) * (int(x0.max()) // block + 1) + x0 // block
    small = np.flatnonzero(~big)
    order = small[np.argsort(keys[small], kind="stable")]
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    for members in np.split(order, bounds):
        if members.size:
            groups.append(((int(y0[members].min()), int(y1[members].max()),
                            int(x0[members].min()), int(x1[members].max())), members))
    for index in np.flatnonzero(big):
        groups.append(((int(y0[index]), int(y1[index]), int(x0[index]), int(x1[index])),
                       np.array([index])))
    return groups


def export_geojson(labels, path, overwrite: bool = False, image=None, block: int = SCAN_BLOCK,
                   classification: str | None = None,
                   relabel: bool = False) -> JobGenerator[ExportResult]:
    """Write every object as a QuPath detection feature of a GeoJSON FeatureCollection.

    Args:
        labels: a :class:`LabelSource` or what :func:`open_label_source` takes.
        path: destination ``.geojson``.
        overwrite: replace an existing file; otherwise refuse.
        image: optional intensity image for ``mean_intensity`` measurements.
        block: block edge (pixels) of both passes.
        classification: QuPath class name given to every object (e.g. ``"Nucleus"``), or None.
        relabel: number the objects 1..N as a relabelled TIFF export does (measurement
            ``original_label`` keeps the IDs of the labels).

    Yields:
        Progress while measuring (per block) and tracing (per group of objects).
        Returns an :class:`ExportResult` with the number of features.
    """
    source = labels if isinstance(labels, LabelSource) else open_label_source(labels)
    with atomic_output(path, overwrite) as tmp:
        table = yield from measure_objects(source, image, block)
        table = table.renumbered() if relabel else table
        groups = trace_groups(table, block)
        columns = table.numeric_columns()
        header = {"type": "FeatureCollection", "napari_medseg": _collection_info(source)}
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(json.dumps(header, allow_nan=False)[:-1] + ', "features": [')
            written = 0
            for done, (region, members) in enumerate(groups, start=1):
                crop = np.asarray(source.labels[region[0]:region[1], region[2]:region[3]])
                for index in members:
                    feature = _feature(table, columns, int(index), crop, region, classification)
                    out.write(("\n" if not written else ",\n") + json.dumps(feature, allow_nan=False))
                    written += 1
                yield Progress("tracing", done, len(groups), f"{written} of {len(table)} objects")
            out.write("\n]}\n")
    max_label = int(table.label.max()) if len(table) else 0
    return ExportResult(Path(path), "geojson", objects=len(table), max_label=max_label,
                        warnings=export_warnings(source, max_label))


def _feature(table: ObjectTable, columns: dict, index: int, crop: np.ndarray, region,
             classification: str | None) -> dict:
    y0, x0, y1, x1 = (int(v) for v in table.bbox[index])
    label = int(table.label[index])
    inside = crop[y0 - region[0]:y1 - region[0], x0 - region[2]:x1 - region[2]]
    mask = inside == table.ids_in_labels[index]
    measurements = {key: column[index].item() for key, column in columns.items()
                    if np.isfinite(column[index])}
    properties = {"objectType": "detection", "label": label, "measurements": measurements}
    if classification:
        properties["classification"] = {"name": classification, "color": CLASS_COLOR}
    if table.run:
        properties["model"] = table.run.get("model", "")
    return {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": object_geometry(mask, (y0, x0)), "properties": properties}


def _collection_info(source: LabelSource) -> dict:
    from .export import provenance_fields

    info = {"coordinates": "image pixels, x right, y down, origin at the top-left pixel's corner",
            **provenance_fields(source)}
    if source.physical:
        info["pixel_size"] = {"y": source.physical[0], "x": source.physical[1], "unit": source.physical[2]}
    return info
