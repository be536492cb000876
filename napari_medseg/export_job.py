"""The Export labels job (Qt-free): what the widget, napari's File → Save Layers and the CLI run.

A napari labels layer becomes a :class:`~napari_medseg.core.export_source.LabelSource`: when it
shows a napari-medseg output store (its ``metadata["medseg"]["output"]``), the store itself is
exported, with its pyramid, pixel size, provenance and uncertainty maps; any other labels layer is
exported from its data, with its scale as pixel size (micrometres unless the layer has units).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core.export import FORMATS, export_labels
from .core.export_source import ExportError, ExportResult, LabelSource, store_source
from .core.progress import JobGenerator
from .core.store import OutputStore, is_engine_store

KNOWN_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".geojson", ".json", ".csv")
FORMAT_TITLES = {"tiff": "Label TIFF", "ome-tiff": "OME-TIFF with pyramid",
                 "geojson": "GeoJSON polygons (QuPath)", "csv": "Object table (CSV)"}


@dataclass(frozen=True)
class ExportRequest:
    """One export.

    Attributes:
        labels: a :class:`LabelSource`, an output store path, a label image path or a 2D array.
        output: destination file.
        format: a key of :data:`~napari_medseg.core.export.FORMATS`.
        overwrite: replace an existing file.
        image: intensity image for ``mean_intensity`` (ImageSource, path or array), or None.
        pixel_size: micrometres per pixel overriding the labels' own, or None.
        relabel: renumber the objects 1..N in ID order (same numbers in every format).
    """

    labels: object
    output: Path
    format: str = "tiff"
    overwrite: bool = False
    image: object = None
    pixel_size: float | None = None
    relabel: bool = False


def export_job(request: ExportRequest) -> JobGenerator[ExportResult]:
    """Run one export (see :func:`~napari_medseg.core.export.export_labels`)."""
    return (yield from export_labels(request.labels, request.output, request.format,
                                     overwrite=request.overwrite, image=request.image,
                                     pixel_size=request.pixel_size, relabel=request.relabel))


def source_from_layer(layer) -> LabelSource:
    """The labels of a napari layer; refuses any layer that is not a Labels layer."""
    from napari.layers import Labels   # plugin widgets get proxies: isinstance sees through them

    if not isinstance(layer, Labels):
        kind = layer.__class__.__name__
        raise ExportError(f"{layer.name!r} is a {kind.lower()} layer, not labels; choose a labels "
                          "layer (napari: right-click an integer image → Convert to Labels)")
    return source_from_layer_data(layer.data, {
        "name": layer.name, "scale": layer.scale, "units": layer.units,
        "metadata": layer.metadata, "multiscale": layer.multiscale})


def source_from_layer_data(data, meta: dict) -> LabelSource:
    """The labels of a layer given as napari's ``(data, meta)`` (what writers receive)."""
    level0 = data[0] if meta.get("multiscale") or isinstance(data, list) else data
    name = str(meta.get("name") or "labels")
    info = (meta.get("metadata") or {}).get("medseg")
    output = info.get("output") if isinstance(info, dict) else None
    if output and is_engine_store(output):
        source = store_source(OutputStore.open(output, mode="r"))
        if tuple(source.shape) == tuple(level0.shape[-2:]):
            source.name = name
            return source
    pixel_size, unit = _pixel_size(meta)
    return LabelSource(level0, name, pixel_size=pixel_size, unit=unit, origin="napari layer")


def _pixel_size(meta: dict) -> tuple[tuple[float, float] | None, str | None]:
    """Scale and unit of a layer's last two axes; a scale without units counts as micrometres."""
    scale = meta.get("scale")
    if scale is None:
        return None, None
    size = tuple(float(s) for s in list(scale)[-2:])
    units = [str(u) for u in list(meta.get("units") or [])[-2:]]
    unit = units[-1] if units and units[-1] not in ("pixel", "", "None") else None
    if unit is None and size == (1.0, 1.0):
        return None, None
    return size, unit or "micrometer"


def output_for(path, fmt: str) -> Path:
    """``path`` with the format's suffix (``.tif``, ``.ome.tif``, ``.geojson``, ``.csv``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path).expanduser()
    name = path.name
    for suffix in KNOWN_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name((name or "labels") + FORMATS[fmt])


def default_output(source: LabelSource, fmt: str, folder=None) -> Path:
    """``<folder>/<labels name><suffix>``; the folder defaults to the store's or image's own."""
    if folder is None:
        origin = Path(source.origin) if source.origin and source.origin not in ("array", "napari layer") \
            else None
        folder = origin.parent if origin is not None else Path.home()
    return output_for(Path(folder) / _safe(source.name), fmt)


def format_for_path(path) -> str:
    """The export format a file name asks for (``.ome.tif`` → OME-TIFF, else by suffix)."""
    name = str(path).lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome-tiff"
    if name.endswith((".geojson", ".json")):
        return "geojson"
    if name.endswith(".csv"):
        return "csv"
    return "tiff"


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "labels"
