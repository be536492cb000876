"""Per-object measurements computed block by block, and their export as a CSV table.

The labels are read in blocks of :data:`~napari_medseg.core.export_source.SCAN_BLOCK` pixels;
each block contributes, per label ID it contains, sums that merge exactly across blocks
(pixel count, Σy, Σx, Σ intensity, Σ uncertainty) and a bounding box (min/max merge), so an
object cut by block borders gets the same numbers as if the image were measured whole
(``skimage.measure.regionprops`` conventions: centroid = mean pixel coordinate, bounding box
``[y0, y1) × [x0, x1)``, equivalent diameter = ``sqrt(4 · area / π)``).

Memory: one block of labels and its per-pixel work arrays (~30 MB for 1024² blocks), plus the
per-object table, which grows with the number of objects, not with the image.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .export_source import (SCAN_BLOCK, ExportError, ExportResult, LabelSource,
                            atomic_output, check_not_negative, export_warnings, open_label_source)
from .blockwise import block_regions
from .progress import JobGenerator, Progress

CSV_ROWS_PER_STEP = 20_000      # rows written between two progress records


@dataclass
class ObjectTable:
    """Measurements of every object, sorted by label ID.

    Attributes:
        label: ``(n,) int64`` label IDs.
        area: ``(n,) int64`` pixel counts.
        centroid: ``(n, 2) float64`` mean ``(y, x)`` pixel coordinate.
        bbox: ``(n, 4) int64`` ``(y0, x0, y1, x1)``, ends exclusive.
        means: ``{column: (n,) float64}`` mean intensity per channel and mean uncertainty per map.
        pixel_size: ``(y, x, unit symbol)`` of a pixel, or None.
        run: ``{"model", "weights_version", "weights_sha256"}`` text, or ``{}``.
        original: ``(n,) int64`` IDs in the labels when ``label`` was renumbered 1..n, else None.
    """

    label: np.ndarray
    area: np.ndarray
    centroid: np.ndarray
    bbox: np.ndarray
    means: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_size: tuple | None = None
    run: dict[str, str] = field(default_factory=dict)
    original: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.label.size)

    def columns(self) -> dict[str, np.ndarray]:
        """Column name → values, in the CSV's column order."""
        diameter = np.sqrt(4.0 * self.area / np.pi)
        cols = {"label": self.label} if self.original is None else {
            "label": self.label, "original_label": self.original}
        cols.update({"area": self.area, "centroid_y": self.centroid[:, 0],
                "centroid_x": self.centroid[:, 1], "bbox_y0": self.bbox[:, 0], "bbox_x0": self.bbox[:, 1],
                "bbox_y1": self.bbox[:, 2], "bbox_x1": self.bbox[:, 3], "equivalent_diameter": diameter})
        if self.pixel_size is not None:
            size_y, size_x, symbol = self.pixel_size
            unit = symbol.replace("µ", "u")
            cols[f"area_{unit}2"] = self.area * size_y * size_x
            cols[f"equivalent_diameter_{unit}"] = diameter * np.sqrt(size_y * size_x)
        cols.update(self.means)
        for key, value in self.run.items():
            cols[key] = np.full(len(self), value, dtype=object)
        return cols

    @property
    def ids_in_labels(self) -> np.ndarray:
        """``(n,)`` IDs as they are in the label image."""
        return self.label if self.original is None else self.original

    def renumbered(self) -> "ObjectTable":
        """The same table with labels 1..n in ID order (the originals kept in ``original``)."""
        return dataclasses.replace(self, label=np.arange(1, len(self) + 1, dtype=np.int64),
                                   original=self.ids_in_labels)

    def numeric_columns(self) -> dict[str, np.ndarray]:
        """The numeric columns only (what GeoJSON features carry as measurements)."""
        return {key: column for key, column in self.columns().items() if column.dtype != object}


def open_intensity(image, shape: tuple[int, int]):
    """An :class:`~napari_medseg.core.io.ImageSource` of the intensity image, checked against the
    labels' ``(H, W)``."""
    from .io import ImageInputError, open_image

    try:
        source = open_image(image)
    except ImageInputError as exc:
        raise ExportError(f"cannot read the intensity image: {exc}") from None
    if tuple(source.shape) != tuple(shape):
        raise ExportError(f"the intensity image is {source.shape[0]}×{source.shape[1]} but the labels "
                          f"are {shape[0]}×{shape[1]}; choose the image the labels were made from")
    return source


def measure_objects(source: LabelSource, image=None, block: int = SCAN_BLOCK) -> JobGenerator[ObjectTable]:
    """Measure every object block by block.

    Args:
        source: labels (and uncertainty maps, when the run stored some).
        image: optional intensity image (path, ImageSource or array) of the labels' ``(H, W)``.
        block: block edge in pixels.

    Yields:
        One :class:`Progress` (stage ``"measuring"``) per block. Returns an :class:`ObjectTable`.
    """
    intensity = open_intensity(image, source.shape) if image is not None else None
    regions = block_regions(source.shape, (block, block))
    parts = []
    for done, region in enumerate(regions, start=1):
        part = _measure_block(source, intensity, region)
        if part is not None:
            parts.append(part)
        yield Progress("measuring", done, len(regions), "measuring objects")
    names = _mean_names(source, intensity)
    return _merge(parts, names, source)


def _mean_names(source: LabelSource, intensity) -> list[str]:
    names = []
    if intensity is not None:
        names += (["mean_intensity"] if intensity.channels == 1 else
                  [f"mean_intensity_c{c}" for c in range(intensity.channels)])
    for name, reader in source.uncertainty.items():
        channels = reader((0, 1, 0, 1)).shape[0]
        names += [f"mean_{name}"] if channels == 1 else [f"mean_{name}_c{c}" for c in range(channels)]
    return names


def _measure_block(source: LabelSource, intensity, region) -> dict | None:
    """Per-ID sums and global bounding boxes of the objects in one block (None when empty)."""
    from scipy import ndimage

    y0, y1, x0, x1 = region
    labels = np.asarray(source.labels[y0:y1, x0:x1])
    if labels.dtype.kind == "i":
        check_not_negative(int(labels.min()))
    if not labels.any():
        return None
    ids = np.unique(labels)               # a plain sort: far faster than return_inverse's argsort
    inverse = np.searchsorted(ids, labels)
    del labels
    counts = np.bincount(inverse.ravel(), minlength=ids.size)
    has_background = ids[0] == 0
    boxes = ndimage.find_objects(inverse if has_background else inverse + 1)
    first = 1 if has_background else 0
    flat = inverse.ravel()
    rows = np.broadcast_to(np.arange(y0, y1, dtype=np.float64)[:, None], inverse.shape).ravel()
    sums = [np.bincount(flat, weights=rows, minlength=ids.size)]
    del rows
    cols = np.broadcast_to(np.arange(x0, x1, dtype=np.float64)[None, :], inverse.shape).ravel()
    sums.append(np.bincount(flat, weights=cols, minlength=ids.size))
    del cols
    for values in _pixel_values(source, intensity, region):
        sums.append(np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=ids.size))
    bbox = np.array([(s[0].start + y0, s[1].start + x0, s[0].stop + y0, s[1].stop + x0)
                     for s in boxes], dtype=np.int64).reshape(-1, 4)
    return {"ids": ids[first:].astype(np.int64), "counts": counts[first:].astype(np.int64),
            "sums": np.stack(sums)[:, first:], "bbox": bbox}


def _pixel_values(source: LabelSource, intensity, region):
    """``(h, w)`` planes averaged per object: intensity channels, then every uncertainty channel."""
    y0, y1, x0, x1 = region
    if intensity is not None:
        yield from intensity.read_region(y0, y1, x0, x1)
    for reader in source.uncertainty.values():
        yield from reader(region)


def _merge(parts: list[dict], names: list[str], source: LabelSource) -> ObjectTable:
    """Merge per-block sums and boxes by label ID."""
    table_run = source.run_columns() if source.provenance.get("model") else {}
    if not parts:
        empty = np.zeros(0, np.int64)
        return ObjectTable(empty, empty, np.zeros((0, 2)), np.zeros((0, 4), np.int64),
                           {name: np.zeros(0) for name in names}, source.physical, table_run)
    ids = np.concatenate([p["ids"] for p in parts])
    unique, inverse = np.unique(ids, return_inverse=True)
    area = np.bincount(inverse, weights=np.concatenate([p["counts"] for p in parts]),
                       minlength=unique.size).astype(np.int64)
    sums = np.concatenate([p["sums"] for p in parts], axis=1)
    totals = np.stack([np.bincount(inverse, weights=row, minlength=unique.size) for row in sums])
    boxes = np.concatenate([p["bbox"] for p in parts])
    bbox = np.empty((unique.size, 4), np.int64)
    bbox[:, :2] = np.iinfo(np.int64).max
    bbox[:, 2:] = -1
    for axis in (0, 1):
        np.minimum.at(bbox[:, axis], inverse, boxes[:, axis])
        np.maximum.at(bbox[:, axis + 2], inverse, boxes[:, axis + 2])
    means = {name: totals[2 + i] / area for i, name in enumerate(names)}
    return ObjectTable(unique.astype(np.int64), area, (totals[:2] / area).T, bbox, means,
                       source.physical, table_run)


def export_object_csv(labels, path, overwrite: bool = False, image=None, block: int = SCAN_BLOCK,
                      relabel: bool = False) -> JobGenerator[ExportResult]:
    """Write one CSV row per object (see :meth:`ObjectTable.columns` for the columns).

    Args:
        labels: a :class:`LabelSource` or what :func:`open_label_source` takes.
        path: destination ``.csv``.
        overwrite: replace an existing file; otherwise refuse.
        image: optional intensity image for ``mean_intensity`` columns.
        block: measuring block edge in pixels.
        relabel: number the objects 1..N as a relabelled TIFF export does (column
            ``original_label`` keeps the IDs of the labels).

    Yields:
        Progress while measuring (per block) and writing (per :data:`CSV_ROWS_PER_STEP` rows).
        Returns an :class:`ExportResult` with the number of objects.
    """
    import pandas as pd

    source = labels if isinstance(labels, LabelSource) else open_label_source(labels)
    with atomic_output(path, overwrite) as tmp:
        table = yield from measure_objects(source, image, block)
        table = table.renumbered() if relabel else table
        frame = pd.DataFrame(table.columns())
        steps = max(1, -(-len(frame) // CSV_ROWS_PER_STEP))
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            for step in range(steps):
                rows = frame.iloc[step * CSV_ROWS_PER_STEP:(step + 1) * CSV_ROWS_PER_STEP]
                rows.to_csv(out, header=step == 0, index=False, lineterminator="\n")
                yield Progress("writing", step + 1, steps, f"{len(rows)} rows")
    max_label = int(table.label.max()) if len(table) else 0
    return ExportResult(Path(path), "csv", objects=len(table), max_label=max_label,
                        warnings=export_warnings(source, max_label))

