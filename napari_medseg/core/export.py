"""Label export: label TIFF, OME-TIFF pyramid, per-object CSV and QuPath GeoJSON, all streamed.

:func:`export_labels` is the one entry point (widget, CLI and napari's File → Save Layers); each
format is a job generator yielding :class:`~napari_medseg.core.progress.Progress` and returning an
:class:`~napari_medseg.core.export_source.ExportResult`. Stopping the generator (Cancel) leaves
no file under the final name (see :func:`~napari_medseg.core.export_source.atomic_output`).

Label images (this module):

- **TIFF**: one tiled (256²), zlib-compressed page; uint16 when every ID fits, else uint32;
  BigTIFF automatically past 4 GB; the physical pixel size as TIFF resolution (pixels per cm).
- **OME-TIFF**: the same page plus a pyramid in sub-IFDs (each level the top-left pixel of every
  2×2 of the one above, so labels stay labels), OME-XML with the physical pixel size and the
  run's provenance (model, weights version and sha256, dates) as a ``MapAnnotation``.

Both read the labels twice: once to find their range (the pixel type must be chosen before the
first tile is written), once tile by tile to write them; memory stays at a few tiles and bands.
"""
from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import numpy as np

from .export_source import (SCAN_BLOCK, ExportError, ExportResult, LabelSource, RelabeledView,
                            atomic_output, export_warnings, open_label_source, scan_labels,
                            temporary_sibling, unit_info)
from .progress import JobGenerator
from .tiff_stream import TILE, TiffPage, write_tiled_tiff

FORMATS = {"tiff": ".tif", "ome-tiff": ".ome.tif", "geojson": ".geojson", "csv": ".csv"}
BIGTIFF_THRESHOLD = 2**32 - 2**25  # bytes; leave headroom under 4 GiB for tags and offsets
PYRAMID_SMALLEST = 256             # pyramid levels are added down to this longest side
PROVENANCE_NAMESPACE = "napari-medseg/provenance"
__all__ = ["FORMATS", "ExportError", "ExportResult", "LabelSource", "export_labels",
           "export_label_tiff", "export_ome_tiff", "label_dtype", "pyramid_shapes",
           "temporary_sibling"]   # temporary_sibling: also used for checkpoints


def label_dtype(max_label: int) -> np.dtype:
    """uint16 when the IDs fit, else uint32 (uint64 past 2**32 − 1, which few readers open)."""
    if max_label < 0:
        raise ExportError("labels must be non-negative integers")
    for dtype in (np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def pyramid_shapes(shape: tuple[int, int], smallest: int = PYRAMID_SMALLEST) -> list[tuple[int, int]]:
    """``(h, w)`` of level 0 and of every halving whose longest side is still ≥ ``smallest``."""
    height, width = shape
    shapes, level = [(height, width)], 1
    while max(-(-height // 2**level), -(-width // 2**level)) >= smallest:
        shapes.append((-(-height // 2**level), -(-width // 2**level)))
        level += 1
    return shapes


def export_labels(labels, path, fmt: str = "tiff", *, overwrite: bool = False, image=None,
                  pixel_size: float | None = None, **options) -> JobGenerator[ExportResult]:
    """Export labels in one of :data:`FORMATS`.

    Args:
        labels: a :class:`LabelSource`, a napari-medseg output store (path or object), a label
            image path, or a 2D integer array-like.
        path: destination file.
        fmt: ``"tiff"``, ``"ome-tiff"``, ``"geojson"`` or ``"csv"``.
        overwrite: replace an existing file; otherwise refuse.
        image: intensity image for ``mean_intensity`` (tables, GeoJSON): a path, an
            :class:`~napari_medseg.core.io.ImageSource` or an array of the labels' ``(H, W)``.
        pixel_size: physical pixel size in micrometres overriding what the labels carry.
        options: keywords of the format's exporter: ``relabel`` and ``block`` (all), ``tile``
            (TIFFs), ``smallest`` (OME-TIFF), ``classification`` (GeoJSON).

    Yields:
        :class:`Progress` records. Returns an :class:`ExportResult`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    source = labels if isinstance(labels, LabelSource) else open_label_source(labels)
    if pixel_size is not None:
        source = _with_pixel_size(source, pixel_size)
    if fmt == "tiff":
        return (yield from export_label_tiff(source, path, overwrite=overwrite, **options))
    if fmt == "ome-tiff":
        return (yield from export_ome_tiff(source, path, overwrite=overwrite, **options))
    if fmt == "csv":
        from .export_tables import export_object_csv

        return (yield from export_object_csv(source, path, overwrite=overwrite, image=image, **options))
    from .export_geojson import export_geojson

    return (yield from export_geojson(source, path, overwrite=overwrite, image=image, **options))


def _with_pixel_size(source: LabelSource, pixel_size: float) -> LabelSource:
    """A copy of ``source`` with a square pixel of ``pixel_size`` micrometres."""
    if not pixel_size > 0:
        raise ExportError(f"pixel size must be a positive number of micrometres, got {pixel_size}")
    return dataclasses.replace(source, pixel_size=(float(pixel_size),) * 2, unit="micrometer")


def export_label_tiff(labels, path, overwrite: bool = False, pixel_size_um: float | None = None,
                      tile: int = TILE, block: int = SCAN_BLOCK,
                      relabel: bool = False) -> JobGenerator[ExportResult]:
    """Write labels to a tiled, zlib-compressed TIFF, tile by tile.

    Args:
        labels: a :class:`LabelSource` or anything :func:`open_label_source` takes; ``(H, W)``
            integer labels, 0 = background.
        path: destination ``.tif``.
        overwrite: replace an existing file; otherwise refuse.
        pixel_size_um: physical pixel size (µm) overriding the source's, written as the TIFF
            resolution (pixels per centimetre).
        tile: tile edge in pixels (multiple of 16).
        block: edge of the blocks the labels are checked in.
        relabel: renumber the objects 1..N in ID order (the check collects the IDs), so that
            more files fit uint16 and Fiji's 32-bit float view of the IDs stays exact.

    Yields:
        Progress while checking (per block) and writing (per row of tiles).
        Returns an :class:`ExportResult`.
    """
    source = _source(labels, pixel_size_um)
    with atomic_output(path, overwrite) as tmp:
        found = yield from scan_labels(source, block, collect_ids=relabel)
        high, level = _relabeled(source, found)
        dtype = label_dtype(high)
        size = _bytes([source.shape], dtype)
        page = TiffPage(level(0), {"resolution": _resolution(source), "resolutionunit": 3}
                        if source.physical else {}, "labels")
        yield from write_tiled_tiff(tmp, [page], dtype, tile=tile, bigtiff=size > BIGTIFF_THRESHOLD)
    return ExportResult(Path(path), "tiff", max_label=high, dtype=dtype.name,
                        warnings=_warnings(source, high, dtype))


def export_ome_tiff(labels, path, overwrite: bool = False, tile: int = TILE,
                    smallest: int = PYRAMID_SMALLEST, block: int = SCAN_BLOCK,
                    relabel: bool = False) -> JobGenerator[ExportResult]:
    """Write labels to a tiled OME-TIFF with a nearest-neighbour pyramid in sub-IFDs.

    Args:
        labels: a :class:`LabelSource` (or what :func:`open_label_source` takes).
        path: destination, conventionally ``.ome.tif``.
        overwrite: replace an existing file; otherwise refuse.
        tile: tile edge in pixels.
        smallest: pyramid levels are added while their longest side is ≥ this.
        block: edge of the blocks the labels are checked in.
        relabel: renumber the objects 1..N in ID order (the check collects the IDs), so that
            more files fit uint16 and Fiji's 32-bit float view of the IDs stays exact.

    Level ``l`` is ``labels[::2**l, ::2**l]``, read from the output store's own labels pyramid
    when there is one, else from level 0 with a step.

    Yields:
        Progress while checking and writing (per row of tiles of every level).
        Returns an :class:`ExportResult`.
    """
    source = _source(labels, None)
    shapes = pyramid_shapes(source.shape, smallest)
    with atomic_output(path, overwrite) as tmp:
        found = yield from scan_labels(source, block, collect_ids=relabel)
        high, level = _relabeled(source, found)
        dtype = label_dtype(high)
        first = {"subifds": len(shapes) - 1, "metadata": ome_metadata(source),
                 **({"resolution": _resolution(source), "resolutionunit": 3} if source.physical else {})}
        pages = [TiffPage(level(0), first, "level 0")]
        pages += [TiffPage(level(index), {"subfiletype": 1}, f"level {index}")
                  for index in range(1, len(shapes))]
        yield from write_tiled_tiff(tmp, pages, dtype, tile=tile, ome=True,
                                    bigtiff=_bytes(shapes, dtype) > BIGTIFF_THRESHOLD)
    return ExportResult(Path(path), "ome-tiff", max_label=high, dtype=dtype.name,
                        warnings=_warnings(source, high, dtype))


def ome_metadata(source: LabelSource) -> dict:
    """tifffile's OME metadata: axes, name, physical pixel size and the run's provenance."""
    name = source.name if source.name.endswith("labels") else f"{source.name} labels"
    meta = {"axes": "YX", "Name": name}
    if source.physical:
        size_y, size_x, symbol = source.physical
        meta.update(PhysicalSizeX=size_x, PhysicalSizeXUnit=symbol,
                    PhysicalSizeY=size_y, PhysicalSizeYUnit=symbol)
    meta["MapAnnotation"] = {"Namespace": PROVENANCE_NAMESPACE, "Value": provenance_fields(source)}
    return meta


def provenance_fields(source: LabelSource) -> dict[str, str]:
    """Text fields saying what made the labels and this file."""
    from napari_medseg import __version__

    run = source.provenance
    fields = {"content": "instance labels, 0 = background", "source": source.origin or source.name,
              **source.run_columns(), "run_date": str(run.get("date") or ""),
              "run_package_version": str(run.get("package_version") or ""),
              "exported_by": f"napari-medseg {__version__}",
              "export_date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return {key: value for key, value in fields.items() if value}


def _relabeled(source: LabelSource, found) -> tuple[int, object]:
    """Largest ID written and a function giving pyramid level ``l`` as written (renumbered when
    the scan collected the IDs)."""
    if found.ids is None:
        return found.high, source.level
    return int(found.ids.size - 1), lambda level: RelabeledView(source.level(level), found.ids)


def _source(labels, pixel_size_um: float | None) -> LabelSource:
    source = labels if isinstance(labels, LabelSource) else open_label_source(labels)
    return _with_pixel_size(source, pixel_size_um) if pixel_size_um else source


def _resolution(source: LabelSource) -> tuple[float, float]:
    """``(x, y)`` pixels per centimetre."""
    size_y, size_x = source.pixel_size
    _, cm = unit_info(source.unit or "micrometer")
    return 1.0 / (size_x * cm), 1.0 / (size_y * cm)


def _bytes(shapes, dtype: np.dtype) -> int:
    return sum(h * w for h, w in shapes) * dtype.itemsize


def _warnings(source: LabelSource, max_label: int, dtype: np.dtype) -> tuple[str, ...]:
    warnings = list(export_warnings(source, max_label))
    if dtype == np.uint64:
        warnings.append("label IDs exceed 4,294,967,295 and were written as uint64, which Fiji and "
                        "QuPath cannot open; relabel the objects sequentially before exporting")
    return tuple(warnings)
